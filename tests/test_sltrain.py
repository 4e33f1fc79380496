import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import FAST, NANO, assert_refactorization_keeps_the_logits, definitions, nano_with, outputs, run_each
from model import (BENCH_ROWS, RANKS, SIZES, Llama, compressible_matrices, estimate_bytes, method_defaults,
                   row_settings)
from test_lowrank_refactor import assert_resume_after_a_crash_is_exact, official_lrs

ns = definitions("train_sltrain.py")
ns["METHOD"] = "sltrain"  # run_name reads the script's METHOD, which definitions() does not execute
SparseLowRankLinear, draw_support, dense = ns["SparseLowRankLinear"], ns["draw_support"], ns["dense"]
refactorize, run_name = ns["refactorize"], ns["run_name"]

M, N, R, ALPHA, DELTA = 48, 40, 6, 12.0, 0.1  # W is 48 x 40; x below has 3 x 5 x 40 = 600 entries, not 1920


def make_layer(seed=0, layer=0, m=M, n=N):
    torch.manual_seed(seed)
    sl = SparseLowRankLinear(m, n, R, ALPHA, draw_support(m, n, int(DELTA * m * n), seed, layer))
    with torch.no_grad():  # B = 0 at init would make A's gradient zero and the checks weak
        sl.B.normal_(0, 0.1)
    return sl


def explicit_weight(sl):
    """The formula written out, independently of the layer's code: B (A alpha / r) + S, S scattered densely."""
    S = torch.zeros(sl.B.shape[0] * sl.A.shape[1]).scatter(0, sl.indices.long(), sl.values)
    return sl.B @ (sl.A * ALPHA / R) + S.view(sl.B.shape[0], sl.A.shape[1])


def assert_close(a, b, tol=1e-5):  # the summation order differs from the reference's
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


def test_the_layer_is_a_linear_with_the_dense_weight():
    sl = make_layer()
    x = torch.randn(3, 5, N, requires_grad=True)
    g = torch.randn(3, 5, M)  # a random upstream gradient
    sl(x).backward(g)
    linear = torch.nn.Linear(N, M, bias=False)
    with torch.no_grad():
        linear.weight.copy_(explicit_weight(sl))
    x_ref = x.detach().clone().requires_grad_()
    linear(x_ref).backward(g)
    assert_close(sl(x), linear(x_ref))
    assert_close(x.grad, x_ref.grad)
    # the values' gradient is the dense weight's gradient gathered at the support
    assert_close(sl.values.grad, linear.weight.grad.view(-1)[sl.indices.long()])
    # and the factors' gradients are those of autograd through the formula
    ref = make_layer()
    F.linear(x.detach(), explicit_weight(ref)).backward(g)
    assert_close(sl.B.grad, ref.B.grad)
    assert_close(sl.A.grad, ref.A.grad)
    assert sl.A.grad.abs().max() > 0 and sl.B.grad.abs().max() > 0


def official_forward(x, B, A, dv, di, scaling):
    """SpLoRaLinear.forward and sparse_linear_forward of para_eff_pt/pt_sltrain/splora_model.py (Glentis et al.'s
    copy of SLTrain), without bias: A is scaled first, then W = B (A scaling) with S scatter-added."""
    lora_A = A * scaling
    W = B.mm(lora_A.to(B.dtype))
    W.view(-1).scatter_add_(0, di.to(torch.int64), dv.to(W.dtype))
    return F.linear(x, W)


def official_grads(grad_y, x, B, A, dv, di, scaling):
    """sparse_linear_backward of the same file, and autograd's step from lora_A = A scaling back to A."""
    A_leaf = A.detach().clone().requires_grad_()
    lora_A = A_leaf * scaling
    W = B.mm(lora_A.detach())
    W.view(-1).scatter_add_(0, di.to(torch.int64), dv.to(W.dtype))
    g2d, x2d = grad_y.reshape(-1, grad_y.size(-1)), x.view(-1, x.size(-1))
    input_grad = g2d.mm(W).view_as(x)
    lora_A.backward(B.t().mm(g2d.t().mm(x2d)))
    lora_B_grad = g2d.t().mm(x2d).mm(lora_A.detach().t())
    dv_grad = g2d.t().mm(x2d).view(-1).gather(0, di.to(torch.int64))
    return input_grad, lora_B_grad, A_leaf.grad, dv_grad


def test_bf16_forward_and_backward_are_the_official_code_s_bit_for_bit():
    torch.manual_seed(0)
    m, n, r, alpha = 48, 40, 8, 24.0  # alpha / r = 3: not a power of two, so the order of the products matters
    sl = SparseLowRankLinear(m, n, r, alpha, draw_support(m, n, int(DELTA * m * n), 0, 0)).to(torch.bfloat16)
    with torch.no_grad():
        sl.B.normal_(0, 0.1)
    x = torch.randn(3, 5, n, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(3, 5, m, dtype=torch.bfloat16)
    y = sl(x)
    y.backward(g)
    B, A, dv, di = sl.B.detach(), sl.A.detach(), sl.values.detach(), sl.indices
    assert torch.equal(y, official_forward(x.detach(), B, A, dv, di, alpha / r))
    for ours, theirs in zip((x.grad, sl.B.grad, sl.A.grad, sl.values.grad), official_grads(g, x.detach(), B, A, dv,
                                                                                          di, alpha / r)):
        assert ours.dtype == theirs.dtype == torch.bfloat16 and torch.equal(ours, theirs)
    # the check can fail: (B A) alpha / r, the order before, rounds otherwise
    W = (B.mm(A) * (alpha / r)).view(-1).scatter_add(0, di.long(), dv).view(m, n)
    assert not torch.equal(F.linear(x.detach(), W), y)


def test_init_and_support():
    torch.manual_seed(0)
    sl = SparseLowRankLinear(M, N, R, ALPHA, draw_support(M, N, int(DELTA * M * N), 0, 3))
    assert (sl.B == 0).all()  # W starts as S
    assert 0.8 / math.sqrt(N) < sl.A.abs().max() <= 1 / math.sqrt(N)  # Kaiming-uniform, a = sqrt 5
    assert 0.8 / math.sqrt(N) < sl.values.abs().max() <= 1 / math.sqrt(N)
    idx = sl.indices
    assert idx.dtype == torch.int32 and idx.device.type == "cpu" and idx.numel() == int(DELTA * M * N)
    assert (idx[1:] > idx[:-1]).all() and idx[0] >= 0 and idx[-1] < M * N  # sorted, distinct, in range
    assert torch.equal(draw_support(M, N, len(idx), 0, 3), idx)  # (seed, layer) decides it
    assert not torch.equal(draw_support(M, N, len(idx), 0, 4), idx)
    assert not torch.equal(draw_support(M, N, len(idx), 1, 3), idx)
    assert ns["index_dtype"](2**31 - 1) == torch.int32 and ns["index_dtype"](2**31) == torch.int64
    # a persistent buffer, left integer by .to(bf16)
    assert torch.equal(sl.state_dict()["indices"], idx) and sl.to(torch.bfloat16).indices.dtype == torch.int32


def test_autocast_keeps_each_gradient_in_its_parameters_dtype():
    sl = make_layer()
    x = torch.randn(3, 5, N)
    reference = sl(x)
    with torch.autocast("cpu", torch.bfloat16):
        y = sl(x)
    y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16 and all(p.grad.dtype == torch.float32 for p in sl.parameters())
    assert ((y.float() - reference).norm() / reference.norm()).item() < 4 * 2**-8  # a few bf16 roundings


def sltrain_nano(seed=0):
    """nano with the script's surgery."""
    def make(i, linear):
        m, n = linear.weight.shape
        return SparseLowRankLinear(m, n, 8, 32, draw_support(m, n, int(DELTA * m * n), seed, i))
    return nano_with(make, seed)


def test_the_graph_keeps_no_m_by_n_tensor():
    model, layers = sltrain_nano()
    sizes = {layer.B.shape[0] * layer.A.shape[1] for layer in layers}  # 32 x 32 and 32 x 88
    idx = torch.randint(0, 50257, (3, 7))  # activations of 3 x 7 x 32 or 88 entries: no m x n by chance
    numels = []

    def pack(t):
        numels.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(idx, idx)[1]
    assert numels and not sizes & set(numels), sorted(set(numels))
    loss.backward()
    # the check can fail: a layer that multiplies by its dense W through autograd keeps W for backward
    sl, numels[:] = layers[0], []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.linear(torch.randn(3, 7, 32, requires_grad=True), dense(sl.B, sl.A * sl.scale, sl.values, sl.indices))
    assert 32 * 32 in numels


def test_a_restart_leaves_the_logits_and_s_unchanged():
    model, layers = sltrain_nano()
    with torch.no_grad():
        for layer in layers:  # B = 0 at init: give the low-rank part unbalanced factors, as training can
            layer.B.normal_(0, 0.5)
            layer.A.div_(4.0)
    S = [(layer.values.clone(), layer.indices.clone()) for layer in layers]
    assert_refactorization_keeps_the_logits(model, layers, refactorize)
    assert all(torch.equal(l.values, v) and torch.equal(l.indices, i) for l, (v, i) in zip(layers, S))


def test_run_names_and_bench_rows():
    defaults = method_defaults("sltrain", "nano")
    assert run_name(argparse.Namespace(**defaults)) == "sltrain_restarts"
    assert run_name(argparse.Namespace(**{**defaults, "restart_every": 0})) == "sltrain"
    for row in ("sltrain", "sltrain_restarts"):  # each benchmark row's run is named after it
        assert run_name(argparse.Namespace(**row_settings(row, "60m")[1])) == row
    assert BENCH_ROWS["sltrain"][1]["delta"] == 0.03 and method_defaults("sltrain", "60m")["delta"] == 0.1


def test_memory_estimate_of_60m_by_hand():
    # 60m: d 512, ff 1376, 8 layers, r 128, delta 0.1; 51,520,000 parameters outside the 7 matrices per layer
    n_other, d, ff, r = 51_520_000, 512, 1376, 128
    nnz = 8 * (4 * int(0.1 * d * d) + 3 * int(0.1 * d * ff))
    weights = n_other + 8 * (4 * r * (d + d) + 3 * r * (d + ff)) + nnz
    assert estimate_bytes("60m", "sltrain") == {"weights_bytes": 2 * weights, "grads_bytes": 2 * weights,
                                                "optimizer_state_bytes": 4 * weights, "buffers_bytes": 4 * nnz}
    plain = estimate_bytes("60m", "sltrain", "fp32", {"rank": RANKS["60m"], "delta": 0.03})
    assert plain["buffers_bytes"] == 4 * 8 * (4 * int(0.03 * d * d) + 3 * int(0.03 * d * ff))


def supports(ckpt_path):
    state = torch.load(ckpt_path, weights_only=True)["model"]
    return [v for k, v in state.items() if k.endswith(".indices")]  # in model order


def drawn(seed):
    """The supports a nano run with this seed must have, drawn here independently of the run."""
    with torch.device("meta"):
        mats = compressible_matrices(Llama(SIZES["nano"]))
    shapes = [lin.weight.shape for _, lin in mats]
    return [draw_support(m, n, int(DELTA * m * n), seed, i) for i, (m, n) in enumerate(shapes)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare):
    """From one process (run_each), at 16-token sequences, on which no check depends: 20 steps with a restart every
    5, seed 1, checkpointed at the end; and 6 steps of plain SLTrain. {name: (result, log, out_dir)}"""
    root = tmp_path_factory.mktemp("runs")
    flags = {"restarts": ["--max-steps", "20", "--lr", "1e-2", "--restart-every", "5", "--recovery-steps", "2",
                          "--seed", "1", "--ckpt-every", "20"],
             "plain": ["--max-steps", "6", "--restart-every", "0", "--delta", "0.03"]}
    run_each([["train_sltrain.py", *NANO, *FAST, "--out-dir", str(root / name), *f] for name, f in flags.items()])
    return {name: (*outputs(root / name), root / name) for name in flags}


def test_trains_and_restarts(runs):
    result, log, _ = runs["restarts"]
    assert log[-1]["loss"] < log[0]["loss"] - 1.0
    # each restart is logged when it happens; none after the last step
    assert [(r["step"], r["resets"], r["refactorizations"]) for r in log if "resets" in r] == [
        (5, 1, 1), (10, 2, 2), (15, 3, 3)]
    assert [r["lr"] for r in log] == official_lrs(1e-2, 20, 2, 5, 2)  # the authors' lr, warmup 10% of the steps
    assert result["run"] == "sltrain_restarts"
    assert {k: result[k] for k in ("rank", "alpha", "delta", "restart_every", "recovery_steps", "lr_recovery")} == {
        "rank": 8, "alpha": 32, "delta": 0.1, "restart_every": 5, "recovery_steps": 2, "lr_recovery": "authors"}


def test_the_support_survives_training_and_restarts_and_depends_on_the_seed(runs):
    saved = supports(runs["restarts"][2] / "ckpt.pt")
    assert len(saved) == 7 * SIZES["nano"].n_layer
    assert all(torch.equal(a, b) for a, b in zip(saved, drawn(1)))  # 20 steps and 4 restarts later
    assert all(not torch.equal(a, b) for a, b in zip(saved, drawn(0)))


def test_parameter_state_and_index_bytes_follow_the_formula(runs):
    result = runs["restarts"][0]
    cfg, r = SIZES["nano"], 8
    d, ff, V = cfg.n_embd, cfg.n_ff, cfg.vocab_size
    nnz = 4 * int(DELTA * d * d) + 3 * int(DELTA * d * ff)  # per layer
    per_layer = 4 * r * (d + d) + 3 * r * (d + ff) + nnz + 2 * d  # 7 matrices and 2 norms
    n_params = 2 * V * d + cfg.n_layer * per_layer + d
    assert result["params"]["total"] == n_params
    assert result["weights_bytes"] == result["grads_bytes"] == 4 * n_params
    n_tensors = 3 + cfg.n_layer * (3 * 7 + 2)  # AdamW keeps one 4-byte step counter per tensor
    assert result["optimizer_state_bytes"] == 2 * 4 * n_params + 4 * n_tensors
    assert result["buffers_bytes"] == 4 * cfg.n_layer * nnz  # int32 indices
    estimate = estimate_bytes("nano", "sltrain", "fp32", {"rank": r, "delta": DELTA})
    assert estimate == {"weights_bytes": 4 * n_params, "grads_bytes": 4 * n_params,
                        "optimizer_state_bytes": 8 * n_params, "buffers_bytes": result["buffers_bytes"]}


def test_resume_across_a_restart_is_exact_and_keeps_the_support(tmp_path, shakespeare):
    # restarts after steps 4 and 8; the checkpoint at 5 falls inside the authors' recovery of the first
    assert_resume_after_a_crash_is_exact("train_sltrain.py", tmp_path, "--restart-every", "4", "--recovery-steps",
                                         "3", steps=12, at=5)
    for run in ("a", "b"):  # straight, and resumed: both at step 12, after 2 restarts
        assert all(torch.equal(a, b) for a, b in zip(supports(tmp_path / run / "ckpt.pt"), drawn(0)))


def test_plain_sltrain_never_restarts(runs):
    result, log, _ = runs["plain"]
    assert result["run"] == "sltrain" and (result["restart_every"], result["delta"]) == (0, 0.03)
    assert not any("resets" in r or "refactorizations" in r for r in log)
