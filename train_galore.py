"""
GaLore: full-rank weights, Adam moments kept in a rank-r projection of each matrix's gradient.

    python train_galore.py                                 # mini on CPU, the embedded Shakespeare as bytes
    python train_galore.py --size 60m --dataset c4         # one GPU, GaLore's 60m run (r 128, lr 0.01, T 200)
    python train_galore.py --size 1b --dataset c4 --per-layer --batch-size 16 --global-batch 16
    torchrun --nproc_per_node=4 train_galore.py --size 350m --dataset c4

The method (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
Alg. 1) as galore-torch 1.0 computes it, for each attention/MLP matrix W (m x n, m >= n; the wide case
mirrors it) with gradient G_t at its step t = 1, 2, ...:
    at t = 1, T+1, 2T+1, ...:  U, S, V^T = svd(G_t);  P = V^T[:r]           projector, r x n (an fp32 SVD)
    R_t = G_t P^T                                                           projected gradient, m x r
    M_t = b1 M_{t-1} + (1 - b1) R_t;  V_t = b2 V_{t-1} + (1 - b2) R_t^2       states 2 m r instead of 2 m n
    N_t = M_t / (sqrt(V_t) + eps)                                           Adam's direction, eps 1e-6
    W'  = W_{t-1} - lr_t (sqrt(1 - b2^t) / (1 - b1^t)) (N_t P) alpha         back to m x n, scaled by alpha
    W_t = W' - lr_t wd W'                                                   decoupled decay, after the update
The moments are kept when P changes (--reset-on-refresh restarts M, V and t instead). Embedding, head and norms
take the same step with R_t = G_t and no P (AdamW, with the bias correction and the decay as above).
The weights stay full rank: only the optimizer state shrinks.
--projector subspace (one warm-started subspace iteration) or randomized (a randomized SVD) replace the
full SVD by a cheaper approximation, checked against the captured energy and replaced by the SVD when poor.
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
METHOD = "galore"
parser.add_argument("--lr", type=POSITIVE, help="peak learning rate")
parser.add_argument("--rank", type=COUNT, help="r, rank of the projection")
parser.add_argument("--update-proj-gap", type=COUNT, help="T: recompute the projector every T steps")
parser.add_argument("--scale", type=POSITIVE, help="alpha: scale of the projected-back update")
parser.add_argument("--proj-type", default="std", choices=["std", "left", "right"],
                    help="which side to project: std projects the smaller one (official default)")
parser.add_argument("--reset-on-refresh", action="store_true",
                    help="restart Adam on a matrix when its projector changes (the official code keeps the moments)")
parser.add_argument("--per-layer", action="store_true",
                    help="step each parameter inside backward (one full gradient alive at a time); no gradient "
                         "accumulation, no DDP, no clipping (--grad-clip defaults to 0 with it; grad_norm is logged)")
if "--per-layer" in sys.argv[1:]:  # each parameter steps before the global norm is known: nothing to clip
    parser.set_defaults(grad_clip=0.0)
parser.add_argument("--projector", default="svd", choices=["svd", "subspace", "randomized"],
                    help="how a refresh finds the top-r subspace: the exact SVD (official), one warm-started "
                         "subspace iteration, or a randomized SVD (both fall back to the SVD when poor)")
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
# the method: GaLore (Zhao et al. 2024) as the official galore-torch 1.0 implements it


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW whose param groups with a "rank" key keep their moments in a rank-r projection.

    Follows galore-torch 1.0 step by step: the projector comes from the SVD of the current gradient at
    steps 0, T, 2T, ... (counted per matrix); the moments are kept when it changes; the bias correction
    is folded into the step size; weight decay comes after the update; eps is 1e-6. The operations run in
    the official order and dtype, so the weights are bit-identical to its in fp32 and in bf16 (tested). The
    state holds only tensors and numbers (the official projector object does not load with weights_only=True).
    """

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.refreshes = []  # (captured energy, exact SVD) of the projectors recomputed since the loop looked

    # --- REST: begin ---
    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if "rank" in group:  # each matrix with its own projector
                for p in params:
                    self.step_param(p, group)
            else:
                self.step_unprojected(params, group)

    @torch.no_grad()
    def step_unprojected(self, params, group):
        """Embedding, head, norms: Adam with R = G (no projection, no residual: AdamW), batched over the tensors by
        torch's _foreach ops (one kernel per operation on CUDA, a loop in C++ on a CPU), each op the per-tensor one,
        so the floats are the per-tensor loop's."""
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
            # the betas as 0-dim tensors: with a number, torch's CPU _foreach_mul_ rounds it to bf16 first, mul_ not
            torch._foreach_mul_(M, torch.tensor(beta1, device=M[0].device))
            torch._foreach_add_(M, G, alpha=1 - beta1)
            torch._foreach_mul_(V, torch.tensor(beta2, device=V[0].device))
            torch._foreach_addcmul_(V, G, G, value=1 - beta2)
            step_size = group["lr"] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
            denom = torch._foreach_sqrt(V)
            torch._foreach_add_(denom, group["eps"])
            N = torch._foreach_div(M, denom)  # Adam's direction
            torch._foreach_add_(W, N, alpha=-step_size)
            if group["weight_decay"] > 0:
                torch._foreach_add_(W, W, alpha=-group["lr"] * group["weight_decay"])
    # --- REST: end ---

    @torch.no_grad()
    def step_param(self, p, group):
        """One parameter's step: a matrix of a "rank" group, or (--per-layer, inside backward) any parameter."""
        if "rank" not in group:
            return self.step_unprojected([p], group)
        state, G = self.state[p], p.grad
        if not state:
            state["step"] = 0
        m, n = G.shape
        # std: shrink the smaller dimension, so the moments keep the larger one (m x r or r x n)
        side = group["proj_type"] if group["proj_type"] != "std" else ("right" if m >= n else "left")
        if state["step"] % group["update_proj_gap"] == 0:  # steps 0, T, 2T, ... before the increment
            self.refreshes.append(refresh_projector(G, group["rank"], side, state, group["projector"], state["step"]))
            if group["reset_on_refresh"] and "exp_avg" in state:
                # old moments live in the old subspace (Fira Sec. 4.2 blames the loss spikes on them)
                state["exp_avg"].zero_()
                state["exp_avg_sq"].zero_()
                state["step"] = 0  # so the bias correction restarts with the moments
        P = state["P"]
        R = G @ P.T if side == "right" else P.T @ G  # (m, n) @ (n, r) or (r, m) @ (m, n)
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(R), torch.zeros_like(R)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["exp_avg"].mul_(beta1).add_(R, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(R, R, value=1 - beta2)
        step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
        N = state["exp_avg"] / state["exp_avg_sq"].sqrt().add_(group["eps"])  # Adam's direction, low rank
        # back to (m, n), then alpha: the official order, which rounds the same in bf16
        p.add_((N @ P if side == "right" else P @ N) * group["scale"], alpha=-step_size)
        if group["weight_decay"] > 0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])


# --- PROJECTOR: begin ---
# The projector of a matrix's gradient G (m x n): side "right" (m >= n) keeps P = V^T[:r] (r x n), R = G P^T;
# side "left" keeps P = U[:, :r] (m x r), R = P^T G. Computed in fp32, stored in G's dtype: the papers' SVD first.


def finite(M):
    """M, if it is finite; else the run stops here with one line, as the loop's divergence checks do: a
    decomposition of non-finite values fails with a LinAlgError (on a GPU it may return them as a projector)."""
    if not M.isfinite().all():
        sys.exit("error: a projector refresh met non-finite values: training diverged (try a lower --lr)")
    return M


def svd_projector(G, r, side):
    """Exact (the papers' and the official code's): the top-r singular vectors of a full SVD of G."""
    U, _, Vh = torch.linalg.svd(finite(G.float()), full_matrices=False)
    return (U[:, :r] if side == "left" else Vh[:r]).to(G.dtype)


def refresh_projector(G, r, side, state, method, step):
    """A new projector in state["P"]; returns (captured energy, whether the exact SVD ran). The captured energy,
    ||P^T G||^2 / (sum of the top-r sigma^2), needs the SVD the cheap projectors avoid, so each SVD keeps
    rho = (sum of the top-r sigma^2) / ||G||^2 and a cheap projector is judged by share / rho, which assumes
    the top-r share has not moved since. Below 0.9, the exact SVD replaces it: on real 60m gradients the
    estimate never fell below 0.93 (the exact value below 0.986), and a stale rho errs low (rho falls as
    training goes on), so a false alarm costs one SVD and never hides a poor projector."""
    if method != "svd" and "P" in state:
        if method == "subspace":
            P = subspace_projector(G, r, side, state["P"])
        else:
            P = randomized_projector(G, r, side, step)
        captured = captured_share(G, P, side) / max(state["rho"], 1e-30)
        if captured >= 0.9:
            state["P"] = P
            return captured, False
    state["P"] = svd_projector(G, r, side)
    state["rho"] = captured_share(G, state["P"], side)
    return 1.0, True


# Ours, not the papers': two cheaper ways to find the top-r subspace, judged by the energy they capture


def subspace_projector(G, r, side, P_old):
    """One step of subspace iteration on G^T G, warm-started from the previous projector: three m x n x r
    matmuls, a QR and an r x r eigh instead of a full SVD. Each step shrinks direction i's error by about
    (sigma_{r+1} / sigma_i)^2, so on the steep spectra of real gradients one step captures nearly everything."""
    A = G.float() if side == "right" else G.float().T        # the left side of G is the right side of G^T
    X = P_old.float() if side == "right" else P_old.float().T  # (r, n), orthonormal rows
    Q = torch.linalg.qr(finite(A.T @ (A @ X.T))).Q             # (n, r): orth(A^T A X^T)
    # Rayleigh-Ritz: turn the basis of span(Q) onto approximate singular vectors, largest first, as the SVD's.
    # The span is the same, but Adam works per coordinate: an arbitrary basis would change the update.
    _, W = torch.linalg.eigh(finite((A @ Q).T @ (A @ Q)))     # (r, r), eigenvalues ascending
    P = (Q @ W.flip(1)).T
    return (P if side == "right" else P.T).to(G.dtype)


def randomized_projector(G, r, side, seed):
    """Randomized SVD (Halko et al. 2011, torch.svd_lowrank, 2 power iterations) with 16 extra columns, which
    raise its overlap with the exact subspace from 0.96 to 0.99 on 60m gradients. Seeded by the step, so a
    resumed run and every DDP process draw the same sketch."""
    with torch.random.fork_rng(devices=[G.device] if G.is_cuda else []):
        torch.manual_seed(seed)
        U, _, V = torch.svd_lowrank(finite(G.float()), q=min(r + 16, *G.shape), niter=2)
    return (U[:, :r] if side == "left" else V[:, :r].T).to(G.dtype)


def captured_share(G, P, side):
    """||projected G||^2 / ||G||^2: the share of G's energy inside the projector's span."""
    R = G.float() @ P.float().T if side == "right" else P.float().T @ G.float()
    return (R.square().sum() / G.float().square().sum().clamp_min(1e-30)).item()
# --- PROJECTOR: end ---


r = args.rank
galore_params = [lin.weight for _, lin in compressible_matrices(model)]
# the largest r whose moments (m x r) plus projector keep less than AdamW's 2mn, per shape: the smallest one binds
largest = {(m, n): (2 * m * n - 1) // (2 * max(m, n) + min(m, n)) for m, n in {tuple(p.shape) for p in galore_params}}
if r > min(largest.values()):
    m, n = min(largest, key=largest.get)
    sys.exit(f"error: --rank {r} is too large for the {m} x {n} matrices: GaLore would keep more state than AdamW "
             f"(use r <= {largest[m, n]})")
projected = {id(p) for p in galore_params}
settings = {"rank": r, "update_proj_gap": args.update_proj_gap, "scale": args.scale,
            "proj_type": args.proj_type, "reset_on_refresh": args.reset_on_refresh, "projector": args.projector}
optimizer = GaLoreAdamW([{"params": [p for p in model.parameters() if id(p) not in projected]},
                         {"params": galore_params, **settings}], lr=args.lr, weight_decay=args.weight_decay)
hparams = {"lr": args.lr, **settings, "per_layer": args.per_layer, "grad_clip": args.grad_clip}

if args.per_layer:
    # GaLore Sec. 4.3: update each parameter as soon as its gradient is complete and free that gradient,
    # so the full gradients are never all alive at once. The global gradient norm is known only after the
    # last parameter has stepped (no clipping, as in the official per-layer GaLore), and each backward is a
    # step (no accumulation).
    if ddp or accum > 1:
        sys.exit(f"error: --per-layer steps inside backward: it works with neither DDP nor gradient accumulation "
                 f"(here {accum}: give --global-batch equal to --batch-size)")
    if args.grad_clip > 0:
        sys.exit(f"error: --per-layer steps each parameter before the global gradient norm is known, so it cannot "
                 f"clip (--grad-clip {args.grad_clip}: give --grad-clip 0, its default with --per-layer)")
    group_index = {p: i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    grad_norms = []  # each gradient's norm, taken before its hook frees it: the loop's clip would find none

    def step_in_backward(p):
        grad_norms.append(torch.linalg.vector_norm(p.grad))
        # look the group up now: load_state_dict (resume) replaces the group dicts
        optimizer.step_param(p, optimizer.param_groups[group_index[p]])
        p.grad = None

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(step_in_backward)

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
    if args.per_layer:  # the global norm of the gradients the hooks stepped, as clip_grad_norm_ computes it
        grad_norm = torch.linalg.vector_norm(torch.stack(grad_norms))
        grad_norms.clear()
    # --- PROJECTOR: begin ---
    if optimizer.refreshes:  # this step recomputed the projectors: count it, and log how good they are
        method_log["refreshes"] = stats["refreshes"] = stats.get("refreshes", 0) + 1
        method_log["proj_energy"] = sum(e for e, _ in optimizer.refreshes) / len(optimizer.refreshes)
        method_log["proj_svds"] = sum(exact for _, exact in optimizer.refreshes)
        optimizer.refreshes.clear()
    # --- PROJECTOR: end ---
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
