"""Named model configurations: the paper's sizes, hybrids and baselines.

``get_config(name, **overrides)`` builds a :class:`DeltaNetConfig`. The layer mix of a preset
is a *pattern* (``layer_pattern``) turned into ``layer_types`` for the final layer count, so
``get_config("hybrid-swa-340m", num_hidden_layers=4)`` still alternates delta and attention.

The 340M-class presets follow flash-linear-attention's 340M DeltaNet shape (24 layers, hidden
1024, 8 heads of 128, SwiGLU 2816, vocab 32000) with tied input/output embeddings: 341.6M
parameters (untied it would be 374M, 10% above the name).

The 125M-class presets share ``deltanet-125m``'s shape (12 layers, hidden 768, 6 heads of 128,
SwiGLU 2048, vocab 32000, untied): the language-model comparison (``deltanet bench lm``) trains
one of each. Every mixer has the same four d x d projections, so the counts stay within 0.2%
of each other (``tests/models/test_config.py`` asserts the 5% band): 134.1-134.3M with the
embeddings, 109.5-109.7M without.
"""

from __future__ import annotations

import difflib
import inspect

from .configuration import DeltaNetConfig

__all__ = ["PRESETS", "check_fields", "get_config", "layer_types_for", "model_fields"]


def layer_types_for(pattern: str, n: int) -> list[str]:
    """``layer_types`` of ``n`` layers for a named pattern.

    Example::

        >>> layer_types_for("global_two", 6)
        ['delta_net', 'full_attention', 'delta_net', 'full_attention', 'delta_net', 'delta_net']
    """
    if pattern == "delta":
        return ["delta_net"] * n
    if pattern == "attention":
        return ["full_attention"] * n
    if pattern == "linear":
        return ["linear_attention"] * n
    if pattern == "swa_alternate":  # the paper's sliding-window hybrid: every other layer
        return ["sliding_attention" if i % 2 else "delta_net" for i in range(n)]
    if pattern == "gated_delta":
        return ["gated_delta_net"] * n
    if pattern == "gated_product":
        return ["gated_delta_product"] * n
    if pattern == "product":  # DeltaProduct without a forget gate
        return ["delta_product"] * n
    if pattern == "gated_swa_alternate":  # the sliding-window hybrid with Gated DeltaNet layers
        return ["sliding_attention" if i % 2 else "gated_delta_net" for i in range(n)]
    if pattern == "global_two":  # the paper's global hybrid: second layer and middle of the stack
        full = {1, n // 2} if n > 1 else {0}
        return ["full_attention" if i in full else "delta_net" for i in range(n)]
    raise ValueError(f"unknown layer_pattern {pattern!r}; valid: delta, attention, linear, swa_alternate, global_two, "
                     "gated_delta, gated_product, product, gated_swa_alternate")


_340M = dict(hidden_size=1024, num_hidden_layers=24, num_heads=8, intermediate_size=2816,
             vocab_size=32000, tie_word_embeddings=True)

_125M = dict(hidden_size=768, num_hidden_layers=12, num_heads=6, intermediate_size=2048, vocab_size=32000,
             tie_word_embeddings=False)
# paper-style linear attention (Katharopoulos et al.): no short convolution, elu + 1, sum normalisation
_PLAIN_LINEAR = dict(use_short_conv=False, qk_activation="elu", qk_norm="sum")

PRESETS: dict[str, dict] = {
    # a few minutes of training on a 2-core CPU
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_heads=2, intermediate_size=384,
                 vocab_size=4096, tie_word_embeddings=True, layer_pattern="delta", sliding_window=64),
    "deltanet-125m": dict(_125M, layer_pattern="delta"),
    "transformer-125m": dict(_125M, layer_pattern="attention"),  # Transformer++: RoPE + SwiGLU
    "linear-attn-125m": dict(_125M, layer_pattern="linear"),  # our mixer (conv, silu, L2), additive update
    "linear-attn-plain-125m": dict(_125M, layer_pattern="linear", **_PLAIN_LINEAR),
    # window 512, not the 340M presets' 2048: the comparison trains at T = 2048, where a 2048-token
    # window would make every attention layer a full one
    "hybrid-swa-125m": dict(_125M, layer_pattern="swa_alternate", sliding_window=512),
    "hybrid-global-125m": dict(_125M, layer_pattern="global_two"),
    # Gated DeltaNet adds the decay projection and a d x d output gate per layer (+7.1M); a narrower
    # SwiGLU (1792) keeps it within 0.5% of the others
    "gated-deltanet-125m": dict(_125M, layer_pattern="gated_delta", intermediate_size=1792),
    "deltanet-340m": dict(_340M, layer_pattern="delta"),
    "deltanet-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_heads=16, intermediate_size=5632,
                          vocab_size=32000, tie_word_embeddings=True, layer_pattern="delta"),
    "hybrid-swa-340m": dict(_340M, layer_pattern="swa_alternate", sliding_window=2048),
    "hybrid-global-340m": dict(_340M, layer_pattern="global_two"),
    "transformer-340m": dict(_340M, layer_pattern="attention"),
    "linear-attn-340m": dict(_340M, layer_pattern="linear"),
    # The gated family at the same width (8 heads of 128): Gated DeltaNet adds a decay
    # projection (8 outputs) and the output gate (1024 x 1024) per layer.
    "gated-deltanet-340m": dict(_340M, layer_pattern="gated_delta"),
    "gated-hybrid-swa-340m": dict(_340M, layer_pattern="gated_swa_alternate", sliding_window=2048),
    # n_h = 2 doubles the key / value projections and convs (+50M at this width): a narrower
    # SwiGLU (1792) keeps the total at the name (342M).
    "gated-deltaproduct-340m": dict(_340M, layer_pattern="gated_product", num_householder=2, intermediate_size=1792),
}


def get_config(name: str, **overrides) -> DeltaNetConfig:
    """The preset ``name`` with ``overrides`` applied (any :class:`DeltaNetConfig` field).

    Example::

        >>> cfg = get_config("tiny", vocab_size=512)
        >>> cfg.vocab_size, cfg.layer_types
        (512, ['delta_net', 'delta_net', 'delta_net', 'delta_net'])
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {sorted(PRESETS)}")
    check_fields(overrides)
    kwargs = {**PRESETS[name], **overrides}
    pattern = kwargs.pop("layer_pattern", "delta")
    if "layer_types" not in overrides:
        kwargs["layer_types"] = layer_types_for(pattern, kwargs["num_hidden_layers"])
    return DeltaNetConfig(**kwargs)


def check_fields(overrides: dict) -> None:
    """Raise ``ValueError`` naming any key of ``overrides`` that is not a model config field.

    ``PretrainedConfig`` keeps unknown keyword arguments as attributes, so a misspelt field
    (``num_hidden_layer=2``) would otherwise be stored and silently ignored.

        >>> check_fields({"num_hidden_layer": 2})
        Traceback (most recent call last):
        ...
        ValueError: unknown model field 'num_hidden_layer' (did you mean 'num_hidden_layers'?)
    """
    valid = model_fields()
    for key in overrides:
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1)
            own = _own_fields() | {"layer_pattern"}
            hint = f"did you mean {close[0]!r}?" if close else f"valid: {', '.join(sorted(own))}, ..."
            raise ValueError(f"unknown model field {key!r} ({hint})")


def model_fields() -> set[str]:
    """Names ``get_config`` accepts: DeltaNetConfig's arguments, the base config's attributes
    (``tie_word_embeddings``, token ids, ...) and ``layer_pattern``."""
    base = set(DeltaNetConfig(hidden_size=64, num_hidden_layers=1, num_heads=1).to_dict())
    return (_own_fields() | base | {"layer_pattern"}) - {"model_type", "transformers_version", "architectures"}


def _own_fields() -> set[str]:
    params = inspect.signature(DeltaNetConfig.__init__).parameters
    return {n for n, p in params.items() if n != "self" and p.kind is not p.VAR_KEYWORD}
