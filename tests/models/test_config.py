"""DeltaNetConfig validation, presets and their parameter counts."""

import re

import pytest
import torch

import deltanet.models  # noqa: F401  (registers the Auto classes)
from deltanet.models import PRESETS, DeltaNetConfig, DeltaNetForCausalLM, get_config
from deltanet.models.presets import layer_types_for

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_heads=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layer_types=["delta_net", "mamba"]), r"unknown layer type.*mamba.*valid types.*delta_net.*sliding_attention"),
        (dict(layer_types=["delta_net", "sliding_attention"]), "sliding_window is not set"),
        (dict(layer_types=["delta_net"]), "one layer type per layer"),
        (dict(num_heads=3), r"hidden_size \(32\) must be divisible by num_heads \(3\)"),
        (dict(num_kv_heads=3, num_heads=2), "multiple of num_kv_heads"),
        (dict(sliding_window=0, layer_types=["sliding_attention"] * 2), "sliding_window must be a positive int"),
        (dict(qk_activation="gelu"), "qk_activation must be one of"),
        (dict(qk_norm="sum"), "needs a non-negative qk_activation"),
        (dict(qk_norm="max"), "qk_norm must be one of"),
        (dict(delta_backend="cuda"), "delta_backend must be one of"),
        (dict(head_dim=7), "head_dim must be even"),
        (dict(hidden_size=0), "hidden_size must be a positive int"),
        (dict(vocab_size=2.5), "vocab_size must be a positive int"),
        (dict(num_householder=0, layer_types=["gated_delta_product"] * 2), "num_householder must be a positive int"),
        (dict(output_gate_activation="relu"), r"output_gate_activation must be one of \['silu', 'sigmoid'\]"),
        (dict(A_init_range=(16, 1)), r"A_init_range must be two numbers \(low, high\) with 0 <= low < high"),
        (dict(A_init_range=(-1, 1)), "A_init_range must be two numbers"),
        (dict(A_init_range=(0, 1, 2)), "A_init_range must be two numbers"),
        (dict(A_init_range="0,16"), "A_init_range must be two numbers"),
    ],
    ids=["unknown_type", "swa_no_window", "len_mismatch", "heads", "kv_heads", "window0", "activation",
         "sum_norm_silu", "norm", "backend", "odd_head_dim", "hidden0", "vocab_float", "householder0",
         "gate_activation", "A_range_reversed", "A_range_negative", "A_range_three", "A_range_str"],
)
def test_invalid_configs_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeltaNetConfig(**{**SMALL, **kwargs})


def test_head_dim_may_decouple_from_hidden_size():
    cfg = DeltaNetConfig(hidden_size=30, num_hidden_layers=1, num_heads=4, head_dim=8)
    model = DeltaNetForCausalLM(cfg)
    assert model.model.layers[0].attn.q_proj.out_features == 32


def test_config_round_trip_and_auto_config(tmp_path):
    from transformers import AutoConfig

    cfg = get_config("hybrid-swa-340m", num_hidden_layers=4, sliding_window=128)
    cfg.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is DeltaNetConfig
    assert loaded.layer_types == ["delta_net", "sliding_attention"] * 2
    assert loaded.sliding_window == 128


def test_gate_activation_and_decay_range_round_trip(tmp_path):
    """``output_gate_activation`` and ``A_init_range`` survive save / load (JSON gives a list) and
    reach the built layers."""
    cfg = DeltaNetConfig(**SMALL, layer_types=["gated_delta_net"] * 2, output_gate_activation="sigmoid",
                         A_init_range=[0, 0.5])
    assert cfg.A_init_range == (0.0, 0.5)
    DeltaNetForCausalLM(cfg).save_pretrained(tmp_path)
    model = DeltaNetForCausalLM.from_pretrained(tmp_path)
    assert model.config.output_gate_activation == "sigmoid" and model.config.A_init_range == (0.0, 0.5)
    assert model.model.layers[1].attn.o_norm.gate_activation == "sigmoid"
    default = DeltaNetConfig(**SMALL)
    assert default.output_gate_activation == "silu" and default.A_init_range == (0.0, 16.0)


def test_get_config_unknown_name_lists_presets():
    with pytest.raises(ValueError, match=re.escape(str(sorted(PRESETS)))):
        get_config("deltanet-7b")


def test_get_config_overrides_and_patterns():
    cfg = get_config("tiny", vocab_size=512)
    assert cfg.vocab_size == 512 and cfg.layer_types == ["delta_net"] * 4
    assert layer_types_for("global_two", 24).count("full_attention") == 2
    glob = get_config("hybrid-global-340m").layer_types
    assert [i for i, t in enumerate(glob) if t == "full_attention"] == [1, 12]
    swa = get_config("hybrid-swa-340m").layer_types
    assert swa[0::2] == ["delta_net"] * 12 and swa[1::2] == ["sliding_attention"] * 12
    assert set(get_config("transformer-340m").layer_types) == {"full_attention"}
    assert set(get_config("linear-attn-340m").layer_types) == {"linear_attention"}
    assert get_config("deltanet-340m", layer_types=["full_attention"] * 24).layer_types[0] == "full_attention"


def _count(name: str) -> int:
    with torch.device("meta"):  # no memory, no init cost
        model = DeltaNetForCausalLM(get_config(name))
    return sum(p.numel() for p in model.parameters())


NAMED = {n: n.rsplit("-", 1)[1] for n in PRESETS if n != "tiny"}


@pytest.mark.parametrize("name", list(NAMED), ids=list(NAMED))
def test_preset_parameter_count_matches_name(name):
    size = NAMED[name]
    target = float(size[:-1]) * (1e9 if size.endswith("b") else 1e6)
    count = _count(name)
    assert abs(count - target) / target <= 0.10, f"{name}: {count / 1e6:.1f}M parameters"


def test_340m_shape_matches_fla():
    cfg = get_config("deltanet-340m")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.vocab_size) == (24, 1024, 8, 128, 32000)
    assert cfg.intermediate_size == 2816


def test_tiny_preset_is_small():
    assert _count("tiny") < 3e6


def test_125m_comparison_presets_are_within_5_percent():
    """The language-model comparison's models (``deltanet bench lm``): one shape, parameter
    counts within +-5% of deltanet-125m (counted on the meta device, no memory)."""
    names = ["deltanet-125m", "transformer-125m", "linear-attn-125m", "linear-attn-plain-125m",
             "hybrid-swa-125m", "hybrid-global-125m", "gated-deltanet-125m"]
    counts = {name: _count(name) for name in names}
    ref = counts["deltanet-125m"]
    print({k: f"{v / 1e6:.2f}M" for k, v in counts.items()})
    assert 125e6 <= ref <= 140e6
    for name, n in counts.items():
        assert abs(n / ref - 1) <= 0.05, (name, n, ref)
    assert get_config("transformer-125m").layer_types == ["full_attention"] * 12
    plain = get_config("linear-attn-plain-125m")
    assert (plain.use_short_conv, plain.qk_activation, plain.qk_norm) == (False, "elu", "sum")
    assert plain.layer_types == ["linear_attention"] * 12 and get_config("linear-attn-125m").use_short_conv
    assert get_config("hybrid-swa-125m").layer_types[:4] == ["delta_net", "sliding_attention"] * 2
    assert get_config("hybrid-swa-125m").sliding_window == 512  # < the comparison's T = 2048
    assert get_config("gated-deltanet-125m").layer_types == ["gated_delta_net"] * 12
    glob = get_config("hybrid-global-125m").layer_types
    assert [i for i, t in enumerate(glob) if t == "full_attention"] == [1, 6]
