"""
Fira: GaLore's low-rank Adam step plus the gradient's full-rank residual, scaled by the norms Adam gives.

    python train_fira.py --size tiny                       # CPU, embedded Shakespeare corpus
    python train_fira.py --size 350m --dataset c4          # one GPU (Fira's recipe: --rank 256, lr 0.01)
    torchrun --nproc_per_node=4 train_fira.py --size 1b --dataset c4

The method (Chen et al. 2024, "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
Constraint?"), for each attention/MLP matrix W (m x n, m >= n; the wide case mirrors it), G_t, Q, R_t
and the moments as in GaLore (train_galore.py), N_t = M_t / (sqrt(V_t) + eps):
    phi_i = ||N_t[i, :]|| / ||R_t[i, :]||                          norm-based scaling, one factor per row
    S_t = phi * (G_t - alpha R_t Q)                                residual outside Adam's view, rescaled
    if ||S_t|| > gamma ||S_{t-1}||:  S_t *= gamma ||S_{t-1}|| / ||S_t||   norm-growth limiter, gamma 1.01
    W_t = W_{t-1} - lr_t (alpha N_t Q + S_t)
Same optimizer memory as GaLore plus one scalar per matrix; the update is full rank again.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import evaluate, get_batch, load_tokens, val_windows
from model import RANKS, Llama, compressible_matrices, get_config, memory_report, param_counts, tensor_bytes

# -----------------------------------------------------------------------------
# config

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# data
parser.add_argument("--dataset", default="shakespeare", help="prepared dataset under data/ (see data.py)")
parser.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
parser.add_argument("--val-tokens", type=int, default=32768, help="size of the fixed validation set")
# model
parser.add_argument("--size", default="tiny", help="model size from model.SIZES: nano tiny 60m 130m 350m 1b 7b")
# optimization
parser.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per process")
parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
parser.add_argument("--max-steps", type=int, default=100, help="optimizer steps in the whole run")
parser.add_argument("--warmup-steps", type=int, default=None, help="linear warmup (default: 10%% of max-steps)")
parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to this fraction of --lr")
parser.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay (benchmarks: 0)")
parser.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
# eval, logging, checkpoints
parser.add_argument("--eval-every", type=int, default=100, help="evaluate every N steps (and at the end)")
parser.add_argument("--log-every", type=int, default=10, help="print and log the loss every N steps")
parser.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N steps and at the end (0: never)")
parser.add_argument("--out-dir", default=None, help="where results go (default: out/<method>_<size>)")
parser.add_argument("--resume", action="store_true", help="continue from <out-dir>/ckpt.pt")
# system
parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="autocast dtype (auto: bfloat16 on CUDA, float32 on CPU); weights stay fp32")
parser.add_argument("--compile", action="store_true", help="torch.compile the model")
parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of the batches")
# --- METHOD: begin ---
METHOD = "fira"
parser.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (Fira: 0.01 at every size)")
parser.add_argument("--rank", type=int, default=None, help="r, rank of the projection (default: model.RANKS)")
parser.add_argument("--update-proj-gap", type=int, default=200, help="T: recompute the projector every T steps")
parser.add_argument("--scale", type=float, default=None,
                    help="alpha: scale of the projected-back update (default: 0.25, and 0.0625 from 1b up)")
parser.add_argument("--paper-residual", action="store_true",
                    help="Fira's Alg. 1: S = phi (G - R Q), alpha on both terms "
                         "(official: alpha N Q + phi (G - alpha R Q))")
# --- METHOD: end ---
args = parser.parse_args()

# -----------------------------------------------------------------------------
# setup: processes, device, precision

cfg = get_config(args.size)
ddp = "RANK" in os.environ  # launched by torchrun
if ddp:
    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{os.environ['LOCAL_RANK']}" if use_cuda else "cpu"
else:
    rank, world = 0, 1
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
master = rank == 0  # only rank 0 prints and writes files
device_type = "cuda" if device.startswith("cuda") else "cpu"
if device_type == "cuda":
    if not torch.cuda.is_available():
        sys.exit(f"error: --device {args.device} but this machine has no CUDA GPU (use --device cpu)")
    torch.cuda.set_device(device)
dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device_type == "cuda" else "float32")
autocast = torch.autocast(device_type, torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
out_dir = args.out_dir or os.path.join("out", f"{METHOD}_{args.size}")
ckpt_path = os.path.join(out_dir, "ckpt.pt")
if args.resume and not os.path.exists(ckpt_path):
    sys.exit(f"error: --resume given but there is no checkpoint at {ckpt_path}")
if master:
    os.makedirs(out_dir, exist_ok=True)

# -----------------------------------------------------------------------------
# data: random training windows, and the fixed validation set shared by every method

if master:  # rank 0 prepares the default corpus if needed, the others wait for it
    tokens = load_tokens(args.dataset)
if ddp:
    dist.barrier()
if not master:
    tokens = load_tokens(args.dataset)
B, T, accum = args.batch_size, args.seq_len, args.grad_accum
tokens_per_step = B * T * accum * world
val = val_windows(tokens["val"], T, args.val_tokens)
warmup_steps = args.warmup_steps if args.warmup_steps is not None else args.max_steps // 10

# -----------------------------------------------------------------------------
# model: the same initial weights for every method (same seed)

torch.manual_seed(args.seed)
model = Llama(cfg).to(device)

# -----------------------------------------------------------------------------
# --- METHOD: begin ---
# the method: Fira (Chen et al. 2024) as the official fira 1.0.2 implements it


class FiraAdamW(torch.optim.Optimizer):
    """GaLore's AdamW (see train_galore.py) plus Fira's scaled full-rank residual on the "rank" groups.

    Follows fira 1.0.2: phi from the un-bias-corrected N and the current R, one factor per row of a tall
    R (m x r) or per column of a wide R (r x n); the residual is G - alpha P R (alpha is not applied to it,
    so it keeps (1 - alpha) of the in-subspace gradient); the limiter stores the norm after limiting,
    never resets, and skips the first step. The paper's Alg. 1 instead uses G - P R and alpha on both terms.
    """

    gamma = 1.01  # norm-growth limiter: the residual's norm grows at most 1% per step

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @staticmethod
    def projector(G, r, side):
        """Top-r singular vectors of G, computed in fp32: left U[:, :r] (m x r) or right V^T[:r] (r x n)."""
        U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
        return (U[:, :r] if side == "left" else Vh[:r]).to(G.dtype)

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
            side = "right" if m >= n else "left"  # GaLore's std: shrink the smaller dimension
            if state["step"] % group["update_proj_gap"] == 0:  # steps 0, T, 2T, ... before the increment
                state["P"] = self.projector(G, group["rank"], side)
            P = state["P"]
            R = G @ P.T if side == "right" else P.T @ G  # (m, r) or (r, n)
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
        if "rank" in group:
            back = (lambda X: X @ P) if side == "right" else (lambda X: P @ X)  # low rank -> (m, n)
            alpha = group["scale"]
            # phi: how much Adam rescales each row (tall R) or column (wide R) of the projected gradient
            dim = 0 if N.shape[0] < N.shape[1] else 1
            phi = N.norm(dim=dim, keepdim=True) / (R.norm(dim=dim, keepdim=True) + 1e-8)
            S = phi * (G - back(R) if group["paper_residual"] else G - alpha * back(R))
            S_norm = S.norm()
            if "residual_norm" in state:  # norm-growth limiter (Fira Sec. 4.3), not on the first step
                limit = torch.clamp(S_norm / (state["residual_norm"] + 1e-8), min=self.gamma) / self.gamma
                S, S_norm = S / limit, S_norm / limit
            state["residual_norm"] = S_norm
            N = alpha * (back(N) + S) if group["paper_residual"] else alpha * back(N) + S
        p.add_(N, alpha=-step_size)
        if group["weight_decay"] > 0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])


rank = args.rank or RANKS[args.size]
scale = args.scale if args.scale is not None else (0.0625 if args.size in ("1b", "7b") else 0.25)
fira_params = [lin.weight for _, lin in compressible_matrices(model)]
projected = {id(p) for p in fira_params}
optimizer = FiraAdamW(
    [{"params": [p for p in model.parameters() if id(p) not in projected]},
     {"params": fira_params, "rank": rank, "update_proj_gap": args.update_proj_gap, "scale": scale,
      "paper_residual": args.paper_residual}],
    lr=args.lr, weight_decay=args.weight_decay)
# --- METHOD: end ---

raw_model = model  # the module itself, for state_dict and memory accounting
if args.compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[device] if device_type == "cuda" else None)
counts = param_counts(raw_model)
if master:
    print(f"{METHOD} | size {args.size} | {counts['total']:,} parameters ({counts['embedding']:,} embedding, "
          f"{counts['non_embedding']:,} non-embedding) | {world} x {device} | {dtype} | "
          f"{tokens_per_step:,} tokens/step")


def get_lr(step):
    """Linear warmup, then cosine decay to min_lr_ratio * lr (the GaLore/Fira benchmark schedule)."""
    if step < warmup_steps:
        return args.lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, args.max_steps - warmup_steps)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


start_step = 0
if args.resume:  # plain tensors only, so weights_only=True loads it safely
    ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
    raw_model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    start_step = ckpt["step"]

# -----------------------------------------------------------------------------
# training loop

if master:  # a resumed run rewrites the log up to its checkpoint and goes on from there
    log_path = os.path.join(out_dir, "log.jsonl")
    resumed = args.resume and os.path.exists(log_path)
    kept = [line for line in open(log_path) if json.loads(line)["step"] <= start_step] if resumed else []
    log = open(log_path, "w")
    log.writelines(kept)
train_time, timed_tokens, grads_bytes = 0.0, 0, 0
bar = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps,
           desc=f"{METHOD} {args.size}", disable=not master)
for step in bar:
    t0 = time.time()
    lr = get_lr(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    # ---------------- TRAINING SECTION BEGIN ----------------
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(accum):
        # batch offsets depend only on (seed, step, micro_step, rank): identical for every method and on resume
        x, y = get_batch(tokens["train"], B, T, seed=args.seed * 10**9 + (step * accum + micro_step) * world + rank)
        x, y = x.to(device), y.to(device)
        # under DDP, all-reduce the gradients only on the last micro-batch
        sync = model.no_sync() if ddp and micro_step < accum - 1 else contextlib.nullcontext()
        with sync:
            with autocast:
                _, loss = model(x, y)
            (loss / accum).backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip) if args.grad_clip > 0 else None
    if step == args.max_steps - 1:  # the gradients alive at the optimizer step, counted once
        grads_bytes = tensor_bytes(p.grad for p in raw_model.parameters())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # free the gradients as soon as they are used
    # --- METHOD: begin ---
    # Fira's projector refresh and limiter happen inside the optimizer step
    # --- METHOD: end ---
    # ---------------- TRAINING SECTION END ----------------
    # everything below is diagnostics
    train_loss = loss_sum.item() / accum
    if not math.isfinite(train_loss):
        sys.exit(f"error: loss is {train_loss} at step {step + 1}")
    if device_type == "cuda":
        torch.cuda.synchronize()
    dt = time.time() - t0
    if step == start_step and device_type == "cuda":  # measure the peak after a warm-up step
        torch.cuda.reset_peak_memory_stats(device)
    if step > start_step:  # the first step pays for allocation and compilation
        train_time, timed_tokens = train_time + dt, timed_tokens + tokens_per_step
    last = step == args.max_steps - 1
    record = {"step": step + 1, "tokens": (step + 1) * tokens_per_step, "loss": train_loss, "lr": lr,
              "tok_per_s": tokens_per_step / dt}
    if grad_norm is not None:
        record["grad_norm"] = grad_norm.item()
    if (step + 1) % args.eval_every == 0 or last:
        record["val_loss"], record["val_ppl"] = evaluate(model, val, B, device, autocast)
    if master and ((step + 1) % args.log_every == 0 or "val_loss" in record):
        bar.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        log.write(json.dumps(record) + "\n")
        log.flush()
    bar.set_postfix(loss=f"{train_loss:.3f}")
    if master and args.ckpt_every > 0 and ((step + 1) % args.ckpt_every == 0 or last):
        ckpt = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1}
        torch.save(ckpt, ckpt_path + ".tmp")
        os.replace(ckpt_path + ".tmp", ckpt_path)  # atomic: a crash never leaves a half-written checkpoint

# -----------------------------------------------------------------------------
# results

if master and args.max_steps > start_step:
    memory = memory_report(raw_model, optimizer)
    memory["grads_bytes"] = grads_bytes
    if device_type == "cuda":
        memory["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    result = {"method": METHOD, "size": args.size, "steps": args.max_steps,
              "tokens": args.max_steps * tokens_per_step, "val_loss": record["val_loss"],
              "val_ppl": record["val_ppl"], **memory, "params": counts,
              "tokens_per_s": timed_tokens / train_time if train_time else None,
              "device": torch.cuda.get_device_name(device) if device_type == "cuda" else "cpu",
              "world_size": world, "dtype": dtype, "torch": torch.__version__, "args": vars(args)}
    # --- METHOD: begin ---
    result.update(rank=rank, update_proj_gap=args.update_proj_gap, scale=scale, paper_residual=args.paper_residual)
    # --- METHOD: end ---
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"val loss {result['val_loss']:.4f} | val ppl {result['val_ppl']:.2f} | "
          + " | ".join(f"{k.replace('_bytes', '')} {v / 2**20:.1f} MiB" for k, v in memory.items())
          + f" | {result['tokens_per_s'] or 0:,.0f} tok/s -> {out_dir}/result.json")
if ddp:
    dist.destroy_process_group()
