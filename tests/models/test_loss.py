"""The fused linear cross-entropy (``deltanet/models/loss.py``) against the plain loss (logits,
float32 log-softmax, ``F.cross_entropy``): values and gradients, float64 and bf16, and the
model's default routing (fused in training, logits in eval)."""

import pytest
import torch
import torch.nn.functional as F

from deltanet.models import DeltaNetConfig, DeltaNetForCausalLM
from deltanet.models.loss import fused_linear_cross_entropy
from tests.utils import assert_close


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


def test_fused_bf16_within_the_bf16_floor():
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


def test_all_ignored_gives_zero_loss_and_gradients():
    h, w, y = _inputs()
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


def test_model_fused_loss_in_training_only():
    fused, plain = _model(fuse_linear_cross_entropy=True), _model(fuse_linear_cross_entropy=False)
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
