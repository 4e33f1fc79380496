"""
APOLLO and APOLLO-Mini: full-rank weights; Adam runs on a random projection of each gradient, only to scale it.

    python train_apollo.py                                 # mini on CPU, the embedded Shakespeare as bytes
    python train_apollo.py --size 60m --dataset c4         # one GPU, APOLLO's 60m run (r 128, lr 0.01, T 200)
    python train_apollo.py --size 60m --dataset c4 --variant apollo_mini  # APOLLO-Mini: r 1, one scale per tensor
    torchrun --nproc_per_node=4 train_apollo.py --size 1b --dataset c4

The method (Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", MLSys 2025, Alg. 1), for each
attention/MLP matrix W (m x n) with gradient G_t at its step t = 1, 2, ...; written for m < n (channels are
the n columns), a matrix with m >= n takes the same step on its transpose (channels are its rows):
    at t = 1, T+1, 2T+1, ...:  P ~ N(0, 1/r), r x m, from a new seed     random projection, never stored
    R_t = P G_t                                                          projected gradient, r x n
    M_t = b1 M_{t-1} + (1 - b1) R_t;  V_t = b2 V_{t-1} + (1 - b2) R_t^2    states 2 n r instead of 2 m n
    N_t = M_t / (sqrt(V_t) + eps)                                        Adam's direction in the projection
    s_j = ||N_t[:, j]|| / (||R_t[:, j]|| + 1e-8)                          APOLLO: one scale per channel j
    s   = ||N_t|| / (||R_t|| + 1e-8)                                     APOLLO-Mini: one scale per tensor
    U_t = G_t diag(s)                                                    the raw gradient, scaled
    if ||U_t|| > gamma ||U_{t-1}||:  U_t = U_t gamma ||U_{t-1}|| / ||U_t||   norm-growth limiter, gamma 1.01
    W_t = W_{t-1} - lr_t wd W_{t-1} - lr_t (sqrt(1 - b2^t) / (1 - b1^t)) alpha U_t
Adam only estimates how much to scale each channel (or the whole tensor); the update is the full-rank raw
gradient, so the weights never leave full rank. ||U_{t-1}|| is the norm after limiting; the first step is not
limited. P is drawn again from its seed (the run's seed, the matrix, the refresh) at every step, so it costs no
memory and is the same on every process and after a resume. Embedding, head and norms take AdamW's step
(the same moments on G_t itself, W_t = W_{t-1} - lr_t wd W_{t-1} - lr_t (sqrt(1 - b2^t) / (1 - b1^t)) N_t).
Memory: weights and gradients N; states 2 max(m, n) r + 1 per matrix (Mini: r = 1), AdamW's 2 elsewhere.
alpha is 1 for APOLLO (the paper folds it into lr) and sqrt(128) for APOLLO-Mini, whose rank-1 scale is small.
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
VARIANTS = ("apollo", "apollo_mini")
# --- VARIANT: begin ---
import argparse  # noqa: E402  (only a script of two methods needs it)

# --variant names the method, whose recipe row gives the defaults: it is read before them, as --size is
pre = argparse.ArgumentParser(add_help=False)
pre.error = lambda message: sys.exit(f"error: {message}")
pre.add_argument("--variant", choices=VARIANTS, default=VARIANTS[0])
METHOD = pre.parse_known_args()[0].variant
# --- VARIANT: end ---
import hashlib  # noqa: E402  (the seeds of the random projections)
parser.add_argument("--variant", choices=VARIANTS,
                    help="apollo: one scale per channel; apollo_mini: APOLLO-Mini, one per tensor (its recipe: rank 1, "
                         "alpha sqrt(128))")
parser.add_argument("--lr", type=POSITIVE, help="peak learning rate")
parser.add_argument("--rank", type=COUNT, help="r, rank of the random projection")
parser.add_argument("--update-proj-gap", type=COUNT, help="T: draw a new projection every T steps")
parser.add_argument("--scale", type=POSITIVE, help="alpha: scale of the scaled gradient")
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
# the method: APOLLO (Zhu et al. 2025), written from the paper's Alg. 1


class Apollo(torch.optim.Optimizer):
    """AdamW whose param groups with a "rank" key take APOLLO's step (the docstring's math): Adam's moments of a
    random rank-r projection of the gradient, used only to scale the raw gradient per channel ("channel") or per
    tensor ("tensor"), then the norm-growth limiter and alpha. Where Alg. 1 is silent, as the authors' code: Adam's
    bias correction in the step size, eps 1e-6 before it, 1e-8 in the scale's denominator, the limiter's norm kept
    after limiting, and for a square matrix one channel per row. The state holds the moments, the limiter's norm
    (one number per matrix) and the step; P is drawn again from its seed at every step."""

    gamma = 1.01  # norm-growth limiter: the scaled gradient's norm grows at most 1% a step

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.refreshed = False  # a projection was drawn anew since the loop looked

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if "rank" in group:  # each matrix with its own projection
                for index, p in enumerate(group["params"]):
                    if p.grad is not None:
                        self.step_param(p, group, index)
            else:
                self.step_unprojected([p for p in group["params"] if p.grad is not None], group)

    @torch.no_grad()
    def step_unprojected(self, params, group):
        """Embedding, head, norms: AdamW, the step below with R = G, batched over the tensors by torch's _foreach
        ops (one kernel per operation on CUDA, a loop in C++ on a CPU), each op the per-tensor one, so the floats
        are the per-tensor loop's."""
        for p in params:
            if not self.state[p]:
                self.state[p].update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        beta1, beta2 = group["betas"]
        for t in {self.state[p]["step"] + 1 for p in params}:  # a batch per step count: its bias correction
            W = [p for p in params if self.state[p]["step"] + 1 == t]
            G = [p.grad for p in W]
            M, V = [self.state[p]["exp_avg"] for p in W], [self.state[p]["exp_avg_sq"] for p in W]
            for p in W:
                self.state[p]["step"] = t
            # numbers as 0-dim tensors: given a number, torch's CPU _foreach_mul_ rounds it to bf16 first, mul_ not
            torch._foreach_mul_(M, torch.tensor(beta1, device=M[0].device))
            torch._foreach_add_(M, G, alpha=1 - beta1)
            torch._foreach_mul_(V, torch.tensor(beta2, device=V[0].device))
            torch._foreach_addcmul_(V, G, G, value=1 - beta2)
            step_size = group["lr"] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
            denom = torch._foreach_sqrt(V)
            torch._foreach_add_(denom, group["eps"])
            N = torch._foreach_div(M, denom)  # Adam's direction
            if group["weight_decay"] > 0:
                torch._foreach_mul_(W, torch.tensor(1 - group["lr"] * group["weight_decay"], device=W[0].device))
            torch._foreach_add_(W, N, alpha=-step_size)

    @torch.no_grad()
    def step_param(self, p, group, index):
        """One matrix's step, in a "rank" group; index: its place in the group, for its projection's seed."""
        state, G = self.state[p], p.grad
        if not state:
            state["step"] = 0
        rows = G.shape[0] >= G.shape[1]  # channels: the rows of a tall or square matrix, else the columns
        refresh, phase = divmod(state["step"], group["update_proj_gap"])  # new P at steps 0, T, 2T, ...
        self.refreshed |= phase == 0
        P = projection(group["rank"], G.shape[1] if rows else G.shape[0], G,
                       projection_seed(group["seed"], index, refresh))
        R = G @ P.T if rows else P @ G  # (m, r) or (r, n)
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(R), torch.zeros_like(R)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["exp_avg"].mul_(beta1).add_(R, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(R, R, value=1 - beta2)
        step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
        N = state["exp_avg"] / state["exp_avg_sq"].sqrt().add_(group["eps"])  # Adam's direction
        # how much Adam rescales each channel (or the tensor) of the projected gradient: norms in fp32
        dim = (1 if rows else 0) if group["scaling"] == "channel" else None
        s = (torch.linalg.vector_norm(N, dim=dim, keepdim=True, dtype=torch.float32)
             / (torch.linalg.vector_norm(R, dim=dim, keepdim=True, dtype=torch.float32) + 1e-8))
        U = G * s.to(G.dtype)
        norm = torch.linalg.vector_norm(U, dtype=torch.float32)
        if "norm" in state:  # the limiter, from the second step on; tensors, so that the GPU never waits
            limit = torch.clamp(norm / (state["norm"].float() + 1e-8) / self.gamma, min=1.0)
            U, norm = U / limit, norm / limit
        state["norm"] = norm.to(G.dtype)
        if group["weight_decay"] > 0:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(U * group["scale"], alpha=-step_size)


def projection_seed(seed, index, refresh):
    """The seed of a matrix's projection, from the run's seed, the matrix's place in its group and the refresh, so
    that every process and a resumed run draw the same P. Hashed: torch's CPU generator keeps only the low 32 bits
    of a seed, so seed * 2^32 + ... would draw the same P for every run seed."""
    return int.from_bytes(hashlib.sha256(f"{seed} {index} {refresh}".encode()).digest()[:8], "little")


def projection(r, k, G, seed):
    """P (r x k), entries N(0, 1/r) drawn in fp32 from its own generator on G's device, in G's dtype."""
    generator = torch.Generator(device=G.device).manual_seed(seed)
    return (torch.randn(r, k, generator=generator, device=G.device) / math.sqrt(r)).to(G.dtype)


r = args.rank
apollo_params = [lin.weight for _, lin in compressible_matrices(model)]
smallest = min(min(p.shape) for p in apollo_params)
if r >= smallest:  # moments of max(m, n) x r: as large as AdamW's 2 m n, or larger
    sys.exit(f"error: --rank {r} must be below {smallest}, the smallest side of the attention and MLP matrices, "
             f"for APOLLO to keep less state than AdamW")
projected = {id(p) for p in apollo_params}
settings = {"rank": r, "update_proj_gap": args.update_proj_gap, "scale": args.scale,
            "scaling": "tensor" if METHOD == "apollo_mini" else "channel", "seed": args.seed}
optimizer = Apollo([{"params": [p for p in model.parameters() if id(p) not in projected]},
                    {"params": apollo_params, **settings}], lr=args.lr, weight_decay=args.weight_decay)
hparams = {"lr": args.lr, "variant": args.variant, **settings}
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
    if optimizer.refreshed:  # this step drew new projections: count it
        method_log["refreshes"] = stats["refreshes"] = stats.get("refreshes", 0) + 1
        optimizer.refreshed = False
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
