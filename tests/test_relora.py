"""LoRA and ReLoRA (train_relora.py): the layer, the merge, the pruned optimizer state, the jagged lr, the warm
start, memory, resume and DDP."""
import json
import math
import sys

import pytest
import torch

from conftest import (NANO, adamw_steps, assert_resume_is_exact, definitions, error_of, nano_with, run, torchrun,
                      train, warmup_cosine_lr)
from model import SIZES, Llama, compressible_matrices, estimate_bytes

ns = definitions("train_relora.py")
LoRALinear, prune_state, set_phase = ns["LoRALinear"], ns["prune_state"], ns["set_phase"]
FAST = ["--seq-len", "16", "--val-tokens", "256"]  # nano runs of a few steps cost little at 16 tokens a sequence


def lora_nano(r=8, alpha=32, seed=0):
    return nano_with(lambda i, linear: LoRALinear(linear.weight, r, alpha), seed)


def as_if_trained(layers, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            layer.B.copy_(torch.randn(layer.B.shape, generator=g) * 0.05)


def test_the_layer_is_w0_plus_b_a_alpha_over_r_and_starts_as_w0():
    W = torch.randn(40, 30)
    layer = LoRALinear(torch.nn.Parameter(W.clone()), 6, 12.0)
    x = torch.randn(5, 30)
    assert not layer.B.any() and not layer.W0.requires_grad and layer.B.requires_grad and layer.A.requires_grad
    torch.testing.assert_close(layer(x), x @ W.T)
    bound = 1 / math.sqrt(30)  # Kaiming-uniform with a = sqrt 5: U(-1/sqrt(n), 1/sqrt(n))
    assert 0.8 * bound < layer.A.abs().max() <= bound
    as_if_trained([layer])
    torch.testing.assert_close(layer(x), x @ (W + layer.B @ layer.A * 2.0).T)


def test_a_merge_leaves_the_logits_unchanged_and_restarts_b_a_at_zero():
    model, layers = lora_nano()
    as_if_trained(layers)
    idx = torch.randint(0, 50257, (2, 16))
    before, _ = model(idx)
    old = [(layer.W0.clone(), layer.A.clone()) for layer in layers]
    generator = torch.Generator().manual_seed(7)
    for layer in layers:
        layer.merge_and_reinit(generator)
    after, _ = model(idx)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    for layer, (W0, A) in zip(layers, old):
        assert not (layer.B @ layer.A).any()  # B = 0: the next cycle starts from W0
        assert not torch.equal(layer.W0, W0) and not torch.equal(layer.A, A)  # merged, and A drawn anew
        assert layer.A.abs().max() <= 1 / math.sqrt(layer.A.shape[1])
    # the same seed draws the same A: a resumed run and every DDP process agree
    _, again = lora_nano()
    generator = torch.Generator().manual_seed(7)
    for layer in again:
        layer.merge_and_reinit(generator)
    assert all(torch.equal(a.A, b.A) for a, b in zip(layers, again))


@pytest.mark.parametrize("ratio", [0.99, 0.5, 1.0])
def test_pruning_keeps_exactly_the_largest_fraction_of_each_moment(ratio):
    model, layers = lora_nano()
    as_if_trained(layers)  # B != 0, so that A has gradients (and states) too
    opt, _ = adamw_steps(model)
    factors = [p for layer in layers for p in (layer.B, layer.A)]
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    prune_state(opt, factors, ratio)
    for p in factors:
        for moment in ("exp_avg", "exp_avg_sq"):  # each moment of each tensor on its own
            old, new = before[id(p)][moment], opt.state[p][moment]
            kept = new != 0
            assert kept.sum().item() == old.numel() - round(ratio * old.numel())
            assert torch.equal(new[kept], old[kept])  # kept as they were
            if 0 < kept.sum() < old.numel():
                assert old[kept].abs().min() >= old[~kept].abs().max()  # and they are the largest
        assert opt.state[p]["step"].item() == 2  # the step counter is kept, as ReLoRA does
    for p in model.parameters():  # embedding, head, norms untouched
        if all(p is not f for f in factors):
            assert all(torch.equal(v, before[id(p)][k]) for k, v in opt.state[p].items())


def test_w0_gets_no_gradient_and_no_state_and_the_warm_start_trains_w0_alone():
    model, layers = lora_nano()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    set_phase(layers, opt, lora=False)
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
    model(idx, idx)[1].backward()
    assert all(l.W0.grad is not None and l.B.grad is None and l.A.grad is None for l in layers)
    opt.step()
    opt.zero_grad()
    assert all(l.W0 in opt.state and l.B not in opt.state and not l.B.any() for l in layers)  # the function is W0 x
    set_phase(layers, opt, lora=True)  # the switch: W0 freezes and its state is freed
    assert all(l.W0 not in opt.state for l in layers)
    W0 = [l.W0.clone() for l in layers]
    model(idx, idx)[1].backward()
    assert all(l.W0.grad is None and l.B.grad is not None and l.A.grad is not None for l in layers)
    opt.step()
    assert all(l.W0 not in opt.state and torch.equal(l.W0, w) for l, w in zip(layers, W0))


def expected_lr(step, lr, max_steps, warmup, N, K, R, min_ratio=0.1):
    """The schedule written out independently: warmup + cosine, dropped to 0 at the switch to low rank (after N
    steps) and at each merge (every K steps after it), from where it climbs back over R steps."""
    base = warmup_cosine_lr(step, lr, max_steps, warmup, min_ratio)
    restarts = ([N] if N else []) + (list(range(N + K, max_steps, K)) if K else [])  # steps done at each
    done = [s for s in restarts if s <= step]
    return base * min(1.0, (step - done[-1] + 1) / R) if done else base


N, K, R, STEPS = 3, 4, 2, 13  # the switch after 3 steps, merges after 7 and 11; K does not divide the run


@pytest.fixture(scope="module")
def relora_run(tmp_path_factory, shakespeare):
    out = tmp_path_factory.mktemp("relora")
    return train("train_relora.py", out, *FAST, "--max-steps", str(STEPS), "--warm-start-steps", str(N),
                 "--relora-every", str(K), "--restart-warmup", str(R), "--warmup-steps", "2", "--lr", "1e-2")


def test_lr_drops_at_the_switch_and_each_merge_and_climbs_back_onto_the_schedule(relora_run):
    _, log, _ = relora_run
    lrs = [r["lr"] for r in log]
    assert lrs == pytest.approx([expected_lr(s, 1e-2, STEPS, 2, N, K, R) for s in range(STEPS)], rel=1e-12)
    for s in (N, N + K, N + 2 * K):  # the first step after each restart: half the schedule's lr, after R = 2: all
        assert lrs[s] < lrs[s - 1] and lrs[s + 1] > lrs[s]
    assert [(r["step"], r["merges"]) for r in log if "merges" in r] == [(7, 1), (11, 2)]  # logged as they happen


def test_parameter_gradient_and_state_bytes_count_w0_as_weights_only(relora_run):
    result, _, _ = relora_run
    cfg, r = SIZES["nano"], 8
    d, ff = cfg.n_embd, cfg.n_ff
    frozen = cfg.n_layer * (4 * d * d + 3 * d * ff)  # W0 of the 7 matrices of every layer
    trained = 2 * cfg.vocab_size * d + cfg.n_layer * (4 * r * (d + d) + 3 * r * (d + ff) + 2 * d) + d
    assert result["params"]["total"] == frozen + trained
    assert result["weights_bytes"] == 4 * (frozen + trained)
    assert result["grads_bytes"] == 4 * trained  # no gradient for W0
    n_tensors = 3 + cfg.n_layer * (2 * 7 + 2)  # AdamW keeps one 4-byte step counter per trained tensor
    assert result["optimizer_state_bytes"] == 2 * 4 * trained + 4 * n_tensors  # no state for W0
    estimate = estimate_bytes("nano", "relora", "fp32", {"rank": r})
    assert estimate == {"weights_bytes": result["weights_bytes"], "grads_bytes": result["grads_bytes"],
                        "optimizer_state_bytes": result["optimizer_state_bytes"] - 4 * n_tensors, "buffers_bytes": 0}


def test_plain_lora_trains_b_a_and_the_rest_and_never_w0(tmp_path, shakespeare):
    result, log, _ = train("train_relora.py", tmp_path, *FAST, "--max-steps", "3", "--relora-every", "0",
                           "--warm-start-steps", "0", "--ckpt-every", "3")
    assert result["run"] == "lora" and not any("merges" in r for r in log)
    torch.manual_seed(0)
    init = Llama(SIZES["nano"]).state_dict()
    trained = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]
    for name, linear in compressible_matrices(Llama(SIZES["nano"])):
        assert torch.equal(trained[f"{name}.W0"], init[f"{name}.weight"])  # W0 is the init, untouched
        assert trained[f"{name}.B"].any()  # B left 0
    for name in ("embed.weight", "head.weight", "norm.weight", "layers.0.attn_norm.weight"):
        assert not torch.equal(trained[name], init[name])


def test_resume_across_a_merge_is_exact(tmp_path, shakespeare):
    # merges after steps 3 and 6: the checkpoint at 4 holds merged W0, a re-drawn A and pruned moments, and the
    # resumed half crosses the second merge and its 2-step re-warm
    assert_resume_is_exact("train_relora.py", tmp_path, *FAST, "--warm-start-steps", "0", "--relora-every", "3",
                           "--restart-warmup", "2")


def test_resume_inside_the_warm_start_and_across_the_switch_is_exact(tmp_path, shakespeare):
    # the checkpoint at 4 is inside the 5-step warm start (W0's state saved), the switch after 5, a merge after 7
    assert_resume_is_exact("train_relora.py", tmp_path, *FAST, "--warm-start-steps", "5", "--relora-every", "2",
                           "--restart-warmup", "1")


def test_ddp_across_the_switch_and_a_merge_matches_one_process(tmp_path, shakespeare):
    # 2 processes vs 1 process accumulating 2 micro-batches: DDP is built again at the switch, as W0 freezes
    common = [*NANO, *FAST, "--max-steps", "5", "--global-batch", "16", "--batch-size", "8", "--warm-start-steps",
              "2", "--relora-every", "2", "--restart-warmup", "1"]
    torchrun("train_relora.py", tmp_path / "ddp", *common)
    run([sys.executable, "train_relora.py", *common, "--out-dir", str(tmp_path / "one")])
    ddp, one = ([json.loads(line) for line in open(tmp_path / d / "log.jsonl")] for d in ("ddp", "one"))
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert [(r["step"], r["merges"]) for r in ddp if "merges" in r] == [(4, 1)]
    assert json.load(open(tmp_path / "ddp" / "result.json"))["val_loss"] == pytest.approx(
        json.load(open(tmp_path / "one" / "result.json"))["val_loss"], rel=1e-5)


@pytest.mark.parametrize("flags,message", [
    (["--relora-every", "5", "--restart-warmup", "5"], "error: --restart-warmup 5 must be below --relora-every 5"),
    (["--prune-ratio", "1.5"], "error: argument --prune-ratio: must be >= 0 and <= 1, got 1.5")],
    ids=["restart-warmup", "prune-ratio"])
def test_bad_settings_are_one_line_errors(tmp_path, flags, message):
    _, _, proc = train("train_relora.py", tmp_path / "out", *flags, check=False)
    assert error_of(proc) == message and not (tmp_path / "out").exists()
