import json
import math
from functools import partial

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import (FAST, NANO, adamw_steps, assert_refactorization_keeps_the_logits, definitions, error_of,
                      nano_with, outputs, run_each, warmup_cosine_lr)
from model import SIZES

ns = definitions("train_lowrank_refactor.py")
LowRankLinear, refactorize, reset_optimizer_state = ns["LowRankLinear"], ns["refactorize"], ns["reset_optimizer_state"]
since_restart, authors_lr = ns["since_restart"], ns["authors_lr"]


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


# the ablation's variants: plain, refactorization only, reset only, both, both with the reset of B and A only
ABLATIONS = [(0, True, "all", 0), (4, True, "none", 0), (4, False, "all", 0), (4, True, "factors", 2)]
OFFICIAL_RUNS = [(24, 8, 6, 3), (23, 3, 5, 4)]  # K divides the run, or not


def expected_lr(step, lr, max_steps, warmup, K, R, min_ratio=0.1):
    """The schedule written out independently: warmup + cosine, times the recovery after each restart."""
    base = warmup_cosine_lr(step, lr, max_steps, warmup, min_ratio)
    restarts = [k for k in range(K, max_steps, K) if k <= step]  # 0-based index of the first step after each
    since = step - restarts[-1] if restarts else R
    return base * (0.001 + 0.999 * since / R if since < R else 1.0)


# the runs of the tests below, none of whose checks depends on the sequence length: (name, the script's flags)
RUNS = [*((f"recovery-{warmup}", ["--max-steps", "19", "--restart-every", "5", "--recovery-steps", "3",
                                 "--warmup-steps", str(warmup), "--lr", "1e-2", "--lr-recovery", "linear"])
          for warmup in (2, 8)),
        ("bytes", ["--max-steps", "2"]),
        *((f"ablation-{K}-{refactorize}-{scope}-{recovery}",
           ["--max-steps", "20", "--lr", "1e-2", "--restart-every", str(K), "--recovery-steps", str(recovery),
            "--reset-scope", scope, *([] if refactorize else ["--no-refactorize"])])
          for K, refactorize, scope, recovery in ABLATIONS),
        *((f"official-{steps}-{warmup}-{K}-{R}", ["--max-steps", str(steps), "--restart-every", str(K),
                                                 "--recovery-steps", str(R), "--warmup-steps", str(warmup),
                                                 "--lr", "3e-3"])
          for steps, warmup, K, R in OFFICIAL_RUNS),
        ("refused", ["--max-steps", "2", "--ckpt-every", "2"]),
        ("refused", ["--max-steps", "4", "--resume", "--lr-recovery", "linear"])]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare):
    """Each RUNS run on nano, in order, from one process (run_each): {name: (result, log, process)}."""
    root = tmp_path_factory.mktemp("runs")
    procs = run_each([["train_lowrank_refactor.py", *NANO, *FAST, "--out-dir", str(root / name), *flags]
                      for name, flags in RUNS], check=False)
    return {name: (*outputs(root / name), proc) for (name, _), proc in zip(RUNS, procs)}


def trained(runs, name):
    result, log, proc = runs[name]
    assert proc.returncode == 0, proc.stderr[-3000:]
    return result, log


@pytest.mark.parametrize("warmup", [2, 8])  # 8: the first restart falls inside the warmup
def test_lr_recovery_linear_follows_its_formula(runs, warmup):
    K, R, steps = 5, 3, 19  # K does not divide the run
    _, log = trained(runs, f"recovery-{warmup}")
    assert [r["lr"] for r in log] == pytest.approx([expected_lr(s, 1e-2, steps, warmup, K, R) for s in range(steps)],
                                                   rel=1e-12)
    # the run logs each restart when it happens
    assert [(r["step"], r["resets"], r["refactorizations"]) for r in log if "resets" in r] == [(5, 1, 1), (10, 2, 2),
                                                                                            (15, 3, 3)]


def test_parameter_and_state_bytes_follow_r_times_m_plus_n(runs):
    result, _ = trained(runs, "bytes")
    cfg, r = SIZES["nano"], 8
    d, ff = cfg.n_embd, cfg.n_ff
    per_layer = 4 * r * (d + d) + 3 * r * (d + ff) + 2 * d  # 7 factorized matrices and 2 norms
    n_params = 2 * cfg.vocab_size * d + cfg.n_layer * per_layer + d
    assert result["params"]["total"] == n_params
    assert result["weights_bytes"] == result["grads_bytes"] == 4 * n_params
    n_tensors = 3 + cfg.n_layer * (2 * 7 + 2)  # AdamW keeps one 4-byte step counter per tensor
    assert result["optimizer_state_bytes"] == 2 * 4 * n_params + 4 * n_tensors


@pytest.mark.parametrize("K,refactorize,scope,recovery", ABLATIONS)
def test_every_ablation_trains(runs, K, refactorize, scope, recovery):
    result, log = trained(runs, f"ablation-{K}-{refactorize}-{scope}-{recovery}")
    assert log[-1]["loss"] < log[0]["loss"] - 1.0
    assert (result["restart_every"], result["refactorize"], result["reset_scope"]) == (K, refactorize, scope)
    assert result["run"] == ("lowrank_restarts" if K else "lowrank")
    acted = [k for k in ("refactorizations", "resets") if any(k in r for r in log)]
    assert acted == [k for k, on in (("refactorizations", refactorize), ("resets", scope != "none")) if K and on]


# --- the authors' lr: their code, re-implemented here from OptimAI-Lab/Memory_Efficient_Pretraining @ 9f803d4


def official_lambda(current_step, *, num_training_steps, first_warmup_steps, restart_every, recovery_steps,
                    min_lr_ratio):
    """_get_cosine_schedule_with_quick_recovery_lambda of para_eff_pt/peft_pretraining/training_utils.py, line by
    line."""
    def get_normal_lr(step):
        if step < first_warmup_steps:
            return float(step) / float(max(1, first_warmup_steps))
        progress = float(step - first_warmup_steps) / float(max(1, num_training_steps - first_warmup_steps))
        cosine_decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_lr_ratio + (1.0 - min_lr_ratio) * cosine_decay

    if restart_every <= 0 or recovery_steps <= 0:
        return get_normal_lr(current_step)
    last_restart_step = (current_step // restart_every) * restart_every
    steps_since_restart = current_step - last_restart_step
    if steps_since_restart < recovery_steps:
        recovery_target_lr = get_normal_lr(last_restart_step + recovery_steps)
        recovery_start_lr = recovery_target_lr * 0.001
        recovery_progress = float(steps_since_restart) / float(recovery_steps - 1) if recovery_steps > 1 else 1.0
        recovery_progress = min(recovery_progress, 1.0)
        return recovery_start_lr + (recovery_target_lr - recovery_start_lr) * recovery_progress
    return get_normal_lr(current_step)


def official_scheduler(optimizer, lr, steps, warmup, K, R, min_ratio, last_epoch=-1):
    """get_scheculer(scheduler_type="cosine_quick_recovery", ...) of training_utils.py: a cycle that does not
    divide the run becomes the whole run."""
    if K > 0 and (K > steps or steps % K != 0):
        K = steps
    if last_epoch != -1:  # torchrun_main_DDP.py's restart block sets it before building the scheduler
        for group in optimizer.param_groups:
            group["initial_lr"] = lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        official_lambda, num_training_steps=steps, first_warmup_steps=warmup, restart_every=K, recovery_steps=R,
        min_lr_ratio=min_ratio), last_epoch)


def official_lrs(lr, steps, warmup, K, R, min_ratio=0.1):
    """The lr of each optimizer step as torchrun_main_DDP.py's loop drives its schedulers (a real LambdaLR), with
    --scheduler cosine_quick_recovery and --peft_model sltrain: optimizer.step(), scheduler.step(),
    update_step += 1, and when update_step % cycle_length == 0 a new AdamW and a scheduler built with
    last_epoch=update_step. (Their loop then trains one step more, update step `steps`, which our runs do not.)"""
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([p], lr=lr)
    scheduler = official_scheduler(optimizer, lr, steps, warmup, K, R, min_ratio)
    lrs, update_step = [], 0
    while update_step < steps:
        lrs.append(optimizer.param_groups[0]["lr"])
        p.grad = torch.ones(1)
        optimizer.step()
        scheduler.step()
        update_step += 1
        if update_step % K == 0:
            optimizer = torch.optim.AdamW([p], lr=lr)
            scheduler = official_scheduler(optimizer, lr, steps, warmup, K, R, min_ratio, last_epoch=update_step)
    return lrs


def test_the_reference_gives_the_numbers_of_the_issue():
    # 60 steps, warmup 6, K 20, R 10 at lr 3e-3: the step before the second restart at 5.2e-7, and the first step
    # after the first restart at lambda(21) = 0.112 plain(30)
    lrs = official_lrs(3e-3, 60, 6, 20, 10)
    plain = lambda t: 0.1 + 0.9 * (1 + math.cos(math.pi * (t - 6) / 54)) / 2  # noqa: E731
    assert lrs[39] == pytest.approx(3e-3 * 0.001 * plain(50), rel=1e-12) and 5.2e-7 < lrs[39] < 5.3e-7
    assert lrs[20] == pytest.approx(3e-3 * (0.001 + 0.999 / 9) * plain(30), rel=1e-12)
    assert lrs[:3] == pytest.approx([3e-3 * plain(10) * (0.001 + 0.999 * j / 9) for j in range(3)], rel=1e-12)


@pytest.mark.parametrize("steps,warmup,K,R", [
    (100, 10, 25, 10),  # the worked example of the docstrings
    (60, 6, 20, 10), (24, 8, 6, 3),  # K divides the run; below, the first restart inside the warmup
    (23, 3, 5, 4), (100, 10, 30, 10),  # K does not divide the run: restarts without recovery
    (30, 0, 10, 1), (30, 5, 10, 0), (20, 4, 50, 3)])  # no warmup, R = 1; R = 0; K beyond the run
def test_authors_lr_is_the_official_schedule_at_every_step(steps, warmup, K, R):
    ours = [3e-3 * authors_lr(s, K, R, warmup, steps, 0.1) for s in range(steps)]
    assert ours == official_lrs(3e-3, steps, warmup, K, R)  # the same floats


def test_the_worked_example_of_the_docstrings():
    K, R, steps = 25, 10, 100
    assert [s for s in range(steps) if since_restart(s + 1, K, steps) == 0] == [24, 49, 74]  # none after 99
    assert [s for s in range(steps) if since_restart(s, K, steps) == 0] == [25, 50, 75]
    linear = [ns["recovery_factor"](s, K, R, steps) for s in range(steps)]
    assert [s for s in range(steps) if linear[s] < 1] == [*range(25, 35), *range(50, 60), *range(75, 85)]
    assert linear[25:35] == pytest.approx([0.001 + 0.999 * j / R for j in range(R)], rel=1e-12)
    # the authors': off their plain warmup + cosine (one step ahead after the first restart) on steps 0-9, 25-33,
    # 49-58, 74-83 and 99
    plain = lambda t: t / 10 if t < 10 else 0.1 + 0.9 * (1 + math.cos(math.pi * (t - 10) / 90)) / 2  # noqa: E731
    authors = [authors_lr(s, K, R, 10, steps, 0.1) for s in range(steps)]
    ahead = [plain(s + (s >= K)) for s in range(steps)]
    assert [s for s in range(steps) if abs(authors[s] - ahead[s]) > 1e-12] == [
        *range(0, 10), *range(25, 34), *range(49, 59), *range(74, 84), 99]
    assert authors[:10] == pytest.approx([plain(10) * (0.001 + 0.999 * j / 9) for j in range(10)], rel=1e-12)
    assert authors[25:34] == pytest.approx([plain(35) * (0.001 + 0.999 * j / 9) for j in range(1, 10)], rel=1e-12)
    assert authors[49:59] == pytest.approx([plain(60) * (0.001 + 0.999 * j / 9) for j in range(10)], rel=1e-12)
    assert authors[99] == pytest.approx(0.001 * plain(110), rel=1e-12)


@pytest.mark.parametrize("steps,warmup,K,R", OFFICIAL_RUNS)
def test_the_lr_of_a_run_is_the_official_code_s(runs, steps, warmup, K, R):
    _, log = trained(runs, f"official-{steps}-{warmup}-{K}-{R}")
    assert [r["step"] for r in log] == list(range(1, steps + 1))
    assert [r["lr"] for r in log] == official_lrs(3e-3, steps, warmup, K, R)
    # a restart after steps K, 2K, ... (counted from 1), never after the last
    assert [r["step"] for r in log if "resets" in r] == list(range(K, steps, K))
    assert [r["step"] for r in log if "refactorizations" in r] == list(range(K, steps, K))


def test_a_resume_refuses_another_lr_recovery(runs):
    assert error_of(runs["refused"][2]).startswith("error: --resume with lr_recovery linear, but ")


# a run that dies right after writing its checkpoint at step --ckpt-every (the script, run in this process)
CRASH = """import os, runpy, sys
replace = os.replace
def crash(src, dst):
    replace(src, dst)
    if str(dst).endswith("ckpt.pt"):
        os._exit(3)
os.replace = crash
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def assert_resume_after_a_crash_is_exact(script, tmp_path, *extra, steps, at):
    """steps straight vs the same run crashing after its checkpoint at step `at`, then --resume: the same lr and
    losses at every step, and the same validation loss. Unlike a shorter first run, the crash keeps --max-steps,
    on which the authors' lr depends (their cycle, and the recovery of their restart after the last step)."""
    args = [*NANO, *FAST, "--max-steps", str(steps), "--ckpt-every", str(at), *extra]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    logged = json.dumps({"step": at + 1, "loss": 123.0})  # a step logged after the checkpoint, then the crash
    append = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n')"
    procs = run_each([[script, *args, "--out-dir", a], ["-c", CRASH, script, *args, "--out-dir", b],
                      ["-c", append, f"{b}/log.jsonl", logged],
                      [script, *args, "--out-dir", b, "--resume"]], check=False)
    assert [proc.returncode for proc in procs] == [0, 3, 0, 0], [proc.stderr[-2000:] for proc in procs]
    (straight, log_a), (resumed, log_b) = outputs(a), outputs(b)
    assert [(r["step"], r["lr"], r["loss"]) for r in log_b] == [(r["step"], r["lr"], r["loss"]) for r in log_a]
    assert resumed["val_loss"] == straight["val_loss"]
    return log_a


def test_resume_inside_a_recovery_window_and_across_a_restart(tmp_path, shakespeare):
    # restarts after steps 4 and 8 (counted from 1); the authors' recovery takes steps 5-6 and 8-10 (the second
    # from the step before its restart), so the checkpoint at 5 falls inside the first, the second after it
    log = assert_resume_after_a_crash_is_exact("train_lowrank_refactor.py", tmp_path, "--restart-every", "4",
                                               "--recovery-steps", "3", steps=12, at=5)
    assert [r["step"] for r in log if "resets" in r] == [4, 8]
    assert [r["lr"] for r in log] == official_lrs(3e-3, 12, 1, 4, 3)


SLTRAIN = definitions("train_sltrain.py")


@pytest.mark.parametrize("script", ["train_lowrank_refactor.py", "train_sltrain.py"])
@pytest.mark.parametrize("bad", ["nan", "inf", "huge"])
def test_a_refactorization_of_non_finite_factors_stops_in_one_line(script, bad):
    """A diverged run reaches the SVD of a refactorization with non-finite factors, or finite ones of 1e25 whose
    product overflows: it stops with the divergence line (not svd's LinAlgError) and leaves B and A as they were."""
    B, A = unbalanced_factors(30, 20, 4)
    if bad == "huge":
        B, A = B * 1e25, A * 1e25
    else:
        B[3, 2] = float(bad)
    before = B.clone(), A.clone()
    with pytest.raises(SystemExit) as e:
        (refactorize if script == "train_lowrank_refactor.py" else SLTRAIN["refactorize"])(B, A)
    assert str(e.value) == "error: a refactorization met non-finite factors: training diverged (try a lower --lr)"
    torch.testing.assert_close((B, A), before, rtol=0, atol=0, equal_nan=True)
