import csv
import fcntl
import glob
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import data
import model
from conftest import ROOT, run


@pytest.fixture
def repo(tmp_path):
    """A copy of the repo whose Fira script fails the way an out-of-memory run would, with the repo's prepared
    datasets (bench.sh checks for them, else asks data.py: a process that imports torch)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "data").symlink_to(data.DATA_DIR)
    scripts = map(os.path.basename, glob.glob(f"{ROOT}/train_*.py"))
    for f in ["bench.sh", "report.py", "model.py", "data.py", "plumbing.py", *scripts]:
        shutil.copy(os.path.join(ROOT, f), repo / f)
    (repo / "train_fira.py").write_text("import sys\nsys.exit('error: simulated out of memory')\n")
    return repo


def test_bench_queues_runs_on_two_cpus_survives_a_failure_and_reruns_stale_runs(tmp_path, shakespeare, repo):
    out = tmp_path / "out"
    env = {"SIZES": "nano", "METHODS": "full fira", "SEEDS": "0 1", "OUT": str(out), "DATA_DIR": data.DATA_DIR,
           "DEVICES": "cpu cpu", "SPEED_ROUNDS": "2", "SPEED_STEPS": "3", "OMP_NUM_THREADS": ""}  # bench.sh sets it
    proc = run(["bash", str(repo / "bench.sh"), "--max-steps", "2"], env=env, check=False)
    assert proc.returncode == 1 and "bench: 4 run(s) failed" in proc.stderr  # fira's 2 seeds and 2 speed rounds
    assert proc.stdout.count("[fail] fira nano seed") == 2 and "error: simulated out of memory" in proc.stdout
    # the two full-rank runs ran side by side: each started (its lock) before the other ended (its result)
    runs = out / "runs"
    # (bench.sh started the second before the first ended: a run's own start can come later on a loaded machine)
    lines = proc.stdout.splitlines()
    started = [i for i, line in enumerate(lines) if line.startswith("[run ] full nano seed")]
    assert len(started) == 2 and max(started) < min(i for i, line in enumerate(lines) if line.startswith("[done]"))
    assert proc.stdout.count("[done] full nano seed") == 2
    # then the speed pass: every row alone on every core (the sweep's runs had half of them each), in turn
    speed = [line for line in lines if "speed round" in line]
    assert [re.match(r"\[(run |done|fail)\] (\w+) nano speed round (\d)", line).groups() for line in speed] == [
        (verb, row, k) for k in "12" for row, verb in [("full", "run "), ("full", "done"), ("fira", "run "),
                                                         ("fira", "fail")]]
    assert " --max-steps 3 --eval-every 3 " in speed[0] and " --seed 0 " in speed[0]
    assert speed[0].count("--max-steps") == 1  # not the sweep's steps too
    threads = [json.load(open(out / r / "result.json"))["threads"] for r in ("runs/full_nano_s0", "speed/full_nano_r1")]
    assert threads == [max(1, os.cpu_count() // 2), os.cpu_count()]
    speed = [(r["method"], r["round"]) for r in csv.DictReader(open(out / "speed.csv"))]
    assert speed == [("full", "1"), ("full", "2")]

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
    assert (f"| Full-rank AdamW | nano | shakespeare-bytes (byte-level tokenizer) | 0.001 | full | 2 | 4,096 "
            f"| {mean:.2f} ± {sd:.2f} (min {min(full):.2f}") in table
    assert "| Fira | nano | |  | | | | seed 0 failed: error: simulated out of memory; seed 1 failed" in table
    assert os.path.exists(out / "loss_nano.png") and os.path.exists(out / "memory_nano.png")
    assert "tokens/s: from bench.sh's speed pass, after the sweep: each row 3 steps alone on the machine" in table
    # a finished run's checkpoint (every run writes one at its end) is not kept: the result is
    assert not glob.glob(str(runs / "full_nano_s*" / "ckpt.pt"))

    # in sequence, as an lr sweep of one lr (full-rank's own): the same runs, so the same perplexities
    proc = run(["bash", str(repo / "bench.sh"), "--max-steps", "2"],
               env={**env, "METHODS": "full", "DEVICES": "cpu", "LRS": "1e-3"})
    sweep = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["lr"], float(r["val_ppl"])) for r in sweep] == [("0.001", ppl) for ppl in full]
    assert f"| Full-rank AdamW | {mean:.2f} ± {sd:.2f} | 1e-3 |" in open(out / "lr_sweep.md").read()

    # re-running skips the finished runs and retries the failed ones; a run recorded with other settings (as an
    # earlier sweep of 3 steps would have) is stale: it runs again, with this sweep's
    recorded = json.load(open(runs / "full_nano_s1" / "result.json"))
    steps = recorded["argv"].index("--max-steps") + 1
    assert recorded["argv"][steps] == "2"
    json.dump({**recorded, "argv": [*recorded["argv"][:steps], "3", *recorded["argv"][steps + 1:]]},
              open(runs / "full_nano_s1" / "result.json", "w"))
    # a run that was resumed recorded its --resume: the same run
    resumed = json.load(open(runs / "full_nano_s0" / "result.json"))
    json.dump({**resumed, "argv": [*resumed["argv"], "--resume"]}, open(runs / "full_nano_s0" / "result.json", "w"))
    proc = run(["bash", str(repo / "bench.sh"), "--max-steps", "2"], env=env, check=False)
    assert proc.stdout.count("[skip] full nano seed") == 1 and "[skip] full nano seed 0" in proc.stdout
    assert proc.stdout.count("[skip] full nano speed round") == 2
    assert "[stale] full nano seed 1" in proc.stdout and "[done] full nano seed 1" in proc.stdout
    assert proc.stdout.count("[fail] fira nano") == 4
    assert json.load(open(runs / "full_nano_s1" / "result.json"))["argv"] == recorded["argv"]
    assert [float(r["val_ppl"]) for r in csv.DictReader(open(out / "results.csv")) if r["method"] == "full"] == full


def test_bench_runs_every_row_with_the_scripts_own_defaults(tmp_path):
    proc = run(["bash", "bench.sh", "--dry-run"], env={"SIZES": "60m", "OUT": str(tmp_path), "DEVICES": "cpu"})
    commands = [line.split() for line in proc.stdout.splitlines() if line.startswith("python ")]
    # the plan comes first; on a GPU its hours are the FLOPs at 40% of the peak (full-rank: 6 per weight but the
    # embedding's, plus attention; low-rank fewer), and the wall time is at least the longest run's
    rows = len(model.BENCH_ROWS)
    assert f"plan: 60m: {rows} runs of 10,000 steps, 1,310,720,000 tokens each" in proc.stdout
    assert "plan: total " in proc.stdout and "CPU: time not estimated" in proc.stdout
    with model.torch.device("meta"):
        full = model.flops_per_token(model.Llama(model.SIZES["60m"]), 256) * 10_000 * 512 * 256 / (0.4 * 989e12 * 3600)
    plan = model.bench_plan(["full", "lowrank"], ["60m"], 2, 0, 1.0, 0, "NVIDIA H100 80GB HBM3", 4, 50257)
    hours = float(plan[0].split(", ")[-1].split()[0])
    assert 2 * full < hours < 4 * full
    assert f"total {hours:.2f} GPU-hours, at least {full:.2f} h on 4 GPU(s)" in plan[1]
    assert [c[-1].split("/")[-1] for c in commands] == [f"{row}_60m_s0" for row in model.BENCH_ROWS]
    # the plans of each script's first row, two at a time (each is mostly the import of torch); the other rows
    # differ from them only in flags, which are checked for every row
    first = {c[1]: c for c in reversed(commands)}
    with ThreadPoolExecutor(2) as pool:
        plans = dict(zip(first, pool.map(lambda c: run([sys.executable, *c[1:-2], "--dry-run"]).stdout,
                                          first.values())))
    for row, command in zip(model.BENCH_ROWS, commands):
        method, settings = model.row_settings(row, "60m")
        assert command[1] == model.METHODS[method]["script"]
        # the row's flags are the script's defaults except where the row says otherwise
        flags = dict(zip(command[2::2], command[3::2]))
        for key, value in settings.items():
            assert flags["--" + key.replace("_", "-")] == str(value)
        if command is not first[command[1]]:
            continue
        plan = plans[command[1]]
        # and the script resolves the papers' batch: 512 sequences of 256 tokens through micro-batches
        assert "512 x 256 = 131,072 tokens/step (8 per micro-batch x 64 accumulated x 1 processes)" in plan
        assert "10,000 steps = 1,310,720,000 tokens" in plan
        assert re.search(rf"method: lr {re.escape(flags['--lr'])}(,|\n)", plan)
    # a dataset not prepared yet: the plan, with the vocabulary its name gives (T5's), and what to prepare
    proc = run(["bash", "bench.sh", "--dry-run"],
               env={"SIZES": "60m", "METHODS": "full", "DATASET": "c4-t5", "OUT": str(tmp_path), "DEVICES": "cpu"})
    with model.torch.device("meta"):
        t5 = model.flops_per_token(model.Llama(model.get_config("60m", 32000)), 256) * 10_000 * 512 * 256
    assert "note: dataset 'c4-t5' is not prepared yet; before the runs: python data.py c4 --tokenizer t5" in proc.stdout
    assert f"1,310,720,000 tokens each, {t5:.2e} FLOPs" in proc.stdout


@pytest.mark.parametrize("size,gib,world,micro", [("60m", 80, 1, 128), ("60m", 141, 1, 128), ("60m", 40, 1, 64),
                                                   ("1b", 80, 1, 16), ("1b", 24, 1, 4), ("60m", 80, 8, 64),
                                                   ("tiny", 0, 1, 8), ("60m", 0, 1, 8)])
def test_micro_batch_fits_the_gpu_and_divides_the_batch(size, gib, world, micro):
    batch = model.RECIPES[size].batch
    assert model.micro_batch(size, batch, world, gib * 2**30) == micro
    assert batch % (micro * world) == 0


FAKE = """import json, os, signal, sys, time
out = sys.argv[sys.argv.index("--out-dir") + 1]
with open(os.path.join(out, "argv.jsonl"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE") == "preempted":  # a checkpoint, then the end of the allocation
    open(os.path.join(out, "ckpt.pt"), "w").close()
    open(os.path.join(out, "ckpt.pt.tmp"), "w").close()
    sys.exit("error: preempted")
signal.signal(signal.SIGTERM, lambda *_: (open(os.path.join(out, "got_sigterm"), "w").close(), sys.exit(1)))
print("training", flush=True)
time.sleep(60)
"""


@pytest.fixture
def fake_repo(repo):
    (repo / "train_full.py").write_text(FAKE)
    return repo


def bench(repo, out, **env):
    return run(["bash", str(repo / "bench.sh"), "--max-steps", "2"], check=False,
               env={"SIZES": "nano", "METHODS": "full", "SEEDS": "0", "OUT": str(out), "SPEED_ROUNDS": "0", **env})


def test_bench_resumes_an_unfinished_run_of_the_same_settings(tmp_path, fake_repo):
    out = tmp_path / "out"
    assert "[fail] full nano seed 0: error: preempted" in bench(fake_repo, out, FAKE="preempted").stdout
    bench(fake_repo, out, FAKE="preempted")  # the same settings: resumed, its leftover *.tmp removed first
    argvs = [json.loads(line) for line in open(out / "runs" / "full_nano_s0" / "argv.jsonl")]
    assert ["--resume" in a for a in argvs] == [False, True] and argvs[0] == argvs[1][:-1]
    # other settings: the folder starts afresh
    run(["bash", str(fake_repo / "bench.sh"), "--max-steps", "3"], check=False,
        env={"SIZES": "nano", "METHODS": "full", "SEEDS": "0", "OUT": str(out), "FAKE": "preempted",
             "SPEED_ROUNDS": "0"})
    argvs = [json.loads(line) for line in open(out / "runs" / "full_nano_s0" / "argv.jsonl")]
    assert len(argvs) == 1 and "--resume" not in argvs[0]


def test_bench_forwards_sigterm_to_every_run_and_leaves_a_live_run_alone(tmp_path, fake_repo):
    out = tmp_path / "out"
    cmd = ["bash", str(fake_repo / "bench.sh"), "--max-steps", "2"]
    env = {**os.environ, "SIZES": "nano", "METHODS": "full", "SEEDS": "0 1", "OUT": str(out), "DEVICES": "cpu cpu",
           "SPEED_ROUNDS": "0"}
    sweep = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = [out / "runs" / f"full_nano_s{seed}" / "train.log" for seed in (0, 1)]
    deadline = time.time() + 60
    while not all(log.exists() and "training" in log.read_text() for log in logs) and time.time() < deadline:
        time.sleep(0.2)  # both runs side by side, each logging to its folder
    sweep.send_signal(signal.SIGTERM)
    assert sweep.wait(30) == 128 + signal.SIGTERM and "bench: stopped by SIGTERM" in sweep.stderr.read()
    for seed in (0, 1):  # each training run got it, and stopped
        assert (out / "runs" / f"full_nano_s{seed}" / "got_sigterm").exists()
    # a folder whose lock a live run holds is never deleted, nor run again
    (out / "runs" / "full_nano_s0" / "result.json").write_text("{}")  # stale: no argv
    with open(out / "runs" / "full_nano_s0" / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = subprocess.run(cmd, env={**env, "FAKE": "preempted", "SEEDS": "0", "DEVICES": "cpu"},
                              capture_output=True, text=True, timeout=120)
    assert "[busy] full nano seed 0: a run is using" in proc.stdout
    assert (out / "runs" / "full_nano_s0" / "got_sigterm").exists()


def test_a_typo_in_methods_runs_nothing(tmp_path, fake_repo):
    proc = bench(fake_repo, tmp_path / "out", METHODS="full fulll")
    assert proc.returncode == 2 and "[run ]" not in proc.stdout and not (tmp_path / "out" / "runs").exists()


def test_report_holds_the_runs_it_is_given_and_fails_in_one_line(tmp_path):
    import report
    for run_dir in ("full_nano_s0", "full_nano_s1", "galore_nano_s0"):
        (tmp_path / "runs" / run_dir).mkdir(parents=True)
        (tmp_path / "runs" / run_dir / "failed.json").write_text(json.dumps({"reason": run_dir}))
    (tmp_path / "runs" / "full_nano_s2.tmp").write_text("")
    assert len(report.load_runs(str(tmp_path))) == 3
    rows = report.load_runs(str(tmp_path), [str(tmp_path / "runs" / "full_nano_s1")])
    assert [(r["method"], r["seed"]) for r in rows] == [("full", 1)]
    (tmp_path / "runs" / "full_nano_s0" / "result.json").write_text(json.dumps({"method": "full"}))
    proc = run([sys.executable, "report.py", str(tmp_path)], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stderr == (
        f"error: {tmp_path}/runs/full_nano_s0/result.json is not a result of this repository's scripts "
        "(KeyError: 'precision')\n")


def fabricate(runs, folder, ppl, method, lr, tokens_per_s=1000.0, states_mib=200, **fields):
    """A run folder with a result.json as the scripts write it (nano on Shakespeare, fp32, 100 MiB of weights and
    gradients), with `fields` in it."""
    (runs / folder).mkdir(parents=True)
    result = {"method": method, "dataset": "shakespeare", "vocab_size": 50304, "precision": "fp32", "tokens": 4096,
              "val_ppl": ppl, "val_loss": math.log(ppl), "device": "cpu", "weights_bytes": 100 * 2**20,
              "grads_bytes": 100 * 2**20, "optimizer_state_bytes": states_mib * 2**20, "buffers_bytes": 0,
              "tokens_per_s": tokens_per_s, "mfu": None, "lr": lr, "rank": None if method == "full" else 8, **fields}
    (runs / folder / "result.json").write_text(json.dumps(result))


def test_report_compares_rows_beyond_the_seed_spread_and_tabulates_an_lr_sweep(tmp_path):
    import report
    runs = tmp_path / "runs"
    for seed, ppl in enumerate([100.0, 102.0]):
        fabricate(runs, f"full_nano_s{seed}", ppl, "full", 1e-3)
    for seed, ppl in enumerate([90.0, 91.0]):  # 10.5 lower, beyond sd 1.41 + 0.71
        fabricate(runs, f"galore_nano_s{seed}", ppl, "galore", 1e-2, tokens_per_s=500.0, states_mib=100)
    for seed, ppl in enumerate([99.5, 101.5]):  # 0.5 lower, within the spread
        fabricate(runs, f"fira_nano_s{seed}", ppl, "fira", 1e-2)
    fabricate(runs, "lowrank_nano_s0", 130.0, "lowrank", 1.5e-3)
    for lr, ppl in [("1e-3", 120.0), ("3e-3", 110.0)]:  # a swept row (its name has an underscore), one lr failed
        fabricate(runs, f"lowrank_restarts_lr{lr}_nano_s0", ppl, "lowrank", float(lr))
    (runs / "lowrank_restarts_lr1e-2_nano_s0").mkdir()
    (runs / "lowrank_restarts_lr1e-2_nano_s0" / "failed.json").write_text(json.dumps({"reason": "diverged"}))
    lines = report.summarize(report.load_runs(str(tmp_path)))
    table = report.markdown([], lines, str(tmp_path))
    # memory: weights + gradients + states counted, and over full-rank's; tokens/s over full-rank's
    assert "| Full-rank AdamW | nano | shakespeare (GPT-2 tokenizer) | 0.001 | full | 2 | 4,096 " \
           "| 101.00 ± 1.41 (min 100.00, max 102.00) | 400.0 (fp32) | 1.00 |" in table
    assert "| GaLore | nano | shakespeare (GPT-2 tokenizer) | 0.01 | 8 | 2 | 4,096 | 90.50 ± 0.71 (min 90.00, " \
           "max 91.00) | 300.0 (fp32) | 0.75 | 18.5 | - | - | 500 | 0.50 | - |" in table
    assert "| nano | GaLore vs Full-rank AdamW | 90.50 ± 0.71 | 101.00 ± 1.41 | -10.50 | 2.12 | yes: GaLore lower |" \
           in table
    assert "| nano | Fira vs Full-rank AdamW | 100.50 ± 1.41 | 101.00 ± 1.41 | -0.50 | 2.83 | no |" in table
    assert "| nano | Fira vs GaLore | 100.50 ± 1.41 | 90.50 ± 0.71 | +10.00 | 2.12 | yes: GaLore lower |" in table
    # a swept row is compared at its best lr; one seed has no spread
    assert "| nano | Low-rank + restarts (lr 3e-3) vs Low-rank | 110.00 | 130.00 | -20.00 | - " \
           "| one seed: spread unknown |" in table
    assert "| nano | GaLore vs Low-rank + restarts (lr 3e-3) | 90.50 ± 0.71 | 110.00 | -19.50 | - |" in table
    assert table.count("\n| nano | ") == 4 + 4  # every row against full-rank, and the four pairs present
    sweep = report.lr_sweep(lines, str(tmp_path))
    assert "| method | lr 1e-3 | lr 3e-3 | lr 1e-2 | best lr |" in sweep
    assert "| Low-rank + restarts | 120.00 | 110.00 | failed | 3e-3 |" in sweep
    assert open(tmp_path / "lr_sweep.md").read() == sweep

    # with a speed pass, tokens/s are its runs': the median over rounds, and the ratio within each round to
    # full-rank's, median (min-max); a row it did not time has no ratio
    for k, (full, galore) in enumerate([(1000.0, 500.0), (2000.0, 800.0), (1000.0, 600.0)], 1):
        for method, tps in (("full", full), ("galore", galore)):
            fabricate(tmp_path / "speed", f"{method}_nano_r{k}", 1.0, method, 1e-3, tokens_per_s=tps, steps=60,
                      threads=2, load_avg=2.0 + k / 10)
    speed = report.load_speed(str(tmp_path))
    report.side_by_side(lines, speed)
    table = report.markdown([], lines, str(tmp_path), speed)
    assert "| 90.50 ± 0.71 (min 90.00, max 91.00) | 300.0 (fp32) | 0.75 | 18.5 | - | - | 600 | 0.50 (0.40-0.60) |" \
        in table
    assert "| 101.00 ± 1.41 (min 100.00, max 102.00) | 400.0 (fp32) | 1.00 | 18.6 | - | - | 1,000 | 1.00 |" in table
    assert "| 100.50 ± 1.41 (min 99.50, max 101.50) | 400.0 (fp32) | 1.00 | 18.5 | - | - | - | - |" in table
    assert ("each row 60 steps alone on the machine (2 threads), the rows in turn, 3 rounds" in table
            and "1-minute load average at the speed runs' ends: 2.1-2.3" in table)


def test_report_puts_the_papers_numbers_beside_comparable_rows_alone(tmp_path):
    import report
    runs, budget = tmp_path / "runs", 10_000 * 512 * 256  # 60m's: the papers' steps x batch x 256 tokens
    t5 = {"dataset": "c4-t5", "vocab_size": 32000, "sequences": "documents", "steps": 10_000,
          "val_ppl_official_style": 31.0, "val_tokens": 10_000_000}
    fabricate(runs, "galore_mini_s0", 12.0, "galore", 1e-2, dataset="shakespeare-bytes", vocab_size=320)
    fabricate(runs, "galore_60m_s0", 33.0, "galore", 1e-2, tokens=budget, **t5)
    fabricate(runs, "fira_60m_s0", 32.0, "fira", 1e-2, tokens=budget, **{**t5, "dataset": "c4", "vocab_size": 50304})
    fabricate(runs, "full_60m_s0", 40.0, "full", 1e-3, tokens=budget // 10, dataset="c4-t5", vocab_size=32000)
    table = report.markdown([], report.summarize(report.load_runs(str(tmp_path))), str(tmp_path))
    assert "| GaLore | mini | shakespeare-bytes (byte-level tokenizer) | 0.01 | 8 | 1 | 4,096 | 12.00 |" in table
    assert "| GaLore | mini | shakespeare-bytes (byte-level tokenizer) | 12.00 | 4,096 | not comparable: size mini, " \
           "the papers report 60m, 130m, 350m, 1b; corpus shakespeare, the papers' is C4; byte-level tokenizer, the " \
           "papers' is T5's; packed windows, the papers' are documents | | |" in table
    ours = "| GaLore | 60m | c4-t5 (T5 tokenizer) | 33.00 | 1,310,720,000 |"
    assert f"{ours} 34.88 | 0.24 | GaLore Table 2 | 31.00 |" in table  # and the official-style number beside it
    assert f"{ours} 34.58 | 0.28 | companion paper (arXiv 2506.16659) table |" in table
    assert "| Fira | 60m | c4 (GPT-2 tokenizer) | 32.00 | 1,310,720,000 | not comparable: GPT-2 tokenizer, the " \
           "papers' is T5's | | |" in table
    # a result without "sequences" was written before documents existed: packed windows
    assert "| Full-rank AdamW | 60m | c4-t5 (T5 tokenizer) | 40.00 | 131,072,000 | not comparable: 10% of the " \
           "papers' budget; packed windows, the papers' are documents; validation size not recorded | | |" in table
    assert "| 34.06 |" not in table and "| 30.05 |" not in table  # full-rank's numbers, at 60m
    # the papers' tokens in other steps (a larger batch, or longer sequences) are not their run
    shutil.rmtree(runs / "galore_60m_s0")
    fabricate(runs, "galore_60m_s0", 33.0, "galore", 1e-2, tokens=budget, **{**t5, "steps": 5_000})
    table = report.markdown([], report.summarize(report.load_runs(str(tmp_path))), str(tmp_path))
    assert f"{ours} not comparable: 5,000 steps, the papers' are 10,000 |" in table
    assert table.count("| not comparable: ") == 4
    # and their validation: the official code's 10M scored tokens
    shutil.rmtree(runs / "galore_60m_s0")
    fabricate(runs, "galore_60m_s0", 33.0, "galore", 1e-2, tokens=budget, **{**t5, "val_tokens": 999_000})
    table = report.markdown([], report.summarize(report.load_runs(str(tmp_path))), str(tmp_path))
    assert f"{ours} not comparable: validated on 999,000 scored tokens, the official code's 10,000,000 |" in table
