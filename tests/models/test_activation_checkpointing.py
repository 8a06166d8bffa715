"""``activation_checkpointing = "none" | "mixer" | "mlp" | "block"``: same loss and gradients, really
recomputed in backward, a no-op for inference / no_grad / cached forwards, validated, and set
by ``deltanet train --activation-checkpointing``."""

import pytest
import torch

import deltanet.models  # noqa: F401  (registers the Auto classes)
from deltanet.models import DeltaNetConfig, DeltaNetForCausalLM, get_config
from tests.utils import assert_close

VOCAB = 61
MIXES = {
    "delta": ["delta_net"] * 2,
    "gated": ["gated_delta_net"] * 2,
    "gated_product": ["gated_delta_product"] * 2,
    "linear": ["linear_attention"] * 2,
    "swa_hybrid": ["delta_net", "sliding_attention"],
    "global_hybrid": ["gated_delta_net", "full_attention"],
    "all": ["delta_net", "sliding_attention", "linear_attention", "full_attention"],
}
MODES = ("mixer", "mlp", "block")
# forward calls per layer of (mixer, MLP), recompute included
CALLS = {"none": (1, 1), "mixer": (2, 1), "mlp": (1, 2), "block": (2, 2)}


def make_model(mix: str, mode: str = "none", dtype=torch.float32, backend: str = "torch", **kw) -> DeltaNetForCausalLM:
    types = MIXES[mix]
    cfg = DeltaNetConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=len(types), num_heads=2,
                         num_kv_heads=1, intermediate_size=64, layer_types=types, sliding_window=5,
                         delta_backend=backend, pad_token_id=0, bos_token_id=None, eos_token_id=None,
                         activation_checkpointing=mode, **kw)
    torch.manual_seed(0)
    return DeltaNetForCausalLM(cfg).to(dtype)


def count_calls(model) -> dict[str, int]:
    """Forward calls of every layer's mixer and of its MLP's gate / up projections (what "mlp"
    reruns), summed (forward and backward recompute). A pre-hook for the mixer: a recompute stops
    early once every saved tensor is back, before post-hooks run."""
    calls = {"attn": 0, "mlp": 0}
    for block in model.model.layers:
        block.attn.register_forward_pre_hook(lambda *_: calls.__setitem__("attn", calls["attn"] + 1))
        gate_up = block.mlp.gate_up

        def counted(*args, gate_up=gate_up, **kw):
            calls["mlp"] += 1
            return gate_up(*args, **kw)

        block.mlp.gate_up = counted
    return calls



@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mix", list(MIXES))
def test_same_loss_and_gradients_on_packed_documents(mix, mode):
    ref, ckpt = make_model(mix).train(), make_model(mix, mode).train()
    calls = count_calls(ckpt)
    torch.manual_seed(1)
    ids = torch.randint(1, VOCAB, (1, 23))
    labels = ids.clone()
    labels[0, 9] = -100
    # documents shorter than the conv kernel and the window: the boundary handling is replayed too
    cu = torch.tensor([0, 3, 11, 23])
    a, b = ref(ids, labels=labels, cu_seqlens=cu), ckpt(ids, labels=labels, cu_seqlens=cu)
    assert_close("loss", b.loss, a.loss, rtol=1e-6)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(ref.named_parameters(), ckpt.parameters()):
        assert q.grad is not None, name
        assert_close(name, q.grad, p.grad, rtol=1e-5)
    n = len(MIXES[mix])
    assert calls == {"attn": CALLS[mode][0] * n, "mlp": CALLS[mode][1] * n}


@pytest.mark.parametrize("mode", MODES)
def test_triton_backend_same_gradients(mode):
    """The Triton chunk kernels (autograd Functions with their own saved tensors; the Triton
    interpreter on CPU, see conftest) under recompute: gradients equal the unrecomputed run's."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels need CUDA tensors
    ref = make_model("gated", backend="triton").to(device).train()
    ckpt = make_model("gated", mode, backend="triton").to(device).train()
    calls = count_calls(ckpt)
    ids = torch.randint(1, VOCAB, (1, 20), device=device)
    cu = torch.tensor([0, 7, 20], device=device)
    a, b = ref(ids, labels=ids, cu_seqlens=cu), ckpt(ids, labels=ids, cu_seqlens=cu)
    a.loss.backward()
    b.loss.backward()
    assert_close("loss", b.loss, a.loss, rtol=1e-6)
    for (name, p), q in zip(ref.named_parameters(), ckpt.parameters()):
        assert_close(name, q.grad, p.grad, rtol=1e-5)
    assert calls["attn"] == 2 * CALLS[mode][0]


@pytest.mark.parametrize("mix", ["delta", "gated"])
def test_wy_recomputed_in_backward_same_gradients(mix):
    """The Triton chunk op keeping only its inputs in a model, packed documents (the interpreter on
    CPU): loss and every parameter's gradient equal those of the op keeping Ai and v_new
    (``DeltaNetMixer.recompute_wy = False``), by the mixers' default (``recompute_wy``), alone and
    under mixer and block checkpointing (whose rerun runs the mixer's forward again: the same
    choice), and by ``deltanet.ops.wy_recomputed_in_backward`` around a model whose mixers defer to
    it, under block checkpointing (the rerun happens in backward, outside the ``with`` block:
    ``checkpoint_kwargs`` hands the switch to it, or the rerun's saved tensors would not match the
    forward's and torch.utils.checkpoint would refuse them). What each keeps is counted too."""
    from deltanet.layers.delta_net import DeltaNetMixer
    from deltanet.ops import wy_recomputed_in_backward

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = torch.randint(1, VOCAB, (1, 20), device=device)
    cu = torch.tensor([0, 7, 20], device=device)
    grads, saved = {}, {}
    for name, mode, attribute, switch in (("kept", "none", False, False), ("recomputed", "none", True, False),
                                          ("recomputed+mixer", "mixer", True, False),
                                          ("recomputed+block", "block", True, False),
                                          ("switch+block", "block", False, True), ("switch", "none", False, True)):
        model = make_model(mix, mode, backend="triton").to(device).train()
        mixers = [m for m in model.modules() if isinstance(m, DeltaNetMixer)]
        assert mixers and all(m.recompute_wy for m in mixers)  # the default
        for m in mixers:
            m.recompute_wy = attribute
        sizes = []

        def pack(t, sizes=sizes):
            sizes.append(t.numel() * t.element_size())
            return t

        with wy_recomputed_in_backward(switch), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=ids, cu_seqlens=cu).loss
        loss.backward()
        grads[name] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
        saved[name] = sum(sizes)
    for run in ("recomputed", "recomputed+mixer", "recomputed+block", "switch+block", "switch"):
        assert_close(f"{run}: loss", grads[run][0], grads["kept"][0], rtol=1e-6)
        assert grads[run][1].keys() == grads["kept"][1].keys()
        for n, g in grads[run][1].items():
            assert_close(f"{run}: {n}", g, grads["kept"][1][n], rtol=1e-5)
    # the attribute and the switch drop the same tensors: Ai (fp32, 64 per token and head) and v_new
    # (fp32 in this float32 model), per layer; gated: g itself in G's place (same size)
    cfg = make_model(mix, "none").config
    dropped = len(mixers) * 20 * cfg.num_heads * (64 + cfg.head_dim) * 4
    assert saved["kept"] - saved["recomputed"] == dropped, (saved, dropped)
    assert saved["switch"] == saved["recomputed"], saved


@pytest.mark.parametrize("mode", ("none", *MODES))
def test_recompute_counts_on_a_padded_batch(mode):
    """none keeps everything (one forward call each); mixer reruns only the mixers in backward;
    block reruns the mixers and the MLPs. Gradients equal the none mode's with padding too."""
    ref, model = make_model("all").train(), make_model("all", mode).train()
    calls = count_calls(model)
    ids = torch.randint(1, VOCAB, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    labels = ids.masked_fill(mask == 0, -100)
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    ref(ids, attention_mask=mask, labels=labels).loss.backward()
    expected = CALLS[mode]
    assert (calls["attn"], calls["mlp"]) == tuple(4 * e for e in expected)
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        assert_close(name, q.grad, p.grad, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_no_recompute_in_eval_no_grad_or_with_a_cache(mode):
    ref, model = make_model("all"), make_model("all", mode)
    calls = count_calls(model)
    ids = torch.randint(1, VOCAB, (2, 9))
    with torch.no_grad():
        want = ref.eval()(ids, use_cache=False).logits
        assert torch.equal(model.eval()(ids, use_cache=False).logits, want)
        assert torch.equal(model.train()(ids, use_cache=False).logits, want)  # train mode, no grad
    assert calls == {"attn": 4 * 2, "mlp": 4 * 2}
    # With grad and a cache (training mode): a rerun block would advance the cached states twice.
    out = model.train()(ids, use_cache=True)
    assert out.past_key_values.get_seq_length() == 9
    out.logits.sum().backward()
    assert calls == {"attn": 4 * 3, "mlp": 4 * 3}
    assert_close("logits with cache", out.logits.detach(), want, rtol=1e-6)


@pytest.mark.parametrize("mix", ["delta", "all"])
def test_generate_unchanged(mix):
    ref, model = make_model(mix).eval(), make_model(mix, "block").train()  # generate runs under no_grad
    ids = torch.randint(1, VOCAB, (2, 6))
    kw = dict(max_new_tokens=7, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))


def test_hf_gradient_checkpointing_still_checkpoints_whole_blocks():
    model = make_model("delta", "mixer").train()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    calls = count_calls(model)
    ids = torch.randint(1, VOCAB, (2, 8))
    model(ids, labels=ids).loss.backward()
    assert calls == {"attn": 4, "mlp": 4}  # block recompute wins over the config's "mixer"


def test_bad_value_raises():
    with pytest.raises(ValueError, match=r"activation_checkpointing must be one of \['none', 'mixer', 'mlp', 'block'\]"):
        DeltaNetConfig(hidden_size=32, num_heads=2, num_hidden_layers=1, activation_checkpointing="all")
    with pytest.raises(ValueError, match="activation_checkpointing must be one of"):
        get_config("tiny", activation_checkpointing=True)
    model = make_model("delta").train()
    model.config.activation_checkpointing = "blocks"  # assigned after validation: caught at forward
    with pytest.raises(ValueError, match="activation_checkpointing must be one of"):
        model(torch.randint(1, VOCAB, (1, 5)))


def test_config_round_trip(tmp_path):
    cfg = get_config("tiny", vocab_size=64, activation_checkpointing="mixer")
    cfg.save_pretrained(tmp_path)
    assert DeltaNetConfig.from_pretrained(tmp_path).activation_checkpointing == "mixer"
    assert get_config("tiny").activation_checkpointing == "none"


def test_train_cli_flag_sets_the_model_field():
    from deltanet.cli import UsageError
    from deltanet.cli.train import build_train_config

    from deltanet.models.configuration import ACTIVATION_CHECKPOINTING

    for mode in ACTIVATION_CHECKPOINTING:  # the CLI's literal choices follow the config's modes
        assert build_train_config(["--activation-checkpointing", mode]).train.model == {
            "activation_checkpointing": mode}
    cfg = build_train_config(["--model", "activation_checkpointing=mixer", "--model", "num_hidden_layers=2"])
    assert cfg.train.model == {"activation_checkpointing": "mixer", "num_hidden_layers": 2}
    assert "activation_checkpointing" not in build_train_config([]).train.model
    # agreeing spellings are fine; contradicting ones are a usage error, not a silent pick
    assert build_train_config(["--model", "activation_checkpointing=block", "--activation-checkpointing",
                               "block"]).train.model == {"activation_checkpointing": "block"}
    with pytest.raises(UsageError, match="contradicts --model activation_checkpointing=mixer"):
        build_train_config(["--model", "activation_checkpointing=mixer", "--activation-checkpointing", "block"])
    with pytest.raises(UsageError, match="invalid choice"):
        build_train_config(["--activation-checkpointing", "all"])


def test_bench_model_sweeps_the_modes(tmp_path):
    """``deltanet bench model --activation-checkpointing none,mixer,block``: one row per mode and
    length, the mode set on each model, and the same losses (same seed) in every mode."""
    import json

    from deltanet.bench.model import build_model
    from deltanet.cli.bench_model import cli_main

    model = build_model("deltanet-340m", smoke=True, activation_checkpointing="block")
    assert model.config.activation_checkpointing == "block"
    out = tmp_path / "ckpt.md"
    assert cli_main(["model", "--smoke", "--models", "transformer-340m", "--activation-checkpointing",
                     "none,mixer,block", "--out", str(out)]) == 0
    rows = json.loads((tmp_path / "ckpt.json").read_text())["rows"]
    assert [(r["T"], r["activation_checkpointing"]) for r in rows] == [
        (T, m) for T in (32, 64) for m in ("none", "mixer", "block")]
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in rows)
    for T in (32, 64):  # same initial weights and batches: recomputing changes no training step
        assert len({r["loss"] for r in rows if r["T"] == T}) == 1, rows
    assert "| transformer-340m | 32 | 4 | autocast | mixer |" in out.read_text()
    with pytest.raises(SystemExit):
        cli_main(["model", "--smoke", "--models", "deltanet-340m", "--activation-checkpointing", "all"])


def _saved_bytes(model, ids) -> int:
    """Bytes of the tensors autograd keeps for backward over one training forward (parameters
    excluded: they are kept anyway)."""
    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    loss.backward()  # outside the hooks: a recompute's own saves during backward are not counted
    return total


def test_mlp_mode_drops_the_gate_and_up_activations():
    """"mlp" keeps, per MLP, only its input (the block's residual stream, which "none" keeps too,
    for the norm's backward): the gate and up projections (2 x intermediate values per token) and
    the norm's 1/rms are dropped. Everything else autograd keeps is the same as in "none"."""
    ids = torch.randint(1, VOCAB, (2, 16))
    n_tok, layers, I = ids.numel(), 2, 64
    none = _saved_bytes(make_model("delta").train(), ids)
    mlp = _saved_bytes(make_model("delta", "mlp").train(), ids)
    # float32: 4 bytes a value; per layer "mlp" drops g, u [tokens, I] and 1/rms [tokens]
    assert none - mlp == layers * n_tok * 4 * (2 * I + 1), (none, mlp)


@pytest.mark.parametrize("mode", ["none", "mlp"])
def test_mlp_mode_does_not_rerun_the_down_projection(mode, monkeypatch):
    """"mlp" reruns the norm and the gate / up projections in backward, not the down projection
    (its output is never needed again): the SwiGLU function's forward runs once per layer."""
    import deltanet.layers.mlp as mlp_module

    model = make_model("swa_hybrid", mode).train()
    weights = [block.mlp.down_proj.weight for block in model.model.layers]
    runs = [0] * len(weights)
    original = mlp_module._SwiGLULinear.forward

    def forward(ctx, g, u, weight, compile):
        runs[next(i for i, w in enumerate(weights) if w is weight)] += 1
        return original(ctx, g, u, weight, compile)

    monkeypatch.setattr(mlp_module._SwiGLULinear, "forward", staticmethod(forward))
    calls = count_calls(model)
    ids = torch.randint(1, VOCAB, (2, 12))
    model(ids, labels=ids).loss.backward()
    assert runs == [1, 1]
    assert calls["mlp"] == 2 * CALLS[mode][1]


def _alive_token_values(model, ids) -> int:
    """Values of the token-sized tensors alive after a training forward (before backward):
    what the step holds for backward, whoever holds it (autograd's saved tensors, or objects the
    graph references, such as a recomputed region's inputs)."""
    import gc

    loss = model(ids, labels=ids).loss
    gc.collect()
    T = ids.shape[1]
    n = sum(t.numel() for t in gc.get_objects()
            if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter) and t.dim() >= 2 and T in t.shape[:3])
    loss.backward()
    return n


@pytest.mark.parametrize("mix", ["delta", "gated"])
def test_block_mode_keeps_one_block_input_per_layer(mix):
    """"block" keeps each block's input and nothing else per layer: one more layer adds exactly
    ``tokens x hidden`` live values. (The mixer's recomputed region used to hold its own inputs,
    the q/k/v projections before the short conv, outside the checkpoint: 4x that per layer.)"""
    ids = torch.randint(1, VOCAB, (1, 37))
    alive = []
    for n_layers in (2, 3):
        types = MIXES[mix][:1] * n_layers
        cfg = DeltaNetConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=n_layers, num_heads=2,
                             num_kv_heads=1, intermediate_size=64, layer_types=types, delta_backend="torch",
                             pad_token_id=0, bos_token_id=None, eos_token_id=None, activation_checkpointing="block")
        torch.manual_seed(0)
        alive.append(_alive_token_values(DeltaNetForCausalLM(cfg).train(), ids))
    assert alive[1] - alive[0] == 37 * 32, alive
