"""The fused linear cross-entropy (``deltanet/models/loss.py``) against the plain loss (logits,
float32 log-softmax, ``F.cross_entropy``): values and gradients of hidden states and weight in
float64, float32, bf16 and under bf16 autocast, any chunk size (dividing the token count or not),
ignored labels, a scaled / accumulated loss, frozen inputs, and the model's default routing (fused
in training, logits in eval) with tied and untied embeddings. Label smoothing is not supported
(neither path of the model uses it)."""

import pytest
import torch
import torch.nn.functional as F

from deltanet.models import DeltaNetConfig, DeltaNetForCausalLM
from deltanet.models import loss as loss_module
from deltanet.models.loss import fused_linear_cross_entropy
from tests.utils import assert_close, rel_err


def plain_loss(h, w, y):
    """The path the fused loss replaces: full logits, float32 (at least) log-softmax."""
    logits = h @ w.t()
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y, ignore_index=-100)


def _inputs(N=37, D=16, V=53, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5
    y = torch.randint(0, V, (N,), generator=g)
    y[3:9] = -100
    y[-1] = -100
    return h.to(dtype), w.to(dtype), y


@pytest.fixture(params=["torch", "triton"])
def kernel(request, monkeypatch):
    """The chunk's softmax / gradient step: PyTorch, or the Triton row kernel (the GPU default;
    on CPU under the interpreter)."""
    if request.param == "triton" and torch.cuda.is_available():
        pytest.skip("these tests use CPU tensors; on a GPU the kernel runs in test_fused_loss_on_cuda_*")
    monkeypatch.setattr(loss_module, "KERNEL", request.param)
    return request.param


def _grads(fn, h, w, y):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fn(h, w, y)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 4096], ids=lambda c: f"chunk{c}")
def test_fused_equals_plain_in_float64(chunk):
    h, w, y = _inputs()
    want = _grads(plain_loss, h, w, y)
    got = _grads(lambda a, b, c: fused_linear_cross_entropy(a, b, c, chunk_size=chunk), h, w, y)
    for name, a, e in zip(("loss", "dh", "dw"), got, want):
        assert_close(name, a, e, rtol=1e-12)
    assert got[1][3:9].abs().max() == 0 and got[1][-1].abs().max() == 0  # ignored rows get no gradient


def test_fused_bf16_within_the_bf16_floor(kernel):
    """bf16 hidden states and weight (the bf16-parameter regime): the fused loss's errors against
    the float64 oracle are at most ~2x those of the plain bf16 path (bf16 logits, fp32 CE)."""
    h, w, y = _inputs(N=300, D=64, V=500)
    oracle = _grads(plain_loss, h, w, y)
    hb, wb = h.bfloat16(), w.bfloat16()
    base = _grads(plain_loss, hb, wb, y)
    got = _grads(lambda a, b, c: fused_linear_cross_entropy(a, b, c, chunk_size=64), hb, wb, y)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    for name, a, b, e in zip(("loss", "dh", "dw"), got, base, oracle):
        assert_close(name, a, e, baseline=b, floor=1e-3)


@pytest.mark.parametrize("chunk", [1, 7, 64, 300, 4096], ids=lambda c: f"chunk{c}")
def test_fused_float32_against_the_float64_oracle(chunk, kernel):
    """float32 hidden states and weight (float32 training on the CPU): the fused loss and both
    gradients are within the float32 rule of the float64 oracle, whatever the chunking (300
    tokens: 7 and 64 leave a partial last chunk), and as close as the plain float32 path."""
    h, w, y = _inputs(N=300, D=64, V=500)
    oracle = _grads(plain_loss, h, w, y)
    base = _grads(plain_loss, h.float(), w.float(), y)
    got = _grads(lambda a, b, c: fused_linear_cross_entropy(a, b, c, chunk_size=chunk), h.float(), w.float(), y)
    assert got[0].dtype == got[1].dtype == got[2].dtype == torch.float32
    for name, a, b, e in zip(("loss", "dh", "dw"), got, base, oracle):
        assert_close(name, a, e, rtol=1e-5)
        assert_close(name, a, e, baseline=b, floor=1e-6)


def test_fused_under_bf16_autocast_within_the_bf16_floor(kernel):
    """float32 parameters under bf16 autocast (the GPU training regime): the chunk GEMMs run in
    bf16 as ``lm_head`` would, so the errors against the float64 oracle are those of the plain
    path under the same autocast (at most ~2x), and gradients keep the parameters' dtype."""
    h, w, y = _inputs(N=300, D=64, V=500)
    oracle = _grads(plain_loss, h, w, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = _grads(lambda a, b, c: plain_loss_linear(a, b, c), h.float(), w.float(), y)
        got = _grads(lambda a, b, c: fused_linear_cross_entropy(a, b, c, chunk_size=64), h.float(), w.float(), y)
    assert got[1].dtype == got[2].dtype == torch.float32
    assert rel_err(base[0], oracle[0]) > 1e-5  # autocast did lower the plain path's precision
    for name, a, b, e in zip(("loss", "dh", "dw"), got, base, oracle):
        assert_close(name, a, e, baseline=b, floor=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: the default route of the fused loss on a GPU")
@pytest.mark.parametrize("regime", ["bf16", "autocast"])
def test_fused_loss_on_cuda_takes_the_kernel_within_the_bf16_floor(regime, monkeypatch):
    """At a GPU shape (2 chunks of 2048 + a partial one, a 32K vocabulary): the Triton row kernel is
    the route taken, and loss and gradients are as close to the float64 oracle as the plain path."""
    calls = []
    kernel = loss_module.softmax_cross_entropy_grad_
    monkeypatch.setattr(loss_module, "softmax_cross_entropy_grad_", lambda *a: calls.append(1) or kernel(*a))
    h, w, y = _inputs(N=4500, D=256, V=32000)
    w = w * 0.1
    oracle = _grads(plain_loss, h.cuda(), w.cuda(), y.cuda())
    pdt = torch.bfloat16 if regime == "bf16" else torch.float32
    hc, wc, yc = h.cuda().to(pdt), w.cuda().to(pdt), y.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=regime == "autocast"):
        base = _grads(plain_loss_linear, hc, wc, yc)
        got = _grads(fused_linear_cross_entropy, hc, wc, yc)
    assert len(calls) == 3  # one per chunk
    for name, a, b, e in zip(("loss", "dh", "dw"), got, base, oracle):
        assert_close(name, a, e, baseline=b, floor=1e-3)


def plain_loss_linear(h, w, y):
    """The model's plain path: ``F.linear`` (autocast casts it), then float32 cross-entropy."""
    logits = F.linear(h, w)
    return F.cross_entropy(logits.float(), y, ignore_index=-100)


def test_other_ignore_index_and_out_of_range_labels():
    h, w, y = _inputs()
    y = y.clamp_min(0)
    y[:5] = 7  # a real class chosen as the ignored one
    want = _grads(lambda a, b, c: F.cross_entropy(a @ b.t(), c, ignore_index=7), h, w, y)
    got = _grads(lambda a, b, c: fused_linear_cross_entropy(a, b, c, chunk_size=4, ignore_index=7), h, w, y)
    for name, a, e in zip(("loss", "dh", "dw"), got, want):
        assert_close(name, a, e, rtol=1e-12)
    # a label that is neither a class nor ignore_index fails, as in F.cross_entropy (not read as class 0)
    for bad in (-1, w.shape[0]):
        y[0] = bad
        with pytest.raises((RuntimeError, IndexError)):
            fused_linear_cross_entropy(h, w, y)


def test_scaled_and_accumulated_losses_backpropagate_their_weights():
    """Gradient accumulation scales each micro-batch's loss and adds the gradients of several
    calls on one weight: the saved gradients are scaled by the incoming one."""
    h, w, y = _inputs(N=40)
    h2, _, y2 = _inputs(N=23, seed=1)

    def run(loss_fn):
        a, b, w_ = h.clone().requires_grad_(), h2.clone().requires_grad_(), w.clone().requires_grad_()
        (0.25 * loss_fn(a, w_, y) + 0.75 * loss_fn(b, w_, y2)).backward()
        return a.grad, b.grad, w_.grad

    want = run(plain_loss)
    got = run(lambda a, b, c: fused_linear_cross_entropy(a, b, c, chunk_size=6))
    for name, a, e in zip(("dh1", "dh2", "dw"), got, want):
        assert_close(name, a, e, rtol=1e-12)


@pytest.mark.parametrize("frozen", ["hidden", "weight"])
def test_frozen_input_gets_no_gradient_and_the_other_the_plain_one(frozen):
    h, w, y = _inputs()
    want = _grads(plain_loss, h, w, y)
    hh, ww = h.clone().requires_grad_(frozen != "hidden"), w.clone().requires_grad_(frozen != "weight")
    loss = fused_linear_cross_entropy(hh, ww, y, chunk_size=8)
    loss.backward()
    assert_close("loss", loss.detach(), want[0], rtol=1e-12)
    if frozen == "hidden":
        assert hh.grad is None
        assert_close("dw", ww.grad, want[2], rtol=1e-12)
    else:
        assert ww.grad is None
        assert_close("dh", hh.grad, want[1], rtol=1e-12)


def test_all_ignored_gives_zero_loss_and_gradients(kernel):
    h, w, y = _inputs(dtype=torch.float32)
    loss, dh, dw = _grads(fused_linear_cross_entropy, h, w, torch.full_like(y, -100))
    assert loss == 0 and dh.abs().max() == 0 and dw.abs().max() == 0


def test_bad_shapes_are_named():
    h, w, y = _inputs()
    with pytest.raises(ValueError, match="share D"):
        fused_linear_cross_entropy(h, w[:, :-1], y)
    with pytest.raises(ValueError, match="labels"):
        fused_linear_cross_entropy(h, w, y[:-1])
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(h, w, y, chunk_size=0)


def _model(**kw):
    cfg = DeltaNetConfig(vocab_size=71, hidden_size=32, num_hidden_layers=2, num_heads=2, intermediate_size=64,
                         layer_types=["delta_net", "sliding_attention"], sliding_window=4, delta_backend="torch",
                         pad_token_id=0, bos_token_id=None, eos_token_id=None, **kw)
    torch.manual_seed(0)
    return DeltaNetForCausalLM(cfg).double().train()


def test_fused_loss_is_the_model_default():
    assert DeltaNetConfig().fuse_linear_cross_entropy
    assert DeltaNetConfig(fuse_linear_cross_entropy=False).fuse_linear_cross_entropy is False


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_model_fused_loss_in_training_only(tied):
    fused, plain = _model(tie_word_embeddings=tied), _model(fuse_linear_cross_entropy=False, tie_word_embeddings=tied)
    assert (fused.lm_head.weight is fused.model.embed_tokens.weight) == tied
    ids = torch.randint(1, 71, (3, 11))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2, 7] = -100
    a, b = plain(ids, labels=labels), fused(ids, labels=labels)
    assert b.logits is None and a.logits is not None
    assert_close("loss", b.loss, a.loss, rtol=1e-12)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        assert_close(name, q.grad, p.grad, rtol=1e-10)
    # eval mode, or no autograd: logits and the same loss
    with torch.no_grad():
        c = fused(ids, labels=labels)
    d = fused.eval()(ids, labels=labels)
    for out in (c, d):
        assert out.logits is not None
        assert_close("loss", out.loss, a.loss, rtol=1e-12)
