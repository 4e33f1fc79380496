"""
GaLore: full-rank weights, Adam moments kept in a rank-r projection of each matrix's gradient.

    python train_galore.py                                 # tiny on CPU, the embedded Shakespeare corpus
    python train_galore.py --size 60m --dataset c4         # one GPU, GaLore's 60m run (r 128, lr 0.01, T 200)
    python train_galore.py --size 1b --dataset c4 --per-layer --batch-size 16 --global-batch 16
    torchrun --nproc_per_node=4 train_galore.py --size 350m --dataset c4

The method (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
Alg. 1) as galore-torch 1.0 computes it, for each attention/MLP matrix W (m x n, m >= n; the wide case
mirrors it) with gradient G_t at its step t = 1, 2, ...:
    at t = 1, T+1, 2T+1, ...:  U, S, V^T = svd(G_t);  Q = V^T[:r]           projector, r x n (an fp32 SVD)
    R_t = G_t Q^T                                                           projected gradient, m x r
    M_t = b1 M_{t-1} + (1 - b1) R_t;  V_t = b2 V_{t-1} + (1 - b2) R_t^2       states 2 m r instead of 2 m n
    N_t = M_t / (sqrt(V_t) + eps)                                           Adam's direction, eps 1e-6
    W'  = W_{t-1} - lr_t (sqrt(1 - b2^t) / (1 - b1^t)) (N_t Q) alpha         back to m x n, scaled by alpha
    W_t = W' - lr_t wd W'                                                   decoupled decay, after the update
The moments are kept when Q changes (--reset-moments restarts M, V and t instead). Embedding, head and norms
take the same step with R_t = G_t and no Q (AdamW, with the bias correction and the decay as above).
The weights stay full rank: only the optimizer state shrinks.
--projector subspace (one warm-started subspace iteration) or randomized (a randomized SVD) replace the
full SVD by a cheaper approximation, checked against the captured energy and replaced by the SVD when poor.
"""
import argparse
import contextlib
import fcntl
import json
import math
import os
import re
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import evaluate, get_batch, load_tokens, val_windows
from model import (RECIPES, SEQ_LEN, Llama, compressible_matrices, estimate_bytes, flops_per_token, get_config,
                   memory_report, method_defaults, micro_batch, param_counts, peak_bf16_flops, tensor_bytes)

# -----------------------------------------------------------------------------
# config: the defaults are the size's recipe; every flag overrides them


def bounded(cast, low, high=math.inf, open_low=False):
    """An argparse type: a finite number in [low, high] (or (low, high]), else a one-line error."""
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {cast.__name__}, got {text!r}") from None
        if not (math.isfinite(value) and (value > low if open_low else value >= low) and value <= high):
            bound = f"> {low}" if open_low else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}" + (f" and <= {high}" if high < math.inf else "")
                                             + f", got {text}")
        return value
    return parse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every default (a computed one says how in its help)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


COUNT, OFF_OR_COUNT = bounded(int, 1), bounded(int, 0)  # 0 switches a period off
POSITIVE = bounded(float, 0, open_low=True)
pre = argparse.ArgumentParser(add_help=False)
pre.add_argument("--size", default="tiny")
size = pre.parse_known_args()[0].size  # the defaults below depend on the size
cfg, recipe = get_config(size), RECIPES[size]
parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
parser.error = lambda message: sys.exit(f"error: {message}")  # one line, not argparse's usage dump
# data
parser.add_argument("--dataset", default="shakespeare", help="prepared dataset under data/ (see data.py)")
parser.add_argument("--seq-len", type=COUNT, default=SEQ_LEN, help="tokens per training sequence")
parser.add_argument("--val-tokens", type=COUNT, default=recipe.val_tokens, help="size of the fixed validation set")
# model
parser.add_argument("--size", default="tiny", help="model size from model.SIZES: nano tiny 60m 130m 350m 1b 7b")
# optimization
parser.add_argument("--max-steps", type=COUNT, default=None,
                    help=f"optimizer steps (default: the recipe's {recipe.steps:,} for {size}, times --budget)")
parser.add_argument("--budget", type=POSITIVE, default=1.0, help="scale the recipe's steps (0.1: a tenth of the run)")
parser.add_argument("--global-batch", type=COUNT, default=recipe.batch,
                    help="sequences per optimizer step, all processes together")
parser.add_argument("--batch-size", type=COUNT, default=None,
                    help="sequences per forward/backward per process (default: what fits this GPU, 8 on a CPU); "
                         "gradient accumulation makes up the global batch")
parser.add_argument("--warmup-steps", type=OFF_OR_COUNT, default=None,
                    help="linear warmup (default: 10%% of the steps)")
parser.add_argument("--min-lr-ratio", type=bounded(float, 0, 1), default=0.1, help="cosine decays to this x --lr")
parser.add_argument("--weight-decay", type=bounded(float, 0), default=0.0, help="decoupled weight decay")
parser.add_argument("--grad-clip", type=bounded(float, 0), default=1.0, help="clip the global gradient norm (0: off)")
# eval, logging, checkpoints
parser.add_argument("--eval-every", type=COUNT, default=None,
                    help=f"evaluate every N steps and at the end (default: {recipe.evals} evaluations per run)")
parser.add_argument("--log-every", type=COUNT, default=10, help="print and log the loss every N steps")
parser.add_argument("--ckpt-every", type=OFF_OR_COUNT, default=0, help="checkpoint every N steps and at the end")
parser.add_argument("--out-dir", default=None, help="where results go (default: out/<run>_<size>_<dataset>)")
parser.add_argument("--resume", action="store_true", help="continue from <out-dir>/ckpt.pt")
parser.add_argument("--dry-run", action="store_true", help="print the plan of the run and exit (nothing is written)")
# system
parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "mixed", "fp32"],
                    help="bf16: weights, gradients and states in bf16, as the papers (auto on CUDA); mixed: fp32 "
                         "weights under bf16 autocast; fp32 (auto on CPU)")
parser.add_argument("--compile", action="store_true", help="torch.compile the model")
parser.add_argument("--seed", type=OFF_OR_COUNT, default=0, help="seed of the initialisation and of the batches")
# --- METHOD: begin ---
METHOD = "galore"
parser.add_argument("--lr", type=POSITIVE, help="peak learning rate")
parser.add_argument("--rank", type=COUNT, help="r, rank of the projection")
parser.add_argument("--update-proj-gap", type=COUNT, help="T: recompute the projector every T steps")
parser.add_argument("--scale", type=POSITIVE, help="alpha: scale of the projected-back update")
parser.add_argument("--proj-type", default="std", choices=["std", "left", "right"],
                    help="which side to project: std projects the smaller one (official default)")
parser.add_argument("--reset-moments", action="store_true",
                    help="restart Adam on a matrix when its projector changes (the official code keeps the moments)")
parser.add_argument("--per-layer", action="store_true",
                    help="step each parameter inside backward (one full gradient alive at a time); no gradient "
                         "accumulation, no DDP, no clipping (--grad-clip defaults to 0 with it; grad_norm is logged)")
pre.add_argument("--per-layer", action="store_true")
if pre.parse_known_args()[0].per_layer:  # each parameter steps before the global norm is known: nothing to clip
    parser.set_defaults(grad_clip=0.0)
parser.add_argument("--projector", default="svd", choices=["svd", "subspace", "randomized"],
                    help="how a refresh finds the top-r subspace: the exact SVD (official), one warm-started "
                         "subspace iteration, or a randomized SVD (both fall back to the SVD when poor)")


def run_name(args):
    return METHOD

# --- METHOD: end ---
parser.set_defaults(**method_defaults(METHOD, size))
args = parser.parse_args()

if args.max_steps is not None and args.budget != 1.0:
    sys.exit("error: give --max-steps or --budget, not both")

# -----------------------------------------------------------------------------
# setup: processes, device, precision, batch, output folder

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
master = ddp_rank == 0  # only rank 0 prints and writes files
device_type = "cuda" if device.startswith("cuda") else "cpu"
if device_type == "cuda":
    if not torch.cuda.is_available():
        sys.exit(f"error: --device {args.device} but this machine has no CUDA GPU (use --device cpu)")
    device = device if ":" in device else f"cuda:{torch.cuda.current_device()}"  # set_device needs an index
    torch.cuda.set_device(device)
precision = args.precision if args.precision != "auto" else ("bf16" if device_type == "cuda" else "fp32")
param_dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # pure bf16: the papers' runs
autocast = torch.autocast(device_type, torch.bfloat16) if precision == "mixed" else contextlib.nullcontext()
# the global batch is fixed by the recipe; each process runs micro-batches of B and accumulates the rest
T, global_batch = args.seq_len, args.global_batch
gpu_bytes = torch.cuda.get_device_properties(device).total_memory if device_type == "cuda" else 0
B = args.batch_size or micro_batch(args.size, global_batch, ddp_world, gpu_bytes)
if global_batch % (B * ddp_world):
    sys.exit(f"error: --global-batch {global_batch} is not a multiple of --batch-size {B} x {ddp_world} processes")
accum = global_batch // (B * ddp_world)
tokens_per_step = global_batch * T
max_steps = args.max_steps or max(1, round(recipe.steps * args.budget))
warmup_steps = args.warmup_steps if args.warmup_steps is not None else max_steps // 10
eval_every = args.eval_every or max(1, max_steps // recipe.evals)
run = run_name(args)
out_dir = args.out_dir or os.path.join("out", f"{run}_{args.size}_{args.dataset.replace(':', '-')}")
ckpt_path = os.path.join(out_dir, "ckpt.pt")
if args.resume and not os.path.exists(ckpt_path):
    sys.exit(f"error: --resume given but there is no checkpoint at {ckpt_path}")
if not args.resume and any(os.path.exists(os.path.join(out_dir, f)) for f in ("result.json", "ckpt.pt")):
    sys.exit(f"error: {out_dir} holds an earlier run; --resume it or choose another --out-dir")

# -----------------------------------------------------------------------------
# data: random training windows, and the fixed validation set shared by every method

if master:  # rank 0 prepares the default corpus if needed, the others wait for it
    tokens = load_tokens(args.dataset, T)
if ddp:
    dist.barrier()
if not master:
    tokens = load_tokens(args.dataset, T)
val = val_windows(tokens["val"], T, args.val_tokens)

# -----------------------------------------------------------------------------
# model: the same initial weights for every method (same seed)

torch.manual_seed(args.seed)
if args.dry_run:  # the plan needs shapes, not weights
    device = "meta"
with torch.device("meta") if args.dry_run else contextlib.nullcontext():
    model = Llama(cfg)
model = model.to(device, param_dtype)

# -----------------------------------------------------------------------------
# --- METHOD: begin ---
# the method: GaLore (Zhao et al. 2024) as the official galore-torch 1.0 implements it


# --- PROJECTOR: begin ---
# The projector of a matrix's gradient G (m x n): side "right" (m >= n) keeps P = V^T[:r] (r x n), R = G P^T;
# side "left" keeps P = U[:, :r] (m x r), R = P^T G. Computed in fp32, stored in G's dtype. Three ways:


def svd_projector(G, r, side):
    """Exact (the papers' and the official code's): the top-r singular vectors of a full SVD of G."""
    U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
    return (U[:, :r] if side == "left" else Vh[:r]).to(G.dtype)


def subspace_projector(G, r, side, P_old):
    """One step of subspace iteration on G^T G, warm-started from the previous projector: three m x n x r
    matmuls, a QR and an r x r eigh instead of a full SVD. Each step shrinks direction i's error by about
    (sigma_{r+1} / sigma_i)^2, so on the steep spectra of real gradients one step captures nearly everything."""
    A = G.float() if side == "right" else G.float().T        # the left side of G is the right side of G^T
    X = P_old.float() if side == "right" else P_old.float().T  # (r, n), orthonormal rows
    Q = torch.linalg.qr(A.T @ (A @ X.T)).Q                     # (n, r): orth(A^T A X^T)
    # Rayleigh-Ritz: turn the basis of span(Q) onto approximate singular vectors, largest first, as the SVD's.
    # The span is the same, but Adam works per coordinate: an arbitrary basis would change the update.
    _, W = torch.linalg.eigh((A @ Q).T @ (A @ Q))             # (r, r), eigenvalues ascending
    P = (Q @ W.flip(1)).T
    return (P if side == "right" else P.T).to(G.dtype)


def randomized_projector(G, r, side, seed):
    """Randomized SVD (Halko et al. 2011, torch.svd_lowrank, 2 power iterations) with 16 extra columns, which
    raise its overlap with the exact subspace from 0.96 to 0.99 on 60m gradients. Seeded by the step, so a
    resumed run and every DDP process draw the same sketch."""
    with torch.random.fork_rng(devices=[G.device] if G.is_cuda else []):
        torch.manual_seed(seed)
        U, _, V = torch.svd_lowrank(G.float(), q=min(r + 16, *G.shape), niter=2)
    return (U[:, :r] if side == "left" else V[:, :r].T).to(G.dtype)


def captured_share(G, P, side):
    """||projected G||^2 / ||G||^2: the share of G's energy inside the projector's span."""
    R = G.float() @ P.float().T if side == "right" else P.float().T @ G.float()
    return (R.square().sum() / G.float().square().sum().clamp_min(1e-30)).item()


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
# --- PROJECTOR: end ---


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

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.step_param(p, group)

    @torch.no_grad()
    def step_param(self, p, group):
        state, G = self.state[p], p.grad
        if not state:
            state["step"] = 0
        if "rank" in group:
            m, n = G.shape
            # std: shrink the smaller dimension, so the moments keep the larger one (m x r or r x n)
            side = group["proj_type"] if group["proj_type"] != "std" else ("right" if m >= n else "left")
            if state["step"] % group["update_proj_gap"] == 0:  # steps 0, T, 2T, ... before the increment
                self.refreshes.append(refresh_projector(G, group["rank"], side, state, group["projector"],
                                                        state["step"]))
                if group["reset_moments"] and "exp_avg" in state:
                    # old moments live in the old subspace (Fira Sec. 4.2 blames the loss spikes on them)
                    state["exp_avg"].zero_()
                    state["exp_avg_sq"].zero_()
                    state["step"] = 0  # so the bias correction restarts with the moments
            P = state["P"]
            R = G @ P.T if side == "right" else P.T @ G  # (m, n) @ (n, r) or (r, m) @ (m, n)
        else:
            R = G  # embedding, head, norms: plain Adam
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(R), torch.zeros_like(R)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["exp_avg"].mul_(beta1).add_(R, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(R, R, value=1 - beta2)
        step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
        N = state["exp_avg"] / state["exp_avg_sq"].sqrt().add_(group["eps"])  # Adam's direction, low rank
        if "rank" in group:  # back to (m, n), then alpha: the official order, which rounds the same in bf16
            p.add_((N @ P if side == "right" else P @ N) * group["scale"], alpha=-step_size)
        else:
            p.add_(N, alpha=-step_size)
        if group["weight_decay"] > 0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])


r = args.rank
galore_params = [lin.weight for _, lin in compressible_matrices(model)]
for m, n in {tuple(p.shape) for p in galore_params}:
    if r * (2 * max(m, n) + min(m, n)) >= 2 * m * n:  # moments of m x r plus the projector, against AdamW's 2mn
        sys.exit(f"error: --rank {r} is too large for the {m} x {n} matrices: GaLore would keep more state than "
                 f"AdamW (use r < {2 * m * n // (2 * max(m, n) + min(m, n))})")
projected = {id(p) for p in galore_params}
optimizer = GaLoreAdamW(
    [{"params": [p for p in model.parameters() if id(p) not in projected]},
     {"params": galore_params, "rank": r, "update_proj_gap": args.update_proj_gap, "scale": args.scale,
      "proj_type": args.proj_type, "reset_moments": args.reset_moments, "projector": args.projector}],
    lr=args.lr, weight_decay=args.weight_decay)
hparams = {"lr": args.lr, "rank": r, "update_proj_gap": args.update_proj_gap, "scale": args.scale,
           "proj_type": args.proj_type, "reset_moments": args.reset_moments, "per_layer": args.per_layer,
           "grad_clip": args.grad_clip, "projector": args.projector}

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
n_flops = flops_per_token(raw_model, T)
if args.compile:
    model = torch.compile(model)
if ddp:
    # buffers are never changed by training (SLTrain's sparse support is drawn alike on every process):
    # no broadcast of them at every step
    model = DDP(model, device_ids=[device] if device_type == "cuda" else None, broadcast_buffers=False)
counts = param_counts(raw_model)
if master:
    estimate = estimate_bytes(args.size, METHOD, precision, hparams)
    print(f"{run} | size {args.size}: {counts['total']:,} parameters ({counts['embedding']:,} embedding + head), "
          f"{n_flops / 1e6:,.1f} MFLOP per token | {ddp_world} x {device_type} | {precision}")
    print(f"data: {args.dataset}, {len(tokens['train']):,} training tokens | {global_batch} x {T} = "
          f"{tokens_per_step:,} tokens/step ({B} per micro-batch x {accum} accumulated x {ddp_world} processes) | "
          f"{max_steps:,} steps = {max_steps * tokens_per_step:,} tokens | warmup {warmup_steps} | "
          f"eval every {eval_every} on {val[0].numel():,} tokens")
    print("method: " + ", ".join(f"{k} {v}" for k, v in hparams.items()))
    print(f"memory ({precision}, estimated from shapes): "
          + " + ".join(f"{k.replace('_bytes', '').replace('_', ' ')} {v / 2**20:,.1f} MiB"
                       for k, v in estimate.items() if v) + "; activations not counted")
    print(f"results -> {out_dir}/result.json and log.jsonl" + (" (dry run: nothing written)" if args.dry_run else ""))
if args.dry_run:
    sys.exit(0)


def get_lr(step):
    """Linear warmup, then cosine decay to min_lr_ratio * lr (the GaLore/Fira benchmark schedule)."""
    if step < warmup_steps:
        return args.lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def all_finite(tensors):
    return bool(torch.stack([t.isfinite().all() for t in tensors]).all())


# a resume must continue the same run: these settings have to match the checkpoint's
config = {"method": METHOD, "size": args.size, "dataset": args.dataset, "seed": args.seed, "seq_len": T,
          "global_batch": global_batch, "precision": precision, "weight_decay": args.weight_decay,
          "grad_clip": args.grad_clip, **hparams}
start_step, stats = 0, {"train_time": 0.0, "timed_tokens": 0, "grads_bytes": 0}
if args.resume:  # plain tensors and numbers only, so weights_only=True loads it safely
    try:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        saved = ckpt["config"]
    except Exception as e:
        sys.exit(f"error: {ckpt_path} is not a checkpoint of this repository ({type(e).__name__}: {e})"[:300])
    for key in {**saved, **config}:
        if saved.get(key) != config.get(key):
            sys.exit(f"error: --resume with {key} {config.get(key)}, but {ckpt_path} was trained with "
                     f"{key} {saved.get(key)}; resume with the same settings or use another --out-dir")
    raw_model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    start_step, stats = ckpt["step"], ckpt["stats"]
    if start_step > max_steps:
        sys.exit(f"error: {ckpt_path} is at step {start_step}, beyond --max-steps {max_steps}")

# -----------------------------------------------------------------------------
# training loop

if master:
    try:  # held until this process exits: a second run in the same folder stops here
        os.makedirs(out_dir, exist_ok=True)
        lock = open(os.path.join(out_dir, ".lock"), "w")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(f"error: another run is using {out_dir} (choose another --out-dir)")
    except OSError as e:
        sys.exit(f"error: cannot write to --out-dir {out_dir}: {e.strerror}")
    # a resumed run keeps the log up to its checkpoint, rewritten atomically before anything else
    log_path = os.path.join(out_dir, "log.jsonl")
    kept = []
    if args.resume and os.path.exists(log_path):
        for line in open(log_path):
            with contextlib.suppress(ValueError):  # a line cut short by a crash is dropped
                if json.loads(line)["step"] <= start_step:
                    kept.append(line)
    with open(log_path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(log_path + ".tmp", log_path)
    log = open(log_path, "a")
estimate_time = device_type == "cpu" and args.size not in ("nano", "tiny")
bar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc=f"{run} {args.size}",
           disable=not master)
last_log_time, last_log_tokens, record = 0.0, 0, {}
for step in bar:
    t0 = time.time()
    lr = get_lr(step)
    # --- METHOD: begin ---
    # GaLore follows the schedule as it is

    # --- METHOD: end ---
    for group in optimizer.param_groups:
        group["lr"] = lr
    # ---------------- TRAINING SECTION BEGIN ----------------
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(accum):
        # batch offsets depend only on (seed, step, micro_step, process): the same for every method and on resume,
        # and N processes draw what one process with N times the accumulation would
        seed = args.seed * 10**9 + (step * accum + micro_step) * ddp_world + ddp_rank
        x, y = get_batch(tokens["train"], B, T, seed)
        x, y = x.to(device), y.to(device)
        # under DDP, all-reduce the gradients only on the last micro-batch
        sync = model.no_sync() if ddp and micro_step < accum - 1 else contextlib.nullcontext()
        with sync:
            with autocast:
                _, loss = model(x, y)
            (loss / accum).backward()
        loss_sum += loss.detach()
        if estimate_time and step == start_step and micro_step == 0 and master:
            total = (time.time() - t0) * accum * (max_steps - start_step)
            bar.write(f"time estimate: {time.time() - t0:.1f} s for the first micro-batch, so about "
                      + (f"{total / 3600:,.1f} h" if total > 3600 else f"{total / 60:,.1f} min")
                      + " on this CPU; use a GPU, or --size tiny")
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip) if args.grad_clip > 0 else None
    if step == max_steps - 1:  # the gradients alive at the optimizer step, counted once
        stats["grads_bytes"] = tensor_bytes(p.grad for p in raw_model.parameters())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # free the gradients as soon as they are used
    # --- METHOD: begin ---
    if args.per_layer:  # the global norm of the gradients the hooks stepped, as clip_grad_norm_ computes it
        grad_norm = torch.linalg.vector_norm(torch.stack(grad_norms))
        grad_norms.clear()
    # --- PROJECTOR: begin ---
    method_log = {}
    if optimizer.refreshes:  # this step recomputed the projectors: count it, and log how good they are
        method_log["refreshes"] = stats["refreshes"] = stats.get("refreshes", 0) + 1
        method_log["proj_energy"] = sum(e for e, _ in optimizer.refreshes) / len(optimizer.refreshes)
        method_log["proj_svds"] = sum(exact for _, exact in optimizer.refreshes)
        optimizer.refreshes.clear()
    # --- PROJECTOR: end ---
    # --- METHOD: end ---
    # ---------------- TRAINING SECTION END ----------------
    # everything below is diagnostics
    if ddp:  # the loss of every process, not just rank 0's
        dist.all_reduce(loss_sum)
    train_loss = loss_sum.item() / (accum * ddp_world)
    if not math.isfinite(train_loss):
        sys.exit(f"error: the training loss is {train_loss} at step {step + 1}: training diverged (try a lower --lr)")
    if device_type == "cuda":
        torch.cuda.synchronize()
    dt = time.time() - t0
    if step == start_step and device_type == "cuda":  # measure the peak after a warm-up step
        torch.cuda.reset_peak_memory_stats(device)
    if step > start_step:  # the first step pays for allocation and compilation
        stats["train_time"] += dt
        stats["timed_tokens"] += tokens_per_step
    last = step == max_steps - 1
    record = {"step": step + 1, "tokens": (step + 1) * tokens_per_step, "loss": train_loss, "lr": lr, **method_log}
    if grad_norm is not None:
        record["grad_norm"] = grad_norm.item()
    if stats["train_time"] > last_log_time:  # training tokens per second since the last log line
        record["tok_per_s"] = (stats["timed_tokens"] - last_log_tokens) / (stats["train_time"] - last_log_time)
    if (step + 1) % eval_every == 0 or last:
        record["val_loss"], record["val_ppl"] = evaluate(model, val, B, device, autocast)
        if not math.isfinite(record["val_ppl"]):
            sys.exit(f"error: the validation loss is {record['val_loss']} at step {step + 1}: training diverged")
    if master and ((step + 1) % args.log_every == 0 or "val_loss" in record or method_log):
        last_log_time, last_log_tokens = stats["train_time"], stats["timed_tokens"]
        bar.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        log.write(json.dumps(record) + "\n")
        log.flush()
    bar.set_postfix(loss=f"{train_loss:.3f}")
    if master and args.ckpt_every > 0 and ((step + 1) % args.ckpt_every == 0 or last):
        if not all_finite(raw_model.parameters()):
            sys.exit(f"error: non-finite weights after step {step + 1}: training diverged (nothing saved)")
        ckpt = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1,
                "config": config, "stats": stats}
        torch.save(ckpt, ckpt_path + ".tmp")
        os.replace(ckpt_path + ".tmp", ckpt_path)  # atomic: a crash never leaves a half-written checkpoint

# -----------------------------------------------------------------------------
# results

if "val_loss" not in record:  # a resume of a finished run: evaluate its final weights
    record["val_loss"], record["val_ppl"] = evaluate(model, val, B, device, autocast)
if master:
    if not (all_finite(raw_model.parameters()) and math.isfinite(record["val_ppl"])):
        sys.exit("error: non-finite weights or validation loss at the end: training diverged (no result written)")
    memory = {**memory_report(raw_model, optimizer), "grads_bytes": stats["grads_bytes"]}
    if device_type == "cuda":
        memory["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    tokens_per_s = stats["timed_tokens"] / stats["train_time"] if stats["train_time"] else None
    # model FLOPs utilization against the dense bf16 peak: for bf16 math on a GPU of the table only
    peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if device_type == "cuda" else None
    mfu = tokens_per_s * n_flops / (peak * ddp_world) if peak and tokens_per_s and precision != "fp32" else None
    result = {"method": METHOD, "run": run, "size": args.size, "dataset": args.dataset, "seed": args.seed,
              "steps": max_steps, "tokens": max_steps * tokens_per_step, "val_loss": record["val_loss"],
              "val_ppl": record["val_ppl"], **memory, "params": counts, "tokens_per_s": tokens_per_s,
              "flops_per_token": n_flops, "mfu": mfu,
              "device": torch.cuda.get_device_name(device) if device_type == "cuda" else "cpu",
              "world_size": ddp_world, "precision": precision, "micro_batch": B, "grad_accum": accum,
              "torch": torch.__version__, **hparams, "args": vars(args), "argv": sys.argv[1:]}
    with open(os.path.join(out_dir, "result.json.tmp"), "w") as f:
        json.dump(result, f, indent=2)
    os.replace(os.path.join(out_dir, "result.json.tmp"), os.path.join(out_dir, "result.json"))
    print(f"val loss {result['val_loss']:.4f} | val ppl {result['val_ppl']:.2f} | "
          + " | ".join(f"{k.replace('_bytes', '')} {v / 2**20:.1f} MiB" for k, v in memory.items())
          + f" | {tokens_per_s or 0:,.0f} tok/s -> {out_dir}/result.json")
if ddp:
    dist.barrier()  # the processes leave together: gloo aborts one whose peer is still writing the results
    dist.destroy_process_group()
