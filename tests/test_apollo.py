"""APOLLO and APOLLO-Mini (train_apollo.py) against a plain transcription of the paper's Alg. 1, and in runs.

The official package (apollo-torch) is CC-BY-NC-4.0, so no test downloads it: the reference is `algorithm_box`
below, written from the paper (Zhu et al., MLSys 2025, Alg. 1 and Eq. 4), in float64, with the readings of what
the box leaves open stated in its docstring."""
import hashlib
import math

import pytest
import torch

from conftest import FAST, NANO, definitions, error_of, outputs, run_each
from model import SIZES, Llama, estimate_bytes, memory_report

APOLLO = definitions("train_apollo.py")
Apollo = APOLLO["Apollo"]
GaLoreAdamW = definitions("train_galore.py")["GaLoreAdamW"]

LR, BETAS, EPS, GAMMA = 1e-2, (0.9, 0.999), 1e-6, 1.01
SEED, RANK, T = 7, 3, 3
# the gradients' norms jump up and down, so that the limiter acts at some steps and not at others
GROWTH = [1, 2, 0.5, 3, 1, 1, 4, 0.3, 1, 2]


def algorithm_box(W0, grads, r, T, lr, alpha, wd, tensor_wise, seed, index, dtype):
    """Alg. 1 of the paper for one matrix W (m x n, m <= n), a plain loop in float64. The random projection is
    the script's draw (seeded by a hash of the run's seed, the matrix's index and the refresh), N(0, 1/r) drawn in
    fp32 and rounded to the run's dtype. What the box leaves open, read as the authors' code does: "AdamW(R)"
    has its bias correction in the step size, sqrt(1 - b2^t) / (1 - b1^t), with eps 1e-6 before it; the scale's
    denominators add 1e-8; Eq. 4's ||G~_{t-1}|| is the norm after limiting, and the first step is not limited.
    Returns the final weights and the steps at which the limiter acted."""
    (b1, b2), (m, n) = BETAS, W0.shape
    W, M, V, previous, limited = W0.double(), 0.0, 0.0, None, []
    for t, G in enumerate(grads, start=1):
        G = G.double()
        if (t - 1) % T == 0:  # Step 1: a new projection every T steps, from a new seed
            key = hashlib.sha256(f"{seed} {index} {(t - 1) // T}".encode()).digest()[:8]
            g = torch.Generator().manual_seed(int.from_bytes(key, "little"))
            P = (torch.randn(r, m, generator=g) / math.sqrt(r)).to(dtype).double()
        R = P @ G
        M = b1 * M + (1 - b1) * R  # Step 2: AdamW's moments of R, no weight decay
        V = b2 * V + (1 - b2) * R**2
        R_tilde = M / (V.sqrt() + EPS)
        if tensor_wise:  # Step 3: APOLLO-Mini's one scale, or APOLLO's one per channel j (column)
            S = R_tilde.norm() / (R.norm() + 1e-8)
        else:
            S = torch.diag(R_tilde.norm(dim=0) / (R.norm(dim=0) + 1e-8))
        G_tilde = G * S if tensor_wise else G @ S
        if previous is not None and G_tilde.norm() / previous > GAMMA:  # Eq. 4, the norm-growth limiter
            G_tilde = G_tilde / G_tilde.norm() * GAMMA * previous
            limited.append(t)
        previous = G_tilde.norm()
        step = lr * math.sqrt(1 - b2**t) / (1 - b1**t)  # Step 4
        W = W - step * alpha * G_tilde - lr * wd * W
    return W, limited


def adamw_box(w0, grads, lr, wd):
    """AdamW for the other parameters, with the same reading of its bias correction and eps."""
    (b1, b2), w, M, V = BETAS, w0.double(), 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        g = g.double()
        M, V = b1 * M + (1 - b1) * g, b2 * V + (1 - b2) * g**2
        w = w - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * M / (V.sqrt() + EPS) - lr * wd * w
    return w


def inputs(dtype, seed=0):
    """A tall, a wide and a square matrix (the group, in this order), a vector and an unprojected matrix (AdamW's
    batch of two); weights at an LLM's init scale (0.01) so that the updates span many ulps; 10 steps of gradients
    (refreshes at steps 1, 4, 7, 10: T = 3)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(12, 8), (8, 12), (8, 8), (8,), (6, 4)]
    params = [(torch.randn(s, generator=g) * 0.01).to(dtype) for s in shapes]
    grads = [[(torch.randn(s, generator=g) * k).to(dtype) for s in shapes] for k in GROWTH]
    return params, grads


def ours(params, grads, variant, wd):
    params = [torch.nn.Parameter(p.clone()) for p in params]
    rank, alpha = (1, math.sqrt(128)) if variant == "apollo_mini" else (RANK, 1.0)
    opt = Apollo([{"params": params[3:]},
                  {"params": params[:3], "rank": rank, "update_proj_gap": T, "scale": alpha,
                   "scaling": "tensor" if variant == "apollo_mini" else "channel", "seed": SEED}],
                 lr=LR, weight_decay=wd)
    refreshes = 0
    for step_grads in grads:
        for p, grad in zip(params, step_grads):
            p.grad = grad.clone()
        opt.step()
        refreshes += opt.refreshed
        opt.refreshed = False
    return [p.detach() for p in params], opt, refreshes


# the relative gap between our update over the 10 steps and the float64 transcription's. fp32: float32 rounding,
# at most 2.2e-7 measured. bf16: every operation of ours rounds to bf16 (the papers' pure-bf16 runs: moments,
# scaled gradient, weights), the transcription's do not: at most 1.3% measured (APOLLO and Mini alike)
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["apollo", "apollo_mini"])
def test_update_is_the_algorithm_box(dtype, variant):
    wd = 0.1
    params, grads = inputs(dtype)
    weights, opt, refreshes = ours(params, grads, variant, wd)
    assert refreshes == 4  # steps 1, 4, 7, 10
    rank, alpha = (1, math.sqrt(128)) if variant == "apollo_mini" else (RANK, 1.0)
    acted = []  # (matrix, step) where the limiter acted
    for index, (w, w0) in enumerate(zip(weights[:3], params[:3])):
        # the box is written for m <= n: a tall or square matrix takes it transposed (its channels are its rows)
        transpose = w0.shape[0] >= w0.shape[1]
        flip = (lambda x: x.T) if transpose else (lambda x: x)
        ref, limited = algorithm_box(flip(w0), [flip(g[index]) for g in grads], rank, T, LR, alpha, wd,
                                     variant == "apollo_mini", SEED, index, dtype)
        acted += [(index, t) for t in limited]
        update, ref_update = w.double() - w0.double(), flip(ref) - w0.double()
        assert (update - ref_update).norm() / ref_update.norm() < TOLERANCE[dtype], index
        state = opt.state[opt.param_groups[1]["params"][index]]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq", "norm"}  # no projection kept
        assert state["exp_avg"].shape == ((w0.shape[0], rank) if transpose else (rank, w0.shape[1]))
    assert 0 < len(acted) < 3 * 9  # the limiter acted at some of the steps it may act at, not at all
    for i in (3, 4):
        ref = adamw_box(params[i], [g[i] for g in grads], LR, wd)
        assert ((weights[i].double() - ref).norm() / (ref - params[i].double()).norm()) < TOLERANCE[dtype]


def test_projection_depends_on_the_seed_the_matrix_and_the_refresh_only():
    params, grads = inputs(torch.float32)
    a, _, _ = ours(params, grads, "apollo", 0.0)
    b, _, _ = ours(params, grads, "apollo", 0.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # what every process and a resumed run draw
    draw = lambda s, i, k: APOLLO["projection"](3, 8, params[0], APOLLO["projection_seed"](s, i, k))  # noqa: E731
    assert torch.equal(draw(0, 1, 2), draw(0, 1, 2))
    assert not any(torch.equal(draw(0, 1, 2), other) for other in (draw(1, 1, 2), draw(0, 2, 2), draw(0, 1, 3)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_state_dict_round_trip_across_a_refresh_is_bit_exact(dtype):
    """What a resume does, in process and in both dtypes (CPU bf16 runs are too slow for a test): load_state_dict
    casts floating state to the weights' dtype, so the limiter's norm is kept in it already."""
    params, grads = inputs(dtype)
    straight, _, _ = ours(params, grads, "apollo", 0.1)
    first, opt, _ = ours(params, grads[:5], "apollo", 0.1)  # a refresh at step 4, the next at step 7
    saved = {k: v for k, v in opt.state_dict().items()}
    resumed = [torch.nn.Parameter(p.clone()) for p in first]
    again = Apollo([{"params": resumed[3:]}, {"params": resumed[:3], **{k: opt.param_groups[1][k] for k in
                    ("rank", "update_proj_gap", "scale", "scaling", "seed")}}], lr=LR, weight_decay=0.1)
    again.load_state_dict(saved)
    for step_grads in grads[5:]:
        for p, grad in zip(resumed, step_grads):
            p.grad = grad.clone()
        again.step()
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight))


def one_step_state_bytes(make):
    torch.manual_seed(0)
    model = Llama(SIZES["nano"])
    opt = make(model)
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
    model(idx, idx)[1].backward()
    opt.step()
    return memory_report(model, opt)["optimizer_state_bytes"]


def test_counted_state_bytes_are_the_estimate_and_mini_is_below_galore():
    from model import compressible_matrices

    def groups(model, **settings):
        mats = [lin.weight for _, lin in compressible_matrices(model)]
        ids = {id(p) for p in mats}
        return [{"params": [p for p in model.parameters() if id(p) not in ids]}, {"params": mats, **settings}]

    apollo = lambda r, scaling: lambda model: Apollo(  # noqa: E731
        groups(model, rank=r, update_proj_gap=25, scale=1.0, scaling=scaling, seed=0), lr=1e-3)
    galore = lambda model: GaLoreAdamW(groups(model, rank=8, update_proj_gap=25, scale=0.25, proj_type="std",  # noqa
                                              reset_on_refresh=False, projector="svd"), lr=1e-3)
    counted = {"apollo": one_step_state_bytes(apollo(8, "channel")),
               "apollo_mini": one_step_state_bytes(apollo(1, "tensor")), "galore": one_step_state_bytes(galore)}
    for method, n in counted.items():  # fp32, nano's rank 8 (Mini: 1)
        assert n == estimate_bytes("nano", method, "fp32")["optimizer_state_bytes"], method
    assert counted["apollo_mini"] < counted["apollo"] < counted["galore"]
    # at the paper sizes, from the estimator: Mini's states about 2 bytes a matrix element below GaLore's
    for size in ("60m", "130m", "350m", "1b"):
        mini, galore_bytes, full = (estimate_bytes(size, m)["optimizer_state_bytes"]
                                    for m in ("apollo_mini", "galore", "full"))
        assert mini < galore_bytes < full, size


VARIANTS = ["apollo", "apollo_mini"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare):
    """Each variant's 12 nano steps at 16-token sequences, then each BAD_FLAGS run, from one process (run_each):
    {variant or its BAD_FLAGS index: (result, log, process, out_dir)}."""
    out = tmp_path_factory.mktemp("apollo")
    flags = {**{variant: ["--max-steps", "12", "--update-proj-gap", "5", "--lr", "1e-2", "--variant", variant]
                for variant in VARIANTS}, **{i: f for i, (f, _) in enumerate(BAD_FLAGS)}}
    procs = run_each([["train_apollo.py", *NANO, *FAST, *f, "--out-dir", str(out / str(name))]
                      for name, f in flags.items()], check=False)
    return {name: (*outputs(out / str(name)), proc, out / str(name)) for name, proc in zip(flags, procs)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_loss_falls_and_the_run_reports_what_it_ran(runs, variant):
    result, log, proc, _ = runs[variant]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert log[-1]["loss"] < log[0]["loss"] - 0.5
    assert [r["refreshes"] for r in log if "refreshes" in r] == [1, 2, 3]  # steps 1, 6, 11
    method, rank = ("apollo_mini", 1) if variant == "apollo_mini" else ("apollo", 8)
    assert result["method"] == result["run"] == method and result["rank"] == rank
    assert result["scaling"] == ("tensor" if variant == "apollo_mini" else "channel")
    estimate = estimate_bytes("nano", method, "fp32", result)
    assert {k: result[k] for k in estimate} == estimate  # counted from the live tensors, as estimated



BAD_FLAGS = [
    (["--rank", "0"], "error: argument --rank: must be >= 1, got 0"),
    (["--rank", "32"], "error: --rank 32 must be below 32, the smallest side of the attention and MLP matrices"),
    (["--scale", "0"], "error: argument --scale: must be > 0, got 0"),
    (["--update-proj-gap", "0"], "error: argument --update-proj-gap: must be >= 1, got 0"),
    (["--variant", "maxi"], "error: argument --variant: invalid choice: 'maxi' (choose from "),
]


@pytest.mark.parametrize("i", range(len(BAD_FLAGS)), ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_errors(runs, i):
    *_, proc, out = runs[i]
    assert error_of(proc).startswith(BAD_FLAGS[i][1]) and proc.stderr.count("\n") == 1, proc.stderr
    assert not out.exists()
