"""What one training step costs on this machine, each figure next to the one it replaces, in one process, the
variants interleaved (on a shared machine only the ratios mean something):

    python docs/measure_step.py peak tiny     # peak live tensor bytes: full fp32 logits / chunked loss / + checkpointing
    python docs/measure_step.py peak 60m
    python docs/measure_step.py adamw tiny    # step time per method, torch.optim.AdamW's for-loop vs fused
    python docs/measure_step.py adamw 60m     # the optimizer step alone, full-rank, for-loop vs fused
    python docs/measure_step.py compile tiny  # full-rank step time, eager vs torch.compile

Micro-batch 8 x 256 (CPU_MICRO_BATCH, SEQ_LEN), fp32 as the CPU default, full-rank AdamW unless a method is named.
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from model import CPU_MICRO_BATCH, RANKS, SEQ_LEN, Llama, PeakTensorBytes, compressible_matrices, get_config  # noqa

B, T = CPU_MICRO_BATCH, SEQ_LEN


def batch(cfg):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 50257, (B, T), generator=g), torch.randint(0, 50257, (B, T), generator=g)


def step(model, optimizer, idx, y, full_logits=False):
    loss = F.cross_entropy(model(idx)[0].flatten(0, 1), y.flatten()) if full_logits else model(idx, y)[1]
    loss.backward()
    del loss
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def peak(size):
    cfg = get_config(size)
    idx, y = batch(cfg)
    torch.manual_seed(0)
    model = Llama(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    step(model, optimizer, idx, y)  # the states exist: the second step's peak, as every later step's
    counted = sum(p.numel() * 4 for p in model.parameters())
    print(f"{size}: weights {counted / 2**20:.1f} MiB, + gradients and 2 moments = {4 * counted / 2**20:.1f} MiB; "
          f"full fp32 logits {B * T * cfg.vocab_size * 4 / 2**20:.1f} MiB")
    for name, full_logits, ckpt in [("full fp32 logits (before)", True, False), ("chunked loss", False, False),
                                    ("chunked loss + checkpointing", False, True),
                                    ("full fp32 logits + checkpointing", True, True)]:
        model.checkpointing = ckpt
        alive = sum(t.numel() * t.element_size() for t in [*model.parameters(), *(
            s for st in optimizer.state.values() for s in st.values())])
        with PeakTensorBytes() as p:
            step(model, optimizer, idx, y, full_logits)
        print(f"  {name:34s} peak {(alive + p.peak) / 2**20:8.1f} MiB (above weights + states "
              f"{p.peak / 2**20:8.1f})")


def surgery(method, model, size):
    """The model as each script's surgery leaves it, at the size's rank and alpha 32."""
    from conftest import definitions
    r = RANKS[size]
    if method == "full":
        return model
    ns = definitions({"lowrank": "train_lowrank_refactor.py", "sltrain": "train_sltrain.py",
                      "lora": "train_relora.py"}[method])
    for i, (name, linear) in enumerate(compressible_matrices(model)):
        m, n = linear.weight.shape
        if method == "lowrank":
            layer = ns["LowRankLinear"](m, n, r, 32)
        elif method == "sltrain":
            layer = ns["SparseLowRankLinear"](m, n, r, 32, ns["draw_support"](m, n, int(0.1 * m * n), 0, i))
        else:
            layer = ns["LoRALinear"](linear.weight, r, 32)
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, layer)
    return model


def timed(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]  # the median


def adamw(size):
    cfg = get_config(size)
    idx, y = batch(cfg)
    methods = ["full", "lowrank", "sltrain", "lora"] if size == "tiny" else ["full"]
    for method in methods:
        runs = {}
        for fused in (False, True):
            torch.manual_seed(0)
            model = surgery(method, Llama(cfg), size)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=fused)
            runs[fused] = (model, opt)
            for p in model.parameters():  # one step to allocate the states
                if p.requires_grad:
                    p.grad = torch.full_like(p, 1e-3)
            opt.step()
        total = {False: [], True: []}
        opt_only = {False: [], True: []}
        for _ in range(3):  # interleaved: for-loop, fused, for-loop, fused, ...
            for fused, (model, opt) in runs.items():
                if size == "tiny":
                    total[fused].append(timed(lambda: step(model, opt, idx, y), 1))
                for p in model.parameters():
                    if p.requires_grad:
                        p.grad = torch.full_like(p, 1e-3)
                opt_only[fused].append(timed(opt.step, 5))
        med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
        line = f"{size} {method:8s} optimizer step: for-loop {1e3 * med(opt_only[False]):7.1f} ms, fused " \
               f"{1e3 * med(opt_only[True]):7.1f} ms ({med(opt_only[False]) / med(opt_only[True]):.2f}x)"
        if size == "tiny":
            line += f" | training step: for-loop {med(total[False]):.3f} s, fused {med(total[True]):.3f} s " \
                    f"({med(total[False]) / med(total[True]):.2f}x, tokens/s x{med(total[False]) / med(total[True]):.2f})"
        print(line, flush=True)


def compile_(size):
    cfg = get_config(size)
    idx, y = batch(cfg)
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = Llama(cfg)
        opt = torch.optim.AdamW(model.parameters(), fused=True)
        fwd = torch.compile(model) if compiled else model
        t0 = time.perf_counter()
        step(fwd, opt, idx, y)
        print(f"first step {'compiled' if compiled else 'eager'}: {time.perf_counter() - t0:.1f} s", flush=True)
        runs[compiled] = (fwd, opt)
    times = {False: [], True: []}
    for _ in range(5):
        for compiled, (fwd, opt) in runs.items():
            times[compiled].append(timed(lambda: step(fwd, opt, idx, y), 1))
    med = {k: sorted(v)[2] for k, v in times.items()}
    print(f"{size} training step: eager {med[False]:.3f} s, compiled {med[True]:.3f} s "
          f"(compiled is {med[False] / med[True]:.2f}x the eager speed)")


if __name__ == "__main__":
    what, size = sys.argv[1:3]
    {"peak": peak, "adamw": adamw, "compile": compile_}[what](size)
