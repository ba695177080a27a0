from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="lit-adapter",
    version="0.1.0",
    description="Parameter-efficient fine-tuning research on LLaMA-family models with Lightning Fabric",
    long_description=(Path(__file__).parent / "README.md").read_text() if (Path(__file__).parent / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lit_adapter", "lit_adapter.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "lightning>=2.4",
        "sentencepiece>=0.2",
        "protobuf",
        "bitsandbytes>=0.46",
        "wandb",
        "tensorboard",
        "jsonargparse[signatures]>=4.30",
        "datasets>=2.18",
        "safetensors",
        "huggingface_hub",
        "tqdm",
        "matplotlib",
        "psutil",
        "pyyaml",
    ],
    extras_require={
        "dev": ["pytest", "pytest-xdist", "transformers>=4.40", "peft>=0.10", "lm-eval>=0.4", "trl>=1.0", "scikit-learn"],
    },
)
