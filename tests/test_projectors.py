"""The projectors GaLore and Fira can refresh with (one text in both scripts): exact SVD, warm-started subspace
iteration, randomized SVD, and the captured-energy check that falls back to the SVD."""
import re

import pytest
import torch

from conftest import ROOT, definitions, train

ns = definitions("train_galore.py")
captured_share, randomized_projector, refresh_projector = (ns["captured_share"], ns["randomized_projector"],
                                                           ns["refresh_projector"])
subspace_projector, svd_projector = ns["subspace_projector"], ns["svd_projector"]


def orth(X):
    return torch.linalg.qr(X).Q


def planted(m, n, r, noise=0.01, seed=0):
    """U diag(s) V^T + noise with a clear gap after index r. Returns G, U_r (m x r), V_r (n x r)."""
    g = torch.Generator().manual_seed(seed)
    U, V = orth(torch.randn(m, r, generator=g)), orth(torch.randn(n, r, generator=g))
    s = torch.linspace(10, 5, r)
    return U @ torch.diag(s) @ V.T + noise * torch.randn(m, n, generator=g), U, V


def as_basis(P, side):
    """Columns spanning the projector's subspace (k x r)."""
    return P.float().T if side == "right" else P.float()


def min_cosine(A, B):
    """Cosine of the largest principal angle between the column spans of A and B."""
    return torch.linalg.svdvals(orth(A).T @ orth(B)).min().item()


def side_of(m, n):
    return "right" if m >= n else "left"


SHAPES = [(96, 64), (64, 96), (80, 80)]  # tall (right), wide (left), square (right)


def cheap_projectors(G, r, side, seed=1):
    """The two cheap projectors; the subspace one from a random (cold) start."""
    g = torch.Generator().manual_seed(seed)
    k = G.shape[1] if side == "right" else G.shape[0]
    X = orth(torch.randn(k, r, generator=g))
    P_old = X.T if side == "right" else X
    return {"subspace": subspace_projector(G, r, side, P_old), "randomized": randomized_projector(G, r, side, seed)}


@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shape_side_dtype_orthonormal(m, n, dtype):
    r, side = 8, side_of(m, n)
    G = planted(m, n, r)[0].to(dtype)
    expected = (r, n) if side == "right" else (m, r)
    for name, P in {**cheap_projectors(G, r, side), "svd": svd_projector(G, r, side)}.items():
        assert P.shape == expected, name
        assert P.dtype == dtype, name
        gram = P.float() @ P.float().T if side == "right" else P.float().T @ P.float()
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 rounding of the stored projector
        assert torch.allclose(gram, torch.eye(r), atol=tol), name
        # the projection the optimizer does has the low-rank shape
        R = G @ P.T if side == "right" else P.T @ G
        assert R.shape == ((m, r) if side == "right" else (r, n)), name


@pytest.mark.parametrize("m,n", SHAPES)
def test_recover_planted_subspace(m, n):
    r, side = 8, side_of(m, n)
    G, U, V = planted(m, n, r)
    truth = V if side == "right" else U
    for name, P in {**cheap_projectors(G, r, side), "svd": svd_projector(G, r, side)}.items():
        assert min_cosine(truth, as_basis(P, side)) > 0.99, name


@pytest.mark.parametrize("m,n", SHAPES)
def test_subspace_iteration_from_perturbed_start_converges(m, n):
    # The fixed point of the iteration is the exact top-r subspace of G (with noise 0.1 that is itself
    # ~0.99 from the planted one), so measure against the exact SVD's subspace.
    r, side = 8, side_of(m, n)
    G = planted(m, n, r, noise=0.1)[0]
    exact = as_basis(svd_projector(G, r, side), side)
    g = torch.Generator().manual_seed(3)
    X = orth(exact + 0.05 * torch.randn(exact.shape, generator=g))  # a slightly rotated exact subspace
    P = X.T if side == "right" else X
    cosines = [min_cosine(exact, X)]
    for _ in range(3):
        P = subspace_projector(G, r, side, P)
        cosines.append(min_cosine(exact, as_basis(P, side)))
    assert cosines[0] < 0.95
    assert cosines[1] > 0.99  # one step from the warm start
    assert all(b >= a - 1e-5 for a, b in zip(cosines, cosines[1:]))  # never worse
    assert cosines[-1] > 0.9999  # converges to the exact subspace


def test_ritz_basis_matches_svd_directions():
    # after Rayleigh-Ritz the rows are the singular vectors (up to sign), sorted like the SVD's
    m, n, r = 96, 64, 8
    g = torch.Generator().manual_seed(0)
    U, V = orth(torch.randn(m, r, generator=g)), orth(torch.randn(n, r, generator=g))
    G = U @ torch.diag(torch.linspace(10, 3, r)) @ V.T + 0.01 * torch.randn(m, n, generator=g)
    P = subspace_projector(G, r, "right", orth(V.T.T + 0.1 * torch.randn(n, r, generator=g)).T)
    cos = (P @ svd_projector(G, r, "right").T).diagonal().abs()
    assert cos.min() > 0.99


def test_captured_share_of_svd_is_top_r_energy():
    G = planted(96, 64, 8, noise=0.3)[0]
    s2 = torch.linalg.svdvals(G).square()
    assert captured_share(G, svd_projector(G, 8, "right"), "right") == pytest.approx(
        (s2[:8].sum() / s2.sum()).item(), rel=1e-5)


def decaying(m, n, seed=0, power=0.3):
    """Singular values i^-power, no clean gap. With power 0.3 one subspace step from an unrelated start
    keeps only ~75% of the top-16 energy (real 60m gradients are far steeper)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, V = orth(torch.randn(m, k, generator=g)), orth(torch.randn(n, k, generator=g))
    return U @ torch.diag(torch.arange(1, k + 1) ** -power) @ V.T


@pytest.mark.parametrize("method", ["subspace", "randomized"])
@pytest.mark.parametrize("m,n", [(192, 128), (128, 192)])
def test_fallback_triggers_on_rotated_gradient_only(method, m, n):
    r, side = 16, side_of(m, n)
    G = decaying(m, n)
    state = {}
    assert refresh_projector(G, r, side, state, method, 0) == (1.0, True)  # first refresh: exact SVD
    P0, rho0 = state["P"], state["rho"]

    # gently changed gradient: 10% new content -> the cheap projector is kept
    g = torch.Generator().manual_seed(5)
    gentle = G + 0.1 * decaying(m, n, seed=6)
    est, exact = refresh_projector(gentle, r, side, state, method, 1)
    assert est >= 0.9 and not exact
    assert state["rho"] == rho0  # no SVD ran
    assert not torch.equal(state["P"], P0)

    # the same spectrum in a random orientation: the old subspace is unrelated to the new one
    O = orth(torch.randn(n if side == "right" else m, n if side == "right" else m, generator=g))
    rotated = G @ O if side == "right" else O @ G
    state = {"P": P0, "rho": rho0}
    est, exact = refresh_projector(rotated, r, side, state, method, 2)
    if method == "subspace":  # the warm start is useless here: the fallback must catch it
        assert exact and est == 1.0
        assert torch.equal(state["P"], svd_projector(rotated, r, side))  # the exact SVD replaced it
        assert captured_share(rotated, subspace_projector(rotated, r, side, P0), side) / rho0 < 0.85
    else:  # the randomized projector does not use the old one: rotation does not hurt it
        assert est >= 0.9 and not exact


def test_method_svd_always_exact():
    G = decaying(96, 64)
    state = {}
    for step in range(2):
        assert refresh_projector(G, 8, "right", state, "svd", step) == (1.0, True)
        assert torch.equal(state["P"], svd_projector(G, 8, "right"))


def test_steep_spectrum_needs_no_fallback_even_from_unrelated_start():
    # Real 60m gradients are this steep or steeper: one step from an unrelated start already
    # keeps >97% of the top-r energy, so the energy rule (rightly, by its own measure) keeps it.
    m, n, r = 192, 128, 16
    G = decaying(m, n, power=1.0)
    state = {}
    refresh_projector(G, r, "right", state, "subspace", 0)
    O = orth(torch.randn(n, n, generator=torch.Generator().manual_seed(7)))
    est, exact = refresh_projector(G @ O, r, "right", state, "subspace", 1)
    assert est > 0.97 and not exact


@pytest.mark.parametrize("method", ["subspace", "randomized"])
def test_rank_deficient_and_zero_gradients(method):
    # rank 2 < r, then an all-zero gradient: projectors stay orthonormal and nothing divides by zero
    g = torch.Generator().manual_seed(0)
    G = torch.randn(96, 2, generator=g) @ torch.randn(2, 64, generator=g)
    state = {}
    for step, M in enumerate((G, G, torch.zeros(96, 64))):
        refresh_projector(M, 8, "right", state, method, step)
        P = state["P"]
        assert torch.isfinite(P).all()
        assert torch.allclose(P @ P.T, torch.eye(8), atol=1e-5)


def test_randomized_projector_is_reproducible_from_its_seed():
    G = decaying(96, 64)
    torch.manual_seed(0)
    a = randomized_projector(G, 8, "right", 5)
    torch.manual_seed(1)  # the global generator does not matter, and is left as it was
    before = torch.get_rng_state()
    assert torch.equal(a, randomized_projector(G, 8, "right", 5))
    assert torch.equal(before, torch.get_rng_state())
    assert not torch.equal(a, randomized_projector(G, 8, "right", 6))


def test_projector_region_is_one_text_in_galore_and_fira():
    region = re.compile(r"# --- PROJECTOR: begin ---\n.*?# --- PROJECTOR: end ---\n", re.S)
    galore, fira = (region.findall(open(f"{ROOT}/{s}").read()) for s in ("train_galore.py", "train_fira.py"))
    assert len(galore) == 2 and galore == fira  # the functions, and the hook that logs the refreshes


@pytest.mark.parametrize("script", ["train_galore.py", "train_fira.py"])
@pytest.mark.parametrize("projector", ["subspace", "randomized"])
def test_cheap_projectors_train_and_log_their_refreshes(tmp_path, shakespeare, script, projector):
    result, log, _ = train(script, tmp_path, "--max-steps", "10", "--update-proj-gap", "3", "--lr", "1e-2",
                           "--projector", projector)
    assert log[-1]["loss"] < log[0]["loss"] - 0.5 and result["projector"] == projector
    refreshes = [r for r in log if "refreshes" in r]
    assert [r["step"] for r in refreshes] == [1, 4, 7, 10] and [r["refreshes"] for r in refreshes] == [1, 2, 3, 4]
    assert refreshes[0]["proj_svds"] == 14 and refreshes[0]["proj_energy"] == 1.0  # the first one is exact
    assert all(0.5 < r["proj_energy"] <= 1.5 for r in refreshes)


FIRA = definitions("train_fira.py")
DIVERGED = "error: a projector refresh met non-finite values: training diverged (try a lower --lr)"


@pytest.mark.parametrize("script,optimizer", [("train_galore.py", "GaLoreAdamW"), ("train_fira.py", "FiraAdamW")])
@pytest.mark.parametrize("projector,bad", [(p, bad) for p in ("svd", "subspace", "randomized") for bad in ("nan", "inf")]
                         + [("subspace", "huge")])
def test_a_refresh_that_meets_non_finite_values_stops_in_one_line(script, optimizer, projector, bad):
    """A diverged gradient reaches a decomposition only at a refresh: it stops there with the divergence line
    (not svd's or eigh's LinAlgError) and leaves the weights and the projector as they were. A finite gradient of
    1e25 overflows only the subspace iteration's G^T G; the SVDs take it."""
    W = torch.nn.Parameter(torch.zeros(48, 32))
    settings = {"rank": 4, "update_proj_gap": 1, "scale": 0.25, "projector": projector,
                **({"proj_type": "std", "reset_on_refresh": False} if script == "train_galore.py"
                   else {"paper_residual": False})}
    opt = (ns if script == "train_galore.py" else FIRA)[optimizer]([{"params": [W], **settings}], lr=1e-3)
    W.grad = planted(48, 32, 4)[0]
    opt.step()  # a first, exact refresh: the cheap projectors start from it
    weights, P = W.detach().clone(), opt.state[W]["P"].clone()
    W.grad = W.grad * 1e25 if bad == "huge" else W.grad.index_put((torch.tensor(3), torch.tensor(5)),
                                                                   torch.tensor(float(bad)))
    with pytest.raises(SystemExit) as e:
        opt.step()
    assert str(e.value) == DIVERGED
    assert torch.equal(W, weights) and torch.equal(opt.state[W]["P"], P)
