import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import (adamw_steps, assert_refactorization_keeps_the_logits, assert_resume_is_exact, definitions,
                      nano_with, train, warmup_cosine_lr)
from model import SIZES

ns = definitions("train_lowrank_refactor.py")
LowRankLinear, refactorize, reset_optimizer_state = ns["LowRankLinear"], ns["refactorize"], ns["reset_optimizer_state"]


def unbalanced_factors(m=300, n=200, r=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g) * 5.0, torch.randn(r, n, generator=g) / 7.0


def test_refactorization_keeps_the_product_and_balances_the_factors():
    B, A = unbalanced_factors()
    before = B @ A
    refactorize(B, A)
    assert ((B @ A - before).norm() / before.norm()).item() < 1e-5
    BtB, AAt = B.T @ B, A @ A.T
    torch.testing.assert_close(BtB, AAt, rtol=1e-4, atol=1e-4)
    # and both equal diag(S), the singular values of B A
    S = torch.linalg.svdvals(before)[:8]
    torch.testing.assert_close(torch.diag(BtB), S, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(BtB, torch.diag(S), rtol=1e-4, atol=1e-3)


class RecordShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if torch.is_tensor(t):
                self.shapes.append(tuple(t.shape))
        return out


def test_refactorization_never_forms_the_m_by_n_product():
    m, n, r = 300, 200, 8
    B, A = unbalanced_factors(m, n, r)
    with RecordShapes() as rec:
        refactorize(B, A)
    assert rec.shapes  # the recorder saw the QRs, the SVD and the products
    assert max(torch.Size(s).numel() for s in rec.shapes) <= max(m, n) * r


def lowrank_nano(r=8, alpha=32, seed=0):
    return nano_with(lambda i, linear: LowRankLinear(*linear.weight.shape, r, alpha), seed)


def test_the_layer_is_b_a_times_alpha_over_r_with_kaiming_factors():
    layer = LowRankLinear(40, 30, 6, 12.0)
    x = torch.randn(5, 30)
    torch.testing.assert_close(layer(x), x @ (layer.B @ layer.A).T * 2.0)
    for factor, fan_in in ((layer.B, 6), (layer.A, 30)):  # U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert factor.abs().max() <= 1 / math.sqrt(fan_in) and factor.abs().max() > 0.8 / math.sqrt(fan_in)


def test_refactorization_leaves_the_logits_unchanged():
    model, layers = lowrank_nano()
    with torch.no_grad():
        for layer in layers:  # make the factors badly unbalanced, as training can
            layer.B.mul_(4.0)
            layer.A.div_(4.0)
    assert_refactorization_keeps_the_logits(model, layers, refactorize)


def test_a_restart_of_scope_all_is_a_brand_new_adamw():
    model, layers = lowrank_nano()
    opt, idx = adamw_steps(model)
    reset_optimizer_state(opt, list(model.parameters()), "both")
    for p in model.parameters():  # embedding and head included
        state = opt.state[p]
        assert state["step"].item() == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    # the next step is the first step of a fresh AdamW
    twin = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(idx, idx)[1].backward()
    fresh = torch.optim.AdamW([torch.nn.Parameter(twin[n]) for n, _ in model.named_parameters()], lr=1e-2)
    for q, (_, p) in zip(fresh.param_groups[0]["params"], model.named_parameters()):
        q.grad = p.grad.clone()
    opt.step()
    fresh.step()
    for q, p in zip(fresh.param_groups[0]["params"], model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


@pytest.mark.parametrize("moments", ["first", "both"])
def test_a_restart_of_scope_factors_leaves_the_rest_untouched(moments):
    model, layers = lowrank_nano()
    opt, _ = adamw_steps(model)
    factors = [p for layer in layers for p in (layer.B, layer.A)]
    others = [p for p in model.parameters() if all(p is not f for f in factors)]
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in others}
    reset_optimizer_state(opt, factors, moments)
    for p in factors:
        state = opt.state[p]
        assert not state["exp_avg"].any()
        assert (not state["exp_avg_sq"].any()) == (moments == "both")
        assert state["step"].item() == (0 if moments == "both" else 2)
    for p in others:
        assert all(torch.equal(v, before[id(p)][k]) for k, v in opt.state[p].items())


def expected_lr(step, lr, max_steps, warmup, K, R, min_ratio=0.1):
    """The schedule written out independently: warmup + cosine, times the recovery after each restart."""
    base = warmup_cosine_lr(step, lr, max_steps, warmup, min_ratio)
    restarts = [k for k in range(K, max_steps, K) if k <= step]  # 0-based index of the first step after each
    since = step - restarts[-1] if restarts else R
    return base * (0.001 + 0.999 * since / R if since < R else 1.0)


@pytest.mark.parametrize("warmup", [2, 8])  # 8: the first restart falls inside the warmup
def test_lr_around_each_restart_follows_the_formula(tmp_path, shakespeare, warmup):
    K, R, steps = 5, 3, 19  # K does not divide the run
    _, log, _ = train("train_lowrank_refactor.py", tmp_path, "--max-steps", str(steps), "--refactor-every", str(K),
                      "--recovery-steps", str(R), "--warmup-steps", str(warmup), "--lr", "1e-2")
    assert [r["lr"] for r in log] == pytest.approx([expected_lr(s, 1e-2, steps, warmup, K, R) for s in range(steps)],
                                                   rel=1e-12)
    # the run logs each restart when it happens
    assert [(r["step"], r["resets"], r["refactorizations"]) for r in log if "resets" in r] == [(5, 1, 1), (10, 2, 2),
                                                                                            (15, 3, 3)]


def test_parameter_and_state_bytes_follow_r_times_m_plus_n(tmp_path, shakespeare):
    result, _, _ = train("train_lowrank_refactor.py", tmp_path, "--max-steps", "2")
    cfg, r = SIZES["nano"], 8
    d, ff = cfg.n_embd, cfg.n_ff
    per_layer = 4 * r * (d + d) + 3 * r * (d + ff) + 2 * d  # 7 factorized matrices and 2 norms
    n_params = 2 * cfg.vocab_size * d + cfg.n_layer * per_layer + d
    assert result["params"]["total"] == n_params
    assert result["weights_bytes"] == result["grads_bytes"] == 4 * n_params
    n_tensors = 3 + cfg.n_layer * (2 * 7 + 2)  # AdamW keeps one 4-byte step counter per tensor
    assert result["optimizer_state_bytes"] == 2 * 4 * n_params + 4 * n_tensors


@pytest.mark.parametrize("refactor,reset,recovery,scope", [(0, 0, 0, "all"), (4, 0, 0, "all"), (0, 4, 0, "all"),
                                                           (4, 4, 2, "factors")])
def test_every_ablation_trains(tmp_path, shakespeare, refactor, reset, recovery, scope):
    result, log, _ = train("train_lowrank_refactor.py", tmp_path, "--max-steps", "20", "--lr", "1e-2",
                           "--refactor-every", str(refactor), "--momentum-reset-every", str(reset),
                           "--recovery-steps", str(recovery), "--reset-scope", scope)
    assert log[-1]["loss"] < log[0]["loss"] - 1.0
    assert (result["refactor_every"], result["momentum_reset_every"], result["reset_scope"]) == (refactor, reset, scope)
    assert result["run"] == ("lowrank_restarts" if refactor or reset else "lowrank")


def test_resume_inside_a_recovery_window_and_across_a_restart(tmp_path, shakespeare):
    # restarts after steps 3 and 6; the checkpoint at 4 falls inside the first 2-step recovery
    assert_resume_is_exact("train_lowrank_refactor.py", tmp_path, "--refactor-every", "3", "--recovery-steps", "2")
