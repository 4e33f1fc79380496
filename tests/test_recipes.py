"""A direct run does what the papers did: the size's recipe is every script's default, and it says what it will do."""
import csv
import os
import re
import subprocess
import sys

import pytest

from conftest import FAST, FAST_CPU, NANO, ROOT, SCRIPTS, outputs, run_each
from model import BENCH_ROWS, METHODS, RECIPES, method_defaults, row_settings

# what each method does every few steps, as its log records it when it happens
ACTIONS = {"train_galore.py": ["refreshes"], "train_fira.py": ["refreshes"], "train_apollo.py": ["refreshes"],
           "train_lowrank_refactor.py": ["refactorizations", "resets"],
           "train_sltrain.py": ["refactorizations", "resets"], "train_relora.py": ["merges"]}


@pytest.fixture(scope="module")
def tiny_defaults(tmp_path_factory, shakespeare):
    """The folder of each ACTIONS script's nano run with every default but the sequence length and the batch (one
    sequence a step), which no period depends on, all from one process (run_each)."""
    root = tmp_path_factory.mktemp("defaults")
    run_each([[script, *NANO, "--log-every", "50", *FAST, "--global-batch", "1", "--batch-size", "1", "--out-dir",
               str(root / script)] for script in ACTIONS])
    return root


@pytest.mark.parametrize("script", sorted(ACTIONS))
def test_the_tiny_defaults_make_every_method_act_at_least_twice(tiny_defaults, script):
    # nano's recipe is tiny's (steps, periods, settings) but for the rank, at a tenth of the cost
    assert RECIPES["nano"].steps == RECIPES["tiny"].steps
    method = next(m for m, entry in METHODS.items() if entry["script"] == script)
    assert {**method_defaults(method, "tiny"), "rank": None} == {**method_defaults(method, "nano"), "rank": None}
    _, log = outputs(tiny_defaults / script)
    assert log[-1]["step"] == 100
    for action in ACTIONS[script]:
        counts = [r[action] for r in log if action in r]
        assert len(counts) >= 2 and counts == list(range(1, len(counts) + 1)), (action, counts)


def test_the_mini_defaults_make_every_method_act_several_times():
    """mini's 300 steps (the CPU benchmark's): every period a sixth of them, so each method acts 5 times"""
    steps = RECIPES["mini"].steps
    for method in METHODS:
        for key, period in method_defaults(method, "mini").items():
            if key in ("update_proj_gap", "restart_every", "reset_every"):
                assert steps // period - 1 >= 5, (method, key, period)


def test_the_mini_lrs_are_the_committed_sweeps_best():
    """mini's lr of every benchmark row is the lowest perplexity of the lr sweep committed with it (one seed), inside
    a range of at least 4 lrs spanning 10x or more"""
    with open(os.path.join(ROOT, "results", "2026-12-03-cpu-lr-sweep", "results.csv")) as f:
        runs = [r for r in csv.DictReader(f) if r["size"] == "mini" and r["status"] == "ok"]
    for row in BENCH_ROWS:
        ppl = {float(r["lr"]): float(r["val_ppl"]) for r in runs if r["method"] == row}
        best = min(ppl, key=ppl.get)
        assert len(ppl) >= 4 and max(ppl) >= 10 * min(ppl) and min(ppl) < best < max(ppl), (row, ppl)
        assert row_settings(row, "mini")[1]["lr"] == best, (row, best)


@pytest.fixture(scope="module")
def helps():
    """Each script's --help at 60m, all from one process (run_each): {script: its text, unwrapped}."""
    procs = run_each([[script, "--size", "60m", "--help"] for script in SCRIPTS])
    return {script: " ".join(proc.stdout.split()) for script, proc in zip(SCRIPTS, procs)}  # argparse wraps lines


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_the_recipe_of_the_size(helps, script):
    text = helps[script]
    assert "--global-batch GLOBAL_BATCH sequences per optimizer step, all processes together (default: 512)" in text
    assert "the recipe's 10,000 for 60m" in text and "(default: 0.1)" in text  # min lr ratio
    method = next(m for m, entry in METHODS.items() if entry["script"] == script)
    if "rank" in METHODS[method]:
        assert "(default: 128)" in text  # the rank of 60m


def test_a_cpu_run_above_tiny_estimates_its_time(tmp_path):
    cmd = [sys.executable, "train_full.py", "--size", "60m", "--device", "cpu", "--global-batch", "2",
           "--batch-size", "1", "--seq-len", "32", "--max-steps", "3", "--out-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **FAST_CPU})
    lines = []
    for line in proc.stdout:  # the estimate comes after the first micro-batch; no need to train further
        lines.append(line)
        if line.startswith("time estimate"):
            break
    proc.kill()
    proc.wait()
    assert re.fullmatch(r"time estimate: [\d.]+ s for the first micro-batch, so about [\d,.]+ (h|min) on this CPU; "
                        r"use a GPU, or --size mini\n", lines[-1]), lines[-1]
