from pathlib import Path

from setuptools import find_packages, setup

HF = ["transformers>=5.0", "safetensors", "gguf>=0.10", "accelerate>=0.26"]  # tested: 5.23.0, gguf 0.19.0
EVAL = ["lm-eval==0.4.13", "datasets>=2.16", "accelerate>=0.26", "transformers>=5.0"]

setup(
    name="megatron-let",
    version="0.1.0",
    description="Late-to-Early Training (LET) for NVIDIA megatron-core: a small frozen teacher "
                "guides the early layers of a large GPT in the first steps of 3D-parallel pretraining",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_let", "megatron_let.*"]),
    install_requires=[
        # Tested with 0.16.1; megatron_let.platform.cpu and checkpoint code touch its internals.
        "megatron-core>=0.16.1,<0.17",
        "torch>=2.6",
        "numpy",
        "pyyaml",
        "psutil",  # megatron's dist-checkpoint writer imports it without declaring it
        "tensorboard",
        "sentencepiece>=0.2",  # tokenizer training and SentencePieceTokenizer preprocessing
        "tokenizers>=0.19",  # GPT2BPETokenizer / HuggingFaceTokenizer preprocessing
        "matplotlib",  # quickstart plots
        "tqdm",  # progress of conversions, downloads and extraction (on a terminal)
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]"],
        "hf": HF,
        "eval": EVAL,
        "test": ["pytest>=8", "pytest-timeout", "ruff==0.17.6", "mypy==2.4.1"] + HF + EVAL,
    },
    entry_points={"console_scripts": ["megatron-let=megatron_let.cli:main"]},
)
