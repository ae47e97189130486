"""Model card template (`README.md.j2`) and per-variant metadata (`variants.yaml`) for `python -m train push`.

Data files only, read by `train/publish.py` from this folder; the `__init__.py` lets setuptools ship them in wheels.
"""
