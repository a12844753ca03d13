"""ordmoe-megatron: OrdMoE expert-rank training for Megatron-Core MoE models.

torch is deliberately *not* listed in install_requires: megatron-core already requires
torch>=2.6 and the README's install step puts in the CPU wheel (torch==2.13.0) first, or keeps a
CUDA build that is already installed. Listing torch here could make pip resolve a CUDA wheel.
megatron-core 0.18 on import triton at import time (it does not pull torch).
"""

import ast
from pathlib import Path

from setuptools import find_packages, setup


def _version() -> str:
    """The one version string, ``ordmoe_megatron.__version__`` (read without importing the package)."""
    tree = ast.parse((Path(__file__).parent / "ordmoe_megatron" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__version__"]:
            return node.value.value
    raise RuntimeError("ordmoe_megatron/__init__.py defines no __version__")


setup(
    name="ordmoe-megatron",
    version=_version(),
    description="OrdMoE (routing-score tier ranking) for Megatron-Core expert-parallel training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ordmoe_megatron", "ordmoe_megatron.*"]),
    python_requires=">=3.10",
    # megatron-core 0.16.1 up to 0.19.x (runtime/compat.py); 0.17 on declare Python >= 3.12, so on
    # Python 3.11 pip resolves 0.16.1.
    install_requires=["megatron-core>=0.16.1,<0.20", "sentencepiece", "numpy", "psutil", "matplotlib"],
    extras_require={
        "convert": ["transformers", "safetensors"],
        "test": ["pytest", "transformers", "safetensors", "ruff==0.17.6"],
        "te": ["transformer-engine[pytorch]"],
        # What Megatron-LM's megatron.training needs beyond megatron-core (for its tests here).
        "megatron-lm": ["triton", "pybind11", "six"],
    },
    entry_points={
        "console_scripts": [
            "ordmoe-pretrain=ordmoe_megatron.entrypoints:pretrain",
            "ordmoe-tier-report=ordmoe_megatron.entrypoints:tier_report",
            "ordmoe-sweep=ordmoe_megatron.entrypoints:sweep",
        ]
    },
)
