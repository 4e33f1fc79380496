"""The memory a training step really takes: the loss without the B x T x V logits, activation checkpointing, and
the measured peak of live tensor bytes."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import model as model_py
from model import SIZES, Llama

CHUNK = 64  # tokens per chunk of the loss in these tests (model.LOSS_CHUNK is 512): a few chunks of a small batch
SMALL = replace(SIZES["nano"], vocab_size=1024)  # nano with a vocabulary that bf16 matmuls on a CPU do quickly


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """nano's ops are too small for two threads to pay for their synchronization (as conftest.FAST_CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loss_and_grads(model, idx, y, chunked):
    """The loss and every parameter's gradient (in fp32), by the chunked loss or by today's full fp32 logits."""
    model.zero_grad(set_to_none=True)
    loss = model(idx, y)[1] if chunked else F.cross_entropy(model(idx)[0].flatten(0, 1), y.flatten())
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


@pytest.fixture
def batch(monkeypatch):
    monkeypatch.setattr(model_py, "LOSS_CHUNK", CHUNK)
    g = torch.Generator().manual_seed(1)
    idx, y = torch.randint(0, SMALL.vocab_size, (2, 3, 50), generator=g)  # two full chunks and a part of one
    y[0, 20:] = y[2, 45:] = model_py.IGNORE  # the pads of documents mode: a document's tail, inside chunks
    return idx, y


def test_chunked_loss_matches_the_full_logits_in_fp32_and_bf16(batch):
    """Against F.cross_entropy, whose ignore_index is IGNORE: the mean over the scored tokens, no gradient from pads."""
    torch.manual_seed(0)
    model = Llama(SMALL)
    full_loss, truth = loss_and_grads(model, *batch, chunked=False)
    loss, grads = loss_and_grads(model, *batch, chunked=True)
    # fp32: the same to rounding (measured: loss 1e-6, gradients 5e-7 of their largest entry)
    assert abs(loss - full_loss) < 1e-5
    for n in truth:
        torch.testing.assert_close(grads[n], truth[n], rtol=0, atol=1e-5 * truth[n].abs().max().item())
    # pure bf16: the chunked loss is about as far from the fp32 gradients as the full bf16 logits are (both 0.4-1.1%
    # of the largest entry, bf16's 8 bits; the head's gradient, summed over bf16 chunks, up to 1.25x), the losses
    # the same to 1e-4
    model.to(torch.bfloat16)
    bf16_loss, bf16 = loss_and_grads(model, *batch, chunked=False)
    loss, grads = loss_and_grads(model, *batch, chunked=True)
    assert abs(loss - bf16_loss) < 1e-4 and abs(loss - full_loss) < 1e-3
    for n in truth:
        scale = truth[n].abs().max()
        err_full, err_chunked = ((g[n] - truth[n]).abs().max() / scale for g in (bf16, grads))
        assert err_chunked <= 1.5 * err_full + 1e-3 and err_chunked < 0.02, n
    # a batch of pads only: loss 0 and no gradient, where F.cross_entropy gives 0/0
    h = torch.randn(4, 8, requires_grad=True)
    loss = model_py.ChunkedCrossEntropy.apply(h, torch.randn(16, 8), torch.full((4,), model_py.IGNORE))
    loss.backward()
    assert loss.item() == 0 and not h.grad.any()


def saved_bytes_and_grads(model, idx):
    """Bytes of activations the forward keeps for the backward (outside checkpointed blocks; weights and buffers
    not counted), the loss and every gradient."""
    model.zero_grad(set_to_none=True)
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            saved.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(idx, idx)[1]
    loss.backward()
    return sum(saved), loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def method_models():
    """nano as each script's surgery leaves it: full-rank, SLTrain (its own autograd Function), LoRA (frozen W0,
    B made non-zero as after training), low-rank B A."""
    from conftest import definitions, nano_with
    sl, lora, lowrank = (definitions(f"train_{m}.py") for m in ("sltrain", "relora", "lowrank_refactor"))

    def sparse(i, linear):
        m, n = linear.weight.shape
        return sl["SparseLowRankLinear"](m, n, 8, 32, sl["draw_support"](m, n, int(0.1 * m * n), 0, i))

    def lora_layer(i, linear):
        layer = lora["LoRALinear"](linear.weight, 8, 32)
        torch.nn.init.normal_(layer.B, std=0.02)
        return layer

    torch.manual_seed(0)
    yield "full", Llama(SIZES["nano"])
    yield "sltrain", nano_with(sparse)[0]
    yield "lora", nano_with(lora_layer)[0]
    yield "lowrank", nano_with(lambda i, linear: lowrank["LowRankLinear"](*linear.weight.shape, 8, 32))[0]


def test_activation_checkpointing_gives_the_same_gradients_for_every_method():
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(2))
    for name, model in method_models():
        kept, loss, grads = saved_bytes_and_grads(model, idx)
        model.checkpointing = True
        kept_ckpt, loss_ckpt, grads_ckpt = saved_bytes_and_grads(model, idx)
        assert kept_ckpt < kept / 2, name  # the blocks' activations are no longer kept
        assert loss_ckpt == loss and grads_ckpt.keys() == grads.keys(), name
        for n in grads:  # the recomputed forward is the same computation: equal to rounding
            torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=1e-6, atol=1e-9, msg=f"{name} {n}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_adamw_takes_the_for_loop_step(dtype):
    """Every script that steps torch.optim.AdamW asks for the fused kernel, whose update is the for-loop's to an ulp
    in fp32 (measured: 1 ulp on 2% of the entries); in bf16 the fused kernel rounds once a step and the loop after
    each of its ops, so they part by a few ulps in 5 steps (measured: 0.8% of the entries, at most 2.5 ulps of the
    largest)."""
    from conftest import ROOT, SCRIPTS
    for script in SCRIPTS:
        text = open(f"{ROOT}/{script}").read()
        assert text.count("torch.optim.AdamW(") == text.count("fused=True)"), script
    torch.manual_seed(0)
    weights = [torch.randn(64, 48, dtype=dtype), torch.randn(48, dtype=dtype)]
    fused, loop = ([torch.nn.Parameter(w.clone()) for w in weights] for _ in range(2))
    optimizers = [torch.optim.AdamW(fused, lr=1e-2, weight_decay=0.1, fused=True),
                  torch.optim.AdamW(loop, lr=1e-2, weight_decay=0.1)]
    for _ in range(5):
        for a, b in zip(fused, loop):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        for opt in optimizers:
            opt.step()
    for a, b in zip(fused, loop):
        ulps = 1 if dtype == torch.float32 else 4
        torch.testing.assert_close(a, b, rtol=0, atol=ulps * torch.finfo(dtype).eps * b.detach().abs().max().item())
        assert not torch.equal(a, weights[0] if a.dim() == 2 else weights[1])  # they moved


def test_peak_tensor_bytes_by_hand():
    from model import PeakTensorBytes
    with PeakTensorBytes() as p:
        a = torch.zeros(1000)  # 4000 bytes
        b = a + 1  # 8000
        view = b.view(10, 100)
        b.add_(1)  # a view and an in-place op allocate nothing
        assert (p.live, p.peak) == (8000, 8000)
        del b
        assert p.live == 8000  # the view keeps b's storage
        del view
        c = torch.ones(250, dtype=torch.float64)  # 2000
        assert (p.live, p.peak) == (6000, 8000)
        del a, c
    assert p.live == 0
    # one training step of y = x W^T, loss = sum y^2, with W (m x n) and x (B x n) alive before
    m, n, B = 64, 32, 16
    W, x = torch.nn.Parameter(torch.randn(m, n)), torch.randn(B, n)
    with PeakTensorBytes() as p:
        loss = (x @ W.T).square().sum()
        # y (kept for the square's backward), y^2 (freed once summed) and the 4-byte loss
        assert (p.live, p.peak) == (4 * B * m + 4, 8 * B * m + 4)
        loss.backward()
        assert p.live == 4 * m * n + 4  # W.grad and the loss
        # W.grad = dy^T x is made while y and dy = 2 y dL are alive (and the two 4-byte dL/dloss, dL/dy^2's)
        assert p.peak == 4 * m * n + 8 * B * m + 8
        W.grad = None
        del loss
    assert p.live == 0


def test_a_training_step_peaks_above_its_tensors_and_the_chunked_loss_cuts_the_logits(monkeypatch):
    """On nano with a 4096-token vocabulary, 1024 tokens, chunks of 128: the step's peak (weights, gradients, AdamW's
    two moments, activations) with the chunked loss is below the full fp32 logits' by more than the logits' bytes,
    and after the step exactly the weights and the states are left."""
    from model import PeakTensorBytes, memory_report
    monkeypatch.setattr(model_py, "LOSS_CHUNK", 128)
    cfg = replace(SIZES["nano"], vocab_size=4096)
    idx, y = torch.randint(0, cfg.vocab_size, (2, 4, 256), generator=torch.Generator().manual_seed(3))
    peaks = {}
    for chunked in (False, True):
        torch.manual_seed(0)
        model = Llama(cfg)
        optimizer = torch.optim.AdamW(model.parameters(), fused=True)
        weights = sum(memory_report(model, optimizer).values())
        with PeakTensorBytes() as p:
            loss = model(idx, y)[1] if chunked else F.cross_entropy(model(idx)[0].flatten(0, 1), y.flatten())
            loss.backward()
            del loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        after = memory_report(model, optimizer)
        assert p.live == after["optimizer_state_bytes"] == 2 * weights + 4 * len(optimizer.state)  # + 4-byte steps
        peaks[chunked] = weights + p.peak
        assert peaks[chunked] > 4 * weights  # weights, gradients and two moments at once, and activations
    logits = idx.numel() * cfg.vocab_size * 4
    assert peaks[False] - peaks[True] > logits
