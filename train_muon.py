"""
Muon: orthogonalized momentum for the attention and MLP matrices, AdamW for embedding, head and norms.

    python train_muon.py                                   # mini on CPU, the embedded Shakespeare as bytes
    python train_muon.py --size 60m --dataset c4           # one GPU
    python train_muon.py --adjust-lr-fn original           # Keller Jordan's shape scaling instead of Moonlight's
    torchrun --nproc_per_node=4 train_muon.py --size 350m --dataset c4

The method (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"; torch.optim.Muon, which
this script calls), for each attention/MLP matrix W (fan-out A x fan-in B) with gradient G_t:
    M_t = mu M_{t-1} + (1 - mu) G_t                        momentum, mu = --momentum (torch's lerp form)
    U_t = (1 - mu) G_t + mu M_t                            Nesterov
    X_0 = U_t / ||U_t||_F  (in bf16; transposed when A > B, so that X X^T is the smaller Gram matrix)
    X_{i+1} = a X_i + (b X_i X_i^T + c (X_i X_i^T)^2) X_i  Newton-Schulz, (a, b, c) = (3.4445, -4.7750, 2.0315):
                                                            X_k ~ the orthogonal factor of U_t (singular values
                                                            pushed into roughly 0.7..1.2), k = --ns-steps
    W_t = W_{t-1} (1 - lr_t wd) - lr_t s(A, B) X_k
with the shape scaling s = 0.2 sqrt(max(A, B)) (--adjust-lr-fn match_rms_adamw, Moonlight: Liu et al. 2025, "Muon
is Scalable for LLM Training"), which gives the update the RMS of AdamW's so that one lr and weight decay serve
both optimizers; or s = sqrt(max(1, A / B)) (original, Keller Jordan's, whose recipes tune Muon's lr apart from
AdamW's). Embedding, head and norms take AdamW (b1 0.9, b2 0.999, eps 1e-8) at the same lr, as train_full.py.
What this script adds to torch: the split of the parameters, the one lr, and one optimizer object for the loop,
the checkpoints and the memory count. Memory: weights N, gradients N, states: one per matrix element (M) and
AdamW's two for the rest. The Newton-Schulz iterations cost 5 (4 m^2 n + 2 m^3) FLOPs per m x n matrix (m <= n)
per step, not in the model FLOPs of the MFU: per token of the papers' 131,072-token steps about 1% of the
model's at 60m, 6% at 1b.
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
METHOD = "muon"
parser.add_argument("--lr", type=POSITIVE, help="peak learning rate of both optimizers")
parser.add_argument("--momentum", type=bounded(float, 0, 1, open_high=True), help="mu, Muon's momentum")
parser.add_argument("--ns-steps", type=bounded(int, 1, 99), help="k, Newton-Schulz iterations per step")
parser.add_argument("--adjust-lr-fn", choices=["match_rms_adamw", "original"],
                    help="the matrices' lr scaling: Moonlight's 0.2 sqrt(max(A, B)), or Keller Jordan's "
                         "sqrt(max(1, A / B))")
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
# the method: torch.optim.Muon on the attention/MLP matrices, torch.optim.AdamW on the rest


class MuonAdamW:
    """Two torch optimizers stepped, zeroed, saved and counted as one: the loop sets the lr of every group, a
    checkpoint holds both states, the memory count sees both."""

    def __init__(self, muon, adamw):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self):  # a property: load_state_dict replaces each optimizer's groups
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self):
        return {**self.muon.state, **self.adamw.state}

    def step(self):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state):
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


matrices = [linear.weight for _, linear in compressible_matrices(model)]
rest = [p for p in model.parameters() if all(p is not w for w in matrices)]
optimizer = MuonAdamW(
    torch.optim.Muon(matrices, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum, nesterov=True,
                     ns_steps=args.ns_steps, adjust_lr_fn=args.adjust_lr_fn),
    torch.optim.AdamW(rest, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay, fused=True))
hparams = {"lr": args.lr, "momentum": args.momentum, "ns_steps": args.ns_steps, "adjust_lr_fn": args.adjust_lr_fn}
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
