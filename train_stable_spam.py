"""
Stable-SPAM (and plain SPAM with --variant spam): Adam with spike-aware clipping and periodic momentum reset.

    python train_stable_spam.py                                # mini on CPU, the embedded Shakespeare as bytes
    python train_stable_spam.py --variant spam                 # SPAM: clipping against V, reset + cosine warmup
    python train_stable_spam.py --size 130m --dataset c4       # one GPU, the authors' BF16 130m run (lr 8e-4)
    torchrun --nproc_per_node=4 train_stable_spam.py --size 350m --dataset c4

Stable-SPAM (Huang et al. 2025, "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam") as the
authors' StableSPAM optimizer (TianjinYellow/StableSPAM, galore_torch/stablespam.py; the same as pt_stable_spam in
OptimAI-Lab/Memory_Efficient_Pretraining) computes it, for every parameter (each tensor on its own) at run step
s = 1, 2, ... with gradient G and the tensor's step k (k = s until the first reset), ||G|| its Frobenius norm:
    rho_s = eta + (1 - eta) (1 + cos(pi s / (T + 1))) / 2       b1 and gamma1 decay to eta x over T = --decay-steps
    m_max = g3 m_max + (1 - g3) max|G|;  h = m_max / (1 - g3^k)    adaptive spike threshold
    G <- G h / max|G|   where |G| > h                               spike-aware clipping, entry by entry
    c = gamma1 rho_s;  m_n = c m_n + (1 - c) ||G||;  v_n = g2 v_n + (1 - g2) ||G||^2
    G <- G (m_n / (1 - c^k)) / (sqrt(v_n / (1 - g2^k)) + eps) / ||G||     adaptive gradient-norm scaling
    if s % dT == 0:  k <- 1                                         momentum reset (M, V zeroed after this step)
    b = b1 rho_s;  M = b M + (1 - b) G;  V = b2 V + (1 - b2) G^2
    W <- W (1 - lr wd) - lr (M / (1 - b^k)) / (sqrt(V / (1 - b2^k)) + eps)
with b1 = 0.9, b2 = 0.999, eps = 1e-8. As in their code, the reset step still updates with the old moments
(bias-corrected as if k = 1), and k restarts at 1 for the three norm statistics too: for a while after a reset
their bias corrections make h large (no clipping) and the rescaled norm small (about 0.16 of its mean just after
the first reset at dT 1000, g2 0.99999), which acts as the reset's warmup.
SPAM (Huang et al., ICLR 2025, "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training") as the
authors' SPAM optimizer (TianjinYellow/SPAM-Optimizer, galore_torch/SPAM.py) computes it:
    if s % dT == 0:  M, V <- 0                                      momentum reset (before this step's update)
    G <- sign(G) sqrt(theta V)   where G^2 > theta V                spike-aware clipping (theta = --threshold), from
                                                                    s = 20 on and from 20 steps past each reset
    M = b1 M + (1 - b1) G;  V = b2 V + (1 - b2) G^2
    W <- W - lr phi_s (sqrt(1 - b2^s) / (1 - b1^s)) M / (sqrt(V) + eps);  W <- W - lr wd W
    phi_s = 1 - 0.99 (1 + cos(pi j / (N + 1))) / 2 for j = s - (the latest reset) < N = --recovery-steps, else 1
with eps = 1e-6 and the bias correction on the run's step s (never reset).
Memory: weights N, gradients N, states 2N (Adam's moments), plus three scalars per tensor for Stable-SPAM.
The authors run both without gradient clipping: --grad-clip defaults to 0 here.
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
VARIANTS = ("stable_spam", "spam")
# --- VARIANT: begin ---
import argparse  # noqa: E402  (only a script of two methods needs it)

# --variant names the method, whose recipe row gives the defaults: it is read before them, as --size is
pre = argparse.ArgumentParser(add_help=False)
pre.error = lambda message: sys.exit(f"error: {message}")
pre.add_argument("--variant", choices=VARIANTS, default=VARIANTS[0])
METHOD = pre.parse_known_args()[0].variant
# --- VARIANT: end ---
parser.add_argument("--variant", choices=VARIANTS, help="Stable-SPAM, or plain SPAM")
parser.add_argument("--lr", type=POSITIVE, help="peak learning rate")
parser.add_argument("--reset-every", type=OFF_OR_COUNT, help="dT: a momentum reset every dT steps (0: never)")
UNIT = bounded(float, 0, 1, open_high=True)
FLAGS = {"stable_spam": ("gamma1", "gamma2", "gamma3", "eta", "decay_steps"), "spam": ("threshold", "recovery_steps")}
parser.add_argument("--gamma1", type=UNIT, help="Stable-SPAM: decay of the gradient norm's running mean")
parser.add_argument("--gamma2", type=UNIT, help="Stable-SPAM: decay of the squared gradient norm's running mean")
parser.add_argument("--gamma3", type=UNIT, help="Stable-SPAM: decay of the running max|G|, the spike threshold")
parser.add_argument("--eta", type=bounded(float, 0, 1),
                    help="Stable-SPAM: b1 and gamma1 decay by a cosine to eta times their value over T steps")
parser.add_argument("--decay-steps", type=COUNT, help="Stable-SPAM: T (default: the run's steps, the authors' total_T)")
parser.add_argument("--threshold", type=bounded(float, 0),
                    help="SPAM: theta, a spike is G^2 > theta V (0: no clipping)")
parser.add_argument("--recovery-steps", type=OFF_OR_COUNT,
                    help="SPAM: N, the update's cosine warmup from 0.01x over the N steps from each reset")
parser.set_defaults(grad_clip=0.0)  # the authors' runs clip no gradient norm
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
# the method: Stable-SPAM or SPAM on every parameter, as the authors' optimizers step it
# Tensor by tensor, not batched by torch._foreach_* as the other scripts' Adam steps: the clipping (and Stable-SPAM's
# norm scaling) compares each tensor with its own statistics through torch.where, which has no _foreach form, and
# batching only Adam's part would keep every tensor's clipped gradient, denominator and direction alive at once
# (three temporaries the size of the whole model) where the loop keeps one tensor's.


class StableSPAM(torch.optim.Optimizer):
    """The docstring's Stable-SPAM step, each tensor on its own, in the order of operations of the authors' code:
    the same floats in fp32 and bf16 (tests/test_stable_spam.py). The run's step s is kept in each param group
    (saved with the optimizer's state), the tensor's step k and three scalars per tensor in its state."""

    def __init__(self, params, lr, reset_every, gamma1, gamma2, gamma3, eta, decay_steps, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, run_step=0,
                                      reset_every=reset_every, gamma1=gamma1, gamma2=gamma2, gamma3=gamma3, eta=eta,
                                      decay_steps=decay_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            group["run_step"] = s = group["run_step"] + 1
            eta, (b1, b2), eps = group["eta"], group["betas"], group["eps"]
            g1, g2, g3 = group["gamma1"], group["gamma2"], group["gamma3"]
            rho = eta + (1.0 - eta) * (1 + math.cos(math.pi * s / (group["decay_steps"] + 1))) / 2
            reset = group["reset_every"] and s % group["reset_every"] == 0
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state[p]
                if not state:
                    zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
                    state.update(step=0, exp_avg=torch.zeros_like(grad), exp_avg_sq=torch.zeros_like(grad),
                                 max_abs=zero, norm_avg=zero.clone(), norm_sq_avg=zero.clone())
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                state["step"] = k = state["step"] + 1
                # spike-aware clipping against the running max of |G|
                peak = grad.abs().max()
                state["max_abs"] = g3 * state["max_abs"] + (1 - g3) * peak
                limit = state["max_abs"] / (1 - g3 ** k)
                grad = torch.where(grad.abs() > limit, grad / peak * limit, grad)
                # the tensor's gradient norm rescaled to its running mean over its running root mean square
                norm, c = torch.norm(grad), g1 * rho
                state["norm_avg"] = c * state["norm_avg"] + (1 - c) * norm
                state["norm_sq_avg"] = g2 * state["norm_sq_avg"] + (1 - g2) * norm ** 2
                target = (state["norm_avg"] / (1 - c ** k)) / (torch.sqrt(state["norm_sq_avg"] / (1 - g2 ** k)) + eps)
                grad = torch.where(norm > 0, grad / norm * target, grad)  # as their `if norm > 0`, without a sync
                if reset:  # this step still moves with the old moments, bias-corrected as a first step
                    state["step"] = k = 1
                # Adam, its b1 decayed with gamma1
                beta1, m, v = b1 * rho, state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                denom = (v.sqrt() / math.sqrt(1 - b2 ** k)).add_(eps)
                p.add_(m / denom, alpha=-group["lr"] / (1 - beta1 ** k))
                if reset:
                    m.zero_()
                    v.zero_()


class SPAM(torch.optim.Optimizer):
    """The docstring's SPAM step, in the order of operations of the authors' code (the same floats in fp32 and
    bf16). The run's step s is kept in each param group, the warmup's position derived from it."""

    SPIKE_FREE_STEPS = 20  # no clipping in the first 20 steps, nor in the 20 from each reset (their grad_accu_steps)

    def __init__(self, params, lr, reset_every, threshold, recovery_steps, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=weight_decay, run_step=0,
                                      reset_every=reset_every, threshold=threshold, recovery_steps=recovery_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            group["run_step"] = s = group["run_step"] + 1
            every, n, theta = group["reset_every"], group["recovery_steps"], group["threshold"]
            b1, b2 = group["betas"]
            since = s % every if every and s >= every else None  # steps since the latest reset
            phi = 1 - 0.99 * (1 + math.cos(math.pi * since / (n + 1))) / 2 if since is not None and since < n else 1
            clip = theta and s >= self.SPIKE_FREE_STEPS and (not every or s % every >= self.SPIKE_FREE_STEPS)
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(grad), exp_avg_sq=torch.zeros_like(grad))
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if since == 0:
                    m.zero_()
                    v.zero_()
                state["step"] = k = state["step"] + 1
                if clip:  # a spike keeps its sign at the threshold's magnitude
                    grad = torch.where(grad ** 2 > theta * v, grad.sign() * torch.sqrt(v * theta), grad)
                m.mul_(b1).add_(grad, alpha=1.0 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
                step_size = group["lr"] * (math.sqrt(1.0 - b2 ** k) / (1.0 - b1 ** k))
                p.add_(m / v.sqrt().add_(group["eps"]), alpha=-step_size * phi)
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])


other = next(v for v in VARIANTS if v != METHOD)
given = [k for k in FLAGS[other] if getattr(args, k) is not None]
if given:  # a flag of the other variant would do nothing
    sys.exit(f"error: --{given[0].replace('_', '-')} is a setting of --variant {other}")
settings = {k: getattr(args, k) for k in FLAGS[METHOD]}
if METHOD == "stable_spam":
    settings["decay_steps"] = args.decay_steps or max_steps
    optimizer = StableSPAM(model.parameters(), args.lr, args.reset_every, weight_decay=args.weight_decay, **settings)
else:
    optimizer = SPAM(model.parameters(), args.lr, args.reset_every, weight_decay=args.weight_decay, **settings)
hparams = {"lr": args.lr, "variant": METHOD, "reset_every": args.reset_every, **settings}
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
    # --- METHOD: begin ---
    if args.reset_every and (step + 1) % args.reset_every == 0:  # the optimizer reset the moments in this step
        method_log["resets"] = stats["resets"] = stats.get("resets", 0) + 1
    # --- METHOD: end ---
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
