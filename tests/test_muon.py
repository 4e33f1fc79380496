"""Muon: the matrices' update is the orthogonalized Nesterov momentum of Keller Jordan's formula (re-implemented
below in float64), scaled as Moonlight's rule says; AdamW takes the rest; a run trains, resumes exactly and counts
one state per matrix element."""
import copy
import math

import pytest
import torch

from conftest import definitions, train

SCRIPT = "train_muon.py"
A, B, C = 3.4445, -4.7750, 2.0315  # the quintic's coefficients, from Keller Jordan's Muon post


def newton_schulz(U, steps=5):
    """The blog's iteration in float64: X <- a X + (b X X^T + c (X X^T)^2) X from X = U / ||U||_F, on the wide
    orientation (X X^T the smaller Gram matrix)."""
    X = U.double() / U.double().norm()
    tall = X.shape[0] > X.shape[1]
    X = X.T if tall else X
    for _ in range(steps):
        gram = X @ X.T
        X = A * X + (B * gram + C * gram @ gram) @ X
    return X.T if tall else X


@pytest.fixture(scope="module")
def muon_adamw():
    ns = definitions(SCRIPT)

    def make(params, lr, adjust="match_rms_adamw", momentum=0.95):
        matrices, rest = [p for p in params if p.ndim == 2], [p for p in params if p.ndim != 2]
        return ns["MuonAdamW"](
            torch.optim.Muon(matrices, lr=lr, weight_decay=0.0, momentum=momentum, nesterov=True, ns_steps=5,
                             adjust_lr_fn=adjust),
            torch.optim.AdamW(rest, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0))
    return make


@pytest.mark.parametrize("adjust", ["match_rms_adamw", "original"])
def test_the_update_is_orthogonalized_nesterov_momentum(muon_adamw, adjust):
    g = torch.Generator().manual_seed(0)
    shapes = [(24, 40), (40, 24), (40,)]  # a wide and a tall matrix (fan-out x fan-in), a norm's vector
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    norm_ref = torch.nn.Parameter(params[2].detach().clone())
    opt = muon_adamw(params, lr=0.01, adjust=adjust)
    adamw = torch.optim.AdamW([norm_ref], lr=0.01, weight_decay=0.0)
    momentum = [torch.zeros(s, dtype=torch.float64) for s in shapes[:2]]
    for step in range(3):
        grads = [torch.randn(s, generator=g) for s in shapes]
        before = [p.detach().clone() for p in params]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        norm_ref.grad = grads[2].clone()
        opt.step()
        adamw.step()
        opt.zero_grad()
        for i, (fan_out, fan_in) in enumerate(shapes[:2]):
            momentum[i] = 0.95 * momentum[i] + 0.05 * grads[i].double()
            expected = newton_schulz(0.05 * grads[i].double() + 0.95 * momentum[i])
            scale = 0.2 * math.sqrt(max(fan_out, fan_in)) if adjust == "match_rms_adamw" else \
                math.sqrt(max(1, fan_out / fan_in))
            update = (before[i] - params[i].detach()).double() / (0.01 * scale)
            # Newton-Schulz runs in bf16 in torch: a few bf16 roundings away from the float64 iteration
            assert (update - expected).norm() < 0.03 * expected.norm(), (step, i)
            # and it is nearly orthogonal: every singular value pushed into about 0.7..1.2
            s = torch.linalg.svdvals(update)
            assert s.min() > 0.6 and s.max() < 1.3, s
        assert torch.equal(params[2], norm_ref)  # embedding, head and norms: AdamW, bit for bit


def test_one_optimizer_for_the_loop_and_the_checkpoint(muon_adamw):
    g = torch.Generator().manual_seed(1)
    make = lambda: [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(2)))  # noqa: E731
                    for s in [(8, 12), (12,)]]
    a, b = make(), make()
    opt_a = muon_adamw(a, lr=0.01)
    grads = [[torch.randn(p.shape, generator=g) for p in a] for _ in range(2)]
    for p, grad in zip(a, grads[0]):
        p.grad = grad.clone()
    opt_a.step()
    assert len(opt_a.param_groups) == 2 and len(opt_a.state) == 2  # both optimizers' groups and states
    for group in opt_a.param_groups:  # the loop sets the lr of every group
        group["lr"] = 0.003
    for p, q in zip(a, b):
        q.data.copy_(p.data)
    opt_b = muon_adamw(b, lr=0.5)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as a checkpoint holds it: a copy
    assert [group["lr"] for group in opt_b.param_groups] == [0.003, 0.003]
    for params, opt in ((a, opt_a), (b, opt_b)):
        for p, grad in zip(params, grads[1]):
            p.grad = grad.clone()
        opt.step()
        opt.zero_grad()
        assert all(p.grad is None for p in params)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_loss_falls_and_one_state_per_matrix_element(tmp_path, shakespeare):
    from model import estimate_bytes
    result, log, _ = train(SCRIPT, tmp_path, "--max-steps", "24", "--lr", "1e-2")
    assert log[-1]["loss"] < log[0]["loss"] - 2.0 and result["val_loss"] < log[0]["loss"] - 1.5
    # counted from the tensors, fp32: a momentum per matrix element, two AdamW moments per other weight and a
    # 4-byte step counter per AdamW tensor (embedding, head, final norm, 2 norms per layer)
    n = result["params"]["total"]
    n_matrices = 2 * (4 * 32 * 32 + 3 * 32 * 88)
    assert result["optimizer_state_bytes"] == 4 * (n_matrices + 2 * (n - n_matrices)) + 4 * (3 + 2 * 2)
    assert result["optimizer_state_bytes"] < 2 * result["weights_bytes"]  # below AdamW's two states
    estimate = estimate_bytes("nano", "muon", "fp32")
    assert estimate["optimizer_state_bytes"] == result["optimizer_state_bytes"] - 4 * 7
    assert estimate["optimizer_state_bytes"] < estimate_bytes("nano", "full", "fp32")["optimizer_state_bytes"]
    for size in ("60m", "1b"):
        muon, full = (estimate_bytes(size, m)["optimizer_state_bytes"] for m in ("muon", "full"))
        assert full / 2 < muon < full
