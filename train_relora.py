"""
LoRA and ReLoRA for pretraining: a frozen full-rank W0 plus trainable low-rank B A, merged and restarted.

    python train_relora.py                                  # tiny on CPU: 25 full-rank steps, then a merge every 25
    python train_relora.py --relora-every 0 --warm-start-steps 0   # plain LoRA (the benchmark's LoRA row)
    python train_relora.py --size 130m --dataset c4         # one GPU: 5K full-rank steps, then a merge every 5K
    torchrun --nproc_per_node=4 train_relora.py --size 350m --dataset c4

The method (LoRA for pretraining, Glentis et al. 2025; ReLoRA, Lialin et al., "ReLoRA: High-Rank Training Through
Low-Rank Updates", ICLR 2024): every attention/MLP matrix is W0 + B A alpha / r, W0 (m x n) the model's own init,
frozen; B (m x r) and A (r x n) train with AdamW, as do the embedding, head and norms. By default, ReLoRA as its
authors' code (Guitaricet/relora) runs it, their two runs (full rank, then ReLoRA) in one, for S steps:
    steps i = 0 .. N-1:  W0 trains full rank, B = 0 and A frozen;  lr_i = lr_w c(i / W, (i - W) / (S - W))
    the switch:          W0 freezes, B A trains; a brand-new AdamW for every parameter (the second run loads
                         the weights alone)
    steps j = 0 .. S-N-1 after it, a warmup (W2; W if N = 0) and cosine of their own over S - N steps:
                         lr_j = lr c(j / W2, (j - W2) / (S - N - W2)), except lr_j = lr (j - cK) / R c_end
                         for cK <= j < cK + R (c >= 1): 0 at j = K, 2K, ..., c_end = the cosine at j = cK + R
    after the lr-0 step j = cK:  W0 <- W0 + B A alpha / r;  A <- Kaiming;  B <- 0    merge (the function is kept)
                         M, V of B and A: 99.9% of the entries zeroed at random (ReLoRA's reset; all of
                         them in bf16), the step counter t kept
    the layer:           y = W0 x + B A dropout(x) alpha / r, dropout 0.1 on the low-rank branch's input
c(u, v) = u while u < 1 (the warmup, from 0), then min_lr_ratio + (1 - min_lr_ratio)(1 + cos(pi v)) / 2. A starts
at 0 as in ReLoRA's code, and B = A = 0 gets no gradient: the factors first train once the first merge draws A
(--a-init kaiming: from the switch on), while the embedding, head and norms train throughout.
Gradients and Adam moments r(m+n) per matrix, weights mn + r(m+n): the memory LoRA saves (the warm start needs
full-rank memory). K = N = 0 is plain LoRA as Glentis et al. (A Kaiming, no dropout, their warmup-cosine lr), whose
total update W - W0 = B A alpha / r has rank at most r.
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
METHOD = "relora"
parser.add_argument("--lr", type=POSITIVE, help="peak learning rate (of the low-rank phase)")
parser.add_argument("--rank", type=COUNT, help="r, inner dimension of B A")
parser.add_argument("--scale", type=POSITIVE, help="alpha: the layer computes W0 x + B A x alpha / r")
parser.add_argument("--relora-every", type=OFF_OR_COUNT, default=None,
                    help="K: merge B A into W0 and restart the factors after steps K, 2K, ... of the low-rank phase "
                         "(0: plain LoRA; default: a quarter of the run's steps)")
parser.add_argument("--warm-start-steps", type=OFF_OR_COUNT, default=None,
                    help="N: full-rank AdamW steps on W0 before B A trains (0: low rank from the first step; "
                         "default: a quarter of the run's steps)")
parser.add_argument("--warm-start-lr", type=POSITIVE, default=None,
                    help="peak lr of the warm start, whose warmup and cosine span the whole run (default: --lr / 2, "
                         "as ReLoRA's README: 5e-4 full rank, then 1e-3)")
parser.add_argument("--switch-warmup", type=OFF_OR_COUNT, default=None,
                    help="W2: after the warm start, the low-rank phase's own lr warmup from 0 (default: a tenth of "
                         "K, as the README's 500 of 5K)")
parser.add_argument("--restart-warmup", type=OFF_OR_COUNT, default=None,
                    help="R: at each merge the lr falls to 0 and climbs back over R steps (default: a fifth of K, "
                         "at most ReLoRA's 100)")
parser.add_argument("--prune", choices=["random", "magnitude"],
                    help="which entries of the factors' Adam moments a merge zeroes: drawn at random (ReLoRA's "
                         "default reset) or the smallest in magnitude")
parser.add_argument("--prune-ratio", type=bounded(float, 0, 1),
                    help="the fraction of each Adam moment of the factors a merge zeroes")
parser.add_argument("--lora-dropout", type=bounded(float, 0, 1), default=None,
                    help="dropout on the input of B A alone, not of W0 (default: ReLoRA's 0.1 if K > 0, "
                         "else 0 as Glentis et al.'s LoRA)")
parser.add_argument("--a-init", choices=["zero", "kaiming"], default=None,
                    help="A as built: zero (ReLoRA's code; B = A = 0 has no gradient, so the factors train from the "
                         "first merge on) or kaiming (LoRA's); default: zero if K > 0, else kaiming")


def run_name(args):
    return "lora" if args.relora_every == 0 and args.warm_start_steps == 0 else "relora"
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
# the method: a frozen W0 plus trainable B A in every attention/MLP matrix, merged and restarted every K steps (ReLoRA)


class LoRALinear(torch.nn.Module):
    """y = W0 x + B A dropout(x) alpha / r. W0 (m x n) is the linear layer's own weight, frozen: no gradient, no
    optimizer state. B (m x r) starts at 0 and A (r x n) at 0 (ReLoRA's code) or Kaiming-uniform, U(+-1/sqrt(n))
    (LoRA's), so the layer starts as W0 x. Dropout (training only) masks the input of the low-rank branch alone,
    as ReLoRA's lora_B(lora_A(lora_dropout(x))): W0 x always sees all of x."""

    def __init__(self, weight, r, alpha, dropout=0.0, a_init="kaiming"):
        super().__init__()
        m, n = weight.shape
        self.scale, self.dropout = alpha / r, dropout
        self.W0 = torch.nn.Parameter(weight.detach(), requires_grad=False)
        self.B = torch.nn.Parameter(torch.zeros(m, r))
        self.A = torch.nn.Parameter(torch.zeros(r, n))
        if a_init == "kaiming":
            torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's default init, as LoRA and ReLoRA

    def forward(self, x):
        linear = torch.nn.functional.linear
        h = torch.nn.functional.dropout(x, self.dropout, self.training)
        return linear(x, self.W0) + linear(linear(h, self.A) * self.scale, self.B)

    @torch.no_grad()
    def merge_and_reinit(self, generator):
        """W0 += B A alpha / r (the function is unchanged), then A is drawn again from `generator`, on the CPU so
        that every device and process draws the same numbers, and B = 0: the next B A starts from 0."""
        self.W0.add_((self.B.float() @ self.A.float() * self.scale).to(self.W0.dtype))
        A = torch.nn.init.kaiming_uniform_(torch.empty(self.A.shape), a=math.sqrt(5), generator=generator)
        self.A.copy_(A)
        self.B.zero_()


@torch.no_grad()
def prune_state(optimizer, params, mode, ratio, generator):
    """ReLoRA's partial optimizer reset (training_utils.optimizer_reset) of each Adam moment (exp_avg, exp_avg_sq)
    of each parameter. The step counter is kept, as ReLoRA does: the bias correction stays ~1, so a zeroed entry's
    next update is (1 - b1) / sqrt(1 - b2) = 3.2 times Adam's usual step, which the lr re-warm tempers.
    random: an entry is kept where a uniform draw in the moment's dtype exceeds `ratio` (ReLoRA: rand_like(t) >
    ratio). Ours comes from `generator`, seeded by (seed, step) and drawn on the CPU, so a resume and every DDP
    process draw the same; ReLoRA draws from the global RNG. In bf16 no draw exceeds 0.999 (the largest is 1 - 2^-8
    and 0.999 rounds to 1), so there ReLoRA's default reset, 0.999, zeroes every entry.
    magnitude: an entry is kept where |t| exceeds the `ratio` quantile of |t|, taken in fp32 and rounded to the
    moment's dtype, as ReLoRA: entries tied at the threshold (frequent in bf16) are zeroed too."""
    for p in params:
        state = optimizer.state.get(p, {})  # none before the factor's first step
        for t in (state[moment] for moment in ("exp_avg", "exp_avg_sq") if moment in state):
            if mode == "random":
                keep = torch.rand(t.shape, dtype=t.dtype, generator=generator).to(t.device) > ratio
            else:
                keep = t.abs() > torch.quantile(t.abs().flatten().float(), ratio).to(t.dtype)
            t.mul_(keep)


def set_phase(layers, optimizer, lora):
    """The warm start (lora False) trains every W0 at full rank, B (= 0) and A frozen; the low-rank phase freezes
    W0, frees its AdamW state (the memory the method saves) and trains B and A."""
    for layer in layers:
        layer.W0.requires_grad_(not lora)
        layer.B.requires_grad_(lora)
        layer.A.requires_grad_(lora)
        if lora:
            optimizer.state.pop(layer.W0, None)


def restarts_lr(i, steps, warmup, every, restart_warmup):
    """The lr multiplier of step i (from 0) of a run of `steps`: ReLoRA's cosine_restarts scheduler
    (training_utils.get_cosine_schedule_with_multiple_warmups). A linear warmup from 0 and a cosine down to
    min_lr_ratio at the end; from step `every` on, every `every` steps the lr falls to 0 and climbs linearly over
    `restart_warmup` steps to the value the cosine has at the end of the climb, then follows the cosine again.
    every = 0: no restarts, ReLoRA's plain cosine scheduler over the whole run."""
    def cosine(i):
        progress = (i - warmup) / max(1, steps - warmup)
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if i < warmup:
        return i / warmup
    since = i % every if every else i
    if every and i >= every and since < restart_warmup:
        return since / restart_warmup * cosine(i - since + restart_warmup)
    return cosine(i)


def relora_lr(step):
    """The lr of a ReLoRA step, the authors' two runs in one. The warm start is their full-rank run: a schedule over
    the whole run, stopped after N steps. The low-rank phase is their ReLoRA run, whose scheduler starts afresh
    over the remaining steps with its own warmup (the whole run's, if there is no warm start)."""
    if step < warm_start:
        return warm_start_lr * restarts_lr(step, max_steps, warmup_steps, 0, 0)
    return args.lr * restarts_lr(step - warm_start, max_steps - warm_start, switch_warmup if warm_start else
                                 warmup_steps, relora_every, restart_warmup)


def seed_dropout(module, inputs):
    """Dropout draws from the global RNG: seed it for each training micro-batch from that micro-batch's `seed` (the
    training loop's, set before the forward), so that a resumed run draws the same masks and N processes draw what
    one process accumulating N micro-batches would. 2**63 + keeps it apart from the batch's own draw."""
    if module.training:
        torch.manual_seed(2**63 + seed)


r, alpha = args.rank, args.scale
if r >= min(cfg.n_embd, cfg.n_ff):
    sys.exit(f"error: --rank {r} must be below d_model {cfg.n_embd} to be low rank")
# ReLoRA's README 250M run: a quarter of the steps full rank, then a merge every quarter, a warmup of a tenth of it
relora_every = max_steps // 4 if args.relora_every is None else args.relora_every
warm_start = max_steps // 4 if args.warm_start_steps is None else args.warm_start_steps
restart_warmup = min(100, relora_every // 5) if args.restart_warmup is None else args.restart_warmup
switch_warmup = (relora_every or max_steps - warm_start) // 10 if args.switch_warmup is None else args.switch_warmup
warm_start_lr = args.warm_start_lr or args.lr / 2  # the README: "we use a larger LR during the ReLoRA stage"
# ReLoRA's script hard-codes dropout 0.1 and zeroes A; plain LoRA is Glentis et al.'s (no dropout, A Kaiming)
dropout = (0.1 if relora_every else 0.0) if args.lora_dropout is None else args.lora_dropout
a_init = args.a_init or ("zero" if relora_every else "kaiming")
if relora_every and restart_warmup >= relora_every:
    sys.exit(f"error: --restart-warmup {restart_warmup} must be below --relora-every {relora_every}")
low_warmup = ("--switch-warmup", switch_warmup) if warm_start else ("--warmup-steps", warmup_steps)
if relora_every and low_warmup[1] > relora_every:  # ReLoRA's scheduler asserts it: the first merge ends the warmup
    sys.exit(f"error: {low_warmup[0]} {low_warmup[1]} must be at most --relora-every {relora_every}")
if master and relora_every and warm_start + relora_every >= max_steps:
    print(f"warning: --warm-start-steps {warm_start} + --relora-every {relora_every} is not below the run's "
          f"{max_steps} steps: no merge will happen", file=sys.stderr)
if master and warm_start:  # the estimate printed below is the low-rank phase's
    full, low = estimate_bytes(args.size, "full", precision), estimate_bytes(args.size, METHOD, precision, {"rank": r})
    extra = sum(full[k] - low[k] for k in ("grads_bytes", "optimizer_state_bytes"))
    print(f"warm start: the first {min(warm_start, max_steps):,} steps train W0 at full rank, with {extra / 2**20:,.1f}"
          f" MiB more of gradients and optimizer state than the low-rank phase (the peak memory is full rank's)")
layers = []
for name, linear in compressible_matrices(model):
    parent, child = name.rsplit(".", 1)
    layers.append(LoRALinear(linear.weight, r, alpha, dropout, a_init).to(device, param_dtype))  # W0 is already there
    setattr(model.get_submodule(parent), child, layers[-1])
if dropout:
    model.register_forward_pre_hook(seed_dropout)
# one AdamW over every parameter: a frozen one gets no gradient, so AdamW skips it and keeps no state for it
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                              weight_decay=args.weight_decay)
factors = [p for layer in layers for p in (layer.B, layer.A)]
lora_phase = True  # as built: W0 frozen; the loop sets the phase of each step (warm start: W0 trains instead)
hparams = {"lr": args.lr, "rank": r, "scale": alpha, "relora_every": relora_every, "warm_start_steps": warm_start,
           "warm_start_lr": warm_start_lr, "switch_warmup": switch_warmup, "restart_warmup": restart_warmup,
           "prune": args.prune, "prune_ratio": args.prune_ratio, "lora_dropout": dropout, "a_init": a_init}
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
    if (step >= warm_start) != lora_phase:  # a pure function of the step, so a resume lands in the right phase
        lora_phase = step >= warm_start
        set_phase(layers, optimizer, lora_phase)
        if lora_phase:  # the authors' ReLoRA run loads the warm-started weights alone: a brand-new AdamW for all
            optimizer.state.clear()
        if ddp:  # DDP all-reduces the parameters that required grad when it was built: wrap the model anew
            model = DDP(model.module, device_ids=[device] if device_type == "cuda" else None, broadcast_buffers=False)
    if relora_every or warm_start:  # ReLoRA's schedules; plain LoRA keeps the benchmark's warmup-cosine
        lr = relora_lr(step)
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
    method_log = {}  # the merges when they happen, counted over the run
    since = step - warm_start  # the low-rank steps before this one
    if relora_every and since >= relora_every and since % relora_every == 0:  # after the lr-0 step, as ReLoRA
        generator = torch.Generator().manual_seed(args.seed * 10**9 + step + 1)  # the same on every rank and resume
        for layer in layers:
            layer.merge_and_reinit(generator)
        prune_state(optimizer, factors, args.prune, args.prune_ratio, generator)
        method_log["merges"] = stats["merges"] = stats.get("merges", 0) + 1
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
