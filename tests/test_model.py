import math

import pytest
import torch

import model
from model import RANKS, SIZES, Llama, compressible_matrices, estimate_bytes, param_counts


def expected_params(cfg):
    """Counted by hand: q,k,v,o (d x d), gate,up (ff x d), down (d x ff), two norms per layer;
    embedding and head (V x d each, untied); the final norm."""
    d, ff, V = cfg.n_embd, cfg.n_ff, cfg.vocab_size
    per_layer = 4 * d * d + 3 * d * ff + 2 * d
    return 2 * V * d, cfg.n_layer * per_layer + d


@pytest.mark.parametrize("size", list(SIZES))
def test_parameter_counts_of_every_size(size):
    cfg = SIZES[size]
    with torch.device("meta"):  # 7b never allocates
        m = Llama(cfg)
    emb, non_emb = expected_params(cfg)
    assert param_counts(m) == {"embedding": emb, "non_embedding": non_emb, "total": emb + non_emb}
    mats = compressible_matrices(m)
    assert len(mats) == 7 * cfg.n_layer
    assert {tuple(lin.weight.shape) for _, lin in mats} == {
        (cfg.n_embd, cfg.n_embd), (cfg.n_ff, cfg.n_embd), (cfg.n_embd, cfg.n_ff)}
    assert RANKS[size] <= cfg.n_embd


def test_benchmark_sizes_match_the_papers_configs():
    # LLaMA configs of GaLore/Fira (d, ff, heads, layers)
    assert [(c.n_embd, c.n_ff, c.n_head, c.n_layer) for k, c in SIZES.items() if k not in ("nano", "mini", "tiny")] == [
        (512, 1376, 8, 8), (768, 2048, 12, 12), (1024, 2736, 16, 24), (2048, 5461, 32, 24), (4096, 11008, 32, 32)]
    assert 1e6 < param_counts(Llama(SIZES["tiny"]))["non_embedding"] < 1e7


def compressible_share(size, vocab_size):
    with torch.device("meta"):
        m = Llama(model.get_config(size, vocab_size))
    return sum(lin.weight.numel() for _, lin in compressible_matrices(m)) / param_counts(m)["total"]


def test_mini_is_the_papers_regime_in_miniature():
    """Its matrices hold at least the share they hold at 1b with T5's vocabulary (90%), on UTF-8 bytes; r = d/4,
    head dim 64 and n_ff / d as the papers' 60m."""
    mini, s60 = SIZES["mini"], SIZES["60m"]
    assert model.get_config("mini", 257).vocab_size == 320  # padded to a multiple of 64, as GPT-2's 50257 -> 50304
    assert compressible_share("mini", 257) >= compressible_share("1b", 32000) > 0.90
    assert compressible_share("tiny", 50257) < 0.12  # where the benchmark stood before: the head and embedding
    assert RANKS["mini"] * 4 == mini.n_embd and mini.n_embd // mini.n_head == s60.n_embd // s60.n_head == 64
    assert mini.n_ff / mini.n_embd == s60.n_ff / s60.n_embd
    assert model.RECIPES["mini"].dataset == "shakespeare-bytes"


def test_the_vocabulary_follows_the_dataset():
    assert [model.get_config("nano", v).vocab_size for v in (257, 32000, 50257, None)] == [320, 32000, 50304, 50304]
    # the papers' 1b on T5's 32,000 tokens: weights + Adam moments 3 N, bf16, N by hand
    d, ff, L, V = 2048, 5461, 24, 32000
    n = 2 * V * d + L * (4 * d * d + 3 * d * ff + 2 * d) + d
    full = estimate_bytes("1b", "full", "bf16", None, V)
    assert full["weights_bytes"] + full["optimizer_state_bytes"] == 2 * 3 * n
    assert abs(2 * 3 * n / 1e9 - 8.04) < 0.01  # the companion paper's Adam row at 1b: 8.04 GB
    # and the memory column of Glentis et al. at 1b (weights + states, GB): low-rank 3.66, GaLore and Fira 4.76
    for method, paper in (("lowrank", 3.66), ("galore", 4.76), ("fira", 4.76)):
        est = estimate_bytes("1b", method, "bf16", None, V)
        assert round((est["weights_bytes"] + est["optimizer_state_bytes"]) / 1e9, 2) == paper, method


def test_a_model_of_the_papers_vocabulary_trains_a_step():
    """T5's 32,000 ids (data.py --tokenizer t5): the embedding and head follow, and a step lowers the loss."""
    torch.manual_seed(0)
    m = Llama(model.get_config("nano", 32000))
    assert m.embed.weight.shape[0] == m.head.weight.shape[0] == 32000
    idx = torch.randint(0, 32000, (2, 17))
    optimizer = torch.optim.AdamW(m.parameters(), lr=1e-2)
    _, before = m(idx[:, :-1], idx[:, 1:])
    assert abs(before.item() - math.log(32000)) < 0.05
    before.backward()
    optimizer.step()
    assert m(idx[:, :-1], idx[:, 1:])[1] < before - 0.1


def test_forward_shapes_and_initial_loss():
    torch.manual_seed(0)
    m = Llama(SIZES["nano"])
    idx = torch.randint(0, 50257, (3, 17))
    logits, _ = m(idx)
    assert logits.shape == (3, 17, 50304)
    none, loss = m(idx, idx)  # the loss comes without the logits (model.chunked_cross_entropy)
    assert none is None
    # small init -> near-uniform prediction over the padded vocabulary
    assert abs(loss.item() - math.log(50304)) < 0.05


def test_model_is_causal():
    torch.manual_seed(0)
    m = Llama(SIZES["nano"])
    idx = torch.randint(0, 50257, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 50257
    a, _ = m(idx)
    b, _ = m(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_unknown_size_is_a_one_line_error():
    with pytest.raises(SystemExit) as e:
        model.get_config("huge")
    assert str(e.value) == "error: unknown --size 'huge'; valid sizes: nano, mini, tiny, 60m, 130m, 350m, 1b, 7b"


def test_memory_estimate_of_60m_by_hand():
    # 60m: d 512, ff 1376, 8 layers, r 128; 51,520,000 parameters outside the 7 matrices per layer
    # (embedding + head 2 x 50304 x 512, norms 17 x 512) and 8 x 3,162,112 inside them.
    n_total, n_other = 76_816_896, 51_520_000
    assert estimate_bytes("60m", "full") == {"weights_bytes": 2 * n_total, "grads_bytes": 2 * n_total,
                                             "optimizer_state_bytes": 4 * n_total, "buffers_bytes": 0}
    # GaLore: per layer q,k,v,o: 2*512*128 moments + 512*128 projector; gate, up, down: 2*1376*128 + 512*128
    galore_states = 2 * n_other + 8 * (4 * (2 * 512 * 128 + 512 * 128) + 3 * (2 * 1376 * 128 + 512 * 128))
    assert estimate_bytes("60m", "galore") == {"weights_bytes": 2 * n_total, "grads_bytes": 2 * n_total,
                                               "optimizer_state_bytes": 2 * galore_states, "buffers_bytes": 0}
    assert estimate_bytes("60m", "fira")["optimizer_state_bytes"] == 2 * (galore_states + 8 * 7)
    # low-rank: r (m + n) per matrix for the weights and for each of the two moments
    lowrank = n_other + 8 * (4 * 128 * (512 + 512) + 3 * 128 * (512 + 1376))
    assert estimate_bytes("60m", "lowrank") == {"weights_bytes": 2 * lowrank, "grads_bytes": 2 * lowrank,
                                                "optimizer_state_bytes": 4 * lowrank, "buffers_bytes": 0}
    galore = estimate_bytes("60m", "galore")
    assert galore["weights_bytes"] + galore["optimizer_state_bytes"] == 392_350_720


def test_memory_estimate_scales_with_precision_and_the_runs_rank():
    bf16, fp32 = estimate_bytes("60m", "lowrank", "bf16"), estimate_bytes("60m", "lowrank", "mixed")
    assert all(fp32[k] == 2 * bf16[k] for k in bf16)
    # a run's own rank (from its result.json or banner) replaces the size's default
    assert estimate_bytes("60m", "lowrank", "bf16", {"rank": 64})["weights_bytes"] < bf16["weights_bytes"]


def test_flops_per_token_counts_trained_frozen_and_attention():
    torch.manual_seed(0)
    m = Llama(SIZES["nano"])
    cfg, T = SIZES["nano"], 64
    trained = sum(p.numel() for p in m.parameters()) - m.embed.weight.numel()
    assert model.flops_per_token(m, T) == 6 * trained + 12 * cfg.n_layer * cfg.n_embd * T
    m.head.weight.requires_grad_(False)  # a frozen weight costs its forward and input gradient only
    assert model.flops_per_token(m, T) == 6 * trained - 2 * m.head.weight.numel() + 12 * cfg.n_layer * cfg.n_embd * T


def test_peak_flops_table():
    assert model.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert model.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert model.peak_bf16_flops("NVIDIA H200") == 989e12
    assert model.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert model.peak_bf16_flops("NVIDIA GeForce GTX 1080") is None
