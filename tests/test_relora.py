"""LoRA and ReLoRA (train_relora.py): the layer, the merge, the pruned optimizer state, the jagged lr, the warm
start, memory, resume and DDP."""
import copy
import json
import math
import sys
from functools import partial

import pytest
import torch

from conftest import (FAST, NANO, adamw_steps, assert_resume_is_exact, definitions, error_of, nano_with,
                      official_cyclical_cosine, outputs, run, run_each, scheduler_lrs, torchrun, train,
                      warmup_cosine_lr)
from model import SIZES, Llama, compressible_matrices, estimate_bytes

ns = definitions("train_relora.py")
LoRALinear, prune_state, set_phase = ns["LoRALinear"], ns["prune_state"], ns["set_phase"]


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


def test_a_zero_init_starts_the_factors_at_zero():
    layer = LoRALinear(torch.nn.Parameter(torch.randn(40, 30)), 6, 12.0, a_init="zero")
    assert not layer.A.any() and not layer.B.any()


def test_dropout_masks_the_low_rank_input_alone_as_relora():
    W, x = torch.randn(40, 30), torch.randn(5, 30)
    layer = LoRALinear(torch.nn.Parameter(W.clone()), 6, 12.0, dropout=0.5)
    as_if_trained([layer])
    plain = x @ (W + layer.B @ layer.A * 2.0).T
    torch.manual_seed(5)
    ours = layer(x)
    # ReLoRaLinear.forward (Guitaricet/relora peft_pretraining/relora.py): F.linear(x, W) + lora_B(lora_A(
    # lora_dropout(x))) * scale, lora_dropout = nn.Dropout(p), drawing from the same global RNG
    lora_A, lora_B = torch.nn.Linear(30, 6, bias=False), torch.nn.Linear(6, 40, bias=False)
    with torch.no_grad():
        lora_A.weight.copy_(layer.A)
        lora_B.weight.copy_(layer.B)
    torch.manual_seed(5)
    official = torch.nn.functional.linear(x, W) + lora_B(lora_A(torch.nn.Dropout(0.5)(x))) * 2.0
    torch.testing.assert_close(ours, official)
    assert (ours - plain).abs().max() > 0.1  # the mask is there
    layer.eval()
    torch.testing.assert_close(layer(x), plain)  # and only in training


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


# ReLoRA's optimizer reset, re-implemented from Guitaricet/relora peft_pretraining/training_utils.py
# (random_pruning_, magnitude_pruning_, and the loop of optimizer_reset over the parameters and the moments)
def official_random_pruning_(tensor, prune_ratio):
    tensor.mul_(torch.rand_like(tensor) > prune_ratio)


def official_magnitude_pruning_(tensor, prune_ratio):
    magnitude = torch.abs(tensor)
    threshold = torch.quantile(magnitude.flatten().to(dtype=torch.float32), prune_ratio).to(dtype=tensor.dtype)
    tensor.mul_((magnitude > threshold).to(dtype=tensor.dtype))


def official_optimizer_reset(optimizer, reset_params, pruning_fn):
    for p in reset_params:
        for key in ("exp_avg", "exp_avg_sq"):
            pruning_fn(optimizer.state[p][key])


@pytest.mark.parametrize("mode,dtype,ratio", [("random", torch.float32, 0.999), ("random", torch.bfloat16, 0.999),
                                              ("random", torch.float32, 0.5), ("magnitude", torch.float32, 0.99),
                                              ("magnitude", torch.bfloat16, 0.9)])
def test_pruning_is_relora_optimizer_reset_and_keeps_the_step(mode, dtype, ratio):
    model, layers = lora_nano()
    model.to(dtype)
    as_if_trained(layers)  # B != 0, so that A has gradients (and states) too
    opt, _ = adamw_steps(model)
    factors = [p for layer in layers for p in (layer.B, layer.A)]
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    reference = copy.deepcopy(opt.state_dict())
    prune_state(opt, factors, mode, ratio, torch.Generator().manual_seed(3))
    # the official functions on a copy of the same moments; its random draw from the global RNG seeded alike
    official = torch.optim.AdamW(model.parameters())
    official.load_state_dict(reference)
    torch.manual_seed(3)
    pruning_fn = official_random_pruning_ if mode == "random" else official_magnitude_pruning_
    official_optimizer_reset(official, factors, lambda t: pruning_fn(t, ratio))
    kept = total = 0
    for p in factors:
        for moment in ("exp_avg", "exp_avg_sq"):
            new = opt.state[p][moment]
            assert new.dtype == dtype and torch.equal(new, official.state[p][moment])
            assert torch.equal(new[new != 0], before[id(p)][moment][new != 0])  # the kept entries as they were
            kept, total = kept + (new != 0).sum().item(), total + new.numel()
        assert opt.state[p]["step"].item() == 2  # the step counter is kept, as ReLoRA does
    if dtype == torch.bfloat16 and mode == "random":
        assert kept == 0  # no bf16 uniform exceeds 0.999: ReLoRA's default reset zeroes all of it in bf16
    else:
        assert 0.5 * (1 - ratio) * total < kept < 1.5 * (1 - ratio) * total
    for p in model.parameters():  # embedding, head, norms untouched
        if all(p is not f for f in factors):
            assert all(torch.equal(v, before[id(p)][k]) for k, v in opt.state[p].items())


def test_magnitude_pruning_drops_the_ties_at_the_threshold():
    p = torch.nn.Parameter(torch.zeros(5))
    opt = torch.optim.AdamW([p])
    opt.state[p] = {"exp_avg": torch.tensor([0.25, 0.5, -0.5, 0.5, 0.75]),
                    "exp_avg_sq": torch.tensor([1.0, 2, 3, 4, 5])}
    prune_state(opt, [p], "magnitude", 0.5, None)
    # the median 0.5 is the threshold and only what exceeds it is kept: 1 of the 5 entries, not 5 - round(2.5) = 3
    assert opt.state[p]["exp_avg"].tolist() == [0, 0, 0, 0, 0.75]
    assert opt.state[p]["exp_avg_sq"].tolist() == [0, 0, 0, 4, 5]


def test_random_pruning_depends_only_on_the_generator():
    model, layers = lora_nano()
    as_if_trained(layers)
    factors = [p for layer in layers for p in (layer.B, layer.A)]
    opt, _ = adamw_steps(model)
    saved = copy.deepcopy(opt.state_dict())
    masks = []
    for global_seed, seed in ((0, 11), (1, 11), (0, 12)):  # the global RNG does not matter, the generator does
        opt.load_state_dict(saved)
        torch.manual_seed(global_seed)
        prune_state(opt, factors, "random", 0.5, torch.Generator().manual_seed(seed))
        masks.append(torch.cat([opt.state[p][m].flatten() != 0 for p in factors for m in ("exp_avg", "exp_avg_sq")]))
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


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


# ReLoRA's schedulers, re-implemented from Guitaricet/relora peft_pretraining/training_utils.py: the full-rank run's
# "cosine" (_get_cyclical_cosine_schedule_with_min_lr_lambda) and the ReLoRA run's "cosine_restarts"
# (_get_cosine_schedule_with_multiple_warmups_lambda), each stepped by a LambdaLR as torchrun_main.py does
def official_multiple_warmups(current_step, *, num_training_steps, first_warmup_steps, restart_warmup_steps,
                              restart_every, min_lr_ratio, adjust_step):
    assert adjust_step + first_warmup_steps <= restart_every
    if current_step < first_warmup_steps:
        return float(current_step) / float(max(1, first_warmup_steps))
    _current_step = current_step + adjust_step
    restart_step = _current_step % restart_every
    restart_number = _current_step // restart_every
    if restart_step < restart_warmup_steps and current_step >= restart_every:
        end_of_warmup_progress = (float(restart_number * restart_every + restart_warmup_steps - first_warmup_steps)
                                  / float(max(1, num_training_steps - first_warmup_steps)))
        warmup_lr_multiplier = min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi
                                                                                          * end_of_warmup_progress))
        return float(restart_step) / float(max(1, restart_warmup_steps)) * warmup_lr_multiplier
    progress = float(_current_step - first_warmup_steps) / float(max(1, num_training_steps - first_warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def official_recipe(steps, warm_lr, warmup, N, lr, first_warmup, K, R):
    """The README's 250M recipe: a full-rank run planned for all `steps`, stopped after N; then a ReLoRA run from
    its weights (--warmed_up_model) whose scheduler covers the remaining steps. Returns every step's lr and the
    update steps after which torchrun_main.py merges and resets the optimizer."""
    warm = scheduler_lrs(partial(official_cyclical_cosine, num_warmup_steps=warmup, cycle_length=steps,
                                min_lr_ratio=0.1), warm_lr, steps)[:N]
    assert (steps - N) % K == 0  # get_cosine_schedule_with_multiple_warmups requires it
    low = scheduler_lrs(partial(official_multiple_warmups, num_training_steps=steps - N, first_warmup_steps=first_warmup,
                               restart_warmup_steps=R, restart_every=K, min_lr_ratio=0.1, adjust_step=0), lr, steps - N)
    update_step = scheduler_start_step = N  # training_state.json of the warm start
    merges = []
    for local_step in range(1, steps - N + 1):  # one micro-batch per update
        update_step += 1
        if local_step >= K and (update_step - scheduler_start_step) % K == 1:  # can_reset_relora and its test
            merges.append(update_step)
    return warm + low, merges


N, K, R, W, W2, STEPS = 3, 4, 2, 2, 1, 15  # the switch after 3 steps, lr 0 at steps 8 and 12, merges right after


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare):
    """From one process (run_each): the recipe's run (a warm start, then merges), 3 steps that end before the first
    merge, and 3 of plain LoRA, each checkpointed at its end. {name: (result, log, out_dir)}"""
    root = tmp_path_factory.mktemp("runs")
    flags = {"recipe": ["--max-steps", str(STEPS), "--warm-start-steps", str(N), "--relora-every", str(K),
                        "--restart-warmup", str(R), "--warmup-steps", str(W), "--switch-warmup", str(W2),
                        "--lr", "1e-2", "--warm-start-lr", "4e-3", "--ckpt-every", str(STEPS)],
             "zero": ["--max-steps", "3", "--warm-start-steps", "0", "--relora-every", "3", "--restart-warmup", "1",
                      "--warmup-steps", "1", "--ckpt-every", "3"],
             "lora": ["--max-steps", "3", "--relora-every", "0", "--warm-start-steps", "0", "--ckpt-every", "3"]}
    run_each([["train_relora.py", *NANO, *FAST, "--out-dir", str(root / name), *f] for name, f in flags.items()])
    return {name: (*outputs(root / name), root / name) for name in flags}


def test_the_schedule_and_the_merges_are_relora_readme_recipe(runs):
    _, log, _ = runs["recipe"]
    lrs, merges = official_recipe(STEPS, 4e-3, W, N, 1e-2, W2, K, R)
    assert [r["lr"] for r in log] == pytest.approx(lrs, rel=1e-12, abs=1e-15)
    assert [(r["step"], r["merges"]) for r in log if "merges" in r] == [(m, i + 1) for i, m in enumerate(merges)]
    assert merges == [N + K + 1, N + 2 * K + 1]
    # the step before each merge, and the first of either run, have lr 0: the moments move, the weights do not
    assert [r["step"] for r in log if r["lr"] == 0] == [1, N + 1, *merges]


def test_the_switch_starts_a_brand_new_adamw_for_every_parameter(runs):
    _, _, out = runs["recipe"]
    state = torch.load(out / "ckpt.pt", weights_only=True)["optimizer"]["state"]
    model, _ = lora_nano()
    names = [name for name, _ in model.named_parameters()]
    assert len(state) == sum(not name.endswith("W0") for name in names)  # W0 keeps none
    for i, name in enumerate(names):  # embedding, head and norms too: every counter started at the switch
        assert name.endswith("W0") or state[i]["step"].item() == STEPS - N


def test_zero_factors_get_no_update_until_the_first_merge(runs):
    trained = torch.load(runs["zero"][2] / "ckpt.pt", weights_only=True)["model"]  # the first merge would follow step 4
    torch.manual_seed(0)
    init = Llama(SIZES["nano"]).state_dict()
    for name, _ in compressible_matrices(Llama(SIZES["nano"])):
        assert not trained[f"{name}.B"].any() and not trained[f"{name}.A"].any()
        assert torch.equal(trained[f"{name}.W0"], init[f"{name}.weight"])
    assert not torch.equal(trained["head.weight"], init["head.weight"])  # the rest trains meanwhile


def test_parameter_gradient_and_state_bytes_count_w0_as_weights_only(runs):
    result, _, _ = runs["recipe"]
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


def test_plain_lora_trains_b_a_and_the_rest_and_never_w0(runs):
    result, log, out = runs["lora"]
    assert result["run"] == "lora" and not any("merges" in r for r in log)
    assert (result["a_init"], result["lora_dropout"]) == ("kaiming", 0.0)  # Glentis et al.'s LoRA
    assert [r["lr"] for r in log] == pytest.approx([warmup_cosine_lr(s, 1.5e-3, 3, 0) for s in range(3)], rel=1e-12)
    torch.manual_seed(0)
    init = Llama(SIZES["nano"]).state_dict()
    trained = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    for name, linear in compressible_matrices(Llama(SIZES["nano"])):
        assert torch.equal(trained[f"{name}.W0"], init[f"{name}.weight"])  # W0 is the init, untouched
        assert trained[f"{name}.B"].any()  # B left 0
    for name in ("embed.weight", "head.weight", "norm.weight", "layers.0.attn_norm.weight"):
        assert not torch.equal(trained[name], init[name])


def test_resume_across_a_merge_is_exact(tmp_path, shakespeare):
    # lr 0 at steps 4 and 7, each followed by a merge: the checkpoint at 4 holds merged W0, a re-drawn A and pruned
    # moments; the resumed half trains the factors under dropout and crosses the second merge and its re-warm
    assert_resume_is_exact("train_relora.py", tmp_path, *FAST, "--warm-start-steps", "0", "--relora-every", "3",
                           "--restart-warmup", "2")


@pytest.mark.parametrize("warm_start", [5, 4], ids=["inside", "at-the-switch"])
def test_resume_inside_the_warm_start_and_across_the_switch_is_exact(tmp_path, shakespeare, warm_start):
    # the checkpoint at 4 is inside the 5-step warm start (W0's state saved), or right before the switch, which
    # the resumed run's first step then makes (a new AdamW, W0 keeps none: the memory of the straight run); lr 0
    # at step 8 and a merge after it
    assert_resume_is_exact("train_relora.py", tmp_path, *FAST, "--warm-start-steps", str(warm_start),
                           "--relora-every", "2", "--restart-warmup", "1")
    straight, resumed = (json.load(open(tmp_path / run / "result.json")) for run in ("a", "b"))
    for key in ("weights_bytes", "grads_bytes", "optimizer_state_bytes"):
        assert resumed[key] == straight[key]
    if warm_start == 4:  # extending the run from its checkpoint at 4, K left to its default: a quarter of 16 steps
        log = (tmp_path / "b" / "log.jsonl").read_text()
        _, _, proc = train("train_relora.py", tmp_path / "b", *FAST, "--max-steps", "16", "--resume",
                           "--warm-start-steps", "4", "--restart-warmup", "1", check=False)
        assert error_of(proc) == (
            "error: --resume with 16 steps derives --relora-every 4 (the checkpoint's 2): these periods default to "
            "fractions of the run's steps; to extend the run, give the checkpoint's: --relora-every 2 "
            "--warm-start-steps 4 --restart-warmup 1 --switch-warmup 0")
        assert (tmp_path / "b" / "log.jsonl").read_text() == log


def test_ddp_across_the_switch_and_a_merge_matches_one_process(tmp_path, shakespeare):
    # 2 processes vs 1 process accumulating 2 micro-batches: DDP is built again at the switch, as W0 freezes; A
    # Kaiming, so that the factors train under dropout, whose masks follow the micro-batch, not the process
    common = [*NANO, *FAST, "--max-steps", "6", "--global-batch", "16", "--batch-size", "8", "--warm-start-steps",
              "2", "--relora-every", "2", "--restart-warmup", "1", "--a-init", "kaiming"]
    torchrun("train_relora.py", tmp_path / "ddp", *common)
    run([sys.executable, "train_relora.py", *common, "--out-dir", str(tmp_path / "one")])
    ddp, one = ([json.loads(line) for line in open(tmp_path / d / "log.jsonl")] for d in ("ddp", "one"))
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert [(r["step"], r["merges"]) for r in ddp if "merges" in r] == [(5, 1)]
    assert json.load(open(tmp_path / "ddp" / "result.json"))["val_loss"] == pytest.approx(
        json.load(open(tmp_path / "one" / "result.json"))["val_loss"], rel=1e-5)


BAD_SETTINGS = [
    (["--relora-every", "5", "--restart-warmup", "5"], "error: --restart-warmup 5 must be below --relora-every 5"),
    (["--prune-ratio", "1.5"], "error: argument --prune-ratio: must be >= 0 and <= 1, got 1.5"),
    (["--relora-every", "4", "--warm-start-steps", "2", "--switch-warmup", "5"],
     "error: --switch-warmup 5 must be at most --relora-every 4"),
    (["--relora-every", "4", "--warm-start-steps", "0", "--warmup-steps", "5"],
     "error: --warmup-steps 5 must be at most --relora-every 4")]


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    """Each BAD_SETTINGS run, from one process (run_each): [(process, its --out-dir)]."""
    root = tmp_path_factory.mktemp("refused")
    procs = run_each([["train_relora.py", *NANO, *flags, "--out-dir", str(root / str(i))]
                      for i, (flags, _) in enumerate(BAD_SETTINGS)], check=False)
    return [(proc, root / str(i)) for i, proc in enumerate(procs)]


@pytest.mark.parametrize("i", range(len(BAD_SETTINGS)), ids=["restart-warmup", "prune-ratio", "switch-warmup",
                                                             "first-warmup"])
def test_bad_settings_are_one_line_errors(refused, i):
    proc, out = refused[i]
    assert error_of(proc) == BAD_SETTINGS[i][1] and not out.exists()
