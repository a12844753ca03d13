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


def _module_constant(path: str, name: str):
    """The literal value of ``name = ...`` in one of the package's files, read with ast (setup.py
    cannot import the package: megatron-core is not installed yet)."""
    with open(os.path.join(HERE, *path.split("/")), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        if any(getattr(t, "id", None) == name for t in targets):
            return ast.literal_eval(node.value)
    raise RuntimeError(f"{path} has no {name} = ... line")


def version() -> str:
    """The one version string, ``ordmoe_megatron.__version__``."""
    return _module_constant("ordmoe_megatron/__init__.py", "__version__")


def megatron_core_requirement() -> str:
    """``megatron-core>=LOW,<HIGH`` from ``SUPPORTED`` in ordmoe_megatron/runtime/compat.py, the one
    statement of the range."""
    low, high = _module_constant("ordmoe_megatron/runtime/compat.py", "SUPPORTED")
    return f"megatron-core>={'.'.join(map(str, low))},<{'.'.join(map(str, high[:2]))}"


setup(
    name="ordmoe-megatron",
    version=version(),
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
        "test": ["pytest", "transformers", "safetensors", "ruff==0.17.6"],
        "te": ["transformer-engine[pytorch]"],
        # What Megatron-LM's pretrain_gpt.py imports beyond megatron-core (core_v0.16 to core_v0.19;
        # checked by importing it in a fresh venv), pybind11 for the dataset helpers it compiles, and
        # datasets, with which --sft's SFTLowLevelDataset reads JSONL (load_dataset).
        "megatron-lm": ["triton", "pybind11", "six", "regex", "pyyaml", "pydantic", "datasets"],
    },
    entry_points={
        "console_scripts": [
            "ordmoe-pretrain=ordmoe_megatron.entrypoints:pretrain",
            "ordmoe-tier-report=ordmoe_megatron.entrypoints:tier_report",
            "ordmoe-sweep=ordmoe_megatron.entrypoints:sweep",
            "ordmoe-convert=ordmoe_megatron.entrypoints:convert",
            "ordmoe-megatron-lm-cpu=ordmoe_megatron.entrypoints:megatron_lm_cpu",
        ]
    },
)
