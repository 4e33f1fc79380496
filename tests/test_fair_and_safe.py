"""Every method sees the same data and budget; no run writes a wrong number, loses a file or fails noisily."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import FAST, FAST_CPU, NANO, ROOT, SCRIPTS, error_of, outputs, run, run_each, torchrun, train


def test_full_galore_and_fira_see_the_same_first_batch(tmp_path, shakespeare):
    # same seed -> same initial weights and the same first batch, so the loss before any update is identical
    scripts = ("train_full.py", "train_galore.py", "train_fira.py")
    run_each([[script, *NANO, *FAST, "--max-steps", "1", "--out-dir", str(tmp_path / script)] for script in scripts])
    losses = [outputs(tmp_path / script)[1][0]["loss"] for script in scripts]
    assert losses[0] == losses[1] == losses[2]


# Fira's and Stable-SPAM's steps, like GaLore's and AdamW's, are functions of the all-reduced gradient alone
DDP_SCRIPTS = [s for s in SCRIPTS if s not in ("train_fira.py", "train_stable_spam.py")]
# 2 processes x micro-batch 8, or 1 process accumulating 2 micro-batches of 8
DDP_RUN = [*NANO, *FAST, "--max-steps", "2", "--global-batch", "16", "--batch-size", "8"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, shakespeare):
    """The folder of each DDP_SCRIPTS run of DDP_RUN in one process, all from one process (run_each)."""
    root = tmp_path_factory.mktemp("one")
    run_each([[script, *DDP_RUN, "--out-dir", str(root / script)] for script in DDP_SCRIPTS])
    return root


@pytest.mark.parametrize("script", DDP_SCRIPTS)
def test_ddp_processes_draw_different_batches(tmp_path, one_process, script):
    # 2 processes draw what 1 process accumulating 2 micro-batches draws: the same losses (up to the order of float
    # sums); if both processes drew the same batch, the loss would differ
    proc = torchrun(script, tmp_path, *DDP_RUN)
    assert proc.stdout.count("val loss") == 1  # only rank 0 reports
    (ddp_result, ddp), (one_result, one) = outputs(tmp_path), outputs(one_process / script)
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert ddp_result["tokens"] == one_result["tokens"] == 2 * 16 * 16 and ddp_result["world_size"] == 2
    assert (ddp_result["grad_accum"], one_result["grad_accum"]) == (1, 2)


def test_resume_refuses_changed_method_settings(tmp_path, shakespeare):
    changes = [("--rank", "4", "rank 4, but"), ("--update-proj-gap", "7", "update_proj_gap 7, but"),
               ("--precision", "bf16", "precision bf16, but")]
    args = ["--out-dir", str(tmp_path), *NANO, *FAST, "--max-steps"]
    resume = [*args, "4", "--resume"]
    first, *refused, fira = run_each([["train_galore.py", *args, "2", "--ckpt-every", "2"],
                                      *[["train_galore.py", *resume, flag, value] for flag, value, _ in changes],
                                      ["train_fira.py", *resume]], check=False)
    assert first.returncode == 0, first.stderr[-2000:]
    for proc, (_, _, message) in zip(refused, changes):
        assert proc.returncode != 0 and proc.stderr.count("\n") == 1
        assert proc.stderr.startswith(f"error: --resume with {message} {tmp_path}/ckpt.pt was trained with")
    # a failed resume leaves the log as it was
    assert len(open(tmp_path / "log.jsonl").readlines()) == 2
    assert fira.stderr.startswith("error: --resume with method fira, but")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_divergence_is_an_error_and_writes_nothing(tmp_path, shakespeare, precision):
    _, _, proc = train("train_full.py", tmp_path, *FAST, "--max-steps", "1", "--lr", "1e30", "--ckpt-every", "1",
                       "--precision", precision, check=False)
    assert "training diverged" in error_of(proc)
    assert not (tmp_path / "result.json").exists() and not (tmp_path / "ckpt.pt").exists()


@pytest.mark.parametrize("script,flags,message", [
    ("train_galore.py", ["--update-proj-gap", "1", "--projector", "subspace", "--per-layer", "--global-batch", "8"],
     "error: a projector refresh met non-finite values: training diverged (try a lower --lr)"),
    ("train_lowrank_refactor.py", ["--restart-every", "1", "--recovery-steps", "0"],
     "error: a refactorization met non-finite factors: training diverged (try a lower --lr)")], ids=["refresh", "restart"])
def test_divergence_at_a_refresh_or_restart_is_the_divergence_line(tmp_path, shakespeare, script, flags, message):
    """The method acting every step at a divergent lr: the decompositions meet the non-finite gradient (GaLore's,
    inside backward with --per-layer) or overflowing factors; each projector and script in test_projectors.py and
    test_lowrank_refactor.py. What was written before is finite."""
    _, log, proc = train(script, tmp_path, *FAST, "--max-steps", "4", "--lr", "1e20",
                         "--warmup-steps", "0", "--ckpt-every", "1", *flags, check=False)
    assert error_of(proc) == message and not (tmp_path / "result.json").exists()
    assert all(math.isfinite(r["loss"]) for r in log)
    if (tmp_path / "ckpt.pt").exists():
        assert all(t.isfinite().all() for t in torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"].values())


def test_a_resumed_finished_run_writes_its_result(tmp_path, shakespeare):
    first, _, _ = train("train_full.py", tmp_path, *FAST, "--max-steps", "3", "--ckpt-every", "3")
    os.remove(tmp_path / "result.json")
    again, log, _ = train("train_full.py", tmp_path, *FAST, "--max-steps", "3", "--resume")
    assert again["val_loss"] == first["val_loss"] and again["tokens_per_s"] == first["tokens_per_s"]
    assert [r["step"] for r in log] == [1, 2, 3]


def test_a_run_never_replaces_another_runs_results(tmp_path, shakespeare):
    train("train_full.py", tmp_path, *FAST, "--max-steps", "1")
    before = open(tmp_path / "result.json").read()
    _, _, proc = train("train_full.py", tmp_path, *FAST, "--max-steps", "2", check=False)
    assert proc.returncode != 0 and proc.stderr == f"error: {tmp_path} holds an earlier run; --resume it or choose " \
                                                   f"another --out-dir\n"
    assert open(tmp_path / "result.json").read() == before


def test_two_runs_in_one_out_dir(tmp_path, shakespeare):
    cmd = [sys.executable, "train_full.py", *NANO, "--out-dir", str(tmp_path)]
    first = subprocess.Popen(cmd + ["--max-steps", "60"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env={**os.environ, **FAST_CPU})
    for line in first.stdout:  # the first run holds the lock once its log exists
        if line.startswith("step 1 |"):
            break
    second = run(cmd + ["--max-steps", "2"], check=False)
    assert first.wait() == 0
    assert second.stderr == f"error: another run is using {tmp_path} (choose another --out-dir)\n"
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in log] == list(range(1, 61))


def bad_checkpoint(tmp_path, kind):
    ckpt = tmp_path / "ckpt.pt"
    if kind == "empty":
        ckpt.write_bytes(b"")
    elif kind == "foreign":
        torch.save({"weights": torch.zeros(3)}, ckpt)
    else:  # truncated: the first half of a real checkpoint
        train("train_full.py", tmp_path / "real", *FAST, "--max-steps", "1", "--ckpt-every", "1")
        data = (tmp_path / "real" / "ckpt.pt").read_bytes()
        ckpt.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("kind", ["empty", "foreign", "truncated"])
def test_a_bad_checkpoint_is_a_one_line_error(tmp_path, shakespeare, kind):
    bad_checkpoint(tmp_path, kind)
    _, _, proc = train("train_full.py", tmp_path, *FAST, "--max-steps", "2", "--resume", check=False)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"error: {tmp_path}/ckpt.pt is not a checkpoint of this repository")
    assert not (tmp_path / "log.jsonl").exists()


BAD_INPUT = [
    ("train_galore.py", ["--rank", "0"], "error: argument --rank: must be >= 1, got 0"),
    ("train_fira.py", ["--rank", "-3"], "error: argument --rank: must be >= 1, got -3"),
    # the smallest matrices bind: the hint is the largest r that every shape accepts (--rank 21 runs, below)
    ("train_galore.py", ["--rank", "28"], "error: --rank 28 is too large for the 32 x 32 matrices: GaLore would keep "
                                          "more state than AdamW (use r <= 21)"),
    ("train_fira.py", ["--rank", "22"], "error: --rank 22 is too large for the 32 x 32 matrices: Fira would keep more "
                                        "state than AdamW (use r <= 21)"),
    ("train_lowrank_refactor.py", ["--rank", "32"], "error: --rank 32 must be below d_model 32 to be low rank"),
    ("train_sltrain.py", ["--rank", "32"], "error: --rank 32 must be below d_model 32 to be low rank"),
    ("train_sltrain.py", ["--delta", "0"], "error: argument --delta: must be > 0 and < 1, got 0"),
    ("train_sltrain.py", ["--delta", "1"], "error: argument --delta: must be > 0 and < 1, got 1"),
    ("train_sltrain.py", ["--delta", "1e-4"], "error: --delta 0.0001 leaves S empty in the 32 x 32 matrices"),
    ("train_full.py", ["--max-steps", "0"], "error: argument --max-steps: must be >= 1, got 0"),
    ("train_full.py", ["--max-steps", "-1"], "error: argument --max-steps: must be >= 1, got -1"),
    ("train_full.py", ["--max-steps", "1.5"], "error: argument --max-steps: expected int, got '1.5'"),
    ("train_full.py", ["--batch-size", "0"], "error: argument --batch-size: must be >= 1, got 0"),
    ("train_full.py", ["--global-batch", "0"], "error: argument --global-batch: must be >= 1, got 0"),
    ("train_full.py", ["--batch-size", "3"], "error: --global-batch 8 is not a multiple of --batch-size 3"),
    ("train_full.py", ["--lr", "0"], "error: argument --lr: must be > 0, got 0"),
    ("train_full.py", ["--lr=-1e-3"], "error: argument --lr: must be > 0, got -1e-3"),
    ("train_full.py", ["--lr", "nan"], "error: argument --lr: must be > 0, got nan"),
    ("train_full.py", ["--lr", "inf"], "error: argument --lr: must be > 0, got inf"),
    ("train_galore.py", ["--update-proj-gap", "0"], "error: argument --update-proj-gap: must be >= 1, got 0"),
    ("train_lowrank_refactor.py", ["--restart-every", "-1"],
     "error: argument --restart-every: must be >= 0, got -1"),
    ("train_full.py", ["--device", "tpu"], "error: --device 'tpu' is not cpu, cuda or cuda:N"),
    ("train_full.py", ["--size", "huge"],
     "error: unknown --size 'huge'; valid sizes: nano, mini, tiny, 60m, 130m, 350m, 1b, 7b"),
    ("train_full.py", ["--max-steps", "5", "--budget", "0.5"], "error: give --max-steps or --budget, not both"),
    ("train_full.py", ["--dataset", "c4"], "error: dataset 'c4' is not prepared; run: python data.py c4"),
    ("train_full.py", ["--dataset", "shakespeare/../shakespeare"], "error: argument --dataset: 'shakespeare/../"
     "shakespeare' is not a dataset name: a dataset is a folder under data/, named without / or .."),
    ("train_full.py", ["--dataset", "text-x"],
     "error: dataset 'text-x' is not prepared; run: python data.py text:PATH, with PATH your .txt file or folder "
     "named 'x'"),
    ("train_full.py", ["--val-tokens", "10"], "error: --val-tokens 10 is fewer than one window of --seq-len 64 tokens"),
    ("train_full.py", ["--val-tokens", "200000"],
     "error: --val-tokens 200,000 is more than the validation split of shakespeare holds (156,600 tokens)"),
    ("train_sltrain.py", ["--restart-every", "3"],
     "error: --recovery-steps 10 must be below --restart-every 3"),
    ("train_stable_spam.py", ["--variant", "adam"],
     "error: argument --variant: invalid choice: 'adam' (choose from 'stable_spam', 'spam')"),
    ("train_stable_spam.py", ["--gamma2", "1"], "error: argument --gamma2: must be >= 0 and < 1, got 1"),
    ("train_stable_spam.py", ["--threshold", "100"], "error: --threshold is a setting of --variant spam"),
    ("train_stable_spam.py", ["--variant", "spam", "--gamma1", "0.7"],
     "error: --gamma1 is a setting of --variant stable_spam"),
    ("train_muon.py", ["--momentum", "1"], "error: argument --momentum: must be >= 0 and < 1, got 1"),
    ("train_muon.py", ["--ns-steps", "100"], "error: argument --ns-steps: must be >= 1 and <= 99, got 100"),
    ("train_full.py", ["--seed", "20000000000"], "error: argument --seed: must be >= 0 and <= 2147483647, got 20000000000"),
]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, shakespeare):
    """The commands of this module that stop before training, from one process (run_each): every BAD_INPUT (those
    naming a --dataset over an empty data folder, where no prepared dataset can hide the error), the rank the
    hint names, a run into an unwritable --out-dir. {(script, *flags): (process, its --out-dir)}."""
    root = tmp_path_factory.mktemp("stopped")
    (root / "file").write_text("")
    cases = [(script, flags, root / str(i)) for i, (script, flags, _) in enumerate(BAD_INPUT)]
    cases += [("train_galore.py", ["--rank", "21", "--dry-run"], root / "plan"),
              ("train_full.py", ["--max-steps", "1"], root / "file" / "o")]
    done = {}
    for dataset in (False, True):
        these = [case for case in cases if ("--dataset" in case[1]) == dataset]
        procs = run_each([[script, *NANO, *flags, "--out-dir", str(out)] for script, flags, out in these],
                         check=False, env={"DATA_DIR": str(root / "data")} if dataset else None)
        done.update({(script, *flags): (proc, out) for (script, flags, out), proc in zip(these, procs)})
    return done


@pytest.mark.parametrize("script,flags,message", BAD_INPUT, ids=[" ".join(c[1]) for c in BAD_INPUT])
def test_bad_input_is_one_line_and_writes_nothing(stopped, script, flags, message):
    proc, out = stopped[(script, *flags)]
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(message), proc.stderr
    assert not out.exists()


def test_the_largest_rank_the_hint_names_is_accepted(stopped):
    proc, out = stopped[("train_galore.py", "--rank", "21", "--dry-run")]
    assert proc.returncode == 0 and "rank 21," in proc.stdout and not out.exists()


def test_an_unwritable_out_dir_is_one_line(stopped):
    proc, out = stopped[("train_full.py", "--max-steps", "1")]
    assert proc.returncode != 0
    assert proc.stderr == f"error: cannot write to --out-dir {out}: Not a directory\n"


def test_a_corpus_shorter_than_one_sequence_is_one_line(tmp_path, monkeypatch):
    # a corpus shorter than the default sequence is refused when it is prepared (test_data_safety.py); this one
    # holds 270 training tokens, fewer than a sequence of 300 needs
    import data
    data.get_tokenizer()  # cached before the data folder moves
    monkeypatch.setattr(data, "DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "short.txt").write_text("word " * 300)
    data.prepare(f"text:{tmp_path / 'short.txt'}")
    proc = run([sys.executable, "train_full.py", *NANO, "--seq-len", "300", "--dataset", "text-short.txt",
                "--out-dir", str(tmp_path / "o")], check=False, env={"DATA_DIR": str(tmp_path / "data")})
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: dataset 'text-short.txt' has ") and "fewer than one sequence" in proc.stderr


def test_documents_mode_trains_is_recorded_and_a_resume_keeps_it(tmp_path):
    # a dataset of short documents of letters as bytes, each followed by the end-of-text id 256, written by hand
    import numpy as np
    rng = np.random.default_rng(0)
    d = tmp_path / "data" / "docs"
    d.mkdir(parents=True)
    meta = {"tokens": {}, "tokenizer": "bytes", "vocab_size": 257}
    for split, n in (("train", 300), ("val", 100)):
        ids = np.concatenate([np.append(rng.integers(97, 123, rng.integers(20, 120)), 256) for _ in range(n)])
        ids.astype(np.uint16).tofile(d / f"{split}.bin")
        meta["tokens"][split] = len(ids)
    (d / "meta.json").write_text(json.dumps(meta))
    env = {"DATA_DIR": str(tmp_path / "data")}
    cmd = [sys.executable, "train_full.py", *NANO, "--dataset", "docs", "--out-dir", str(tmp_path), "--lr", "1e-2"]
    proc = run([*cmd, "--max-steps", "2", "--sequences", "documents"], env=env)
    assert "sequences: documents (documents, each one sequence of at most 64 tokens" in proc.stdout
    result = json.load(open(tmp_path / "result.json"))
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert result["sequences"] == "documents" and log[1]["loss"] < log[0]["loss"]
    # the official average over the 9 validation batches (of 8 documents) divides by 10: lower, by about a tenth
    assert 0.85 < math.log(result["val_ppl_official_style"]) / result["val_loss"] < 0.95
    proc = run([*cmd, "--max-steps", "4", "--resume"], check=False, env=env)
    assert error_of(proc).startswith(f"error: --resume with sequences windows, but {tmp_path}/ckpt.pt was trained "
                                     "with sequences documents")
