"""Running ``ordmoe-pretrain`` from tests, as a user would (a subprocess on CPU)."""
import json
import subprocess
import sys


def run_pretrain(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "ordmoe_megatron.train", *args], capture_output=True, text=True,
                          timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"ordmoe-pretrain {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_metrics(path):
    return [json.loads(line) for line in open(path)]
