import os
import sys
from functools import partial

import pytest

from conftest import official_cyclical_cosine, run, scheduler_lrs, train


def test_loss_falls_on_nano(tmp_path, shakespeare):
    result, log, _ = train("train_full.py", tmp_path, "--max-steps", "30", "--lr", "1e-2")
    assert [r["step"] for r in log] == list(range(1, 31))
    # the official schedule (GaLore's released scheduler over the whole run, stepped as their loop steps it): warmup
    # from lr 0 over 10% of the steps, cosine down to 0.1 of the peak
    official = partial(official_cyclical_cosine, num_warmup_steps=3, cycle_length=30, min_lr_ratio=0.1)
    assert [r["lr"] for r in log] == pytest.approx(scheduler_lrs(official, 1e-2, 30), rel=1e-12, abs=0)
    assert log[0]["lr"] == 0.0
    assert log[-1]["loss"] < log[0]["loss"] - 2.0  # from ~10.8 (uniform) towards unigram statistics
    assert result["val_ppl"] < 3000 and result["steps"] == 30 and result["tokens"] == 30 * 8 * 64
    # memory counted from the tensors: fp32 AdamW holds two moments per weight and a 4-byte step counter
    # per tensor (embedding, head, final norm, and per layer 2 norms + 7 matrices)
    assert result["weights_bytes"] == 4 * result["params"]["total"]
    assert result["optimizer_state_bytes"] == 2 * result["weights_bytes"] + 4 * (3 + 2 * 9)
    assert result["grads_bytes"] == result["weights_bytes"] and result["buffers_bytes"] == 0
    # model FLOPs: 6 per weight but the input embedding, plus attention's 12 L d T
    assert result["flops_per_token"] == 6 * (result["params"]["total"] - 50304 * 32) + 12 * 2 * 32 * 64
    assert result["precision"] == "fp32" and result["mfu"] is None  # no MFU on a CPU


def test_pure_bf16_trains_and_counts_two_bytes(tmp_path, shakespeare):
    # bf16 matmuls are slow on a CPU without bf16 units: short sequences, a small validation set
    result, log, _ = train("train_full.py", tmp_path, "--max-steps", "20", "--lr", "1e-2", "--precision", "bf16",
                           "--seq-len", "16", "--val-tokens", "256")
    assert log[-1]["loss"] < log[0]["loss"] - 1.0
    assert result["precision"] == "bf16" and result["weights_bytes"] == 2 * result["params"]["total"]
    # bf16 moments; torch keeps AdamW's step counters in fp32
    assert result["optimizer_state_bytes"] == 2 * result["weights_bytes"] + 4 * (3 + 2 * 9)


def test_mixed_precision_keeps_fp32_weights(tmp_path, shakespeare):
    result, log, _ = train("train_full.py", tmp_path, "--max-steps", "3", "--precision", "mixed")
    assert result["precision"] == "mixed" and result["weights_bytes"] == 4 * result["params"]["total"]


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    proc = run([sys.executable, "train_full.py", "--size", "60m", "--dry-run", "--out-dir", str(out)])
    assert "512 x 256 = 131,072 tokens/step (8 per micro-batch x 64 accumulated x 1 processes)" in proc.stdout
    assert "10,000 steps = 1,310,720,000 tokens | warmup 1000" in proc.stdout
    assert "eval every 1,000 on 156,416 tokens (the whole validation split)" in proc.stdout  # not 10,000,000
    assert f"checkpoint {out}/ckpt.pt: every 30 min, at the end and on SIGTERM or Ctrl-C" in proc.stdout
    assert not os.path.exists(out)
