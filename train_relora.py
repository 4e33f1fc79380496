"""
LoRA and ReLoRA for pretraining: a frozen full-rank W0 plus trainable low-rank B A, merged and restarted.

    python train_relora.py                                  # tiny on CPU: 25 full-rank steps, then a merge every 25
    python train_relora.py --relora-every 0 --warm-start-steps 0   # plain LoRA (the benchmark's LoRA row)
    python train_relora.py --size 130m --dataset c4         # one GPU: 5K full-rank steps, then a merge every 5K
    torchrun --nproc_per_node=4 train_relora.py --size 350m --dataset c4

The method (LoRA for pretraining, Glentis et al. 2025; ReLoRA, Lialin et al., "ReLoRA: High-Rank Training Through
Low-Rank Updates", ICLR 2024): every attention/MLP matrix is W0 + B A alpha / r, W0 (m x n) the model's own init,
frozen; B (m x r) = 0 and A (r x n) Kaiming-uniform train with AdamW, as do the embedding, head and norms.
    steps 1 .. N:    W0 trains full rank, B = 0 and A frozen     warm start; then W0 freezes and its state is freed
    every K steps:   W0 <- W0 + B A alpha / r;  A <- Kaiming;  B <- 0      merge and restart (same function)
                     M, V of B and A: the largest 1% of each by magnitude kept, the rest zeroed; t kept
    lr_{s+j} = lr(s+j) min(1, j / R)  for the j-th step after a restart s (the switch, each merge): jagged schedule
Gradients and Adam moments r(m+n) per matrix, weights mn + r(m+n): the memory LoRA saves (the warm start needs
full-rank memory). K = N = 0 is plain LoRA, whose total update W - W0 = B A alpha / r has rank at most r.
"""

import contextlib
import math
import sys
import time

import torch

from data import evaluate, get_batch
from model import compressible_matrices, estimate_bytes, flops_per_token, get_config, tensor_bytes
from plumbing import (COUNT, OFF_OR_COUNT, POSITIVE, bounded, check_val, ddp_wrap, finish, load_data, lr_schedule,
                      mean_loss, new_model, open_out_dir, output_paths, parse_args, print_plan, progress_bar,
                      resume, run_config, run_name, save_checkpoint, setup_batch, setup_precision, setup_processes,
                      setup_steps, shared_parser, time_estimate, time_step, wrap_model, write_log, write_result)

# -----------------------------------------------------------------------------
# config: the flags every script shares (plumbing.py), then the method's; every default is the size's recipe

parser, size = shared_parser(__doc__)
# --- METHOD: begin ---
METHOD = "relora"
parser.add_argument("--lr", type=POSITIVE, help="peak learning rate")
parser.add_argument("--rank", type=COUNT, help="r, inner dimension of B A")
parser.add_argument("--scale", type=POSITIVE, help="alpha: the layer computes W0 x + B A x alpha / r")
parser.add_argument("--relora-every", type=OFF_OR_COUNT, default=None,
                    help="K: merge B A into W0 and restart the factors every K steps after the warm start "
                         "(0: plain LoRA; default: a quarter of the run's steps)")
parser.add_argument("--warm-start-steps", type=OFF_OR_COUNT, default=None,
                    help="N: full-rank AdamW steps on W0 before B A trains (0: low rank from the first step; "
                         "default: a quarter of the run's steps)")
parser.add_argument("--restart-warmup", type=OFF_OR_COUNT, default=None,
                    help="R: after the warm start and after each merge the lr climbs from 0 back to the schedule "
                         "over R steps (default: a fifth of the merge period, at most ReLoRA's 100)")
parser.add_argument("--prune-ratio", type=bounded(float, 0, 1),
                    help="at each merge, zero this fraction of each of the factors' Adam moments, the smallest "
                         "entries by magnitude")


def run_name(args):
    return "lora" if args.relora_every == 0 and args.warm_start_steps == 0 else "relora"
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
tokens, val = load_data(args, master, ddp)  # random training windows; the fixed validation set every method shares

# -----------------------------------------------------------------------------
# model: the same initial weights for every method (same seed)

cfg = get_config(args.size)
torch.manual_seed(args.seed)
if args.dry_run:  # the plan needs shapes, not weights
    device = "meta"
model = new_model(args, device, param_dtype)

# -----------------------------------------------------------------------------
# --- METHOD: begin ---
# the method: a frozen W0 plus trainable B A in every attention/MLP matrix, merged and restarted every K steps (ReLoRA)


class LoRALinear(torch.nn.Module):
    """y = W0 x + B (A x) alpha / r. W0 (m x n) is the linear layer's own weight, frozen: no gradient, no optimizer
    state. B (m x r) starts at 0 and A (r x n) Kaiming-uniform, U(+-1/sqrt(n)), so the layer starts as W0 x."""

    def __init__(self, weight, r, alpha):
        super().__init__()
        m, n = weight.shape
        self.scale = alpha / r
        self.W0 = torch.nn.Parameter(weight.detach(), requires_grad=False)
        self.B = torch.nn.Parameter(torch.zeros(m, r))
        self.A = torch.nn.Parameter(torch.empty(r, n))
        torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's default init, as LoRA and ReLoRA

    def forward(self, x):
        linear = torch.nn.functional.linear
        return linear(x, self.W0) + linear(linear(x, self.A) * self.scale, self.B)

    @torch.no_grad()
    def merge_and_reinit(self, generator):
        """W0 += B A alpha / r (the function is unchanged), then A is drawn again from `generator`, on the CPU so
        that every device and process draws the same numbers, and B = 0: the next B A starts from 0."""
        self.W0.add_((self.B.float() @ self.A.float() * self.scale).to(self.W0.dtype))
        A = torch.nn.init.kaiming_uniform_(torch.empty(self.A.shape), a=math.sqrt(5), generator=generator)
        self.A.copy_(A)
        self.B.zero_()


@torch.no_grad()
def prune_state(optimizer, params, ratio):
    """ReLoRA's partial optimizer reset: in each Adam moment (exp_avg, exp_avg_sq) of each parameter, the
    round(ratio n) entries smallest in magnitude are zeroed and the other n - round(ratio n) kept. The step
    counter is kept, as ReLoRA does: the bias correction stays ~1, so the kept entries act as before, and a zeroed
    entry's next update is (1 - b1) / sqrt(1 - b2) = 3.2 times Adam's usual step, which the lr re-warm tempers."""
    for p in params:
        state = optimizer.state.get(p, {})  # none before the factor's first step
        for t in (state[moment] for moment in ("exp_avg", "exp_avg_sq") if moment in state):
            keep = t.numel() - round(ratio * t.numel())
            mask = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
            mask[t.abs().flatten().topk(keep).indices] = True
            t.masked_fill_(~mask.view_as(t), 0)


def set_phase(layers, optimizer, lora):
    """The warm start (lora False) trains every W0 at full rank, B (= 0) and A frozen; the low-rank phase freezes
    W0, frees its AdamW state (the memory the method saves) and trains B and A."""
    for layer in layers:
        layer.W0.requires_grad_(not lora)
        layer.B.requires_grad_(lora)
        layer.A.requires_grad_(lora)
        if lora:
            optimizer.state.pop(layer.W0, None)


def restart_factor(step, warm_start, every, warmup):
    """The jagged schedule: restarts follow `warm_start` steps (if any) and every `every` steps after it; the lr
    falls to 0 at each and climbs back linearly, the j-th step after it getting j / warmup of the schedule's lr."""
    first = warm_start or every  # the first restart: the switch to low rank, else the first merge
    if not (first and warmup) or step < first:
        return 1.0  # before it, the global warmup is the only one
    since = (step - warm_start) % every if every else step - warm_start
    return min(1.0, (since + 1) / warmup)


r, alpha = args.rank, args.scale
if r >= min(cfg.n_embd, cfg.n_ff):
    sys.exit(f"error: --rank {r} must be below d_model {cfg.n_embd} to be low rank")
# ReLoRA's 250M run: a quarter of the steps full rank, then a merge every quarter
relora_every = max_steps // 4 if args.relora_every is None else args.relora_every
warm_start = max_steps // 4 if args.warm_start_steps is None else args.warm_start_steps
restart_warmup = min(100, relora_every // 5) if args.restart_warmup is None else args.restart_warmup
if relora_every and restart_warmup >= relora_every:
    sys.exit(f"error: --restart-warmup {restart_warmup} must be below --relora-every {relora_every}")
if master and relora_every and warm_start + relora_every > max_steps:
    print(f"warning: --warm-start-steps {warm_start} + --relora-every {relora_every} is beyond the run's "
          f"{max_steps} steps: no merge will happen", file=sys.stderr)
if master and warm_start:  # the estimate printed below is the low-rank phase's
    full, low = estimate_bytes(args.size, "full", precision), estimate_bytes(args.size, METHOD, precision, {"rank": r})
    extra = sum(full[k] - low[k] for k in ("grads_bytes", "optimizer_state_bytes"))
    print(f"warm start: the first {min(warm_start, max_steps):,} steps train W0 at full rank, with {extra / 2**20:,.1f}"
          f" MiB more of gradients and optimizer state than the low-rank phase (the peak memory is full rank's)")
layers = []
for name, linear in compressible_matrices(model):
    parent, child = name.rsplit(".", 1)
    layers.append(LoRALinear(linear.weight, r, alpha).to(device, param_dtype))  # W0 is already there
    setattr(model.get_submodule(parent), child, layers[-1])
# one AdamW over every parameter: a frozen one gets no gradient, so AdamW skips it and keeps no state for it
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                              weight_decay=args.weight_decay)
factors = [p for layer in layers for p in (layer.B, layer.A)]
lora_phase = True  # as built: W0 frozen; the loop sets the phase of each step (warm start: W0 trains instead)
hparams = {"lr": args.lr, "rank": r, "scale": alpha, "relora_every": relora_every, "warm_start_steps": warm_start,
           "restart_warmup": restart_warmup, "prune_ratio": args.prune_ratio}
# --- METHOD: end ---

raw_model = model  # the module itself, for state_dict and memory accounting
n_flops = flops_per_token(raw_model, seq_len)
model = wrap_model(model, args, ddp, device, device_type)
if master:
    print_plan(run, args, METHOD, hparams, raw_model, n_flops, precision, device_type, ddp_world, tokens, val,
               micro_batch, accum, max_steps, warmup_steps, eval_every, out_dir)
if args.dry_run:
    sys.exit(0)
config = run_config(args, METHOD, precision, hparams)  # a resume must continue the same run
start_step, stats = resume(args, ckpt_path, device, config, raw_model, optimizer, max_steps)

# -----------------------------------------------------------------------------
# training loop

log = open_out_dir(out_dir, args.resume, start_step) if master else None
bar = progress_bar(run, args, start_step, max_steps, master)
last_log, record = (0.0, 0), {}
for step in bar:
    t0 = time.time()
    lr = lr_schedule(step, args.lr, warmup_steps, max_steps, args.min_lr_ratio)
    # --- METHOD: begin ---
    if (step >= warm_start) != lora_phase:  # a pure function of the step, so a resume lands in the right phase
        lora_phase = step >= warm_start
        set_phase(layers, optimizer, lora_phase)
        if ddp:  # DDP all-reduces the parameters that required grad when it was built: wrap the model anew
            model = ddp_wrap(model.module, device, device_type)
    lr *= restart_factor(step, warm_start, relora_every, restart_warmup)  # the jagged schedule
    # --- METHOD: end ---
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
    method_log = {}  # what the method did in this step, if anything
    # --- METHOD: begin ---
    if relora_every and step + 1 > warm_start and (step + 1 - warm_start) % relora_every == 0:
        generator = torch.Generator().manual_seed(args.seed * 10**9 + step + 1)  # the same on every rank and resume
        for layer in layers:
            layer.merge_and_reinit(generator)
        prune_state(optimizer, factors, args.prune_ratio)
        method_log["merges"] = stats["merges"] = stats.get("merges", 0) + 1
    # --- METHOD: end ---
    # everything below is diagnostics: the loss, divergence, timing, evaluation, the log, checkpoints
    train_loss = mean_loss(loss_sum, accum, ddp, ddp_world, step)
    time_step(stats, step, start_step, t0, tokens_per_step, device, device_type)
    last = step == max_steps - 1
    record = {"step": step + 1, "tokens": (step + 1) * tokens_per_step, "loss": train_loss, "lr": lr, **method_log}
    if grad_norm is not None:
        record["grad_norm"] = grad_norm.item()
    if (step + 1) % eval_every == 0 or last:
        record["val_loss"], record["val_ppl"] = evaluate(model, val, micro_batch, device, autocast)
        check_val(record, step)
    if master and ((step + 1) % args.log_every == 0 or "val_loss" in record or method_log):
        last_log = write_log(bar, log, record, stats, last_log)
    bar.set_postfix(loss=f"{train_loss:.3f}")
    if master and args.ckpt_every > 0 and ((step + 1) % args.ckpt_every == 0 or last):
        save_checkpoint(ckpt_path, raw_model, optimizer, step, config, stats)

# -----------------------------------------------------------------------------
# results

if "val_loss" not in record:  # a resume of a finished run: evaluate its final weights
    record["val_loss"], record["val_ppl"] = evaluate(model, val, micro_batch, device, autocast)
if master:
    write_result(out_dir, run, args, METHOD, hparams, record, raw_model, optimizer, stats, n_flops, max_steps,
                 precision, device, device_type, ddp_world, micro_batch, accum)
finish(ddp)
