import math

import pytest
import torch

import model
from model import RANKS, SIZES, Llama, compressible_matrices, estimate_bf16_bytes, param_counts


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
    assert [(c.n_embd, c.n_ff, c.n_head, c.n_layer) for k, c in SIZES.items() if k not in ("nano", "tiny")] == [
        (512, 1376, 8, 8), (768, 2048, 12, 12), (1024, 2736, 16, 24), (2048, 5461, 32, 24), (4096, 11008, 32, 32)]
    assert 1e6 < param_counts(Llama(SIZES["tiny"]))["non_embedding"] < 1e7


def test_forward_shapes_and_initial_loss():
    torch.manual_seed(0)
    m = Llama(SIZES["nano"])
    idx = torch.randint(0, 50257, (3, 17))
    logits, loss = m(idx, idx)
    assert logits.shape == (3, 17, 50304)
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
    assert str(e.value) == "error: unknown --size 'huge'; valid sizes: nano, tiny, 60m, 130m, 350m, 1b, 7b"
