"""
SLTrain with restarts: sparse plus low-rank weights; refactorization, momentum reset and lr quick recovery.

    python train_sltrain.py                                    # mini on CPU: delta 0.1, a restart every 50 steps
    python train_sltrain.py --restart-every 0 --delta 0.03     # plain SLTrain, at the SLTrain paper's density
    python train_sltrain.py --size 1b --dataset c4             # one GPU, the authors' 1b run (r 512, alpha 16)
    torchrun --nproc_per_node=4 train_sltrain.py --size 350m --dataset c4

The method (Han et al. 2024, "SLTrain: a sparse plus low-rank approach for parameter and memory efficient
pretraining", with the restarts of Glentis et al. 2025): every attention/MLP matrix is
    W = B (A alpha / r) + S                          B (m x r) = 0 and A (r x n) Kaiming-uniform at init
S is sparse on a fixed random support: int(delta m n) positions of W, drawn once from the seed and the layer's
index and kept as an int32 buffer (in every checkpoint, never re-drawn); only its values train (U(+-1/sqrt(n))
at init, so W starts as S). A layer forms W in its forward and again in its backward and frees it each time:
the autograd graph keeps x, B, A alpha / r, the values and the indices, never an m x n matrix. As the official
code (pt_sltrain), A is scaled before the product: B (A alpha / r), not (B A) alpha / r, which rounds
differently in bf16 unless alpha / r is a power of two. After steps K-1, 2K-1, ... (0-based; none after the
last step), a restart, the same text as train_lowrank_refactor.py's, as the authors' loop does it:
    B A <- balanced factors of the same product       thin QRs and an r x r SVD; S is left alone
    M, V, t <- 0 for every parameter                   a brand-new AdamW: factors, values, embedding, head, norms
and the lr's quick recovery over R = 10 steps. --lr-recovery authors (the default) is the lr of their code,
their LambdaLR rebuilt at each restart; with plain(t) = t / warmup, then the cosine to min_lr_ratio:
    lambda(t) = plain(c + R) (0.001 + 0.999 min(1, j / (R - 1)))   t = c + j, c a multiple of K, j < R
    lambda(t) = plain(t) elsewhere;   step s trains at --lr x lambda(s) up to the first restart, lambda(s + 1) after
(their get_scheculer stretches K to the whole run unless K divides it: the restarts then get no recovery).
--lr-recovery linear, this repository's rule (a run without resets takes the shared schedule in both):
    lr_{cK+j} = lr(cK+j) (0.001 + 0.999 j / R)         j = 0 .. R-1, on the warmup + cosine every script shares
Weights r(m+n) + delta m n instead of mn per matrix, and so are the gradients and each Adam moment; plus
4 bytes per index. Compute: each layer multiplies by the dense W, plus two B A products to form it.
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
METHOD = "sltrain"
parser.add_argument("--lr", type=POSITIVE, help="peak learning rate")
parser.add_argument("--rank", type=COUNT, help="r, inner dimension of the low-rank part B A")
parser.add_argument("--alpha", type=POSITIVE, help="the low-rank part is B A alpha / r")
parser.add_argument("--delta", type=bounded(float, 0, 1, open_low=True, open_high=True),
                    help="density of S, the fraction of W's entries it trains: 0.1 is the authors' restart runs, "
                         "0.03 the SLTrain paper's own setting")
# --- RESTART: begin ---
parser.add_argument("--restart-every", type=OFF_OR_COUNT,
                    help="K: a restart every K steps, refactorization + optimizer reset + lr recovery (0: none)")
parser.add_argument("--no-refactorize", action="store_true",
                    help="restarts without the refactorization (the ablation's reset-only variant)")
parser.add_argument("--reset-scope", default="all", choices=["all", "factors", "none"],
                    help="whose AdamW state a restart resets: every parameter's (the authors' runs), B and A only, "
                         "or none (the ablation's refactorization-only variant)")
parser.add_argument("--reset-moments", default="both", choices=["both", "first"],
                    help="both moments and the step counter (a fresh AdamW), or the first moment only")
parser.add_argument("--recovery-steps", type=OFF_OR_COUNT,
                    help="R: after each restart the lr climbs from 0.001x back to the schedule over R steps")
parser.add_argument("--lr-recovery", default="authors", choices=["authors", "linear"],
                    help="the lr of a run with restarts: the authors' scheduler, rebuilt at each restart (its own "
                         "warmup, a ramp over the first R steps, the recovery's target at R steps past it); or "
                         "linear: the shared warmup + cosine times 0.001 + 0.999 j / R for the j-th step past one")


def run_name(args):
    return f"{METHOD}_restarts" if args.restart_every else METHOD
# --- RESTART: end ---
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
# the method: sparse plus low-rank weights W = B (A alpha / r) + S (Han et al. 2024), restarts (Glentis et al.)
import numpy as np  # noqa: E402  (the support draw; the skeleton's imports are every script's)


def index_dtype(numel):
    """The smallest integer dtype for flat indices into numel entries (index_add_ and index_select take both)."""
    return torch.int32 if numel < 2**31 else torch.int64


def draw_support(m, n, nnz, seed, layer):
    """nnz distinct flat positions of an m x n matrix, sorted (scatter and gather then walk W in order). Drawn on
    the CPU from (seed, layer) alone, so every device and every process gets the same support. NumPy's choice
    without replacement is a partial Fisher-Yates shuffle (Floyd's algorithm below 5% density): 2-3x faster than
    torch.randperm(m n) at delta 0.1, 15x at 0.03 (1b's MLP shape)."""
    rng = np.random.default_rng([seed, layer])
    support = np.sort(rng.choice(m * n, nnz, replace=False, shuffle=False))
    return torch.from_numpy(support).to(index_dtype(m * n))


def dense(B, A_scaled, values, indices):
    """W = B A_scaled + S, a fresh m x n tensor (S: values scattered to their flat indices). Differentiable."""
    W = torch.mm(B, A_scaled)                        # (m, r) @ (r, n) -> (m, n)
    W.view(-1).index_add_(0, indices, values)        # the indices are distinct: S lands on top of B A
    return W


class SparseLowRankFunction(torch.autograd.Function):
    """y = x W^T for W = B A_scaled + S. Saves x, B, A_scaled, the values and the indices, and forms W again in
    backward (one more (m x r)(r x n) product) instead of keeping an m x n W per layer until backward."""

    @staticmethod
    def forward(ctx, x, B, A_scaled, values, indices):
        ctx.save_for_backward(x, B, A_scaled, values, indices)
        return torch.nn.functional.linear(x, dense(B, A_scaled, values, indices))  # W is freed on return

    @staticmethod
    def backward(ctx, grad_y):
        x, B, A_scaled, values, indices = ctx.saved_tensors
        m, n = B.shape[0], A_scaled.shape[1]
        grad_x = grad_B = grad_A = grad_values = None
        if ctx.needs_input_grad[0]:  # W is formed and freed before grad_W exists: one m x n at a time
            grad_x = grad_y @ dense(B, A_scaled, values, indices)        # (.., m) @ (m, n) -> (.., n)
        if any(ctx.needs_input_grad[1:4]):
            # the values need the dense gradient at their support, so grad_W is formed anyway; the factors'
            # gradients through it cost 2mnr flops, less than through x and grad_y once a batch has more than
            # mn / (m + n) tokens, and make no (tokens x r) temporaries
            grad_W = grad_y.reshape(-1, m).T @ x.reshape(-1, n)          # (m, N) @ (N, n) -> (m, n)
            if ctx.needs_input_grad[1]:
                grad_B = grad_W @ A_scaled.T                             # (m, n) @ (n, r) -> (m, r)
            if ctx.needs_input_grad[2]:  # autograd's product A alpha / r takes it on to A
                grad_A = B.T @ grad_W                                    # (r, m) @ (m, n) -> (r, n)
            if ctx.needs_input_grad[3]:
                grad_values = grad_W.view(-1).index_select(0, indices)  # the dense gradient at the support
        return grad_x, grad_B, grad_A, grad_values, None


class SparseLowRankLinear(torch.nn.Module):
    """nn.Linear(n, m) as W = B (A alpha / r) + S: r(m + n) + nnz parameters and nnz indices instead of mn.
    B = 0, so W starts as S; A Kaiming-uniform; the values U(+-1/sqrt(n)), nn.Linear's init, on the support."""

    def __init__(self, m, n, r, alpha, support):
        super().__init__()
        self.scale = alpha / r
        self.register_buffer("indices", support)  # persistent: saved and restored with the weights
        self.B = torch.nn.Parameter(torch.zeros(m, r))
        self.A = torch.nn.Parameter(torch.empty(r, n))
        torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's default init
        self.values = torch.nn.Parameter(torch.empty(support.numel()).uniform_(-1 / math.sqrt(n), 1 / math.sqrt(n)))

    def forward(self, x):
        B, A, values = self.B, self.A, self.values
        if torch.is_autocast_enabled(x.device.type):  # cast here, so that every tensor in the Function is bf16
            dtype = torch.get_autocast_dtype(x.device.type)
            x, B, A, values = (t.to(dtype) for t in (x, B, A, values))
        # the official order: A is scaled first (an r x n product, rounded), then W = B (A alpha / r) + S
        return SparseLowRankFunction.apply(x, B, A * self.scale, values, self.indices)


# --- RESTART: begin ---
@torch.no_grad()
def refactorize(B, A):
    """Replace B, A by the balanced factors of the same product, B' = U S^1/2, A' = S^1/2 V^T for
    B A = U S V^T, so that B'^T B' = A' A'^T = S. Only m x r, n x r and r x r matrices are formed. Non-finite (or
    overflowing) factors stop the run with one line, as the loop's divergence checks do, before the SVD fails on
    them with a LinAlgError (on a GPU it may write them back)."""
    Qb, Rb = torch.linalg.qr(B.float())      # (m, r), (r, r)
    Qa, Ra = torch.linalg.qr(A.float().T)    # (n, r), (r, r)
    core = Rb @ Ra.T                         # B A = Qb (Rb Ra^T) Qa^T = (Qb U) S (Qa Vh^T)^T
    if not core.isfinite().all():
        sys.exit("error: a refactorization met non-finite factors: training diverged (try a lower --lr)")
    U, S, Vh = torch.linalg.svd(core)
    root = S.sqrt()
    B.copy_((Qb @ U) * root)                 # (m, r) @ (r, r), columns scaled by S^1/2
    A.copy_(root[:, None] * (Vh @ Qa.T))     # (r, r) @ (r, n), rows scaled by S^1/2


@torch.no_grad()
def reset_optimizer_state(optimizer, params, moments):
    """AdamW's state of params as a brand-new optimizer's: both moments and the step counter zeroed (the bias
    correction restarts with them), or with moments="first" the first moment only."""
    for p in params:
        state = optimizer.state[p]
        if state:  # no state before the first step
            state["exp_avg"].zero_()
            if moments == "both":
                state["exp_avg_sq"].zero_()
                state["step"].zero_()


def since_restart(step, every, max_steps):
    """The one rule of when a restart happens: after 0-based steps K-1, 2K-1, ... (K = every; 0: never), but not
    after the last step, whose recovery would never be trained. So step s is s % K steps past the latest restart
    once K <= s < max_steps, and None before the first; the per-step hook restarts after step s when step s + 1
    is 0 steps past one. K = 25, 100 steps: restarts after steps 24, 49 and 74, none after 99."""
    return step % every if every and every <= step < max_steps else None


def recovery_factor(step, every, recovery, max_steps):
    """--lr-recovery linear: the step j steps past a restart trains at 0.001 + 0.999 j / R of the warmup + cosine
    schedule for j < R = recovery, every other step at 1. K = 25, R = 10, 100 steps: steps 25-34, 50-59 and 75-84
    take 0.001, 0.1009, ..., 0.9001."""
    since = since_restart(step, every, max_steps)
    return 0.001 + 0.999 * since / recovery if since is not None and since < recovery else 1.0


def authors_lr(step, every, recovery, warmup, max_steps, min_ratio):
    """--lr-recovery authors: the lr multiplier of step as Glentis et al.'s code gives it. Their scheduler
    (cosine_quick_recovery, para_eff_pt/peft_pretraining/training_utils.py) is a LambdaLR of its count t:
        plain(t) = t / warmup, then min_ratio + (1 - min_ratio) (1 + cos(pi (t - warmup) / (max_steps - warmup))) / 2
        lambda(t) = plain(c + R) (0.001 + 0.999 min(1, j / (R - 1)))   t = c + j, c a multiple of K, j < R
        lambda(t) = plain(t)                                            elsewhere
    where their get_scheculer replaces K by max_steps unless K divides it (their restarts then get no recovery).
    Their loop (torchrun_main_DDP.py) rebuilds the LambdaLR at each restart with last_epoch = the steps done, and
    a LambdaLR steps once when built: step s trains at lambda(s) before the first restart and at lambda(s + 1)
    after it. K = 25, R = 10, 100 steps: steps 0-9 ramp up to plain(10); steps 25-33 take j = 1..9 of plain(35);
    steps 49-58 and 74-83 take j = 0..9 of plain(60) and plain(85), the old optimizer's last step at 0.001; and
    step 99 takes 0.001 plain(110), since their loop restarts after its last step too."""
    def plain(t):
        if t < warmup:
            return float(t) / float(max(1, warmup))
        progress = float(t - warmup) / float(max(1, max_steps - warmup))
        return min_ratio + (1.0 - min_ratio) * (0.5 * (1.0 + math.cos(math.pi * progress)))

    t = step + 1 if since_restart(step, every, max_steps) is not None else step
    period = every if max_steps % every == 0 else max_steps
    cycle_start = t // period * period
    if recovery <= 0 or t - cycle_start >= recovery:
        return plain(t)
    target = plain(cycle_start + recovery)
    low = target * 0.001
    progress = min(float(t - cycle_start) / float(recovery - 1), 1.0) if recovery > 1 else 1.0
    return low + (target - low) * progress  # their interpolation, term for term: the same float
# --- RESTART: end ---


r, alpha, delta = args.rank, args.alpha, args.delta
if r >= min(cfg.n_embd, cfg.n_ff):
    sys.exit(f"error: --rank {r} must be below d_model {cfg.n_embd} to be low rank")
if int(delta * cfg.n_embd**2) < 1:
    sys.exit(f"error: --delta {delta} leaves S empty in the {cfg.n_embd} x {cfg.n_embd} matrices")
factorized = []
for i, (name, linear) in enumerate(compressible_matrices(model)):
    parent, child = name.rsplit(".", 1)
    m, n = linear.weight.shape
    nnz = int(delta * m * n)
    # drawn on the CPU, then moved with the layer; a dry run needs only the support's shape
    support = torch.empty(nnz, dtype=index_dtype(m * n)) if args.dry_run else draw_support(m, n, nnz, args.seed, i)
    factorized.append(SparseLowRankLinear(m, n, r, alpha, support))
    setattr(model.get_submodule(parent), child, factorized[-1].to(device, param_dtype))  # indices stay integers
# fused: all parameters' updates in one kernel (CPU and CUDA), the default for-loop's numbers to an ulp, faster
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                              weight_decay=args.weight_decay, fused=True)
factors = [p for layer in factorized for p in (layer.B, layer.A)]  # the sparse values are not factors
# --- RESTART: begin ---
restart_every, recovery_steps = args.restart_every, args.recovery_steps
if restart_every and recovery_steps >= restart_every:
    sys.exit(f"error: --recovery-steps {recovery_steps} must be below --restart-every {restart_every}")
reset_params = {"all": list(model.parameters()), "factors": factors, "none": []}[args.reset_scope]
restarts = {"restart_every": restart_every, "refactorize": not args.no_refactorize, "reset_scope": args.reset_scope,
            "reset_moments": args.reset_moments, "recovery_steps": recovery_steps, "lr_recovery": args.lr_recovery}
# --- RESTART: end ---
hparams = {"lr": args.lr, "rank": r, "alpha": alpha, "delta": delta, **restarts}
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
    # --- METHOD: begin ---
    # --- RESTART: begin ---
    if args.lr_recovery == "authors" and restart_every:  # their scheduler replaces the warmup + cosine too
        lr = args.lr * authors_lr(step, restart_every, recovery_steps, warmup_steps, max_steps, args.min_lr_ratio)
    else:  # the quick recovery after each restart, on the schedule every script shares
        lr *= recovery_factor(step, restart_every, recovery_steps, max_steps)
    # --- RESTART: end ---
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
    stop_peak(tracker, stats)
    method_log = {}  # what the method did in this step, if anything
    # --- METHOD: begin ---
    # --- RESTART: begin ---
    if since_restart(step + 1, restart_every, max_steps) == 0:  # the next step is the first past a restart
        if not args.no_refactorize:
            for layer in factorized:
                refactorize(layer.B, layer.A)
            method_log["refactorizations"] = stats["refactorizations"] = stats.get("refactorizations", 0) + 1
        if reset_params:
            reset_optimizer_state(optimizer, reset_params, args.reset_moments)
            method_log["resets"] = stats["resets"] = stats.get("resets", 0) + 1
    # --- RESTART: end ---
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
