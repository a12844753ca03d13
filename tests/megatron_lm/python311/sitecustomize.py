"""Put first on PYTHONPATH by the Megatron-LM tests on Python 3.11 only: Megatron-LM from core_v0.18
on imports ``typing.override`` (Python 3.12), so every process that imports ``megatron.training``
gets the stand-in from ``megatron_lm.cpu_launch`` before anything else runs."""

from ordmoe_megatron.megatron_lm.cpu_launch import typing_override_for_python_311

typing_override_for_python_311()
