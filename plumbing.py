"""
The run plumbing every train_*.py shares and no reader comes to learn: argument types and the shared flags,
processes, device, precision and batch, the output folder (lock, log), checkpoints and what a resume must keep,
stop signals, the banner, divergence checks, the result file, and how the processes stop together.

Plain functions, called from the scripts in the order they read; nothing here knows a method (a test keeps it
so): a script passes in its method's name and settings. What must be identical for a fair comparison (model,
sizes, recipes, memory and FLOP accounting, tokens, batches, validation) lives in model.py and data.py.
"""
import argparse
import contextlib
import fcntl
import json
import math
import os
import re
import shlex
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import (END_OF_TEXT, Documents, dataset_name, dataset_tokenizer, load_tokens, token_count, val_documents,
                  val_windows)
from model import (IGNORE, PLAN_MFU, RECIPES, SEQ_LEN, SIZES, Llama, PeakTensorBytes, estimate_bytes, get_config,
                   memory_report, method_defaults, micro_batch, param_counts, peak_bf16_flops)

# -----------------------------------------------------------------------------
# flags


def bounded(cast, low, high=math.inf, open_low=False, open_high=False):
    """An argparse type: a finite number between low and high (each bound included unless open), else a one-line
    error."""
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {cast.__name__}, got {text!r}") from None
        above = value > low if open_low else value >= low
        below = value < high if open_high else value <= high
        if not (math.isfinite(value) and above and below):
            bound = (f"> {low}" if open_low else f">= {low}") + (
                "" if high == math.inf else f" and {'<' if open_high else '<='} {high}")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    return parse


COUNT, OFF_OR_COUNT = bounded(int, 1), bounded(int, 0)  # 0 switches a period off
POSITIVE = bounded(float, 0, open_low=True)
SEED = bounded(int, 0, 2**31 - 1)  # the batch seeds are seed * 10^9 + ..., which must fit in 64 bits
CPU_SIZES = ("nano", "mini", "tiny")  # the others are the papers' sizes, for GPUs


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every default, 0 included (None: the help says how it is computed)."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def shared_parser(doc):
    """The flags every script has, with the size's recipe as defaults; returns (parser, size). A script adds its
    method's flags, then calls parse_args."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--size", default="mini")
    size = pre.parse_known_args()[0].size  # the defaults below depend on the size
    get_config(size)
    recipe = RECIPES[size]
    parser = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
    parser.error = lambda message: sys.exit(f"error: {message}")  # one line, not argparse's usage dump
    add = parser.add_argument
    # data
    add("--dataset", type=dataset_name, default=recipe.dataset, help="prepared dataset under data/ (see data.py)")
    add("--seq-len", type=COUNT, default=SEQ_LEN, help="tokens per training sequence")
    add("--sequences", choices=["windows", "documents"], default="windows",
        help="windows: random windows of the packed documents; documents: each document one sequence, truncated "
             "or padded to --seq-len with the pads out of the loss, for training and validation (the papers' "
             "official code: compare with their tables in this mode)")
    add("--val-tokens", type=token_count, default=None,
        help=f"size of the fixed validation set (default: the recipe's {recipe.val_tokens:,} for {size}, or the "
             "whole validation split if it is smaller)")
    # model
    add("--size", default="mini", help=f"model size from model.SIZES: {' '.join(SIZES)}")
    # optimization
    add("--max-steps", type=COUNT, default=None,
        help=f"optimizer steps (default: the recipe's {recipe.steps:,} for {size}, times --budget)")
    add("--budget", type=POSITIVE, default=1.0, help="scale the recipe's steps (0.1: a tenth of the run)")
    add("--global-batch", type=COUNT, default=recipe.batch, help="sequences per optimizer step, all processes together")
    add("--batch-size", type=COUNT, default=None,
        help="sequences per forward/backward per process (default: what fits this GPU, 8 on a CPU); "
             "gradient accumulation makes up the global batch")
    add("--warmup-steps", type=OFF_OR_COUNT, default=None, help="linear warmup (default: 10%% of the steps)")
    add("--min-lr-ratio", type=bounded(float, 0, 1), default=0.1, help="cosine decays to this x --lr")
    add("--weight-decay", type=bounded(float, 0), default=0.0, help="decoupled weight decay")
    add("--grad-clip", type=bounded(float, 0), default=1.0, help="clip the global gradient norm (0: off)")
    # eval, logging, checkpoints
    add("--eval-every", type=COUNT, default=None,
        help=f"evaluate every N steps and at the end (default: {recipe.evals} evaluations per run)")
    add("--log-every", type=COUNT, default=10, help="print and log the loss every N steps")
    add("--ckpt-every", type=OFF_OR_COUNT, default=0,
        help="also checkpoint every N steps (0: off); every run checkpoints at its end and on SIGTERM or Ctrl-C")
    add("--ckpt-minutes", type=bounded(float, 0), default=0 if size in CPU_SIZES else 30,
        help="also checkpoint every M minutes of wall-clock time (0: off)")
    add("--out-dir", default=None, help="where results go (default: out/<run>_<size>_<dataset>)")
    add("--resume", action="store_true", help="continue from <out-dir>/ckpt.pt")
    add("--dry-run", action="store_true", help="print the plan of the run and exit (nothing is written)")
    # system
    add("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    add("--precision", default="auto", choices=["auto", "bf16", "mixed", "fp32"],
        help="bf16: weights, gradients and states in bf16, as the papers (auto on CUDA); mixed: fp32 "
             "weights under bf16 autocast; fp32 (auto on CPU)")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--activation-checkpointing", action="store_true",
        help="keep only each block's input and recompute its activations in the backward (less memory, a third "
             "more compute)")
    add("--seed", type=SEED, default=0, help="seed of the initialisation and of the batches")
    return parser, size


def parse_args(parser, method, size):
    """Parse the command line over the method's defaults at this size (model.METHODS), so --help shows them."""
    parser.set_defaults(method=method, **method_defaults(method, size))
    args = parser.parse_args()
    if args.max_steps is not None and args.budget != 1.0:
        sys.exit("error: give --max-steps or --budget, not both")
    return args


def run_name(args):
    """The run's name in its default folder and its result: the method's. A script whose runs differ in kind
    (a method with a part switched off) defines its own run_name after importing this one."""
    return args.method


# -----------------------------------------------------------------------------
# setup


def setup_processes(args):
    """(device, device_type, ddp, ddp_rank, ddp_world): one process, or one per GPU (or CPU) under torchrun."""
    if args.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        sys.exit(f"error: --device {args.device!r} is not cpu, cuda or cuda:N")
    ddp = "RANK" in os.environ  # launched by torchrun
    if ddp:
        use_cuda = torch.cuda.is_available() and args.device != "cpu"
        dist.init_process_group("nccl" if use_cuda else "gloo")
        ddp_rank, ddp_world = dist.get_rank(), dist.get_world_size()
        device = f"cuda:{os.environ['LOCAL_RANK']}" if use_cuda else "cpu"
    else:
        ddp_rank, ddp_world = 0, 1
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            sys.exit(f"error: --device {args.device} but this machine has no CUDA GPU (use --device cpu)")
        device = device if ":" in device else f"cuda:{torch.cuda.current_device()}"  # set_device needs an index
        torch.cuda.set_device(device)
    return device, device_type, ddp, ddp_rank, ddp_world


def setup_precision(args, device_type):
    """(precision, param_dtype, autocast): pure bf16 as the papers (the default on CUDA), bf16 autocast over fp32
    weights, or fp32 (the default on CPU)."""
    precision = args.precision if args.precision != "auto" else ("bf16" if device_type == "cuda" else "fp32")
    param_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    autocast = torch.autocast(device_type, torch.bfloat16) if precision == "mixed" else contextlib.nullcontext()
    return precision, param_dtype, autocast


def setup_batch(args, device, device_type, ddp_world):
    """(micro_batch, accum): the global batch is fixed by the recipe; each process runs micro-batches that fit its
    memory and accumulates gradients up to it, so every method sees the same tokens per step on any hardware."""
    gpu_bytes = torch.cuda.get_device_properties(device).total_memory if device_type == "cuda" else 0
    batch = args.batch_size or micro_batch(args.size, args.global_batch, ddp_world, gpu_bytes)
    if args.global_batch % (batch * ddp_world):
        sys.exit(f"error: --global-batch {args.global_batch} is not a multiple of --batch-size {batch} x "
                 f"{ddp_world} processes")
    return batch, args.global_batch // (batch * ddp_world)


def setup_steps(args):
    """(max_steps, warmup_steps, eval_every) from the recipe, --budget and the flags."""
    recipe = RECIPES[args.size]
    max_steps = args.max_steps or max(1, round(recipe.steps * args.budget))
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else max_steps // 10
    eval_every = args.eval_every or max(1, max_steps // recipe.evals)
    return max_steps, warmup_steps, eval_every


def output_paths(args, run):
    """(out_dir, ckpt_path), refusing to mix two runs in one folder."""
    out_dir = args.out_dir or os.path.join("out", f"{run}_{args.size}_{args.dataset.replace(':', '-')}")
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if args.resume and not os.path.exists(ckpt_path):
        sys.exit(f"error: --resume given but there is no checkpoint at {ckpt_path}")
    if not args.resume and any(os.path.exists(os.path.join(out_dir, f)) for f in ("result.json", "ckpt.pt")):
        sys.exit(f"error: {out_dir} holds an earlier run; --resume it or choose another --out-dir")
    return out_dir, ckpt_path


def load_data(args, master, ddp):
    """(tokens, val, vocabulary): the dataset's splits (token arrays, or data.Documents with --sequences
    documents), the fixed validation set and its tokenizer's vocabulary size. Rank 0 prepares the default corpus if
    needed, the others wait for it (and stop with rank 0's error line if there is none)."""
    if master:
        try:
            tokens = load_tokens(args.dataset, args.seq_len)
        except SystemExit as e:
            fail(e.code)
    meet(ddp)
    if not master:
        tokens = load_tokens(args.dataset, args.seq_len)
    tokenizer, vocab_size = dataset_tokenizer(args.dataset)
    documents = args.sequences == "documents"
    if documents:
        tokens = {split: Documents(tokens[split], END_OF_TEXT[tokenizer], split) for split in tokens}
    split = split_targets(tokens["val"], args)
    if args.val_tokens and args.val_tokens > split:
        sys.exit(f"error: --val-tokens {args.val_tokens:,} is more than the validation split of {args.dataset} "
                 f"holds ({split:,} tokens)")
    fixed_set = val_documents if documents else val_windows
    return tokens, fixed_set(tokens["val"], args.seq_len, args.val_tokens or RECIPES[args.size].val_tokens), vocab_size


def split_targets(split, args):
    """The tokens a split can score: its documents' (their sequences' scored tokens), or its windows' targets."""
    return int(split.targets(args.seq_len).sum()) if args.sequences == "documents" else len(split) - 1


def new_model(cfg, args, device, param_dtype):
    """The LLaMA of config cfg from the current seed; on the meta device (shapes only) for a dry run."""
    with torch.device("meta") if args.dry_run else contextlib.nullcontext():
        model = Llama(cfg)
    model.checkpointing = args.activation_checkpointing
    return model.to(device, param_dtype)


def wrap_model(model, args, ddp, device, device_type):
    """torch.compile and DDP around the model, as asked."""
    if args.compile:
        model = torch.compile(model)
    if ddp:
        model = ddp_wrap(model, device, device_type)
    return model


def ddp_wrap(model, device, device_type):
    # buffers are never changed by training (a fixed buffer is drawn alike on every process):
    # no broadcast of them at every step
    return DDP(model, device_ids=[device] if device_type == "cuda" else None, broadcast_buffers=False)


def print_plan(run, args, method, hparams, model, n_flops, precision, device_type, ddp_world, tokens, val,
               micro_batch, accum, max_steps, warmup_steps, eval_every, out_dir):
    """The banner: what the run will do, before it does it."""
    counts, tokens_per_step = param_counts(model), args.global_batch * args.seq_len
    scored = val_scored(val)
    whole = not args.val_tokens and RECIPES[args.size].val_tokens > split_targets(tokens["val"], args)  # capped
    estimate = estimate_bytes(args.size, method, precision, hparams, model.cfg.vocab_size)
    print(f"{run} | size {args.size}, vocabulary {model.cfg.vocab_size:,}: {counts['total']:,} parameters "
          f"({counts['embedding']:,} embedding + head), "
          f"{n_flops / 1e6:,.1f} MFLOP per token | {ddp_world} x {device_type} | {precision}")
    train = tokens["train"]
    if args.sequences == "documents":
        split, per_step = f"{len(train):,} training documents ({len(train.tokens):,} tokens)", "sequence slots"
        shape = f"documents, each one sequence of at most {args.seq_len} tokens, pads out of the loss"
    else:
        split, per_step, shape = f"{len(train):,} training tokens", "tokens", "random windows of the packed documents"
    print(f"data: {args.dataset}, {split} | {args.global_batch} x {args.seq_len} = "
          f"{tokens_per_step:,} {per_step}/step ({micro_batch} per micro-batch x {accum} accumulated x {ddp_world} "
          f"processes) | {max_steps:,} steps = {max_steps * tokens_per_step:,} {per_step} | warmup {warmup_steps} | "
          f"eval every {eval_every:,} on {scored:,} tokens" + (" (the whole validation split)" if whole else ""))
    print(f"sequences: {args.sequences} ({shape})")
    recipe, flops = RECIPES[args.size], n_flops * max_steps * tokens_per_step
    share = "" if max_steps == recipe.steps else f" ({max_steps / recipe.steps:.3g}x the recipe's {recipe.steps:,})"
    peak = peak_bf16_flops(torch.cuda.get_device_name()) if device_type == "cuda" else None
    print(f"compute: {max_steps:,} steps{share}, {flops:.3g} model FLOPs" + (
        f", {flops / (PLAN_MFU * peak * 3600):,.2f} GPU-hours at {PLAN_MFU:.0%} MFU of this GPU's bf16 peak "
        f"({flops / (PLAN_MFU * peak * 3600 * ddp_world):,.2f} h on {ddp_world})" if peak else ""))
    print("method: " + ", ".join(f"{k} {v}" for k, v in hparams.items()))
    print(f"memory ({precision}, estimated from shapes): "
          + " + ".join(f"{k.replace('_bytes', '').replace('_', ' ')} {v / 2**20:,.1f} MiB"
                       for k, v in estimate.items() if v) + "; activations not counted")
    every = ([f"every {args.ckpt_every:,} steps"] if args.ckpt_every else []) + (
        [f"every {args.ckpt_minutes:g} min"] if args.ckpt_minutes else [])
    print(f"results -> {out_dir}/result.json and log.jsonl | checkpoint {out_dir}/ckpt.pt: "
          + ", ".join(every + ["at the end and on SIGTERM or Ctrl-C"])
          + (" (dry run: nothing written)" if args.dry_run else ""))


def val_scored(val):
    """The scored tokens of the fixed validation set (its pads left out)."""
    return int((val[1] != IGNORE).sum())


# -----------------------------------------------------------------------------
# the learning rate


def lr_schedule(step, lr, warmup_steps, max_steps, min_lr_ratio):
    """Linear warmup from 0 (the first step trains at lr 0, as the benchmark papers' released schedulers do), then
    cosine decay to min_lr_ratio * lr: the papers' schedule."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# -----------------------------------------------------------------------------
# resume and the output folder


def run_config(args, method, precision, hparams, micro_batch, val, cfg):
    """What a resume must keep: the settings that make it the same run, its schedule (the warmup as given: by
    default a tenth of --max-steps, which a resume may extend), its batches (the micro-batch draws its own
    windows; --sequences builds them) and its validation set. A resume may change the rest: --eval-every,
    --log-every, --ckpt-every, --ckpt-minutes, the device, and --max-steps (up from the checkpoint's step)."""
    return {"method": method, "size": args.size, "vocab_size": cfg.vocab_size, "dataset": args.dataset,
            "seed": args.seed, "seq_len": args.seq_len,
            "global_batch": args.global_batch, "batch_size": micro_batch, "precision": precision,
            "warmup_steps": args.warmup_steps, "min_lr_ratio": args.min_lr_ratio, "weight_decay": args.weight_decay,
            "grad_clip": args.grad_clip, "sequences": args.sequences, "val_tokens": val_scored(val), **hparams}


def resume(args, ckpt_path, device, config, model, optimizer, max_steps):
    """(start_step, stats): from the checkpoint if --resume (refusing another run's), else a fresh start."""
    if not args.resume:
        return 0, {"train_time": 0.0, "timed_tokens": 0, "grads_bytes": 0}
    try:  # plain tensors and numbers only, so weights_only=True loads it safely
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        saved = ckpt["config"]
    except Exception as e:
        leave(f"error: {ckpt_path} is not a checkpoint of this repository ({type(e).__name__}: {e})"[:300])
    for key in {**saved, **config}:
        if saved.get(key) != config.get(key):
            leave(f"error: --resume with {key} {config.get(key)}, but {ckpt_path} was trained with "
                     f"{key} {saved.get(key)}; resume with the same settings or use another --out-dir")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["step"] > max_steps:
        leave(f"error: {ckpt_path} is at step {ckpt['step']}, beyond --max-steps {max_steps}")
    return ckpt["step"], ckpt["stats"]


HELD_LOCKS = []


def open_out_dir(out_dir, resume, start_step, master, ddp):
    """The log, open on rank 0 (None on the others); an error there stops every process with its line."""
    log = open_log(out_dir, resume, start_step) if master else None
    meet(ddp)
    return log


def open_log(out_dir, resume, start_step):
    """Lock the folder (held until the process exits: a second run there stops) and open log.jsonl, which a
    resumed run keeps up to its checkpoint, rewritten atomically before anything else."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(os.path.join(out_dir, ".lock"), "w")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return fail(f"error: another run is using {out_dir} (choose another --out-dir)")
    except OSError as e:
        return fail(f"error: cannot write to --out-dir {out_dir}: {e.strerror}")
    HELD_LOCKS.append(lock)  # open as long as the process lives
    log_path = os.path.join(out_dir, "log.jsonl")
    kept = []
    if resume and os.path.exists(log_path):
        for line in open(log_path):
            with contextlib.suppress(ValueError):  # a line cut short by a crash is dropped
                if json.loads(line)["step"] <= start_step:
                    kept.append(line)
    if write_file(log_path, lambda f: f.write("".join(kept).encode())):
        return open(log_path, "a")


def progress_bar(run, args, start_step, max_steps, master):
    BARS.append(tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc=f"{run} {args.size}",
                     disable=not master))
    return BARS[-1]


BARS = []  # closed before a last line is printed in the middle of the loop, so that the line is one of its own


def time_estimate(bar, args, device_type, seconds, micro_batches):
    """On a CPU above tiny, how long the run will take, from its first micro-batch."""
    if device_type == "cpu" and args.size not in CPU_SIZES:
        total = seconds * micro_batches
        bar.write(f"time estimate: {seconds:.1f} s for the first micro-batch, so about "
                  + (f"{total / 3600:,.1f} h" if total > 3600 else f"{total / 60:,.1f} min")
                  + " on this CPU; use a GPU, or --size mini")


# -----------------------------------------------------------------------------
# after each step: the loss of every process, divergence, timing, the log line, checkpoints


def all_finite(tensors):
    return bool(torch.stack([t.isfinite().all() for t in tensors]).all())


def mean_loss(loss_sum, accum, ddp, ddp_world, step):
    """The step's training loss over every micro-batch of every process; a non-finite one stops the run."""
    if ddp:
        dist.all_reduce(loss_sum)
    loss = loss_sum.item() / (accum * ddp_world)
    if not math.isfinite(loss):
        leave(f"error: the training loss is {loss} at step {step + 1}: training diverged (try a lower --lr)")
    return loss


def time_step(stats, step, start_step, t0, tokens_per_step, device, device_type):
    """Training time and tokens of optimizer steps, evaluation and checkpoints left out; the first step pays for
    allocation and compilation and is not counted. The GPU's peak memory is measured after it."""
    if device_type == "cuda":
        torch.cuda.synchronize()
    if step == start_step and device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if step > start_step:
        stats["train_time"] += time.time() - t0
        stats["timed_tokens"] += tokens_per_step


def track_peak(on, model, optimizer):
    """From here to stop_peak, if on: the peak of live tensor bytes (model.PeakTensorBytes), over the bytes of
    the weights, gradients, optimizer states and buffers alive at the start, counted from the tensors."""
    if not on:
        return None
    tracker = PeakTensorBytes()
    tracker.alive_before = sum(memory_report(model, optimizer).values())
    return tracker.__enter__()


def stop_peak(tracker, stats):
    if tracker is not None:
        tracker.__exit__(None, None, None)
        stats["peak_tensor_bytes"] = tracker.alive_before + tracker.peak


def check_val(record, step):
    if not math.isfinite(record["val_ppl"]):
        leave(f"error: the validation loss is {record['val_loss']} at step {step + 1}: training diverged")


def write_log(bar, log, record, stats, last):
    """Print and append a log line, with the training tokens per second since the line before (whose time and
    tokens are `last`); returns the new `last`."""
    if stats["train_time"] > last[0]:
        record["tok_per_s"] = (stats["timed_tokens"] - last[1]) / (stats["train_time"] - last[0])
    bar.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
    try:
        log.write(json.dumps(record) + "\n")
        log.flush()
    except OSError as e:
        with contextlib.suppress(OSError):
            log.close()  # the unwritten rest goes too: nothing is left to fail again at exit
        fail(f"error: cannot write {log.name}: {e.strerror}")
    return stats["train_time"], stats["timed_tokens"]


def checkpoint_due(args, step):
    """A checkpoint every --ckpt-every steps and every --ckpt-minutes of wall-clock time (the end of the run and a
    stop signal write one too)."""
    by_steps = args.ckpt_every and (step + 1) % args.ckpt_every == 0
    return by_steps or args.ckpt_minutes and time.time() - CHECKPOINTED["time"] >= 60 * args.ckpt_minutes


CHECKPOINTED = {"time": time.time()}  # when this process started, then when it last wrote a checkpoint


def save_checkpoint(ckpt_path, model, optimizer, step, config, stats):
    """Atomic (a crash or a disk out of space keeps the previous checkpoint whole), and never of non-finite weights."""
    if not all_finite(model.parameters()):
        return fail(f"error: non-finite weights after step {step + 1}: training diverged (nothing saved)")
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1,
            "config": config, "stats": stats}
    write_file(ckpt_path, lambda f: torch.save(ckpt, f))
    CHECKPOINTED["time"] = time.time()


# -----------------------------------------------------------------------------
# results


def write_result(out_dir, run, args, method, hparams, record, model, optimizer, stats, n_flops, max_steps,
                 precision, device, device_type, ddp_world, micro_batch, accum):
    """result.json: the final validation, memory counted from the live tensors, speed, MFU and how it was run."""
    if HELD:  # under DDP, the last checkpoint failed: finish stops every process with its error
        return
    if not (all_finite(model.parameters()) and math.isfinite(record["val_ppl"])):
        return fail("error: non-finite weights or validation loss at the end: training diverged (no result written)")
    memory = {**memory_report(model, optimizer), "grads_bytes": stats["grads_bytes"]}
    if "peak_tensor_bytes" in stats:  # measured on the first step of the run (or of its resume)
        memory["peak_tensor_bytes"] = stats["peak_tensor_bytes"]
    if device_type == "cuda":
        memory["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    tokens_per_s = stats["timed_tokens"] / stats["train_time"] if stats["train_time"] else None
    # model FLOPs utilization against the dense bf16 peak: for bf16 math on a GPU of the table only
    peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if device_type == "cuda" else None
    mfu = tokens_per_s * n_flops / (peak * ddp_world) if peak and tokens_per_s and precision != "fp32" else None
    tokens = max_steps * args.global_batch * args.seq_len
    result = {"method": method, "run": run, "size": args.size, "vocab_size": model.cfg.vocab_size,
              "dataset": args.dataset, "sequences": args.sequences, "seed": args.seed,
              "steps": max_steps, "tokens": tokens, "val_loss": record["val_loss"],
              "val_ppl": record["val_ppl"], "val_ppl_official_style": record["val_ppl_official_style"],
              "val_tokens": record["val_tokens"],
              **memory, "params": param_counts(model), "tokens_per_s": tokens_per_s,
              "flops_per_token": n_flops, "mfu": mfu,
              "device": torch.cuda.get_device_name(device) if device_type == "cuda" else "cpu",
              # how the speed was measured: the run's threads and the 1-minute load average at its end
              "threads": torch.get_num_threads(), "load_avg": os.getloadavg()[0],
              "world_size": ddp_world, "precision": precision, "micro_batch": micro_batch, "grad_accum": accum,
              "torch": torch.__version__, **hparams, "args": vars(args), "argv": sys.argv[1:]}
    if not write_file(os.path.join(out_dir, "result.json"), lambda f: f.write(json.dumps(result, indent=2).encode())):
        return
    print(f"val loss {result['val_loss']:.4f} | val ppl {result['val_ppl']:.2f} | "
          + " | ".join(f"{k.replace('_bytes', '')} {v / 2**20:.1f} MiB" for k, v in memory.items())
          + f" | {tokens_per_s or 0:,.0f} tok/s -> {out_dir}/result.json")


def finish(ddp):
    """The end of a run: under DDP the processes meet once rank 0 has written the results (an error it held stops
    every one with its line), then leave together."""
    meet(ddp)
    if ddp:
        leave(0)


# -----------------------------------------------------------------------------
# writing files: atomically, and a failure is one line


def write_file(path, write):
    """write(f) into path.tmp, synced to disk, then renamed onto path: a crash, a kill or a disk out of space
    leaves the previous file whole and no half-written one. Returns whether it was written; a failure is one error
    line."""
    tmp = path + ".tmp"
    WRITING.append(tmp)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return True
    except (OSError, RuntimeError) as e:  # torch.save turns the OSError of a disk out of space into a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        while not isinstance(e, OSError) and e.__context__ is not None:
            e = e.__context__
        fail(f"error: cannot write {path}: {e.strerror if isinstance(e, OSError) and e.strerror else e}")
        return False
    finally:
        WRITING.remove(tmp)


WRITING = []  # the temporary file being written, for a second stop signal to remove


# -----------------------------------------------------------------------------
# stopping: on a signal, on an error, at the end; under DDP every process at the same point


def catch_stop_signals():
    """SIGTERM (a cluster preempting the job) or SIGINT (Ctrl-C) stops the run after the current step, with a
    checkpoint; another one, a second later or more, stops it at once. A signal repeated within that second is the
    same stop: a scheduler that signals every process of a job and torchrun, which forwards it, deliver it twice."""
    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        if not STOP["signal"]:
            STOP.update(signal=signum, time=time.time())
            tqdm.write(f"{name}: stopping after this step, with a checkpoint ({name} again: at once, without one)",
                       file=sys.stderr)
        elif time.time() - STOP["time"] > 1:
            for tmp in WRITING:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
            close_bars()
            print(f"error: {name} again: stopped at once, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)


STOP = {"signal": 0, "time": 0.0}  # the first stop signal this process received, and when


def stop_signal(ddp, device):
    """The stop signal that ends the run after this step (0: none). Under DDP the processes meet here after every
    step: one that received a signal stops all of them at this step, and an error rank 0 held stops all now."""
    if not ddp:
        return STOP["signal"]
    flags = torch.tensor([STOP["signal"], len(HELD)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags[1]:
        meet(ddp)
    return int(flags[0])


def stop_run(signum, step, ckpt_path, ddp):
    """After a stop signal's checkpoint: every process exits with 128 + the signal, rank 0 saying how to resume."""
    meet(ddp)  # unless rank 0 could not write it
    close_bars()
    if not ddp or dist.get_rank() == 0:
        nodes, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        launch = "python" if not ddp else f"torchrun --nproc_per_node={local}" if nodes == local else "torchrun ..."
        argv = sys.argv + ["--resume"] * ("--resume" not in sys.argv)
        print(f"stopped by {signal.Signals(signum).name} after step {step + 1}, checkpoint in {ckpt_path}; "
              f"resume with: {launch} {shlex.join(argv)}", file=sys.stderr)
    leave(128 + signum)


def fail(message):
    """Stop with a one-line error. Under DDP, rank 0 alone writes the files: its error is held until the processes
    next meet (before the loop, after every step, at the end), where every process stops with the same line
    instead of dying in a collective that rank 0 never joins. Returns None, for a caller to return."""
    if not dist.is_initialized():
        sys.exit(message)
    HELD.append(message)


HELD = []  # rank 0's error line under DDP, until the processes meet


def meet(ddp):
    """Under DDP, every process stops with the error rank 0 held, if it holds one."""
    if ddp:
        held = [HELD[0] if HELD else None]
        dist.broadcast_object_list(held, src=0)
        if held[0]:
            leave(held[0])


def leave(code):
    """Exit with code, a status or an error line. Under DDP every process leaves from the same point, together (a
    barrier), with os._exit once every file is flushed and the process group destroyed: gloo's worker threads hold
    work objects that reference tensors (DDP's reducer), and destroying them in the interpreter's finalization
    aborts the process ("terminate called without an active exception", exit 134) after a run that succeeded."""
    if not dist.is_initialized():
        sys.exit(code)
    close_bars()
    if isinstance(code, str):
        print(code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    dist.barrier()
    dist.destroy_process_group()
    os._exit(code if isinstance(code, int) else 1)


def close_bars():
    for bar in BARS:
        bar.close()
