import csv
import glob
import os
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import data
import model
from conftest import ROOT, run


@pytest.fixture
def repo(tmp_path):
    """A copy of the repo whose Fira script fails the way an out-of-memory run would."""
    repo = tmp_path / "repo"
    repo.mkdir()
    scripts = map(os.path.basename, glob.glob(f"{ROOT}/train_*.py"))
    for f in ["bench.sh", "report.py", "model.py", "data.py", "plumbing.py", *scripts]:
        shutil.copy(os.path.join(ROOT, f), repo / f)
    (repo / "train_fira.py").write_text("import sys\nsys.exit('error: simulated out of memory')\n")
    return repo


def test_bench_sweeps_seeds_survives_a_failure_and_reruns_stale_runs(tmp_path, shakespeare, repo):
    out = tmp_path / "out"
    env = {"SIZES": "nano", "METHODS": "full fira", "SEEDS": "0 1", "OUT": str(out), "DATA_DIR": data.DATA_DIR}
    proc = run(["bash", str(repo / "bench.sh"), "--max-steps", "2"], env=env, check=False)
    assert proc.returncode == 1 and "bench: 2 run(s) failed" in proc.stderr
    assert proc.stdout.count("[fail] fira nano seed") == 2 and "error: simulated out of memory" in proc.stdout

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["method"], r["seed"]) for r in rows] == [(m, s) for m in ("full", "fira") for s in ("0", "1")]
    for r in rows:
        if r["method"] == "fira":
            assert r["status"] == "failed: error: simulated out of memory"
        else:
            assert r["status"] == "ok" and float(r["val_ppl"]) > 1 and int(r["tokens"]) == 2 * 8 * 256
    # two seeds: different batches and inits, so different perplexities, and the table gives mean and spread
    full = [float(r["val_ppl"]) for r in rows if r["method"] == "full"]
    assert full[0] != full[1]
    table = open(out / "results.md").read()
    mean, sd = sum(full) / 2, abs(full[0] - full[1]) / 2 ** 0.5
    assert f"| Full-rank AdamW | nano | full | 2 | 4,096 | {mean:.2f} ± {sd:.2f} (min {min(full):.2f}" in table
    assert "| Fira | nano | | | | seed 0 failed: error: simulated out of memory; seed 1 failed" in table

    # re-running skips the finished runs and retries the failed ones; other settings make a run stale
    proc = run(["bash", str(repo / "bench.sh"), "--max-steps", "2"], env=env, check=False)
    assert proc.stdout.count("[skip]") == 2 and proc.stdout.count("[fail] fira nano") == 2
    proc = run(["bash", str(repo / "bench.sh"), "--max-steps", "3"], env={**env, "METHODS": "full", "SEEDS": "0"})
    assert "[stale] full nano seed 0" in proc.stdout
    assert next(csv.DictReader(open(out / "results.csv")))["tokens"] == str(3 * 8 * 256)


def test_bench_runs_every_row_with_the_scripts_own_defaults(tmp_path):
    proc = run(["bash", "bench.sh", "--dry-run"], env={"SIZES": "60m", "OUT": str(tmp_path)})
    commands = [line.split() for line in proc.stdout.splitlines() if line.startswith("python ")]
    assert [c[-1].split("/")[-1] for c in commands] == [f"{row}_60m_s0" for row in model.BENCH_ROWS]
    # the scripts' plans, two at a time (each is mostly the import of torch)
    with ThreadPoolExecutor(2) as pool:
        plans = list(pool.map(lambda c: run([sys.executable, *c[1:-2], "--dry-run"]).stdout, commands))
    for row, command, plan in zip(model.BENCH_ROWS, commands, plans):
        method, overrides = model.BENCH_ROWS[row]
        assert command[1] == model.METHODS[method]["script"]
        # the row's flags are the script's defaults except where the row says otherwise
        flags = dict(zip(command[2::2], command[3::2]))
        for key, value in {**model.method_defaults(method, "60m"), **overrides}.items():
            assert flags["--" + key.replace("_", "-")] == str(value)
        # and the script resolves the papers' batch: 512 sequences of 256 tokens through micro-batches
        assert "512 x 256 = 131,072 tokens/step (8 per micro-batch x 64 accumulated x 1 processes)" in plan
        assert "10,000 steps = 1,310,720,000 tokens" in plan
        assert re.search(rf"method: lr {re.escape(flags['--lr'])}(,|\n)", plan)


@pytest.mark.parametrize("size,gib,world,micro", [("60m", 80, 1, 128), ("60m", 141, 1, 128), ("60m", 40, 1, 64),
                                                   ("1b", 80, 1, 16), ("1b", 24, 1, 4), ("60m", 80, 8, 64),
                                                   ("tiny", 0, 1, 8), ("60m", 0, 1, 8)])
def test_micro_batch_fits_the_gpu_and_divides_the_batch(size, gib, world, micro):
    batch = model.RECIPES[size].batch
    assert model.micro_batch(size, batch, world, gib * 2**30) == micro
    assert batch % (micro * world) == 0
