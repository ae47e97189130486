"""Model card template (`README.md.j2`) and shared card metadata (`variants.yaml`) for `python -m train push`.

Each named data set's own card metadata is its entry in `train/infra/registry.py`.

Data files only, read by `train/commands/card.py` and `space.py` from this folder; the `__init__.py` lets setuptools ship them in wheels.
"""
