"""Long runs survive what clusters do to them: a stop signal (SIGTERM, Ctrl-C) checkpoints after the current step and
says how to resume, and the resumed run is the straight run bit for bit; a full disk is one line that keeps the
previous checkpoint; a resume refuses what would make it another run; an error on rank 0 alone stops every DDP
process with the same line."""
import fcntl
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import FAST, NANO, SCRIPTS, error_of, outputs, run, run_each, train

RUN = [*FAST, "--max-steps", "4"]  # after NANO
# the stop comes after step 2; with these the method acts in the resumed steps too (a refresh or a reset at step 3),
# so that its state crosses the checkpoint: these stand for the methods' own resume tests. The low-rank scripts and
# ReLoRA have theirs, inside a recovery window, across a restart, a merge, the warm-start switch.
ACTS = {"train_galore.py": ["--update-proj-gap", "3"], "train_fira.py": ["--update-proj-gap", "3"],
        "train_apollo.py": ["--update-proj-gap", "3"], "train_stable_spam.py": ["--reset-every", "3"]}

# the script, run in this process, sends itself stop signals in step $SIGNAL_STEP, once it has trained (on rank
# $SIGNAL_RANK under DDP): one per pause in $SIGNAL_PAUSES (the seconds before it), as a scheduler or a user would
SIGNAL = """import os, runpy, signal, sys, time
sys.path.insert(0, os.getcwd())
import plumbing
stop_signal, steps = plumbing.stop_signal, []
def signal_then_stop_signal(*args):
    steps.append(1)
    if len(steps) == int(os.environ["SIGNAL_STEP"]) and os.environ.get("RANK", "0") == os.environ["SIGNAL_RANK"]:
        for pause in os.environ["SIGNAL_PAUSES"].split():
            time.sleep(float(pause))
            os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))
    return stop_signal(*args)
plumbing.stop_signal = signal_then_stop_signal
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
SIGNAL_ENV = {"SIGNAL_STEP": "2", "SIGNAL_RANK": "0", "SIGNAL_PAUSES": "0 0", "SIGNAL": "SIGTERM"}


def signalled(script, out_dir, *extra):
    """The arguments of python that run script on nano, stopped by signals in step 2 (SIGNAL_ENV): two at once
    by default, as a scheduler signals every process and torchrun forwards it, so a worker receives one stop
    twice."""
    return ["-c", SIGNAL, script, *NANO, *RUN, "--out-dir", str(out_dir), *extra]


def resume_command(script, out_dir, acts):
    """The command that a stop of signalled(script, out_dir, *acts) must print."""
    return f"python {script} {shlex.join([*NANO, *RUN, '--out-dir', str(out_dir), *acts])} --resume"


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, shakespeare):
    """Each script's straight run, the same run stopped by signals, what the stop left in its folder and the resume
    the stop must print, in this order, from one process (run_each): {script: (straight process, stopped
    process, the files it left, resumed process, straight's out_dir, stopped's out_dir)}."""
    root, commands = tmp_path_factory.mktemp("stopped"), []
    for script in SCRIPTS:
        acts = ACTS.get(script, [])
        commands += [[script, *NANO, *RUN, "--out-dir", str(root / "straight" / script), *acts],
                     signalled(script, root / script, *acts),
                     ["-c", "import os, sys; print(*sorted(os.listdir(sys.argv[1])))", str(root / script)],
                     shlex.split(resume_command(script, root / script, acts))[1:]]
    procs = run_each(commands, check=False, env=SIGNAL_ENV)
    return {script: (*procs[4 * i:4 * i + 4], root / "straight" / script, root / script)
            for i, script in enumerate(SCRIPTS)}


@pytest.fixture(scope="module")
def straight(stopped):
    """The straight 4-step nano run of a script: (result, log, out_dir)."""
    def get(script):
        proc, *_, out, _ = stopped[script]
        assert proc.returncode == 0, proc.stderr[-3000:]
        return (*outputs(out), out)
    return get


def steps(log):
    return [(r["step"], r["lr"], r["loss"], r.get("val_loss")) for r in log]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_stop_signal_checkpoints_and_the_printed_resume_is_the_straight_run(stopped, straight, script):
    acts = ACTS.get(script, [])
    _, proc, files, resume, _, out = stopped[script]
    assert proc.returncode == 128 + 15, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"stopped by SIGTERM after step 2, checkpoint in {out}/ckpt.pt; resume with: " \
                   f"{resume_command(script, out, acts)}"
    assert proc.stderr.count("SIGTERM: stopping after this step") == 1  # the repeat is the same stop
    assert files.stdout.split() == [".lock", "ckpt.pt", "log.jsonl"]  # no result
    assert resume.returncode == 0, resume.stderr[-3000:]  # the command printed
    result, log, _ = straight(script)
    resumed, resumed_log = outputs(out)
    assert steps(resumed_log) == steps(log) and resumed["val_loss"] == result["val_loss"]
    if acts:  # the method acted after the stop, from the state the checkpoint kept
        assert any(key in r for r in log if r["step"] > 2 for key in ("refreshes", "resets")), log


def test_a_second_signal_stops_at_once_without_a_checkpoint(tmp_path, shakespeare):
    proc = run([sys.executable, *signalled("train_full.py", tmp_path)], check=False,  # Ctrl-C, again 1.2 s later
               env={**SIGNAL_ENV, "SIGNAL_PAUSES": "0 1.2", "SIGNAL": "SIGINT"})
    assert proc.returncode == 128 + 2
    assert proc.stderr.strip().splitlines()[-1] == "error: SIGINT again: stopped at once, without a checkpoint"
    assert sorted(os.listdir(tmp_path)) == [".lock", "log.jsonl"]


@pytest.fixture
def small_disk(tmp_path):
    """A 56 MiB tmpfs: room for one nano checkpoint (37 MiB), not for the next one beside it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=56m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, shakespeare, straight, small_disk):
    out = small_disk / "run"
    _, _, proc = train("train_full.py", out, *RUN, "--ckpt-every", "2", check=False)
    assert error_of(proc) == f"error: cannot write {out}/ckpt.pt: No space left on device"
    assert sorted(os.listdir(out)) == [".lock", "ckpt.pt", "log.jsonl"]  # the step-2 checkpoint, no temporary file
    # the disk fills up: the log cannot be rewritten for a resume, and stays as it was
    log_before = open(out / "log.jsonl").read()
    with open(small_disk / "filler", "wb") as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * 2**16)
            f.flush()
    _, _, proc = train("train_full.py", out, *RUN, "--resume", check=False)
    assert error_of(proc) == f"error: cannot write {out}/log.jsonl: No space left on device"
    assert open(out / "log.jsonl").read() == log_before and not glob.glob(f"{out}/*.tmp")
    # on a disk with room, the checkpoint left resumes the run as if nothing had happened
    shutil.copytree(out, tmp_path / "moved")
    resumed, log, _ = train("train_full.py", tmp_path / "moved", *RUN, "--resume")
    result, straight_log, _ = straight("train_full.py")
    assert steps(log) == steps(straight_log) and resumed["val_loss"] == result["val_loss"]


# the schedule, the validation set and the windows drawn per micro-batch
CHANGES = [("--warmup-steps", "1", "warmup_steps", "None"), ("--min-lr-ratio", "0.5", "min_lr_ratio", "0.1"),
           ("--val-tokens", "128", "val_tokens", "256"), ("--batch-size", "4", "batch_size", "8")]


# a model of another vocabulary: what a dataset re-prepared with another tokenizer under the same name would give
CHANGES.append(("--dataset", "shakespeare", "vocab_size", "50304"))


@pytest.mark.parametrize("flag,value,key,saved", CHANGES, ids=[c[0] for c in CHANGES])
def test_a_resume_refuses_what_changes_the_run(shakespeare, straight, monkeypatch, flag, value, key, saved):
    """train_full.py's setup up to its resume, in this process (a process per refusal would cost seconds)."""
    import plumbing
    from model import get_config
    _, _, out = straight("train_full.py")
    monkeypatch.setattr(sys, "argv", ["train_full.py", *NANO, *RUN, "--out-dir", str(out), "--resume", flag, value])
    parser, size = plumbing.shared_parser(None)
    parser.add_argument("--lr", type=plumbing.POSITIVE)
    args = plumbing.parse_args(parser, "full", size)
    micro_batch, _ = plumbing.setup_batch(args, "cpu", "cpu", 1)
    _, val, vocab_size = plumbing.load_data(args, True, False)
    if key == "vocab_size":
        value, vocab_size = "320", 257
    config = plumbing.run_config(args, "full", "fp32", {"lr": args.lr}, micro_batch, val, get_config(size, vocab_size))
    with pytest.raises(SystemExit) as refused:  # before it loads anything into the model and the optimizer
        plumbing.resume(args, os.path.join(out, "ckpt.pt"), "cpu", config, None, None, 4)
    assert refused.value.code == (f"error: --resume with {key} {value}, but {out}/ckpt.pt was trained with {key} "
                                  f"{saved}; resume with the same settings or use another --out-dir")


def test_a_resume_allows_what_leaves_the_run_as_it_was(tmp_path, shakespeare, straight):
    _, log, out = straight("train_full.py")
    shutil.copytree(out, tmp_path / "run")
    _, extended, _ = train("train_full.py", tmp_path / "run", *FAST, "--max-steps", "6", "--resume", "--eval-every",
                           "1", "--log-every", "2", "--ckpt-every", "5", "--ckpt-minutes", "1")
    assert extended[:4] == log and [r["step"] for r in extended[4:]] == [5, 6]
    assert all("val_loss" in r for r in extended[4:])


def test_a_locked_out_dir_under_ddp_stops_every_process_with_one_line(tmp_path, shakespeare):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as lock:  # another run holds the folder
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "--log-dir",
                    str(tmp_path / "logs"), "--redirects", "3", "train_full.py", *NANO, "--out-dir", str(out)],
                   check=False)
    assert proc.returncode != 0
    ranks = sorted(glob.glob(f"{tmp_path}/logs/*/attempt_0/*/stderr.log"))
    assert len(ranks) == 2
    for path in ranks:
        stderr = open(path).read()
        assert "Traceback" not in stderr
        assert stderr.strip().splitlines()[-1] == f"error: another run is using {out} (choose another --out-dir)"


def test_a_stop_signal_to_one_ddp_process_stops_all_at_the_same_step(tmp_path, shakespeare):
    (tmp_path / "send_signals.py").write_text(SIGNAL)
    out, logs = tmp_path / "out", tmp_path / "logs"
    args = [*NANO, *RUN, "--out-dir", str(out)]
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "--log-dir",
                str(logs), "--redirects", "3", str(tmp_path / "send_signals.py"), "train_full.py", *args], check=False,
               env={**SIGNAL_ENV, "SIGNAL_RANK": "1"})
    assert proc.returncode != 0
    rank0, rank1 = (open(p).read() for p in sorted(glob.glob(f"{logs}/*/attempt_0/*/stderr.log")))
    assert "Traceback" not in rank0 + rank1 and "SIGTERM: stopping after this step" in rank1
    assert rank0.strip().splitlines()[-1] == (f"stopped by SIGTERM after step 2, checkpoint in {out}/ckpt.pt; resume "
                                              f"with: torchrun --nproc_per_node=2 train_full.py {shlex.join(args)} "
                                              "--resume")
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 2]
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2
