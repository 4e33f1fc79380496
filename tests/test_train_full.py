import json
import os
import sys

from conftest import NANO, assert_resume_is_exact, run, train


def test_loss_falls_on_nano(tmp_path, shakespeare):
    result, log, _ = train("train_full.py", tmp_path, "--max-steps", "30", "--lr", "1e-2")
    assert [r["step"] for r in log] == list(range(1, 31))
    assert log[-1]["loss"] < log[0]["loss"] - 2.0  # from ~10.8 (uniform) towards unigram statistics
    assert result["val_ppl"] < 3000 and result["steps"] == 30 and result["tokens"] == 30 * 8 * 64
    # memory counted from the tensors: fp32 AdamW holds two moments per weight and a 4-byte step counter
    # per tensor (embedding, head, final norm, and per layer 2 norms + 7 matrices)
    assert result["weights_bytes"] == 4 * result["params"]["total"]
    assert result["optimizer_state_bytes"] == 2 * result["weights_bytes"] + 4 * (3 + 2 * 9)
    assert result["grads_bytes"] == result["weights_bytes"]


def test_resume_continues_bit_for_bit(tmp_path, shakespeare):
    assert_resume_is_exact("train_full.py", tmp_path, "--lr", "3e-3", steps=10)


def test_ddp_two_processes_on_cpu(tmp_path, shakespeare):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           "train_full.py", *NANO, "--max-steps", "3", "--out-dir", str(tmp_path)]
    proc = run(cmd)
    result = json.load(open(tmp_path / "result.json"))
    assert result["world_size"] == 2 and result["tokens"] == 3 * 2 * 8 * 64
    assert proc.stdout.count("val loss") == 1  # only rank 0 reports


def test_bad_size_is_a_one_line_error(tmp_path):
    proc = run([sys.executable, "train_full.py", "--size", "huge", "--out-dir", str(tmp_path)], check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip() == "error: unknown --size 'huge'; valid sizes: nano, tiny, 60m, 130m, 350m, 1b, 7b"


def test_missing_dataset_is_a_one_line_error(tmp_path):
    proc = run([sys.executable, "train_full.py", *NANO, "--dataset", "c4", "--out-dir", str(tmp_path / "o")],
               check=False, env={"DATA_DIR": str(tmp_path)})
    assert proc.returncode != 0
    assert proc.stderr.strip() == "error: dataset 'c4' is not prepared; run: python data.py c4"


def test_resume_without_checkpoint_is_a_one_line_error(tmp_path):
    proc = run([sys.executable, "train_full.py", *NANO, "--resume", "--out-dir", str(tmp_path)], check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip() == f"error: --resume given but there is no checkpoint at {tmp_path}/ckpt.pt"
