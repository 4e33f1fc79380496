"""Stable-SPAM and SPAM: the step is the authors' (re-implemented below from their code, bit for bit in fp32 and
bf16, across momentum resets and SPAM's warmup), a run trains, resets and resumes exactly."""
import math
import warnings

import pytest
import torch

from conftest import NANO, definitions, outputs, run_each

SCRIPT = "train_stable_spam.py"


class CosineDecay:
    """Their CosineDecay: torch's CosineAnnealingLR over T_max + 1 steps, evaluated at a given step."""

    def __init__(self, death_rate, T_max, eta_min=0, clamp=False):
        self.sgd = torch.optim.SGD(torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(1))]), lr=death_rate)
        self.cosine_stepper = torch.optim.lr_scheduler.CosineAnnealingLR(self.sgd, T_max + 1, eta_min, -1)
        self.T_max, self.eta_min, self.clamp = T_max, eta_min, clamp

    def get_dr(self, current_step):
        if self.clamp and current_step >= self.T_max:  # SPAM's version returns eta_min from T_max on
            return self.eta_min
        with warnings.catch_warnings():  # stepping with an epoch is deprecated (and still supported) in torch
            warnings.simplefilter("ignore")
            self.cosine_stepper.step(current_step)
        return self.sgd.param_groups[0]["lr"]


class OfficialStableSPAM(torch.optim.Optimizer):
    """StableSPAM.step of TianjinYellow/StableSPAM galore_torch/stablespam.py (= pt_stable_spam's
    StableSPAM_optimizer in OptimAI-Lab/Memory_Efficient_Pretraining), statement by statement, amsgrad off."""

    def __init__(self, params, lr, gamma1, gamma2, gamma3, total_T, eta_min, update_proj_gap, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay))
        self.gamma1, self.gamma2, self.theta = gamma1, gamma2, gamma3
        self.warmup = CosineDecay(1.0, total_T, eta_min=eta_min)
        self.total_steps, self.update_proj_gap = 0, update_proj_gap

    @torch.no_grad()
    def step(self):
        self.total_steps += 1
        scale = self.warmup.get_dr(self.total_steps)
        for group in self.param_groups:
            for p in group["params"]:
                p.data.mul_(1 - group["lr"] * group["weight_decay"])
                grad = p.grad
                state = self.state[p]
                if "exp_avg" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                    state["m_norm_t"] = 0
                    state["v_norm_t"] = 0
                    state["m_max_t"] = 0
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                max_gradient = torch.max(grad.abs())
                m_max_t = state["m_max_t"]
                state["step"] += 1
                m_max_t = self.theta * m_max_t + (1 - self.theta) * max_gradient
                m_max_hat = m_max_t / (1 - self.theta ** state["step"])
                mask = grad.abs() > m_max_hat
                if mask.sum() > 0:
                    grad[mask] = grad[mask] / max_gradient * m_max_hat
                state["m_max_t"] = m_max_t
                grad_norm = torch.norm(grad)
                m_norm_t, v_norm_t = state["m_norm_t"], state["v_norm_t"]
                m_norm_t = self.gamma1 * scale * m_norm_t + (1 - self.gamma1 * scale) * grad_norm
                v_norm_t = self.gamma2 * v_norm_t + (1 - self.gamma2) * grad_norm ** 2
                m_norm_hat = m_norm_t / (1 - (self.gamma1 * scale) ** state["step"])
                v_norm_hat = v_norm_t / (1 - self.gamma2 ** state["step"])
                c_norm_t = m_norm_hat / (torch.sqrt(v_norm_hat) + group["eps"])
                if grad_norm > 0:
                    grad = grad / grad_norm * c_norm_t
                state["m_norm_t"], state["v_norm_t"] = m_norm_t, v_norm_t
                if self.update_proj_gap != 0:
                    if self.total_steps % self.update_proj_gap == 0:
                        state["exp_avg"] = torch.zeros_like(grad)
                        state["exp_avg_sq"] = torch.zeros_like(grad)
                        state["step"] = 1
                beta1, beta2 = group["betas"]
                beta1 = beta1 * scale
                bias_correction1 = 1 - beta1 ** state["step"]
                bias_correction2 = 1 - beta2 ** state["step"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
                step_size = group["lr"] / bias_correction1
                p.add_(exp_avg / denom, alpha=-step_size)


class OfficialSPAM(torch.optim.Optimizer):
    """SPAM.step of TianjinYellow/SPAM-Optimizer galore_torch/SPAM.py (the class its README and torchrun_main.py
    use, DeltaT and warmup_steps as arguments), statement by statement, for a group without "density"."""

    def __init__(self, params, lr, warmup_steps, threshold, DeltaT, weight_decay=0.0, grad_accu_steps=20):
        super().__init__(params, dict(lr=lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=weight_decay,
                                      correct_bias=True))
        self.state["total_step"] = 0
        self.state["current_step"] = warmup_steps + 1
        self.DeltaT, self.warmup_steps = DeltaT, warmup_steps
        self.warmup = CosineDecay(0.99, warmup_steps, clamp=True)
        self.thres, self.grad_accu_steps = threshold, grad_accu_steps

    @torch.no_grad()
    def step(self):
        scale_factor = 1 - self.warmup.get_dr(self.state["current_step"])
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                if (self.state["total_step"] + 1) % self.DeltaT == 0:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                beta1, beta2 = group["betas"]
                state["step"] += 1
                if self.thres != 0:
                    current_step = self.state["total_step"] + 1
                    if current_step >= self.grad_accu_steps:
                        mask = (grad ** 2) > (self.thres * exp_avg_sq)
                        if current_step % self.DeltaT >= self.grad_accu_steps:
                            grad[mask] = grad[mask].sign() * torch.sqrt(exp_avg_sq[mask] * self.thres)
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                bias_correction1 = 1.0 - beta1 ** state["step"]
                bias_correction2 = 1.0 - beta2 ** state["step"]
                step_size *= math.sqrt(bias_correction2) / bias_correction1
                p.add_(exp_avg / denom, alpha=-step_size * scale_factor)
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=(-group["lr"] * group["weight_decay"]))
        self.state["total_step"] += 1
        self.state["current_step"] += 1
        if (self.state["total_step"] != 0) and ((self.state["total_step"] + 1) % self.DeltaT == 0):
            self.state["current_step"] = 0
            self.warmup = CosineDecay(0.99, self.warmup_steps, clamp=True)


@pytest.fixture(scope="module")
def ours():
    return definitions(SCRIPT)


def run_both(make_ours, make_official, dtype, steps):
    """The same gradients (with spikes) into both optimizers, step by step: the weights and moments must stay
    bit-identical. Returns how many elements each step changed, to check that the run exercised something."""
    g = torch.Generator().manual_seed(0)
    shapes = [(12, 20), (20,), (7, 5)]
    init = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    opt_a, opt_b = make_ours(a), make_official(b)
    for step in range(steps):
        for pa, pb in zip(a, b):
            grad = torch.randn(pa.shape, generator=g) * (1 + step % 3)
            spikes = torch.rand(pa.shape, generator=g) < 0.05
            grad = torch.where(spikes, grad * 1000, grad).to(dtype)  # a few gradient spikes every step
            pa.grad, pb.grad = grad.clone(), grad.clone()
        opt_a.step()
        opt_b.step()
        for pa, pb in zip(a, b):
            assert torch.equal(pa, pb), step
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opt_a.state[pa][key], opt_b.state[pb][key]), (step, key)
    assert not any(torch.equal(pa, t) for pa, t in zip(a, init))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stable_spam_step_is_the_authors(ours, dtype):
    # 12 steps, resets after steps 5 and 10, the decay of b1 and gamma1 over the 12 steps; wd on
    run_both(lambda p: ours["StableSPAM"](p, lr=1e-2, reset_every=5, gamma1=0.85, gamma2=0.99999, gamma3=0.999,
                                          eta=0.5, decay_steps=12, weight_decay=0.1),
             lambda p: OfficialStableSPAM(p, lr=1e-2, gamma1=0.85, gamma2=0.99999, gamma3=0.999, total_T=12,
                                          eta_min=0.5, update_proj_gap=5, weight_decay=0.1), dtype, 12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spam_step_is_the_authors(ours, dtype):
    # 60 steps: resets at steps 25 and 50, each followed by a 10-step warmup; clipping from step 20 but in the
    # 20 steps from each reset; wd on
    run_both(lambda p: ours["SPAM"](p, lr=1e-2, reset_every=25, threshold=5000.0, recovery_steps=10,
                                    weight_decay=0.1),
             lambda p: OfficialSPAM(p, lr=1e-2, warmup_steps=10, threshold=5000.0, DeltaT=25, weight_decay=0.1),
             dtype, 60)


def test_spam_clips_spikes_and_warms_up_after_a_reset(ours):
    """What the bit-for-bit test cannot see: the pieces act. A gradient 1000x its history is cut to sqrt(theta V);
    the step after a reset moves W by 0.01 of an undisturbed first step."""
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = ours["SPAM"]([p], lr=1.0, reset_every=25, threshold=5000.0, recovery_steps=10)
    for s in range(1, 21):
        p.grad = torch.full((4,), 1000.0 if s == 20 else 1.0, dtype=torch.float64)
        v_before = opt.state[p]["exp_avg_sq"].clone() if opt.state else None
        opt.step()
    clipped = math.sqrt(5000 * v_before[0].item())
    expected_v = 0.999 * v_before[0].item() + 0.001 * clipped ** 2
    assert opt.state[p]["exp_avg_sq"][0].item() == pytest.approx(expected_v, rel=1e-12)
    for s in range(21, 26):
        p.grad = torch.ones(4, dtype=torch.float64)
        before = p.detach().clone()
        opt.step()
    # step 25 is a reset: M = 0.1 G, V = 0.001 G^2, bias-corrected by the run's step 25, times phi = 0.01
    bias = math.sqrt(1 - 0.999 ** 25) / (1 - 0.9 ** 25)
    assert (before - p.detach())[0].item() == pytest.approx(0.01 * bias * 0.1 / (math.sqrt(0.001) + 1e-6), rel=1e-9)


@pytest.fixture(scope="module")
def nano_runs(tmp_path_factory):
    """Both variants, 24 nano steps at lr 1e-2 with a reset every 8 steps (SPAM's warmup over 2), from one process
    (run_each): {variant: (result, log)}. (At 16-token sequences SPAM's loss falls by less than 2.)"""
    out = tmp_path_factory.mktemp("spam")
    flags = {"stable_spam": [], "spam": ["--recovery-steps", "2"]}
    run_each([[SCRIPT, *NANO, "--out-dir", str(out / variant), "--variant", variant, "--max-steps", "24",
               "--lr", "1e-2", "--reset-every", "8", *flags[variant]] for variant in flags])
    return {variant: outputs(out / variant) for variant in flags}


@pytest.mark.parametrize("variant", ["stable_spam", "spam"])
def test_loss_falls_with_resets(nano_runs, variant):
    result, log = nano_runs[variant]
    # from ~10.8 (uniform) towards unigram statistics, and the validation loss with it
    assert log[-1]["loss"] < log[0]["loss"] - 2.0 and result["val_loss"] < log[0]["loss"] - 1.5
    assert [r["step"] for r in log if "resets" in r] == [8, 16, 24] and log[-1]["resets"] == 3
    assert result["variant"] == variant and result["method"] == variant and result["args"]["grad_clip"] == 0.0
    assert all("grad_norm" not in r for r in log)  # the authors' runs clip nothing
    # memory counted from the tensors: two fp32 moments per weight; Stable-SPAM adds its three fp32 scalars per
    # tensor (embedding, head, final norm, and per layer 2 norms + 7 matrices)
    scalars = 3 * 4 * (3 + 2 * 9) if variant == "stable_spam" else 0
    assert result["optimizer_state_bytes"] == 2 * result["weights_bytes"] + scalars
