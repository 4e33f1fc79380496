"""
Low-rank factorized training with restarts: weight refactorization, momentum reset and lr quick recovery.

    python train_lowrank_refactor.py                           # tiny on CPU: a restart every 25 steps
    python train_lowrank_refactor.py --refactor-every 0 --momentum-reset-every 0 --recovery-steps 0   # plain
    python train_lowrank_refactor.py --size 1b --dataset c4    # one GPU, the authors' 1b run (r 512, alpha 16)
    torchrun --nproc_per_node=4 train_lowrank_refactor.py --size 350m --dataset c4

The method (Glentis et al. 2025, "Scalable Parameter and Memory Efficient Pretraining for LLM: Recent
Algorithmic Advances and Benchmarking"): every attention/MLP matrix is W = B A alpha / r, with B (m x r)
and A (r x n) trained from scratch by AdamW (both Kaiming-uniform, as the official code); the m x n matrix
never exists. After steps K-1, 2K-1, ... (0-based; none after the last step), a restart:
    B = Qb Rb,  A^T = Qa Ra,  Rb Ra^T = U S V^T      thin QRs and the SVD of an r x r matrix
    B <- Qb U S^1/2,  A <- S^1/2 V^T Qa^T             refactorization: the same B A, balanced (B^T B = A A^T = S)
    M, V, t <- 0 for every parameter                   momentum reset: a brand-new AdamW, embedding and head too
and the lr's quick recovery over R = 10 steps. --lr-recovery authors (the default) is the lr of the authors'
code, their LambdaLR rebuilt at each restart; with plain(t) = t / warmup, then the cosine to min_lr_ratio:
    lambda(t) = plain(c + R) (0.001 + 0.999 min(1, j / (R - 1)))   t = c + j, c a multiple of K, j < R
    lambda(t) = plain(t) elsewhere;   step s trains at --lr x lambda(s) up to the first restart, lambda(s + 1) after
(their get_scheculer stretches K to the whole run unless K divides it: the restarts then get no recovery).
--lr-recovery linear, this repository's rule (a run without resets takes the shared schedule in both):
    lr_{cK+j} = lr(cK+j) (0.001 + 0.999 j / R)         j = 0 .. R-1, on the warmup + cosine every script shares
Their released code restarts SLTrain only (its loop's restart block requires peft_model == 'sltrain'); its
--peft_model choice restart_lora is handled nowhere (the paper's low-rank + restarts runs used unreleased
code), so this script gives the low-rank factors the released SLTrain restart, its lr included.
Weights r(m+n) instead of mn per matrix, and so are the gradients and each Adam moment. The paper's
ablation: the reset speeds up convergence most, the refactorization gives a steady gain, both are best.
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
METHOD = "lowrank"
parser.add_argument("--lr", type=POSITIVE, help="peak learning rate")
parser.add_argument("--rank", type=COUNT, help="r, inner dimension of B A")
parser.add_argument("--scale", type=POSITIVE, help="alpha: the layer computes B A x alpha / r")
parser.add_argument("--refactor-every", type=OFF_OR_COUNT, help="K: re-balance every B A through its SVD every K steps")
parser.add_argument("--momentum-reset-every", type=OFF_OR_COUNT, default=None,
                    help="reset the optimizer state every N steps (default: --refactor-every)")
parser.add_argument("--reset-scope", default="all", choices=["all", "factors"],
                    help="whose state a reset clears: every parameter's (the authors' runs) or B and A only")
parser.add_argument("--reset-moments", default="both", choices=["both", "first"],
                    help="both moments and the step counter (a fresh AdamW), or the first moment only")
parser.add_argument("--recovery-steps", type=OFF_OR_COUNT,
                    help="R: after each reset the lr climbs from 0.001x back to the schedule over R steps")
parser.add_argument("--lr-recovery", default="authors", choices=["authors", "linear"],
                    help="the lr of a run with resets: the authors' scheduler, rebuilt at each restart (its own "
                         "warmup, a ramp over the first R steps, the recovery's target at R steps past it); or "
                         "linear: the shared warmup + cosine times 0.001 + 0.999 j / R for the j-th step past a reset")


def run_name(args):
    reset_every = args.refactor_every if args.momentum_reset_every is None else args.momentum_reset_every
    return "lowrank_restarts" if args.refactor_every or reset_every else "lowrank"
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
# the method: low-rank factors B A in place of every attention/MLP matrix, with restarts (Glentis et al. 2025)


class LowRankLinear(torch.nn.Module):
    """y = B (A x) alpha / r, i.e. W = B A alpha / r with B (m x r), A (r x n): r(m + n) parameters instead of
    mn. Both factors start Kaiming-uniform, U(+-1/sqrt(fan_in)), as the official code."""

    def __init__(self, m, n, r, alpha):
        super().__init__()
        self.scale = alpha / r
        self.B = torch.nn.Parameter(torch.empty(m, r))
        self.A = torch.nn.Parameter(torch.empty(r, n))
        for factor in (self.B, self.A):
            torch.nn.init.kaiming_uniform_(factor, a=math.sqrt(5))  # nn.Linear's default init

    def forward(self, x):
        linear = torch.nn.functional.linear
        return linear(linear(x, self.A) * self.scale, self.B)  # (.., n) -> (.., r) -> (.., m)


# --- RESTART: begin ---
@torch.no_grad()
def refactorize(B, A):
    """Replace B, A by the balanced factors of the same product, B' = U S^1/2, A' = S^1/2 V^T for
    B A = U S V^T, so that B'^T B' = A' A'^T = S. Only m x r, n x r and r x r matrices are formed."""
    Qb, Rb = torch.linalg.qr(B.float())      # (m, r), (r, r)
    Qa, Ra = torch.linalg.qr(A.float().T)    # (n, r), (r, r)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)   # B A = Qb (Rb Ra^T) Qa^T = (Qb U) S (Qa Vh^T)^T
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


r, alpha = args.rank, args.scale
if r >= min(cfg.n_embd, cfg.n_ff):
    sys.exit(f"error: --rank {r} must be below d_model {cfg.n_embd} to be low rank")
refactor_every, recovery_steps, reset_moments = args.refactor_every, args.recovery_steps, args.reset_moments
reset_every = refactor_every if args.momentum_reset_every is None else args.momentum_reset_every
if reset_every and recovery_steps >= reset_every:
    sys.exit(f"error: --recovery-steps {recovery_steps} must be below the reset period {reset_every}")
factorized = []
for name, linear in compressible_matrices(model):
    parent, child = name.rsplit(".", 1)
    factorized.append(LowRankLinear(*linear.weight.shape, r, alpha))
    setattr(model.get_submodule(parent), child, factorized[-1].to(device, param_dtype))
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                              weight_decay=args.weight_decay)
factors = [p for layer in factorized for p in (layer.B, layer.A)]
reset_params = list(model.parameters()) if args.reset_scope == "all" else factors
hparams = {"lr": args.lr, "rank": r, "scale": alpha, "refactor_every": refactor_every, "momentum_reset_every":
           reset_every, "reset_scope": args.reset_scope, "reset_moments": reset_moments,
           "recovery_steps": recovery_steps, "lr_recovery": args.lr_recovery}
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
    # --- RESTART: begin ---
    if args.lr_recovery == "authors" and reset_every:  # their scheduler replaces the warmup + cosine too
        lr = args.lr * authors_lr(step, reset_every, recovery_steps, warmup_steps, max_steps, args.min_lr_ratio)
    else:  # the quick recovery after each momentum reset, on the schedule every script shares
        lr *= recovery_factor(step, reset_every, recovery_steps, max_steps)
    # --- RESTART: end ---
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
    # --- RESTART: begin ---
    method_log = {}  # the restart's pieces when they happen, counted over the run
    if since_restart(step + 1, refactor_every, max_steps) == 0:  # the next step is the first past a restart
        for layer in factorized:
            refactorize(layer.B, layer.A)
        method_log["refactorizations"] = stats["refactorizations"] = stats.get("refactorizations", 0) + 1
    if since_restart(step + 1, reset_every, max_steps) == 0:
        reset_optimizer_state(optimizer, reset_params, reset_moments)
        method_log["resets"] = stats["resets"] = stats.get("resets", 0) + 1
    # --- RESTART: end ---
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
