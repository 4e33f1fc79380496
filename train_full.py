"""
Full-rank AdamW: the baseline every memory-efficient method is measured against.

    python train_full.py                                   # mini on CPU, the embedded Shakespeare as bytes
    python train_full.py --size 60m --dataset c4           # one GPU, the papers' 60m run (python data.py c4 first)
    torchrun --nproc_per_node=4 train_full.py --size 350m --dataset c4
    python train_full.py --size 350m --dry-run             # print the plan (steps, batch, memory) and exit

The method (AdamW, Loshchilov & Hutter 2019), for every parameter W with gradient G at step t:
    M_t = b1 M_{t-1} + (1 - b1) G_t                      first moment
    V_t = b2 V_{t-1} + (1 - b2) G_t^2                    second moment
    W_t = W_{t-1} - lr_t wd W_{t-1} - lr_t (M_t / (1 - b1^t)) / (sqrt(V_t / (1 - b2^t)) + eps)
Memory: weights N, gradients N, optimizer states 2N for a model of N parameters. Every other script
is this one plus its method: `diff train_full.py train_galore.py` shows GaLore and nothing else.
Defaults are the size's recipe (model.RECIPES and model.METHODS: the papers' steps, batch and learning
rate); every flag overrides them, and `--size 350m --help` lists that size's values.
"""

import contextlib
import math
import sys
import time

import torch

from data import evaluate, get_batch
from model import compressible_matrices, estimate_bytes, flops_per_token, get_config, tensor_bytes
from plumbing import (COUNT, OFF_OR_COUNT, POSITIVE, bounded, catch_stop_signals, check_val, checkpoint_due, ddp_wrap,
                      finish, load_data, lr_schedule, mean_loss, new_model, open_out_dir, output_paths, parse_args,
                      print_plan, progress_bar, resume, run_config, run_name, save_checkpoint, setup_batch,
                      setup_precision, setup_processes, setup_steps, shared_parser, stop_peak, stop_run, stop_signal,
                      time_estimate, time_step, track_peak, wrap_model, write_log, write_result)

# -----------------------------------------------------------------------------
# config: the flags every script shares (plumbing.py), then the method's; every default is the size's recipe

parser, size = shared_parser(__doc__)
# --- METHOD: begin ---
METHOD = "full"
parser.add_argument("--lr", type=POSITIVE, help="peak learning rate")

# --- METHOD: end ---
args = parse_args(parser, METHOD, size)

# -----------------------------------------------------------------------------
# setup: processes, device, precision, the batch (micro-batches x accumulation x processes), steps, data

device, device_type, ddp, ddp_rank, ddp_world = setup_processes(args)
master = ddp_rank == 0  # only rank 0 prints and writes files
precision, param_dtype, autocast = setup_precision(args, device_type)  # pure bf16: the papers' runs
micro_batch, accum = setup_batch(args, device, device_type, ddp_world)
max_steps, warmup_steps, eval_every = setup_steps(args)
seq_len, tokens_per_step = args.seq_len, args.global_batch * args.seq_len
run = run_name(args)
out_dir, ckpt_path = output_paths(args, run)
# the training split (random windows, or documents: --sequences), the fixed validation set every method shares,
# the tokenizer's vocabulary size
tokens, val, vocab_size = load_data(args, master, ddp)

# -----------------------------------------------------------------------------
# model: the same initial weights for every method (same seed)

cfg = get_config(args.size, vocab_size)
torch.manual_seed(args.seed)
if args.dry_run:  # the plan needs shapes, not weights
    device = "meta"
model = new_model(cfg, args, device, param_dtype)

# -----------------------------------------------------------------------------
# --- METHOD: begin ---
# the method: plain AdamW on every parameter (torch.optim.AdamW)

# fused: all parameters' updates in one kernel (CPU and CUDA), the default for-loop's numbers to an ulp, faster
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                              weight_decay=args.weight_decay, fused=True)
hparams = {"lr": args.lr}  # what a resume must keep, and what the banner and result.json report
# --- METHOD: end ---

raw_model = model  # the module itself, for state_dict and memory accounting
n_flops = flops_per_token(raw_model, seq_len)
model = wrap_model(model, args, ddp, device, device_type)
if master:
    print_plan(run, args, METHOD, hparams, raw_model, n_flops, precision, device_type, ddp_world, tokens, val,
               micro_batch, accum, max_steps, warmup_steps, eval_every, out_dir)
if args.dry_run:
    sys.exit(0)
config = run_config(args, METHOD, precision, hparams, micro_batch, val, cfg)  # a resume must continue the same run
start_step, stats = resume(args, ckpt_path, device, config, raw_model, optimizer, max_steps)

# -----------------------------------------------------------------------------
# training loop

log = open_out_dir(out_dir, args.resume, start_step, master, ddp)  # rank 0 writes the files
catch_stop_signals()  # SIGTERM (a preemption) or Ctrl-C: a checkpoint after the current step, then exit
bar = progress_bar(run, args, start_step, max_steps, master)
last_log, record = (0.0, 0), {}
for step in bar:
    t0 = time.time()
    # the step that the timing skips is measured: its peak of live tensor bytes (not under torch.compile)
    tracker = track_peak(step == start_step and not args.compile, raw_model, optimizer)
    lr = lr_schedule(step, args.lr, warmup_steps, max_steps, args.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(accum):
        # batch offsets depend only on (seed, step, micro_step, process): the same for every method and on resume,
        # and N processes draw what one process with N times the accumulation would
        seed = args.seed * 10**9 + (step * accum + micro_step) * ddp_world + ddp_rank
        x, y = get_batch(tokens["train"], micro_batch, seq_len, seed)
        x, y = x.to(device), y.to(device)
        # under DDP, all-reduce the gradients only on the last micro-batch
        sync = model.no_sync() if ddp and micro_step < accum - 1 else contextlib.nullcontext()
        with sync:
            with autocast:
                _, loss = model(x, y)
            (loss / accum).backward()
        loss_sum += loss.detach()
        if step == start_step and micro_step == 0 and master:
            time_estimate(bar, args, device_type, time.time() - t0, accum * (max_steps - start_step))
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip) if args.grad_clip > 0 else None
    if step == max_steps - 1:  # the gradients alive at the optimizer step, counted once
        stats["grads_bytes"] = tensor_bytes(p.grad for p in raw_model.parameters())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # free the gradients as soon as they are used
    stop_peak(tracker, stats)
    method_log = {}  # what the method did in this step, if anything
    # everything below is diagnostics: the loss, divergence, timing, evaluation, the log, checkpoints
    train_loss = mean_loss(loss_sum, accum, ddp, ddp_world, step)
    time_step(stats, step, start_step, t0, tokens_per_step, device, device_type)
    last = step == max_steps - 1
    record = {"step": step + 1, "tokens": (step + 1) * tokens_per_step, "loss": train_loss, "lr": lr, **method_log}
    if grad_norm is not None:
        record["grad_norm"] = grad_norm.item()
    if (step + 1) % eval_every == 0 or last:
        record.update(evaluate(model, val, micro_batch, device, autocast))
        check_val(record, step)
    if master and ((step + 1) % args.log_every == 0 or "val_loss" in record or method_log):
        last_log = write_log(bar, log, record, stats, last_log)
    bar.set_postfix(loss=f"{train_loss:.3f}")
    stop = stop_signal(ddp, device)  # a stop signal to any process stops every process after this step
    if master and (last or stop or checkpoint_due(args, step)):
        save_checkpoint(ckpt_path, raw_model, optimizer, step, config, stats)
    if stop and not last:
        stop_run(stop, step, ckpt_path, ddp)

# -----------------------------------------------------------------------------
# results

if "val_loss" not in record:  # a resume of a finished run: evaluate its final weights
    record.update(evaluate(model, val, micro_batch, device, autocast))
if master:
    write_result(out_dir, run, args, METHOD, hparams, record, raw_model, optimizer, stats, n_flops, max_steps,
                 precision, device, device_type, ddp_world, micro_batch, accum)
finish(ddp)
