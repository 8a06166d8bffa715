"""The synthetic-task training step: fixed-shape target gather and the CUDA-graph path.

A CUDA graph cannot be captured on CPU, so these tests run the graph machinery of the training
core (``deltanet.training.core``) on CPU with a stand-in for ``_capture`` (replaying the step eagerly) and check what the CPU can check: the
warm-up / capture / verify / replay sequence, the learning-rate schedule through a tensor
learning rate, and every fallback to eager training with its reason.
"""

import pytest
import torch

from deltanet.evaluation.tasks import synthetic
from deltanet.training import core
from deltanet.evaluation.tasks.mqar import make_mqar
from deltanet.evaluation.tasks.synthetic import (
    IGNORE_INDEX,
    TrainConfig,
    build_model,
    fixed_target_positions,
    train_and_evaluate,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(data, *, seed=0, **cfg):
    torch.manual_seed(seed)
    model = build_model("delta_net", width=32, num_layers=1, vocab_size=64, head_dim=16)
    kw = dict(lr=3e-3, max_steps=12, epochs=10, batch_size=16, eval_every=4, warmup_steps=4, device="cpu")
    run = train_and_evaluate(model, data, data, TrainConfig(**{**kw, **cfg}))
    return run, model


def _losses(run):
    return torch.tensor([c["loss"] for c in run.curve])


@pytest.fixture
def data():
    return make_mqar(128, 32, 4, 64, seed=0)


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    """Let ``cuda_graph=True`` run its machinery on CPU; ``capture.mode`` picks the stand-in:
    "eager" replays the step eagerly (a correct graph), "raise" fails the capture, "stale"
    replays nothing (a broken graph that the check must catch)."""
    monkeypatch.setattr(core, "_GRAPH_DEVICES", ("cuda", "cpu"))
    calls = []

    def capture(fn, device):
        calls.append(device)
        if capture.mode == "raise":
            raise RuntimeError("operation not permitted when stream is capturing")
        static = torch.zeros(())

        def replay():
            if capture.mode == "eager":
                for p in capture.params():
                    p.grad = None  # a graph's backward writes the gradients afresh
                static.copy_(fn().detach())

        return replay, static

    capture.mode, capture.calls, capture.params = "eager", calls, lambda: []
    monkeypatch.setattr(core, "_capture", capture)
    return capture


def test_fixed_target_positions(data):
    _, y = data
    pos = fixed_target_positions(y)
    assert pos.shape == (128, 4) and pos.dtype == torch.long
    assert torch.equal(y.gather(1, pos), y[y != IGNORE_INDEX].view(128, 4))
    y2 = y.clone()
    y2[0, pos[0, 0]] = IGNORE_INDEX  # one row with fewer targets
    assert fixed_target_positions(y2) is None
    assert fixed_target_positions(torch.full((2, 5), IGNORE_INDEX)) is None


def test_gathered_targets_give_the_boolean_selection_loss(data, monkeypatch):
    """The fixed-shape gather (no sync per step) trains exactly like the boolean selection."""
    gathered, _ = _run(data)
    monkeypatch.setattr(synthetic, "fixed_target_positions", lambda y: None)
    selected, _ = _run(data)
    torch.testing.assert_close(_losses(gathered), _losses(selected), rtol=1e-5, atol=1e-6)
    assert gathered.step_mode == selected.step_mode == "eager"


def test_cuda_graph_on_cpu_falls_back_to_the_same_eager_run(data):
    eager, _ = _run(data)
    flagged, _ = _run(data, cuda_graph=True)
    assert flagged.step_mode == "eager (cuda_graph needs CUDA, device is cpu)"
    assert torch.equal(_losses(flagged), _losses(eager))


def test_graph_path_captures_once_checks_and_replays(data, graphs_on_cpu):
    torch.manual_seed(0)
    model = build_model("delta_net", width=32, num_layers=1, vocab_size=64, head_dim=16)
    graphs_on_cpu.params = model.parameters
    cfg = TrainConfig(lr=3e-3, max_steps=12, epochs=10, batch_size=16, eval_every=4, warmup_steps=4, device="cpu",
                      cuda_graph=True)
    run = train_and_evaluate(model, data, data, cfg)
    assert run.step_mode == "cuda_graph" and run.steps == 12
    assert len(graphs_on_cpu.calls) == 1
    # Same training as eager (fused AdamW with a tensor lr vs the default AdamW: rounding only);
    # the warm-up schedule reaches the tensor lr through fill_.
    eager, _ = _run(data)
    torch.testing.assert_close(_losses(run), _losses(eager), rtol=1e-4, atol=1e-5)
    assert eager.curve[-1]["loss"] < eager.curve[0]["loss"]


def test_lr_tensor_follows_the_schedule(data, graphs_on_cpu):
    torch.manual_seed(0)
    model = build_model("delta_net", width=32, num_layers=1, vocab_size=64, head_dim=16)
    graphs_on_cpu.params = model.parameters
    seen = []
    step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append([float(g["lr"]) for g in self.param_groups])
        assert all(isinstance(g["lr"], torch.Tensor) for g in self.param_groups)
        return step(self, *a, **k)

    cfg = TrainConfig(lr=1e-3, max_steps=9, epochs=10, batch_size=16, eval_every=9, warmup_steps=6, device="cpu",
                      cuda_graph=True, schedule="constant")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", spy)
        train_and_evaluate(model, data, data, cfg)
    # steps 0-2 eager (before the capture); step 3 twice (the check's eager step and its
    # replay); steps 4-8 replays, the lr still warming up through step 5
    expected = [i / 6 * 1e-3 for i in (1, 2, 3, 4, 4, 5, 6, 6, 6, 6)]
    assert [s[0] for s in seen] == pytest.approx(expected)
    assert all(s[0] == s[1] for s in seen)


def test_failed_capture_trains_eagerly_and_says_why(data, graphs_on_cpu):
    graphs_on_cpu.mode = "raise"
    run, _ = _run(data, cuda_graph=True)
    assert run.step_mode.startswith("eager (cuda graph failed: RuntimeError: operation not permitted")
    assert run.steps == 12 and len(run.curve) == 3
    eager, _ = _run(data)
    torch.testing.assert_close(_losses(run), _losses(eager), rtol=1e-4, atol=1e-5)


def test_broken_replay_is_caught_and_undone(data, graphs_on_cpu):
    """A replay that does not train (stale output, no update) fails the check; training goes
    on eagerly from the eager step's state, as if no graph had been tried."""
    graphs_on_cpu.mode = "stale"
    run, _ = _run(data, cuda_graph=True)
    assert run.step_mode.startswith("eager (cuda graph failed: replayed loss 0 != eager loss")
    eager, _ = _run(data)
    assert run.steps == 12
    torch.testing.assert_close(_losses(run), _losses(eager), rtol=1e-4, atol=1e-5)


def test_graph_needs_fixed_target_count(data, graphs_on_cpu):
    x, y = data
    y = y.clone()
    y[0, fixed_target_positions(y)[0, 0]] = IGNORE_INDEX
    run, _ = _run((x, y), cuda_graph=True)
    assert run.step_mode == "eager (cuda_graph needs the same number of targets in every row)"
    assert graphs_on_cpu.calls == []
