"""
The LLaMA-style decoder every method trains, the size table, the recipes (what a run does by default), and the
accounting of memory and FLOPs.

Everything here must be identical across methods for the comparison to be fair, so it is shared. The model
knows nothing about any method: a method finds the matrices it may compress through
`compressible_matrices(model)`. The recipe table and the memory estimator name the methods, so that one table
serves every script and bench.sh.

    python model.py                                # every size: its parameters and the papers' recipe
    python model.py --memory                       # bf16 bytes of weights + optimizer states per size and method
    python model.py --memory --vocab-size 32000    # ... with the papers' T5 vocabulary
    python model.py --bench-command "full lowrank" 60m    # the script and flags bench.sh runs for rows of its table
"""
import argparse
import math
import sys
import weakref
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import checkpoint


@dataclass
class LlamaConfig:
    n_embd: int          # d_model
    n_ff: int            # SwiGLU hidden width
    n_head: int
    n_layer: int
    vocab_size: int = 50304  # the dataset's (meta.json) padded to a multiple of 64: GPT-2's 50257 -> 50304
    norm_eps: float = 1e-6
    init_std: float = 0.02   # as the GaLore/Fira LLaMA configs


# The benchmark sizes are the GaLore/Fira/Glentis et al. LLaMA configs (configs/llama_*.json);
# `nano`, `mini` and `tiny` are ours, for tests and CPU runs. The vocabulary is the dataset's (GPT-2's by default:
# the papers use T5's 32000, so their embedding share is smaller). `mini` is the papers' regime in miniature for a
# CPU, on UTF-8 bytes (vocabulary 257 -> 320): attention + MLP are 90.5% of its parameters (1b on T5: 90%), head
# dim 64 and n_ff / d = 2.6875 as 60m, r = d / 4.
SIZES = {
    "nano": LlamaConfig(n_embd=32, n_ff=88, n_head=2, n_layer=2),
    "mini": LlamaConfig(n_embd=128, n_ff=344, n_head=2, n_layer=4),
    "tiny": LlamaConfig(n_embd=256, n_ff=688, n_head=4, n_layer=4),
    "60m": LlamaConfig(n_embd=512, n_ff=1376, n_head=8, n_layer=8),
    "130m": LlamaConfig(n_embd=768, n_ff=2048, n_head=12, n_layer=12),
    "350m": LlamaConfig(n_embd=1024, n_ff=2736, n_head=16, n_layer=24),
    "1b": LlamaConfig(n_embd=2048, n_ff=5461, n_head=32, n_layer=24),
    "7b": LlamaConfig(n_embd=4096, n_ff=11008, n_head=32, n_layer=32),
}

# Rank r of the low-rank methods per size: GaLore's Table 2 (r / d_model = 128/512, 256/768, 256/1024,
# 512/2048), reused by Fira and by Glentis et al.; 7b as GaLore's 7B run; nano, mini and tiny keep r = d/4.
RANKS = {"nano": 8, "mini": 32, "tiny": 64, "60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}

# Linear layers a method may compress: attention q,k,v,o and MLP gate,up,down (as the official
# GaLore/Fira code, which takes every nn.Linear under "attn" or "mlp"). Embedding, head and norms never.
COMPRESSIBLE = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


def get_config(size, vocab_size=None):
    """The config of a named size with a dataset's vocabulary (default GPT-2's), or a one-line exit listing the valid
    sizes."""
    if size not in SIZES:
        sys.exit(f"error: unknown --size {size!r}; valid sizes: {', '.join(SIZES)}")
    if vocab_size is None:
        return SIZES[size]
    return replace(SIZES[size], vocab_size=64 * math.ceil(vocab_size / 64))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32: under bf16 autocast the mean of squares loses precision otherwise
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rotary_cos_sin(seq_len, head_dim, device, base=10000.0):
    """cos and sin of the rotary angles, (T, head_dim/2) each (RoFormer, as LLaMA)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    # x: (B, H, T, hd); rotate the two halves of each head as a complex pair (HF LLaMA's layout)
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = torch.cat([cos, cos], -1).to(x.dtype), torch.cat([sin, sin], -1).to(x.dtype)
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.q = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.k = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.v = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.o = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        # (B, T, C) -> (B, H, T, hd)
        q, k, v = (lin(x).view(B, T, self.n_head, -1).transpose(1, 2) for lin in (self.q, self.k, self.v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate = nn.Linear(cfg.n_embd, cfg.n_ff, bias=False)
        self.up = nn.Linear(cfg.n_embd, cfg.n_ff, bias=False)
        self.down = nn.Linear(cfg.n_ff, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)  # untied, as in the benchmarks
        # activation checkpointing (--activation-checkpointing): keep only each block's input for the backward,
        # which runs the block's forward again (a third more compute for the activations of one block at a time)
        self.checkpointing = False
        for module in self.modules():  # HF LLaMA init: N(0, 0.02) for every linear and embedding
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=cfg.init_std)

    def forward(self, idx, targets=None):
        """(logits, None) without targets; (None, mean cross-entropy) with them, computed from the last hidden
        states in chunks of tokens so that the B x T x V logits never exist (at 60m and 8 x 256 tokens they would
        be 412 MB in fp32, more than the weights, gradients and AdamW states together)."""
        T = idx.shape[1]
        cos, sin = rotary_cos_sin(T, self.cfg.n_embd // self.cfg.n_head, idx.device)
        x = self.embed(idx)
        for block in self.layers:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        x = self.norm(x)
        if targets is None:
            return self.head(x).float(), None
        return None, chunked_cross_entropy(x, self.head.weight, targets)


LOSS_CHUNK = 512  # tokens per chunk of the loss: 512 x 50304 fp32 logits are 103 MB, whatever the micro-batch


IGNORE = -100  # the target of a pad, which the loss skips (F.cross_entropy's ignore_index, the papers' label)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean over the N scored tokens (targets not IGNORE) of -log softmax(h W^T)[target], one chunk of tokens at a
    time; the logits are fp32 inside a chunk only (the matmul in the dtype of h and W, as the head's nn.Linear), and
    the backward recomputes them:
        dL/dlogits = (softmax(logits) - onehot(target)) / N (0 for a pad),  dL/dh = dL/dlogits W,
        dL/dW = sum dL/dlogits^T h
    It saves h and the log-sum-exps instead of the probabilities. A batch of pads only has loss 0 (not 0/0): a
    micro-batch of empty documents adds nothing to the step."""

    @staticmethod
    def forward(ctx, h, weight, targets):  # h: (N, d), weight: (V, d), targets: (N,)
        scored = targets != IGNORE
        picks = targets.clamp_min(0)  # a pad gathers any column; its loss is multiplied by 0
        n = scored.sum().clamp_min(1)
        lse = torch.empty(len(h), device=h.device)
        loss = torch.zeros((), device=h.device)
        for i in range(0, len(h), LOSS_CHUNK):
            logits = (h[i:i + LOSS_CHUNK] @ weight.T).float()
            lse[i:i + LOSS_CHUNK] = logits.logsumexp(-1)
            picked = logits.gather(1, picks[i:i + LOSS_CHUNK, None]).squeeze(1)
            loss += ((lse[i:i + LOSS_CHUNK] - picked) * scored[i:i + LOSS_CHUNK]).sum()
        ctx.save_for_backward(h, weight, picks, scored, n, lse)
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        h, weight, picks, scored, n, lse = ctx.saved_tensors
        row_scale = scored * (grad_loss / n)  # 1/N for a scored token, 0 for a pad
        grad_h = torch.empty_like(h)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)  # summed over the chunks in fp32
        for i in range(0, len(h), LOSS_CHUNK):
            hc, tc = h[i:i + LOSS_CHUNK], picks[i:i + LOSS_CHUNK]
            grad_logits = (hc @ weight.T).float().sub_(lse[i:i + LOSS_CHUNK, None]).exp_()  # softmax, in place
            grad_logits[torch.arange(len(tc), device=tc.device), tc] -= 1
            grad_logits = grad_logits.mul_(row_scale[i:i + LOSS_CHUNK, None]).to(h.dtype)
            grad_h[i:i + LOSS_CHUNK] = grad_logits @ weight
            grad_weight += (grad_logits.T @ hc).float()
        return grad_h, grad_weight.to(weight.dtype), None


def chunked_cross_entropy(h, weight, targets):
    """The mean cross-entropy of the logits h W^T against the targets that are not IGNORE, never holding more than
    LOSS_CHUNK tokens' logits; under autocast the matmuls run in its dtype, as the head's nn.Linear would."""
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dtype), weight.to(dtype)
    with torch.autocast(h.device.type, enabled=False):
        return ChunkedCrossEntropy.apply(h.flatten(0, 1), weight, targets.reshape(-1))


def compressible_matrices(model):
    """(name, nn.Linear) of the attention and MLP matrices, in model order."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.endswith(COMPRESSIBLE)]


def param_counts(model):
    """Parameter counts split as papers quote them: embedding + head vs the rest."""
    emb = model.embed.weight.numel() + model.head.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return {"embedding": emb, "non_embedding": total - emb, "total": total}


# -----------------------------------------------------------------------------
# recipes: what a run does by default, so that `python train_X.py --size 350m` is the papers' 350m run

@dataclass
class Recipe:
    steps: int             # optimizer steps of the papers' run (10% of them linear warmup)
    batch: int             # sequences per optimizer step, all processes together
    micro_batch_80gb: int  # sequences per forward/backward that fit an 80 GB GPU (bf16; larger GPUs scale it)
    val_tokens: int        # size of the fixed validation set
    evals: int             # evaluations per run, the last one at the end
    dataset: str = "shakespeare"  # the default --dataset (prepared on first use; C4 must be prepared: data.py)


SEQ_LEN = 256         # tokens per sequence in every benchmark paper
CPU_MICRO_BATCH = 8   # sequences per forward/backward on a CPU
# GaLore / Fira / Glentis et al.: 512 sequences of 256 tokens per step, 10K / 20K / 60K / 100K / 150K steps.
# nano and tiny are ours: 100 CPU steps of 8 sequences (205K tokens, a few minutes of tiny on 2 cores). mini's
# budget, 300 steps of 16 sequences (1.2M bytes, 1.4 per parameter), is about 2 minutes a run on 2 cores. The
# papers' sizes validate on 10M tokens, as the official code's target_eval_tokens (capped at a smaller split).
RECIPES = {
    "nano": Recipe(100, 8, 8, 4_096, 1),
    "mini": Recipe(300, 16, 512, 65_536, 1, "shakespeare-bytes"),
    "tiny": Recipe(100, 8, 8, 32_768, 1),
    "60m": Recipe(10_000, 512, 128, 10_000_000, 10),
    "130m": Recipe(20_000, 512, 64, 10_000_000, 10),
    "350m": Recipe(60_000, 512, 64, 10_000_000, 10),
    "1b": Recipe(100_000, 512, 16, 10_000_000, 10),
    "7b": Recipe(150_000, 512, 4, 10_000_000, 10),
}

# The papers act every 200 steps (GaLore's projector T, the restarts' K) of 10K-100K; 100-step CPU runs act every
# 25, mini's 300 steps every 50.
CPU_PERIOD = {"nano": 25, "tiny": 25, "mini": 50}
PERIOD = {**CPU_PERIOD, "7b": 500, "*": 200}
# alpha of the low-rank parameterizations (y = B A x alpha / r): 32 up to 130m, 16 from 350m (the authors' runs)
ALPHA = {"350m": 16, "1b": 16, "7b": 16, "*": 32}

# Every script's defaults, per size where they differ ("*": every other size): its paper's settings.
# Sources in docs/details.md ("Recipes"); lrs not found in any release are marked "ours" there. The lrs at mini
# ("mini": ...) are tuned here, not the papers': each benchmark row's best of a one-seed sweep over 4-7 lrs
# spanning 10x or more (results/2026-12-03-cpu-lr-sweep/lr_sweep.md, a test reads it); the paper sizes keep the
# papers' values.
METHODS = {
    "full": {"script": "train_full.py", "lr": {"mini": 3e-3, "*": 1e-3}},
    "galore": {"script": "train_galore.py", "lr": {"mini": 1e-1, "7b": 5e-3, "*": 1e-2}, "rank": RANKS,
               "update_proj_gap": PERIOD, "scale": 0.25},
    "fira": {"script": "train_fira.py", "lr": {"mini": 1e-2, "*": 1e-2}, "rank": RANKS, "update_proj_gap": PERIOD,
             "scale": {"1b": 0.0625, "7b": 0.0625, "*": 0.25}},
    "lowrank": {"script": "train_lowrank_refactor.py", "lr": {"mini": 3e-3, "1b": 5e-3, "7b": 5e-3, "*": 3e-3},
                "rank": RANKS,
                "alpha": ALPHA, "restart_every": PERIOD, "recovery_steps": 10},
    "sltrain": {"script": "train_sltrain.py", "lr": {"mini": 3e-3, "1b": 5e-3, "7b": 5e-3, "*": 3e-3},
                "rank": RANKS,
                "alpha": ALPHA, "delta": 0.1, "restart_every": PERIOD, "recovery_steps": 10},
    # LoRA / ReLoRA. lr, rank, alpha: Glentis et al.'s LoRA row at 60m (lr 0.0015, r 128, alpha 32), the ranks and
    # alphas of the other low-rank rows elsewhere (lr 0.0015 above 60m is ours). ReLoRA (Lialin et al., ICLR 2024,
    # and its repo guitaricet/relora): at each merge its README's 250M run resets the factors' Adam moments
    # (reset_optimizer_on_relora: 99.9% zeroed at random, all of them in bf16); the paper's sec. 3 prunes 99% by
    # magnitude, the repo's 1B config 80% (optimizer_magnitude_pruning 0.8). The script derives the rest from the run's
    # length: a warm start and a merge period of a quarter of the steps each (the README's 250M run: 5K full-rank
    # steps, then a merge every 5K, of 20K), a re-warm of a fifth of the period, at most 100 steps (paper, Fig. 2:
    # 50-100; 100 in the README), and after the warm start a warmup of a tenth of the period (the README's 500).
    "relora": {"script": "train_relora.py", "lr": {"mini": 1e-2, "*": 1.5e-3}, "rank": RANKS, "alpha": ALPHA,
               "prune": "random", "prune_ratio": 0.999},
    # APOLLO (Zhu et al., MLSys 2025) Table 2 and its scripts (scripts/pretrain_c4/llama_*_apollo*.sh): lr 0.01, T 200,
    # the rank a quarter of d_model (130m: 192; 7b: Table 3's 256), alpha 1; APOLLO-Mini rank 1, alpha sqrt(128)
    # (the paper's; its 130m script used sqrt(192)). nano and tiny as the other methods (r = d/4, T 25).
    "apollo": {"script": "train_apollo.py", "variant": "apollo", "lr": {"mini": 1e-2, "*": 1e-2},
               "rank": {**RANKS, "130m": 192, "7b": 256}, "update_proj_gap": PERIOD, "scale": 1.0},
    "apollo_mini": {"script": "train_apollo.py", "variant": "apollo_mini", "lr": {"mini": 1e-2, "*": 1e-2}, "rank": 1,
                    "update_proj_gap": PERIOD, "scale": math.sqrt(128)},
    # Stable-SPAM: the authors' BF16 run (TianjinYellow/StableSPAM scripts_BF16/stablespam.sh, 130m: lr 8e-4, gamma1
    # 0.85, gamma2 0.99999, gamma3 0.999, a reset every 1000 steps, eta 0.5); lr 1e-3 elsewhere is their README's.
    # SPAM: the authors' scripts (TianjinYellow/SPAM-Optimizer scripts/: 130m 8e-4, 350m 4e-4, dT 500, theta 5000)
    # and their README's warmup N = 150; 1b's 2e-4 continues the halving (their 1b script's 2e-3 cannot run as
    # released). The CPU sizes reset every PERIOD steps (SPAM warming up over 2/5 of it), so that their runs reset.
    "stable_spam": {"script": "train_stable_spam.py", "variant": "stable_spam",
                    "lr": {"mini": 3e-3, "130m": 8e-4, "*": 1e-3}, "reset_every": {**CPU_PERIOD, "*": 1000},
                    "gamma1": 0.85, "gamma2": 0.99999, "gamma3": 0.999, "eta": 0.5},
    "spam": {"script": "train_stable_spam.py", "variant": "spam",
             "lr": {"mini": 3e-3, "350m": 4e-4, "1b": 2e-4, "7b": 2e-4, "*": 8e-4},
             "reset_every": {**CPU_PERIOD, "*": 500}, "threshold": 5000,
             "recovery_steps": {"nano": 10, "tiny": 10, "mini": 20, "*": 150}},
    # Muon: torch.optim.Muon's momentum 0.95 and 5 Newton-Schulz steps (Keller Jordan's), Moonlight's lr scaling so
    # that AdamW's lr serves (full's 1e-3: ours, no Muon run of the benchmark papers gives its lr)
    "muon": {"script": "train_muon.py", "lr": {"mini": 1e-2, "*": 1e-3}, "momentum": 0.95, "ns_steps": 5,
             "adjust_lr_fn": "match_rms_adamw"},
}

# The benchmark's rows: a script's method and what differs from its defaults (per size as METHODS).
BENCH_ROWS = {
    "full": ("full", {}),
    "galore": ("galore", {}),
    "fira": ("fira", {}),
    "lowrank": ("lowrank", {"lr": {"mini": 1e-3, "*": 1.5e-3}, "restart_every": 0, "recovery_steps": 0}),
    "lowrank_restarts": ("lowrank", {}),
    "sltrain": ("sltrain", {"restart_every": 0, "recovery_steps": 0, "delta": 0.03}),
    "sltrain_restarts": ("sltrain", {}),
    "lora": ("relora", {"lr": {"mini": 3e-3, "*": 1.5e-3}, "relora_every": 0, "warm_start_steps": 0}),
    "relora": ("relora", {}),
    "apollo": ("apollo", {}),
    "apollo_mini": ("apollo_mini", {}),
    "stable_spam": ("stable_spam", {}),
    "spam": ("spam", {}),
    "muon": ("muon", {}),
}


def at_size(settings, size):
    """settings with the values given per size resolved at a size."""
    return {k: v.get(size, v.get("*")) if isinstance(v, dict) else v for k, v in settings.items()}


def method_defaults(method, size):
    """A script's default settings at a size."""
    return at_size({k: v for k, v in METHODS[method].items() if k != "script"}, size)


def row_settings(row, size):
    """(method, settings) of a row of the benchmark at a size: its script's defaults and the row's own."""
    method, overrides = BENCH_ROWS[row]
    return method, {**method_defaults(method, size), **at_size(overrides, size)}


def bench_command(row, size):
    """The script and flags bench.sh runs for a row of the benchmark at a size (every method flag explicit)."""
    method, settings = row_settings(row, size)
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in settings.items()]
    return " ".join([METHODS[method]["script"], *flags])


def micro_batch(size, batch, world, gpu_bytes):
    """Sequences per forward/backward: the recipe's 80 GB micro-batch scaled to this GPU's memory (a power of two,
    at most the per-process batch), or CPU_MICRO_BATCH on a CPU (gpu_bytes 0)."""
    per_process = batch // world
    if not gpu_bytes:
        return min(CPU_MICRO_BATCH, per_process)
    fits = max(1, int(RECIPES[size].micro_batch_80gb * gpu_bytes / (80 * 2**30)))
    return min(2 ** int(math.log2(fits)), per_process)


# -----------------------------------------------------------------------------
# memory accounting: counted from the live tensors, so it is exact on any device

def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def memory_report(model, optimizer):
    """Bytes of weights, of gradients alive now, of every tensor in the optimizer's state, and of the model's
    buffers (SLTrain's sparse support indices; no other method keeps any)."""
    params = list(model.parameters())
    states = [t for s in optimizer.state.values() for t in s.values()]
    return {"weights_bytes": tensor_bytes(params),
            "grads_bytes": tensor_bytes(p.grad for p in params),
            "optimizer_state_bytes": tensor_bytes(states),
            "buffers_bytes": tensor_bytes(model.buffers())}


class PeakTensorBytes(TorchDispatchMode):
    """The bytes of tensor storage allocated while active and alive now (`live`), and the most at any moment
    (`peak`), on any device: every op's outputs that share no storage with its inputs are new storage, counted
    until freed. Tensors alive before it began (weights, optimizer states) are not counted: the caller adds them.
    Memory an op uses inside itself and frees before it returns (a kernel's workspace) is not seen."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracked = set()  # ids of the storages counted and still alive

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if is_strided(t)}
        for t in tree_flatten(out)[0]:
            if is_strided(t) and id(t.untyped_storage()) not in inputs | self.tracked:
                storage = t.untyped_storage()  # the same Python object for as long as the storage lives
                self.tracked.add(id(storage))
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self.free, id(storage), storage.nbytes())
        return out

    def free(self, storage_id, nbytes):
        self.tracked.discard(storage_id)
        self.live -= nbytes


def is_strided(t):
    return isinstance(t, torch.Tensor) and t.layout == torch.strided


def estimate_bytes(size, method, precision="bf16", hparams=None, vocab_size=None):
    """Weights, gradients, optimizer states and index buffers, from the shapes alone (nothing is allocated).

    Element counts: full (and stable_spam, spam): weights N, gradients N, Adam moments 2N (Stable-SPAM's three
    scalars per tensor not counted). muon: one momentum per matrix element, AdamW's two for the rest. galore/fira:
    the compressible m x n matrices keep full weights and gradients, but their moments live in the projected space
    (2 max(m,n) r) plus the projector (min(m,n) r); Fira adds one norm scalar per matrix. apollo/apollo_mini: the
    moments of the random projection (2 max(m,n) r, r = 1 for Mini; the projection is drawn again, never stored)
    and the limiter's norm (one scalar per matrix). lowrank: each matrix becomes B (m x r) A (r x n): weights,
    gradients and each moment r(m+n). sltrain: r(m+n) + delta m n values, plus int32 (int64 above 2^31) indices.
    relora: the frozen W0 (m n) counts as weights, with no gradient and no state; the trainable B A has r(m+n).
    Everything else (embedding, head, norms) has full AdamW in every method. Bytes per element: 2 in pure bf16 (the
    papers' convention), 4 in mixed and fp32 (fp32 weights, gradients and states). AdamW's 4-byte step counters are
    not counted. hparams: the run's rank and SLTrain density, if they differ from the defaults (RANKS[size], delta
    0.1); vocab_size: the dataset's, if not GPT-2's.
    """
    r, delta = (hparams or {}).get("rank", RANKS[size]), (hparams or {}).get("delta", 0.1)
    with torch.device("meta"):
        model = Llama(get_config(size, vocab_size))
    shapes = [tuple(m.weight.shape) for _, m in compressible_matrices(model)]
    n_total = sum(p.numel() for p in model.parameters())
    n_other = n_total - sum(m * n for m, n in shapes)
    index_bytes = 0
    if method in ("full", "stable_spam", "spam"):  # Adam's two moments (Stable-SPAM's 3 scalars per tensor aside)
        weights = trained = n_total
        states = 2 * n_total
    elif method in ("apollo", "apollo_mini"):
        r = (hparams or {}).get("rank", method_defaults(method, size)["rank"])
        weights = trained = n_total
        states = 2 * n_other + sum(2 * max(m, n) * r + 1 for m, n in shapes)
    elif method in ("galore", "fira"):
        weights = trained = n_total
        states = 2 * n_other + sum(2 * max(m, n) * min(r, m, n) + min(m, n) * min(r, m, n) for m, n in shapes)
        states += len(shapes) if method == "fira" else 0
    elif method == "muon":  # one momentum per matrix element, AdamW's two moments for the rest
        weights = trained = n_total
        states = sum(m * n for m, n in shapes) + 2 * n_other
    elif method == "lowrank":
        weights = trained = n_other + sum(r * (m + n) for m, n in shapes)
        states = 2 * weights
    elif method == "sltrain":
        nnz = [int(delta * m * n) for m, n in shapes]
        weights = trained = n_other + sum(r * (m + n) for m, n in shapes) + sum(nnz)
        states = 2 * weights
        index_bytes = sum(k * (4 if m * n < 2**31 else 8) for k, (m, n) in zip(nnz, shapes))
    elif method == "relora":
        trained = n_other + sum(r * (m + n) for m, n in shapes)
        weights = trained + sum(m * n for m, n in shapes)
        states = 2 * trained
    else:
        raise ValueError(method)
    per = 2 if precision == "bf16" else 4
    return {"weights_bytes": per * weights, "grads_bytes": per * trained, "optimizer_state_bytes": per * states,
            "buffers_bytes": index_bytes}


# -----------------------------------------------------------------------------
# FLOPs and model FLOPs utilization

# dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s; the first name that occurs
# in torch.cuda.get_device_name() wins, so the specific names come first
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
                    ("H200", 989.0), ("A100", 312.0), ("L4", 121.0)]


def peak_bf16_flops(device_name):
    """The GPU's dense bf16 peak in FLOP/s, or None for a GPU not in the table (and for a CPU)."""
    return next((tflops * 1e12 for name, tflops in PEAK_BF16_TFLOPS if name in device_name), None)


def flops_per_token(model, seq_len):
    """Model FLOPs of one token's forward + backward (PaLM, Chowdhery et al. 2022, App. B): 6 per trained
    weight it multiplies (2 forward, 4 backward) and 4 per frozen one (no weight gradient), plus attention's
    12 L d T. Every parameter but the input embedding table counts (a lookup, no multiply)."""
    cfg = model.cfg
    weights = sum((6 if p.requires_grad else 4) * p.numel() for n, p in model.named_parameters()
                  if p is not model.embed.weight)
    return weights + 12 * cfg.n_layer * cfg.n_embd * seq_len


PLAN_MFU = 0.4  # the throughput a plan assumes on a GPU: 40% of its dense bf16 peak


def bench_plan(rows, sizes, runs, max_steps, budget, global_batch, gpu_name, gpus, vocab_size):
    """The lines of a sweep's plan: per size its runs (rows x runs each), tokens and FLOPs, and on a GPU of the
    peak table the GPU-hours at PLAN_MFU and the least wall time on `gpus` GPUs; FLOPs from the shapes alone (6 per
    trained weight, 4 per frozen one, as flops_per_token) with the dataset's vocabulary, so no weights are built."""
    peak = peak_bf16_flops(gpu_name)
    lines, total, longest = [], 0.0, 0.0
    for size in sizes:
        cfg, recipe = get_config(size, vocab_size), RECIPES[size]
        steps = max_steps or max(1, round(recipe.steps * budget))
        tokens = steps * (global_batch or recipe.batch) * SEQ_LEN
        flops = 0.0
        for row in rows:
            method, settings = row_settings(row, size)
            est = estimate_bytes(size, method, "bf16", settings, vocab_size)
            weights, trained = est["weights_bytes"] / 2, est["grads_bytes"] / 2
            per_token = (6 * trained + 4 * (weights - trained) - 6 * cfg.vocab_size * cfg.n_embd
                         + 12 * cfg.n_layer * cfg.n_embd * SEQ_LEN)
            flops += per_token * tokens * runs
            longest = max(longest, per_token * tokens)
        total += flops
        n = len(rows) * runs
        share = "" if steps == recipe.steps else f" ({steps / recipe.steps:.3g}x the recipe's {recipe.steps:,})"
        line = (f"{size}: {n} run{'s' * (n != 1)} of {steps:,} steps{share}, {tokens:,} tokens each, "
                f"{flops:.2e} FLOPs")
        lines.append(line + (f", {flops / (PLAN_MFU * peak) / 3600:,.2f} GPU-hours" if peak else ""))
    if peak:
        wall = max(total / gpus, longest) / (PLAN_MFU * peak) / 3600  # the longest run, if it is the bound
        lines.append(f"total {total / (PLAN_MFU * peak) / 3600:,.2f} GPU-hours, at least {wall:,.2f} h on {gpus} "
                     f"GPU(s) (assumed: {PLAN_MFU:.0%} MFU of the {gpu_name}'s {peak / 1e12:,.0f} TFLOP/s dense bf16 "
                     f"peak)")
    else:
        lines.append(f"total {total:.2e} FLOPs; " + (f"{gpu_name}: not in model.PEAK_BF16_TFLOPS, time not estimated"
                                                    if gpus else "CPU: time not estimated"))
    return lines


def main():
    parser = argparse.ArgumentParser(description="Sizes of the LLaMA models, their recipes and the memory they need.")
    parser.add_argument("--size", default=None, help="one size only (default: all)")
    parser.add_argument("--memory", action="store_true",
                        help="print bf16 bytes of weights + optimizer states for every method")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="the tokenizer's vocabulary (default GPT-2's 50257; the papers' T5: 32000)")
    parser.add_argument("--bench-command", nargs=2, metavar=("ROWS", "SIZES"),
                        help="print, one line per size and row (each list separated by spaces), the size, the row, "
                             "and the script and flags bench.sh runs for it")
    parser.add_argument("--plan", nargs=7, metavar=("RUNS", "MAX_STEPS", "BUDGET", "GLOBAL_BATCH", "GPU", "GPUS",
                                                    "DATASET"),
                        help="with --bench-command: then print the sweep's plan, each line after 'plan ' (RUNS per "
                             "row and size; MAX_STEPS and GLOBAL_BATCH 0 for the recipe's; GPU the device name; the "
                             "model's vocabulary is DATASET's)")
    args = parser.parse_args()
    if args.bench_command:  # every row and size at once: the sweep is checked before its first run, in one process
        rows, sizes = (names.split() for names in args.bench_command)
        for row in rows:
            if row not in BENCH_ROWS:
                sys.exit(f"error: unknown benchmark row {row!r}; rows: {', '.join(BENCH_ROWS)}")
        for size in sizes:
            get_config(size)
        for size in sizes:
            for row in rows:
                print(size, row, bench_command(row, size))
        if args.plan:
            from data import dataset_tokenizer  # data.py imports this module: not at the top
            runs, max_steps, budget, global_batch, gpu, gpus, dataset = args.plan
            for line in bench_plan(rows, sizes, int(runs), int(max_steps), float(budget), int(global_batch), gpu,
                                   int(gpus), dataset_tokenizer(dataset)[1]):
                print("plan", line)
        return
    sizes = [args.size] if args.size else list(SIZES)
    for size in sizes:
        get_config(size)
    if args.vocab_size is not None and args.vocab_size < 1:
        sys.exit(f"error: --vocab-size must be >= 1, got {args.vocab_size}")
    if args.memory:
        # stable_spam, spam: as full
        methods = ("full", "galore", "fira", "lowrank", "sltrain", "relora", "muon", "apollo", "apollo_mini")
        vocab = get_config("nano", args.vocab_size).vocab_size
        print(f"GB in pure bf16 (2 bytes per element, as the papers count), vocabulary {vocab:,}: weights + optimizer "
              "states (as GaLore Table 2) | + gradients (as Fira Table 3); sltrain at delta 0.1 adds its int32 indices")
        print(f"{'size':>5} {'rank':>5} " + " ".join(f"{m:>15}" for m in methods) + f" {'sltrain indices':>16}")
        for size in sizes:
            est = [estimate_bytes(size, m, "bf16", None, args.vocab_size) for m in methods]
            cells = [f"{(e['weights_bytes'] + e['optimizer_state_bytes']) / 1e9:6.3f} | "
                     f"{(e['weights_bytes'] + e['optimizer_state_bytes'] + e['grads_bytes']) / 1e9:6.3f}"
                     for e in est]
            print(f"{size:>5} {RANKS[size]:>5} " + " ".join(f"{c:>15}" for c in cells)
                  + f" {est[4]['buffers_bytes'] / 1e9:16.3f}")
        print("activations, and GaLore's gradients under --per-layer, are not counted")
        return
    print(f"{'size':>5} {'d':>5} {'ff':>6} {'heads':>5} {'layers':>6} "
          f"{'embedding':>12} {'non-embedding':>14} {'total':>14} {'recipe':>28}")
    for size in sizes:
        cfg, recipe = SIZES[size], RECIPES[size]
        with torch.device("meta"):
            c = param_counts(Llama(cfg))
        tokens = recipe.steps * recipe.batch * SEQ_LEN
        tokens = f"{tokens / 1e9:.2f}B" if tokens >= 1e9 else f"{tokens / 1e6:.2f}M"
        print(f"{size:>5} {cfg.n_embd:>5} {cfg.n_ff:>6} {cfg.n_head:>5} {cfg.n_layer:>6} "
              f"{c['embedding']:>12,} {c['non_embedding']:>14,} {c['total']:>14,} "
              f"{f'{recipe.steps:,} x {recipe.batch} x {SEQ_LEN} = {tokens}':>28}")


if __name__ == "__main__":
    main()
