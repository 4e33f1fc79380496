import csv
import glob
import os
import shutil

from conftest import ROOT, run

import data


def test_bench_sweeps_every_method_and_survives_a_failure(tmp_path, shakespeare):
    # a copy of the repo whose Fira script fails the way an out-of-memory run would
    repo = tmp_path / "repo"
    repo.mkdir()
    for f in ["bench.sh", "report.py", "model.py", "data.py", *map(os.path.basename, glob.glob(f"{ROOT}/train_*.py"))]:
        shutil.copy(os.path.join(ROOT, f), repo / f)
    (repo / "train_fira.py").write_text("import sys\nsys.exit('error: simulated out of memory')\n")
    env = {"SIZES": "nano", "CPU_STEPS": "3", "OUT": str(tmp_path / "out"), "DATA_DIR": data.DATA_DIR}
    proc = run(["bash", str(repo / "bench.sh")], env=env)
    assert "[fail] fira nano: error: simulated out of memory" in proc.stdout

    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert [r["method"] for r in rows] == ["full", "galore", "fira", "lowrank", "lowrank_refactor"]
    assert rows[2]["status"] == "failed: error: simulated out of memory"
    for r in rows[:2] + rows[3:]:
        assert r["status"] == "ok" and float(r["val_ppl"]) > 1 and int(r["tokens"]) == 3 * 8 * 256
    table = open(tmp_path / "out" / "results.md").read()
    assert table.count("| nano |") == 5 and "| Fira | nano | | | failed: error: simulated out of memory" in table

    # re-running skips the finished runs and retries the failed one
    proc = run(["bash", str(repo / "bench.sh")], env=env)
    assert proc.stdout.count("[skip]") == 4 and "[fail] fira nano" in proc.stdout
