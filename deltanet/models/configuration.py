"""``DeltaNetConfig``: the Hugging Face configuration of DeltaNet, its hybrids and baselines.

The layer mix follows the Hugging Face convention ``layer_types``: one entry per layer, from
``LAYER_TYPES``. The paper's hybrids are configs, not code paths (see ``presets.py``).
Every invalid combination raises ``ValueError`` here, at config time, not deep inside a
forward pass.
"""

from __future__ import annotations

from transformers import PretrainedConfig

__all__ = ["ACTIVATION_CHECKPOINTING", "DeltaNetConfig", "LAYER_TYPES"]

LAYER_TYPES = ("delta_net", "gated_delta_net", "gated_delta_product", "delta_product", "sliding_attention",
               "full_attention", "linear_attention")
QK_ACTIVATIONS = ("silu", "relu", "elu", "identity")
QK_NORMS = ("l2", "sum")
DELTA_BACKENDS = ("auto", "triton", "recurrent", "torch", "reference")
# One-token decode steps of delta-rule layers: one fused Triton kernel per layer, the eager op-by-op
# step, or fused where the decode backend is Triton's recurrent kernel (deltanet/layers/delta_net.py).
DECODE_KERNELS = ("auto", "fused", "eager")
# What training recomputes in backward instead of keeping: nothing, each token mixer, or each
# whole block (norms + mixer + MLP). Inference and cached decoding never recompute.
ACTIVATION_CHECKPOINTING = ("none", "mixer", "mlp", "block")
OUTPUT_GATE_ACTIVATIONS = ("silu", "sigmoid")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _A_init_range(value) -> tuple[float, float]:
    """``(low, high)`` as two floats with ``0 <= low < high`` (a JSON config gives a list)."""
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok or not 0 <= value[0] < value[1] or not value[1] < float("inf"):
        raise ValueError(f"A_init_range must be two numbers (low, high) with 0 <= low < high, got {value!r}")
    return float(value[0]), float(value[1])


class DeltaNetConfig(PretrainedConfig):
    """Configuration of :class:`~deltanet.models.DeltaNetForCausalLM`.

    Args:
        vocab_size, hidden_size, num_hidden_layers: the usual sizes.
        num_heads: heads of every mixer; ``head_dim`` defaults to ``hidden_size // num_heads``.
        num_kv_heads: key/value heads of attention layers (grouped-query); default ``num_heads``.
        intermediate_size: SwiGLU width; default ``8/3 * hidden_size`` rounded up to 256.
        layer_types: one of ``LAYER_TYPES`` per layer; default all ``"delta_net"``.
        sliding_window: window of ``"sliding_attention"`` layers (required if any).
        conv_size, use_short_conv: the causal depthwise convolution on q, k, v.
        qk_activation: ``"silu" | "relu" | "elu" | "identity"`` (elu means elu + 1).
        qk_norm: ``"l2" | "sum"``.
        use_beta: learn beta (else beta = 1); allow_neg_eigval: beta in (0, 2).
        use_output_gate: ``RMSNorm(o) * act(W_g x)`` instead of ``RMSNorm(o)`` (always on in
            the gated layer types).
        output_gate_activation: ``act`` of the output gate, ``"silu"`` (the default, Gated
            DeltaNet's) or ``"sigmoid"``. ``silu(W_g x)`` starts near ``W_g x / 2``: small, with a
            random sign per token and channel; ``sigmoid`` starts near 0.5 for every token. In a
            small recall model (MQAR, T = 64, 2 layers of width 64, weaker decay) the silu gate
            stalled learning where the sigmoid gate did not; at T = 128 both stalled
            (benchmarks/results/2026-12-06-cpu-mqar-gated.md).
        A_init_range: ``(low, high)``: the gated layers draw the decay rate ``A ~ U(low, high)``
            per head at initialisation (``g = -A * softplus(W_a x + dt_bias)``, ``dt`` starting
            log-uniform in ``[1e-3, 0.1]``). The default ``(0, 16)`` (Mamba-2's) gives a median
            half-life of ~11 tokens; with few heads a model may have no head that remembers
            far enough for recall at the start (the same results file). ``0 <= low < high``.
        num_householder: Householder steps per token (n_h) of ``"gated_delta_product"`` and
            ``"delta_product"`` layers.
        delta_backend: backend of ``deltanet.ops.delta_rule`` for training / prefill; the
            ``linear_attention`` layers take ``"auto"`` and ``"triton"`` as they are (Triton chunk
            kernels on CUDA) and any other value as their PyTorch chunkwise form.
        decode_kernel: ``"auto" | "fused" | "eager"``: one-token decode steps of the delta-rule
            layers as one fused Triton kernel per layer (conv step, q/k norm, beta, decay, the
            delta rule, output norm) with the projections and MLPs of every block as GEMV kernels
            (norm + input projections, output projection + residual, norm + gate/up + SwiGLU,
            down + residual), op by op, or ``"auto"`` (the default): fused on CUDA, op by op
            elsewhere (``deltanet.layers.delta_net``). Set on a
            loaded model with ``deltanet.models.set_decode_kernel``.
        fuse_linear_cross_entropy: in training (train mode, autograd recording) with ``labels``,
            compute the loss in token chunks fused with the output projection, never holding the
            ``[tokens, vocab]`` logits (4 GiB in float32 at 32K tokens x 32K vocab, kept for
            backward by the plain loss); ``logits`` is then None. Eval mode or ``torch.no_grad``
            return logits and the plain loss either way. On by default; ``False`` (``deltanet train
            --plain-loss``) keeps the logits in training too.
        activation_checkpointing: ``"none" | "mixer" | "mlp" | "block"``: in training, recompute
            each token mixer (``"mixer"``: its activations are not kept, the MLP's are), each MLP
            (``"mlp"``: the gate / up projections, the largest activations of a 340M block, 11 KB of
            its 27 KB per token in bf16, are not kept; backward reruns the norm and those two
            projections, not the down projection) or
            each whole block (``"block"``: only the block inputs are kept) during backward, trading
            time for memory. No effect in eval mode, under ``torch.no_grad`` or with a cache.

    Example::

        >>> cfg = DeltaNetConfig(hidden_size=64, num_hidden_layers=2, num_heads=2,
        ...                      layer_types=["delta_net", "sliding_attention"], sliding_window=16)
        >>> cfg.head_dim, cfg.intermediate_size
        (32, 256)
    """

    model_type = "deltanet"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1024,
        num_hidden_layers: int = 24,
        num_heads: int = 8,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        intermediate_size: int | None = None,
        layer_types: list[str] | None = None,
        sliding_window: int | None = None,
        conv_size: int = 4,
        use_short_conv: bool = True,
        qk_activation: str = "silu",
        qk_norm: str = "l2",
        use_beta: bool = True,
        allow_neg_eigval: bool = False,
        use_output_gate: bool = False,
        output_gate_activation: str = "silu",
        A_init_range: tuple[float, float] = (0.0, 16.0),
        num_householder: int = 2,
        norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 8192,
        initializer_range: float = 0.02,
        delta_backend: str = "auto",
        decode_kernel: str = "auto",
        fuse_linear_cross_entropy: bool = True,
        activation_checkpointing: str = "none",
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                            ("num_hidden_layers", num_hidden_layers), ("num_heads", num_heads),
                            ("conv_size", conv_size), ("max_position_embeddings", max_position_embeddings),
                            ("num_householder", num_householder)):
            _positive_int(name, value)
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(
                    f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}), or give head_dim"
                )
            head_dim = hidden_size // num_heads
        _positive_int("head_dim", head_dim)
        if head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary embeddings rotate pairs), got {head_dim}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        _positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if intermediate_size is None:
            intermediate_size = 256 * -(-int(hidden_size * 8 / 3) // 256)
        _positive_int("intermediate_size", intermediate_size)

        if layer_types is None:
            layer_types = ["delta_net"] * num_hidden_layers
        layer_types = list(layer_types)
        if len(layer_types) != num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(layer_types)} entries but num_hidden_layers is {num_hidden_layers}; "
                "give one layer type per layer"
            )
        unknown = sorted({t for t in layer_types if t not in LAYER_TYPES})
        if unknown:
            raise ValueError(f"unknown layer type(s) {unknown} in layer_types; valid types: {list(LAYER_TYPES)}")
        if "sliding_attention" in layer_types:
            if sliding_window is None:
                raise ValueError("layer_types contains 'sliding_attention' but sliding_window is not set")
            _positive_int("sliding_window", sliding_window)
        elif sliding_window is not None:
            _positive_int("sliding_window", sliding_window)
        for name, value, valid in (("qk_activation", qk_activation, QK_ACTIVATIONS), ("qk_norm", qk_norm, QK_NORMS),
                                   ("delta_backend", delta_backend, DELTA_BACKENDS),
                                   ("decode_kernel", decode_kernel, DECODE_KERNELS),
                                   ("activation_checkpointing", activation_checkpointing, ACTIVATION_CHECKPOINTING),
                                   ("output_gate_activation", output_gate_activation, OUTPUT_GATE_ACTIVATIONS)):
            if value not in valid:
                raise ValueError(f"{name} must be one of {list(valid)}, got {value!r}")
        if qk_norm == "sum" and qk_activation not in ("relu", "elu"):
            # sum normalisation needs non-negative features, otherwise |k| is unbounded
            raise ValueError(f"qk_norm='sum' needs a non-negative qk_activation ('relu' or 'elu'), got {qk_activation!r}")
        A_init_range = _A_init_range(A_init_range)
        if not (isinstance(norm_eps, float) and norm_eps > 0):
            raise ValueError(f"norm_eps must be a positive float, got {norm_eps!r}")
        if not (isinstance(rope_theta, (int, float)) and rope_theta > 0):
            raise ValueError(f"rope_theta must be positive, got {rope_theta!r}")

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.sliding_window = sliding_window
        self.conv_size = conv_size
        self.use_short_conv = bool(use_short_conv)
        self.qk_activation = qk_activation
        self.qk_norm = qk_norm
        self.use_beta = bool(use_beta)
        self.allow_neg_eigval = bool(allow_neg_eigval)
        self.use_output_gate = bool(use_output_gate)
        self.output_gate_activation = output_gate_activation
        self.A_init_range = A_init_range
        self.num_householder = num_householder
        self.norm_eps = norm_eps
        self.rope_theta = float(rope_theta)
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.delta_backend = delta_backend
        self.decode_kernel = decode_kernel
        self.fuse_linear_cross_entropy = bool(fuse_linear_cross_entropy)
        self.activation_checkpointing = activation_checkpointing
        self.use_cache = use_cache
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
        # Set after the base __init__, whose built-in validator only knows attention layer names;
        # ours are validated above (and in ``validate`` below, which save_pretrained calls).
        self.layer_types = layer_types

    def validate(self) -> None:
        """Hugging Face's checks, except its ``layer_types`` check, which only knows attention
        layer names; ours ("delta_net", ...) are checked here and in ``__init__``."""
        for validator in getattr(self, "__class_validators__", ()):
            if validator.__name__ != "validate_layer_type":
                validator(self)
        if len(self.layer_types) != self.num_hidden_layers or any(t not in LAYER_TYPES for t in self.layer_types):
            raise ValueError(f"layer_types must hold num_hidden_layers entries from {list(LAYER_TYPES)}, got {self.layer_types}")

    @property
    def num_attention_heads(self) -> int:
        """Alias read by Hugging Face utilities."""
        return self.num_heads
