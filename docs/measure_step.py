"""What one training step costs on this machine, each figure next to the one it replaces, in one process, the
variants interleaved (on a shared machine only the ratios mean something):

    python docs/measure_step.py peak tiny        # peak live tensor bytes: full fp32 logits / chunked loss / + ckpt
    python docs/measure_step.py peak 60m
    python docs/measure_step.py optimizer 60m    # every method's optimizer step, before / after fused and batched
    python docs/measure_step.py optimizer tiny   # the same, and tokens/s of the training step with each
    python docs/measure_step.py compile tiny     # full-rank step time, eager vs torch.compile

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


ADAMW = {"full": "full", "lowrank": "lowrank", "sltrain": "sltrain", "relora": "lora", "muon": "full"}
OURS = {"galore": ("train_galore.py", "GaLoreAdamW"), "fira": ("train_fira.py", "FiraAdamW"),
        "apollo": ("train_apollo.py", "Apollo"), "apollo_mini": ("train_apollo.py", "Apollo"),
        "stable_spam": ("train_stable_spam.py", "StableSPAM"), "spam": ("train_stable_spam.py", "SPAM")}


def before_and_after(method, model, size):
    """The method's optimizer as its script builds it (the size's recipe), twice, each with its step before and
    after issue 20's fused and batched steps (the same floats): torch.optim.AdamW's for-loop and fused kernel; for
    GaLore, Fira and APOLLO their step with every tensor on its own (the batched step's operations, a list of one
    at a time, as the loop before it) and batched; Stable-SPAM and SPAM (not batched) twice the same step, which
    shows the noise. Muon: its AdamW part (embedding, head, norms) only, as torch.optim.Muon's Newton-Schulz
    iterations run in bf16, too slow on this CPU (RESULTS.md); they did not change."""
    from conftest import definitions
    from model import method_defaults
    if method in ADAMW:
        matrices = [lin.weight for _, lin in compressible_matrices(model)] if method == "muon" else []
        params = [p for p in model.parameters() if p.requires_grad and all(p is not w for w in matrices)]
        return [(lambda o: o.step)(torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, fused=fused))
                for fused in (False, True)]
    script, name = OURS[method]
    cls, hp = definitions(script)[name], method_defaults(method, size)
    matrices = [lin.weight for _, lin in compressible_matrices(model)]
    rest = [p for p in model.parameters() if all(p is not w for w in matrices)]
    if method in ("stable_spam", "spam"):
        flags = {k: v for k, v in hp.items() if k not in ("variant", "lr")}
        if method == "stable_spam":
            flags["decay_steps"] = 10_000
        return [cls(model.parameters(), lr=hp["lr"], weight_decay=0.1, **flags).step for _ in range(2)]
    group = {"rank": hp["rank"], "update_proj_gap": hp["update_proj_gap"], "scale": hp["scale"], **(
        {"proj_type": "std", "reset_on_refresh": False, "projector": "svd"} if method == "galore" else
        {"paper_residual": False, "projector": "svd"} if method == "fira" else
        {"scaling": "tensor" if method == "apollo_mini" else "channel", "seed": 0})}
    before, after = (cls([{"params": rest}, {"params": matrices, **group}], lr=hp["lr"], weight_decay=0.1)
                     for _ in range(2))

    def one_at_a_time():
        for g in before.param_groups:
            for index, p in enumerate(g["params"]):
                if "rank" not in g:
                    before.step_unprojected([p], g)
                else:
                    before.step_param(p, g, *([index] if name == "Apollo" else []))
    return [one_at_a_time, after.step]


def optimizer(size):
    """The optimizer step of every method, before and after issue 20, on random gradients (interleaved rounds,
    medians); at tiny also the training step with it (8 x 256 tokens: forward and backward, timed in the same rounds,
    plus each step) as tokens/s; and the step's peak of tensor bytes above the weights, gradients and states."""
    cfg = get_config(size)
    idx, y = batch(cfg)
    reps, rounds = 1, 3
    for method in ["full", "galore", "fira", "apollo", "apollo_mini", "stable_spam", "spam", "muon", "lowrank",
                   "sltrain", "relora"]:
        torch.manual_seed(0)
        model = surgery(ADAMW.get(method, "full"), Llama(cfg), size)
        trainable = [p for p in model.parameters() if p.requires_grad]
        g = torch.Generator().manual_seed(1)
        for p in trainable:
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        steps = before_and_after(method, model, size)
        for s in steps:
            s()  # the states (and GaLore's, Fira's SVDs, T = 200 steps apart) exist: every later step's cost
        opt_times, fb_times, peaks = ([], []), [], []
        for s in steps:
            with PeakTensorBytes() as p:
                s()
            peaks.append(p.peak)
        for _ in range(rounds):
            if size == "tiny":  # real gradients of this round's batch, for both steps
                for p in trainable:
                    p.grad = None
                fb_times.append(timed(lambda: model(idx, y)[1].backward(), 1))
            for times, s in zip(opt_times, steps):  # before, after, before, after, ...
                times.append(timed(s, reps))
        med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
        b, a = med(opt_times[0]), med(opt_times[1])
        line = (f"{size} {method:11s} optimizer step: before {1e3 * b:8.1f} ms, after {1e3 * a:8.1f} ms "
                f"({b / a:.2f}x); peak above weights, grads, states: before {peaks[0] / 2**20:6.1f} MiB, after "
                f"{peaks[1] / 2**20:6.1f} MiB")
        if size == "tiny":
            fb = med(fb_times)
            line += f" | forward+backward {fb:.2f} s: tokens/s x{(fb + b) / (fb + a):.3f} after"
        print(line, flush=True)
        del model, steps


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
    {"peak": peak, "optimizer": optimizer, "compile": compile_}[what](size)
