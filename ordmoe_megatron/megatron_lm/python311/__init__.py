"""This directory goes first on ``PYTHONPATH`` of the processes ``megatron_lm.cpu_launch`` starts
on Python 3.11 (``DIRECTORY``), so that its ``sitecustomize`` runs in each of them, the processes
Megatron-LM spawns (its checkpoint writers) included."""

import os

DIRECTORY = os.path.dirname(os.path.abspath(__file__))
