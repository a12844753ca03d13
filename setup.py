"""ordmoe-megatron: OrdMoE expert-rank training for Megatron-Core MoE models.

torch is deliberately *not* listed in install_requires: megatron-core already requires
torch>=2.6 and the README's install step puts in the CPU wheel (torch==2.13.0) first, or keeps a
CUDA build that is already installed. Listing torch here could make pip resolve a CUDA wheel.
megatron-core 0.18 on import triton at import time (it does not pull torch).
"""

import ast
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def megatron_core_requirement() -> str:
    """``megatron-core>=LOW,<HIGH`` from ``SUPPORTED`` in ordmoe_megatron/runtime/compat.py, the one
    statement of the range (read with ast: compat imports megatron, which is not installed yet)."""
    with open(os.path.join(HERE, "ordmoe_megatron", "runtime", "compat.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SUPPORTED" for t in node.targets):
            low, high = ast.literal_eval(node.value)
            return f"megatron-core>={'.'.join(map(str, low))},<{'.'.join(map(str, high[:2]))}"
    raise RuntimeError("ordmoe_megatron/runtime/compat.py has no SUPPORTED = (low, high) line")


setup(
    name="ordmoe-megatron",
    version="0.1.0",
    description="OrdMoE (routing-score tier ranking) for Megatron-Core expert-parallel training",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ordmoe_megatron", "ordmoe_megatron.*"]),
    python_requires=">=3.10",
    # The range of runtime/compat.py's SUPPORTED; the releases after its first declare Python >= 3.12,
    # so on Python 3.11 pip resolves the first.
    install_requires=[megatron_core_requirement(), "sentencepiece", "numpy", "psutil", "matplotlib"],
    extras_require={
        "convert": ["transformers", "safetensors"],
        "test": ["pytest", "transformers", "safetensors"],
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
