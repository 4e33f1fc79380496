import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import assert_resume_is_exact, definitions, train
from model import SIZES, Llama, compressible_matrices

ns = definitions("train_lowrank_refactor.py")
LowRankLinear, refactorize, reset_momentum = ns["LowRankLinear"], ns["refactorize"], ns["reset_momentum"]


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


def test_refactorization_leaves_the_logits_unchanged():
    torch.manual_seed(0)
    model = Llama(SIZES["nano"])
    layers = []
    for name, linear in compressible_matrices(model):
        parent, child = name.rsplit(".", 1)
        layers.append(LowRankLinear(*linear.weight.shape, 8, 0.2))
        setattr(model.get_submodule(parent), child, layers[-1])
    with torch.no_grad():
        for layer in layers:  # make the factors badly unbalanced, as training can
            layer.B.mul_(4.0)
            layer.A.div_(4.0)
    idx = torch.randint(0, 50257, (2, 16))
    before, _ = model(idx)
    for layer in layers:
        refactorize(layer.B, layer.A)
    after, _ = model(idx)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert all(torch.allclose(l.B.T @ l.B, l.A @ l.A.T, atol=1e-4) for l in layers)


@pytest.mark.parametrize("which", ["first", "both"])
def test_momentum_reset_zeroes_exactly_the_chosen_moments_of_the_factors(which):
    torch.manual_seed(0)
    layer, other = LowRankLinear(6, 5, 2, 0.5), torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([layer.B, layer.A, other], lr=1e-2)
    for _ in range(2):
        (layer(torch.randn(3, 5)).square().sum() + other.square().sum()).backward()
        opt.step()
        opt.zero_grad()
    other_state = {k: v.clone() for k, v in opt.state[other].items()}
    reset_momentum(opt, [layer.B, layer.A], which)
    for p in (layer.B, layer.A):
        state = opt.state[p]
        assert torch.count_nonzero(state["exp_avg"]) == 0
        assert (torch.count_nonzero(state["exp_avg_sq"]) == 0) == (which == "both")
        assert state["step"].item() == (0 if which == "both" else 2)
    for k, v in opt.state[other].items():  # the full-rank parameters keep their state
        assert torch.equal(v, other_state[k])


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


@pytest.mark.parametrize("refactor,reset", [(0, 0), (5, 0), (0, 5), (5, 5)])
def test_every_ablation_trains(tmp_path, shakespeare, refactor, reset):
    result, log, _ = train("train_lowrank_refactor.py", tmp_path, "--max-steps", "20", "--lr", "1e-2",
                           "--refactor-every", str(refactor), "--momentum-reset-every", str(reset))
    assert log[-1]["loss"] < log[0]["loss"] - 1.0
    assert (result["refactor_every"], result["momentum_reset_every"]) == (refactor, reset)


def test_resume_across_a_refactorization(tmp_path, shakespeare):
    assert_resume_is_exact("train_lowrank_refactor.py", tmp_path, "--refactor-every", "3")
