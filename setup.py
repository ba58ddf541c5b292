"""megalong: long-context continued pretraining and SFT (ProLong, LongAlign) on megatron-core.

Ranges here are what cluster containers (NGC: torch, TE, apex preinstalled) already satisfy, so
installing megalong never reinstalls torch. The dev/CI pins live in constraints.txt (used by make).
"""
from setuptools import find_packages, setup

setup(
    name="megalong",
    version="0.1.0",
    description="Long-context (64K-512K) training recipes on megatron-core",
    packages=find_packages(include=["megalong", "megalong.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.20",
        "psutil",  # undeclared by megatron-core; dist_checkpointing hangs without it
        "numpy",
        "sentencepiece",
        "tokenizers",
        "safetensors",
        "wandb",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist>=3.6", "transformers", "matplotlib", "zstandard", "pyarrow",
                 "gigatoken"],
        "data": ["zstandard", "pyarrow", "matplotlib", "gigatoken", "transformers"],
        "eval": ["transformers", "matplotlib"],
        "gpu": ["transformer-engine", "flash-attn", "nvidia-cudnn-frontend"],
    },
    entry_points={"console_scripts": ["megalong=megalong.cli:main"]},
)
