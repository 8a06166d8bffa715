"""The training core: schedule values, parameter groups, accumulation, clipping, autocast, and
the eager side of the captured step (the graph side runs in tests/evaluation/test_train_step.py)."""

from __future__ import annotations

import math

import pytest
import torch

from deltanet.training.core import (AdamWConfig, CapturedStep, LRSchedule, amp_dtype, autocast, build_adamw,
                                    clip_grads, decay_groups, lr_at, set_lr, train_step)

CPU = torch.device("cpu")


# -- schedule --------------------------------------------------------------------------------


def test_cosine_schedule_at_key_steps():
    s = LRSchedule(peak=2e-3, total_steps=110, warmup=10, min_ratio=0.1)
    # warm-up: linear from peak/warmup to exactly peak at the last warm-up step
    assert [s.lr(t) for t in (0, 4, 9)] == [2e-3 * 0.1, 2e-3 * 0.5, 2e-3]
    assert s.lr(10) == 2e-3  # cosine starts at the peak
    assert s.lr(60) == pytest.approx(2e-3 * (0.1 + 0.9 * 0.5), rel=1e-12)  # half-way: the mid-point
    assert s.lr(35) == pytest.approx(2e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))), rel=1e-12)
    assert s.lr(110) == pytest.approx(2e-4, rel=1e-12)  # the floor at total_steps ...
    assert s.lr(500) == s.lr(110)  # ... and after it
    lrs = [s.lr(t) for t in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay


def test_cosine_to_zero_and_constant_shapes():
    s = LRSchedule(peak=1.0, total_steps=8, warmup=3)
    assert s.lr(8) == 0.0 and s.lr(3) == 1.0
    c = LRSchedule(peak=1.0, total_steps=8, warmup=3, shape="constant")
    assert [c.lr(t) for t in range(10)] == [1 / 3, 2 / 3, 1.0] + [1.0] * 7


def test_no_warmup_and_progress_override():
    s = LRSchedule(peak=1.0, total_steps=10, warmup=0, min_ratio=0.0)
    assert s.lr(0) == 1.0
    # a wall-clock budget drives the position after warm-up; it is clamped to [0, 1]
    assert s.lr(1, progress=0.5) == pytest.approx(0.5, rel=1e-12)
    assert s.lr(1, progress=1.7) == 0.0 and s.lr(9, progress=-0.2) == 1.0
    w = LRSchedule(peak=1.0, total_steps=10, warmup=4)
    assert w.lr(2, progress=0.9) == 0.75  # during warm-up the progress is ignored


def test_lr_at_is_the_schedule_and_within_an_ulp_of_the_old_formula():
    for lr, total, warmup, ratio in ((6e-3, 300, 10, 0.1), (3e-3, 6, 3, 0.1), (1e-3, 50, 7, 0.0)):
        s = LRSchedule(lr, total, warmup, ratio)
        for t in range(total + 2):
            assert lr_at(t, total, lr, warmup, ratio) == s.lr(t)
            if t < warmup:  # the form used before the core: lr * (t + 1) / warmup
                assert s.lr(t) == pytest.approx(lr * (t + 1) / warmup, rel=2.3e-16, abs=0)


@pytest.mark.parametrize("kw, match", [
    (dict(peak=0.0), "peak"), (dict(total_steps=0), "total_steps"), (dict(warmup=-1), "warmup"),
    (dict(min_ratio=1.5), "min_ratio"), (dict(shape="linear"), "shape"),
], ids=["peak", "total", "warmup", "ratio", "shape"])
def test_schedule_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        LRSchedule(**{**dict(peak=1.0, total_steps=10), **kw})


# -- optimiser -------------------------------------------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.lin = torch.nn.Linear(4, 4)  # weight decays, bias does not
        self.norm = torch.nn.LayerNorm(4)
        self.conv = torch.nn.Conv1d(4, 4, 3, groups=4, bias=False)  # 3-D: decays
        self.gain = torch.nn.Parameter(torch.ones(()))  # scalar: no decay
        self.frozen = torch.nn.Parameter(torch.ones(4, 4), requires_grad=False)


def test_weight_decay_on_matrices_only():
    net = _Net()
    groups = decay_groups(net.parameters(), 0.1)
    names = {id(p): n for n, p in net.named_parameters()}
    assert [names[id(p)] for p in groups[0]["params"]] == ["emb.weight", "lin.weight", "conv.weight"]
    assert [names[id(p)] for p in groups[1]["params"]] == ["gain", "lin.bias", "norm.weight", "norm.bias"]
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (0.1, 0.0)


def test_build_adamw_carries_the_callers_numbers():
    net = _Net()
    opt = build_adamw(net.parameters(), AdamWConfig(lr=3e-3, weight_decay=0.05, betas=(0.9, 0.98), eps=1e-6),
                      device=CPU)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    for g in opt.param_groups:
        assert g["lr"] == 3e-3 and g["betas"] == (0.9, 0.98) and g["eps"] == 1e-6 and not g["fused"]
    set_lr(opt, 1e-4)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-4]


def test_capturable_adamw_keeps_a_tensor_lr_that_set_lr_fills_in_place():
    opt = build_adamw(_Net().parameters(), AdamWConfig(lr=1e-3), device=CPU, capturable=True)
    tensors = [g["lr"] for g in opt.param_groups]
    assert all(isinstance(t, torch.Tensor) for t in tensors) and tensors[0] is not tensors[1]
    set_lr(opt, 5e-4)
    assert all(g["lr"] is t for g, t in zip(opt.param_groups, tensors))  # the same tensors: a graph reads them
    assert [float(t) for t in tensors] == [torch.tensor(5e-4).item()] * 2


@pytest.mark.parametrize("kw, match", [
    (dict(lr=-1.0), "lr"), (dict(weight_decay=-0.1), "weight_decay"), (dict(betas=(0.9, 1.0)), "betas"),
    (dict(eps=0.0), "eps"),
], ids=["lr", "wd", "betas", "eps"])
def test_adamw_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        AdamWConfig(**{"lr": 1e-3, **kw})


# -- autocast --------------------------------------------------------------------------------


def test_amp_dtype_by_device():
    assert amp_dtype(CPU) is None and amp_dtype(torch.device("cuda")) is torch.bfloat16
    assert amp_dtype(CPU, "bfloat16") is torch.bfloat16 and amp_dtype(torch.device("cuda"), "float32") is None
    with pytest.raises(ValueError, match="dtype"):
        amp_dtype(CPU, "fp16")


def test_autocast_context():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(CPU, None):
        assert (a @ b).dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast(CPU, None):  # float32 means float32
        assert (a @ b).dtype == torch.float32
    with autocast(CPU, torch.bfloat16, cache=False):
        assert (a @ b).dtype == torch.bfloat16 and not torch.is_autocast_cache_enabled()
    with autocast(CPU, torch.bfloat16):
        assert torch.is_autocast_cache_enabled()


# -- the step --------------------------------------------------------------------------------


class _Recorder(torch.optim.Optimizer):
    """Records the gradients it is asked to apply, and applies nothing."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})
        self.seen: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.seen.append([p.grad.clone() for g in self.param_groups for p in g["params"]])


def _model_and_data():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    return model, torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)


def test_two_half_batches_accumulate_to_the_full_batch_gradient():
    model, x, y = _model_and_data()
    opt = _Recorder(model.parameters())
    loss = lambda xs, ys: torch.nn.functional.mse_loss(model(xs), ys)  # noqa: E731
    full = train_step(opt, model.parameters(), lambda m: loss(x, y))
    halves = train_step(opt, model.parameters(), lambda m: loss(x[8 * m:8 * (m + 1)], y[8 * m:8 * (m + 1)]), accum=2)
    for g_full, g_acc in zip(*opt.seen):
        torch.testing.assert_close(g_acc, g_full, rtol=1e-12, atol=1e-14)
    assert float(halves.loss) == pytest.approx(float(full.loss), rel=1e-12)
    assert float(halves.grad_norm) == pytest.approx(float(full.grad_norm), rel=1e-12)
    # and a single half is not the full batch (the check above can fail)
    train_step(opt, model.parameters(), lambda m: loss(x[:8], y[:8]))
    assert not torch.allclose(opt.seen[2][0], opt.seen[0][0])


def test_clipping_scales_to_max_norm_and_reports_the_norm_before():
    model, x, y = _model_and_data()
    opt = _Recorder(model.parameters())
    step = lambda **kw: train_step(opt, model.parameters(),  # noqa: E731
                                   lambda m: 100 * torch.nn.functional.mse_loss(model(x), y), **kw)
    free = step(grad_clip=0.0)
    raw = torch.cat([g.flatten() for g in opt.seen[-1]]).norm()
    assert float(free.grad_norm) == pytest.approx(float(raw), rel=1e-12) and float(raw) > 1.0
    clipped = step(grad_clip=1.0)
    after = torch.cat([g.flatten() for g in opt.seen[-1]])
    assert float(clipped.grad_norm) == pytest.approx(float(raw), rel=1e-12)  # the norm before clipping
    assert float(after.norm()) == pytest.approx(1.0, rel=1e-6)
    torch.testing.assert_close(after, torch.cat([g.flatten() for g in opt.seen[0]]) / raw, rtol=1e-6, atol=0)
    roomy = step(grad_clip=10 * float(raw))  # a norm under the limit is left alone
    for g, g0 in zip(opt.seen[-1], opt.seen[0]):
        assert torch.equal(g, g0)
    assert float(roomy.grad_norm) == pytest.approx(float(raw), rel=1e-12)
    assert step(grad_clip=0.0, measure_norm=False).grad_norm is None


def test_clip_grads_skips_parameters_without_gradient():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    a.grad = torch.full((3,), 4.0)
    assert float(clip_grads([a, b], 0.0)) == pytest.approx(math.sqrt(48))
    assert float(clip_grads([a, b], 1.0)) == pytest.approx(math.sqrt(48)) and b.grad is None
    assert float(a.grad.norm()) == pytest.approx(1.0, rel=1e-6)


def test_step_updates_zeroes_and_syncs_only_the_last_micro_batch():
    model, x, y = _model_and_data()
    opt = build_adamw(model.parameters(), AdamWConfig(lr=1e-2), device=CPU)
    before = [p.detach().clone() for p in model.parameters()]
    seen = []

    class Sync:
        def __init__(self, last):
            self.last = last

        def __enter__(self):
            seen.append(self.last)

        def __exit__(self, *exc):
            return False

    train_step(opt, model.parameters(), lambda m: torch.nn.functional.mse_loss(model(x), y), accum=3, sync=Sync)
    assert seen == [False, False, True]
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none=True)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    train_step(opt, model.parameters(), lambda m: torch.nn.functional.mse_loss(model(x), y), zero_grad=False)
    assert all(p.grad is not None for p in model.parameters())  # kept: a captured step's static buffers
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="accum"):
            train_step(opt, model.parameters(), lambda m: model(x).sum(), accum=bad)


def test_params_are_read_after_the_backward():
    """FSDP2 registers other tensors as the module's parameters between forward and backward
    (and leaves the root unsharded after a no-grad forward): the list to clip is taken when the
    gradients exist, not before the forward."""
    model, x, y = _model_and_data()
    opt = _Recorder(model.parameters())
    events = []

    class LateParams:
        def __iter__(self):
            events.append("params")
            return iter(model.parameters())

    def loss(m):
        events.append("forward")
        return 100 * torch.nn.functional.mse_loss(model(x), y)

    out = train_step(opt, LateParams(), loss, accum=2, grad_clip=1.0)
    assert events == ["forward", "forward", "params"]
    assert float(torch.cat([g.flatten() for g in opt.seen[-1]]).norm()) == pytest.approx(1.0, rel=1e-6)
    assert float(out.grad_norm) > 1.0


def test_eager_captured_step_zeroes_then_runs_the_body():
    model, x, y = _model_and_data()
    opt = build_adamw(model.parameters(), AdamWConfig(lr=1e-2), device=CPU)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.full_like(p, 7.0)  # stale gradients must not leak into the first step

    def body():
        return train_step(opt, params, lambda m: torch.nn.functional.mse_loss(model(x), y), zero_grad=False).loss

    ref_model, _, _ = _model_and_data()
    ref_opt = build_adamw(ref_model.parameters(), AdamWConfig(lr=1e-2), device=CPU)
    step = CapturedStep(body, opt=opt, params=params, device=CPU, graph=False)
    for _ in range(5):
        loss = step()
        ref = train_step(ref_opt, ref_model.parameters(), lambda m: torch.nn.functional.mse_loss(ref_model(x), y))
        assert torch.equal(loss, ref.loss)
    assert step.mode == "eager"
    for p, q in zip(params, ref_model.parameters()):
        assert torch.equal(p, q)
