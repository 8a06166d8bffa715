"""DeltaNet language models (Hugging Face ``PreTrainedModel`` + ``GenerationMixin``).

A pre-norm residual stack; each block is ``x + mixer(norm(x))`` then ``x + SwiGLU(norm(x))``,
with the mixer picked per layer by ``config.layer_types``. Three batch layouts share one code
path:

- padded batches: ``attention_mask [B, T]`` (left padding for generation) — padded tokens
  leave recurrent states untouched and are invisible to attention, and RoPE positions count
  real tokens only, so a padded row computes what the row alone computes;
- packed documents: ``cu_seqlens = [0, ..., T]`` with ``B == 1`` — no state, conv tap or
  attention score crosses a document boundary, and positions restart at each document. The
  forward wraps ``cu_seqlens`` once into a :class:`~deltanet.ops.packing.PackedSequences` (its one
  host read; positions in documents and the kernels' chunk table computed once) and hands that
  to every layer and op, forward and backward;
- cached decoding: ``past_key_values`` (a :class:`DeltaNetCache`).

Context parallelism (``context_parallel=<process group>``): each rank passes a consecutive segment
of the same rows and gets that segment's logits / loss share (:mod:`deltanet.parallel`); plain
and packed rows (``cu_seqlens`` of the whole row), every layer type, activation checkpointing.

``config.activation_checkpointing`` ("none" | "mixer" | "mlp" | "block") recomputes each token
mixer, each MLP or each whole block in backward during training (non-reentrant ``torch.utils.checkpoint``,
which also replays the RNG state); inference and cached forwards never recompute.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from ..layers import AttentionMixer, DeltaNetMixer, LinearAttentionMixer, RMSNorm, ShortConvolution, SwiGLU
from ..layers.delta_net import DECODE_KERNELS, DELTA_TYPES, takes_fused_decode
from ..ops.delta_rule.backward_memory import checkpoint_kwargs
from ..ops.packing import PackedSequences
from ..parallel.halo import SegmentLayout
from .cache import DeltaNetCache
from .configuration import ACTIVATION_CHECKPOINTING, DeltaNetConfig
from .cuda_graph import decode_step, graph_decodable
from .loss import fused_linear_cross_entropy

__all__ = ["CONTEXT_PARALLEL_TYPES", "DeltaNetBlock", "DeltaNetForCausalLM", "DeltaNetModel",
           "DeltaNetPreTrainedModel", "set_decode_kernel"]


# transformers renamed the cache field of model outputs from ``past_key_values`` to ``cache``
# (5.2x; ``past_key_values`` stays readable through a property). ``generate`` reads the field
# its version knows, so the outputs declare that one; both names are readable either way.
CACHE_FIELD = "cache" if isinstance(getattr(ModelOutput, "past_key_values", None), property) else "past_key_values"


def _output_class(name: str, first: tuple[str, ...], doc: str) -> type:
    fields = [(f, torch.Tensor | None, dataclasses.field(default=None)) for f in first]
    fields += [(CACHE_FIELD, DeltaNetCache | None, dataclasses.field(default=None)),
               ("hidden_states", tuple | None, dataclasses.field(default=None))]
    namespace = {"__doc__": doc, "__module__": __name__}
    if CACHE_FIELD == "past_key_values":
        namespace["cache"] = property(lambda self: self.past_key_values)
    return dataclasses.make_dataclass(name, fields, bases=(ModelOutput,), namespace=namespace)


DeltaNetModelOutput = _output_class(
    "DeltaNetModelOutput", ("last_hidden_state",),
    "Backbone output: ``last_hidden_state``, the cache (``past_key_values`` / ``cache``), ``hidden_states``.")
DeltaNetCausalLMOutput = _output_class(
    "DeltaNetCausalLMOutput", ("loss", "logits"),
    "Causal LM output: ``loss``, ``logits``, the cache (``past_key_values`` / ``cache``), ``hidden_states``.")


def _init_module():
    """``transformers.initialization`` (5.x: its functions skip tensors loaded from a checkpoint);
    on 4.x, which loads weights after initialising, plain ``torch.nn.init``."""
    try:
        from transformers import initialization
    except ImportError:
        return nn.init
    return initialization


def _with_cache(output: ModelOutput, cache: DeltaNetCache | None) -> ModelOutput:
    if cache is not None:
        output[CACHE_FIELD] = cache
    return output


# Layer types that run under context parallelism: the delta rules and linear attention exchange
# state summaries, the attention layers the keys/values their queries reach before the segment
# (deltanet.parallel).
CONTEXT_PARALLEL_TYPES = (*DELTA_TYPES, "sliding_attention", "full_attention", "linear_attention")


def _check_context_parallel(config, use_cache, cache, attention_mask) -> None:
    others = sorted(set(config.layer_types) - set(CONTEXT_PARALLEL_TYPES))
    if others:
        raise ValueError(f"context_parallel supports the layer types {list(CONTEXT_PARALLEL_TYPES)}, "
                         f"the config also has {others}")
    if use_cache or cache is not None or attention_mask is not None:
        # a cache holds one rank's states only; padding would shift every later rank's positions
        raise ValueError("context_parallel cannot be combined with a cache or attention_mask (padding); "
                         "pack documents with cu_seqlens instead")


def _context_parallel_loss(logits, labels, group) -> torch.Tensor:
    """This rank's token-loss sum over the whole group's count of labelled tokens."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must be [B, T_r] = {tuple(logits.shape[:2])} (already shifted) under "
                         f"context_parallel, got {tuple(labels.shape)}")
    n = (labels != -100).sum().to(torch.float64)
    torch.distributed.all_reduce(n, group=group)
    total = F.cross_entropy(logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32)),
                            labels.flatten(), ignore_index=-100, reduction="sum")
    return total / n.clamp(min=1).to(total.dtype)


def _make_mixer(config: DeltaNetConfig, layer_idx: int) -> nn.Module:
    kind = config.layer_types[layer_idx]
    if kind in DELTA_TYPES:
        return DeltaNetMixer(config, layer_idx)
    if kind == "linear_attention":
        return LinearAttentionMixer(config, layer_idx)
    if kind == "sliding_attention":
        return AttentionMixer(config, layer_idx, window=config.sliding_window)
    return AttentionMixer(config, layer_idx)


def set_decode_kernel(model: nn.Module, kernel: str) -> None:
    """Route the one-token decode steps of every delta-rule layer of ``model`` (a backbone or an
    LM): ``"fused"`` (one Triton kernel per layer), ``"eager"`` or ``"auto"`` (the config field
    ``decode_kernel``; set here on a built model, config included, for A/B comparisons)."""
    if kernel not in DECODE_KERNELS:
        raise ValueError(f"decode_kernel must be one of {list(DECODE_KERNELS)}, got {kernel!r}")
    model.config.decode_kernel = kernel
    for module in model.modules():
        if isinstance(module, (DeltaNetMixer, AttentionMixer, DeltaNetBlock)):
            module.decode_kernel = kernel


class DeltaNetBlock(nn.Module):
    """Pre-norm residual block: ``x += mixer(norm(x)); x += mlp(norm(x))``.

    One-token decode steps with ``decode_kernel`` fused (the config field, or this attribute:
    :func:`set_decode_kernel`) run the MLP as two Triton kernels (norm + gate/up + SwiGLU, down +
    residual) whatever the mixer; a delta-rule mixer adds the residual in its output projection's
    kernel (``deltanet.ops.decode_linear``)."""

    def __init__(self, config: DeltaNetConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = _make_mixer(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.decode_kernel = getattr(config, "decode_kernel", "auto")

    def forward(self, x, checkpoint_mixer: bool = False, checkpoint_mlp: bool = False, **mixer_kwargs):
        """``checkpoint_mixer``: keep none of the mixer's activations, rerun it in backward
        (``activation_checkpointing="mixer"``); ``checkpoint_mlp``: the same for the MLP
        (``"mlp"``: its gate / up projections, 2 x intermediate values per token, are not kept;
        backward reruns the norm and those two projections from the block's residual stream, not
        the down projection: ``SwiGLU(recompute=True)``). The model only sets them in training,
        cache-free."""
        if checkpoint_mixer:
            x = x + checkpoint(self._mix, x, use_reentrant=False, **checkpoint_kwargs(), **mixer_kwargs)
        else:
            x = self._mix(x, residual=x, **mixer_kwargs)
        if checkpoint_mlp and torch.compiler.is_compiling():  # an outer compile picks what to save
            return x + checkpoint(self.mlp, x, norm=self.mlp_norm, use_reentrant=False, **checkpoint_kwargs())
        if checkpoint_mlp:
            return self.mlp(x, norm=self.mlp_norm, residual=x, recompute=True)
        fused = mixer_kwargs.get("cache") is not None and takes_fused_decode(self.decode_kernel, x,
                                                                             self.mlp.gate_proj.weight)
        return self.mlp(x, norm=self.mlp_norm, residual=x, fused_decode=fused)

    def _mix(self, x, residual=None, **mixer_kwargs):
        """``residual + mixer(norm(x))`` (``mixer(norm(x))`` without a residual)."""
        # Every mixer and the MLP take the pre-norm and fuse it with their input projections:
        # the normalised activations are recomputed in backward, not kept.
        if isinstance(self.attn, (DeltaNetMixer, AttentionMixer, LinearAttentionMixer)):
            return self.attn(x, norm=self.attn_norm, residual=residual, **mixer_kwargs)
        y = self.attn(self.attn_norm(x), **mixer_kwargs)
        return y if residual is None else residual + y


class DeltaNetPreTrainedModel(PreTrainedModel):
    config_class = DeltaNetConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeltaNetBlock"]
    _supports_cache_class = True
    _is_stateful = True  # recurrent states cannot be rolled back: no assisted decoding

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        init = _init_module()

        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, ShortConvolution):
            bound = module.kernel_size ** -0.5
            init.uniform_(module.weight, -bound, bound)
        elif isinstance(module, DeltaNetMixer) and module.gated:
            module.reset_decay_parameters(init)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own DeltaNetCache on the first forward


class DeltaNetModel(DeltaNetPreTrainedModel):
    """The backbone: embeddings, blocks, final norm. Returns :class:`DeltaNetModelOutput`."""

    def __init__(self, config: DeltaNetConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=None)
        self.layers = nn.ModuleList(DeltaNetBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _prepare(self, B, T, past, attention_mask, position_ids, packed: PackedSequences | None, device):
        """-> (mask of the new tokens or None, full key mask or None, position_ids [B, T])."""
        full_mask = None
        if attention_mask is not None:
            if attention_mask.ndim != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] not in (T, past + T):
                raise ValueError(
                    f"attention_mask must have shape [B, T] = {(B, T)} or [B, past + T] = {(B, past + T)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            full_mask = attention_mask.to(device)
            if full_mask.shape[1] != past + T:  # mask of the new tokens only: the past was all real
                full_mask = torch.cat([full_mask.new_ones(B, past), full_mask], dim=1)
            if bool(full_mask.all()):
                full_mask = None
        if position_ids is None:
            if full_mask is not None:
                position_ids = (full_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -T:]
            elif packed is not None:
                position_ids = packed.positions[None]
            else:
                position_ids = torch.arange(past, past + T, device=device)[None].expand(B, T)
        mask = full_mask[:, -T:] if full_mask is not None else None
        return mask, full_mask, position_ids

    def _checkpointing(self, cache: DeltaNetCache | None) -> str:
        """What this forward recomputes in backward: ``config.activation_checkpointing`` (or
        "block" after Hugging Face's ``gradient_checkpointing_enable()``) while training, else
        "none". Never with a cache: a rerun block would advance the cached states twice."""
        mode = getattr(self.config, "activation_checkpointing", "none")
        if mode not in ACTIVATION_CHECKPOINTING:  # the config validates it; this catches later assignment
            raise ValueError(f"activation_checkpointing must be one of {list(ACTIVATION_CHECKPOINTING)}, "
                             f"got {mode!r}")
        if self.gradient_checkpointing:
            mode = "block"
        if not (self.training and torch.is_grad_enabled()) or cache is not None:
            return "none"
        return mode

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DeltaNetCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cu_seqlens: torch.Tensor | PackedSequences | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: DeltaNetCache | None = None,
        context_parallel=None,
        **kwargs,
    ) -> DeltaNetModelOutput:
        """``context_parallel``: a process group whose ranks hold consecutive segments of the
        same rows (``deltanet.parallel.split_segment``); every layer type
        (``CONTEXT_PARALLEL_TYPES``), activation checkpointing included; no cache or padding mask.
        Default ``position_ids`` then count from the segment's start in the whole row.
        ``cu_seqlens`` (packed documents, ``B == 1``) then gives the WHOLE row's boundaries, the
        same on every rank: documents may start anywhere and span ranks; default positions
        count from each document's start."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if context_parallel is not None:
            _check_context_parallel(self.config, use_cache, past_key_values if past_key_values is not None else cache,
                                    attention_mask)
            use_cache = False
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        past_key_values = past_key_values if past_key_values is not None else cache
        if use_cache is None:  # packed documents are a training/scoring layout: no cache by default
            use_cache = self.config.use_cache and not self.training and cu_seqlens is None
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError(f"cu_seqlens requires batch size 1 (documents packed along T), got {B}")
            if use_cache or past_key_values is not None:
                raise ValueError("cu_seqlens (packed documents) cannot be combined with a cache (use_cache=True)")
            if attention_mask is not None:
                raise ValueError("give either cu_seqlens (packed documents) or attention_mask (padding), not both")
            if isinstance(cu_seqlens, PackedSequences):
                if cu_seqlens.device != x.device:
                    raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the inputs are on {x.device}")
            else:
                cu_seqlens = torch.as_tensor(cu_seqlens, device=x.device)
                if cu_seqlens.dtype not in (torch.int32, torch.int64):
                    raise TypeError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
            if context_parallel is None:  # (under context parallelism: the whole row's, below)
                # validated and derived once: every layer and op (and their backward) reads this
                cu_seqlens = PackedSequences.from_cu_seqlens(cu_seqlens, T)
        if use_cache and past_key_values is None:
            past_key_values = DeltaNetCache(self.config)
        if past_key_values is not None and not isinstance(past_key_values, DeltaNetCache):
            raise TypeError(f"past_key_values must be a DeltaNetCache, got {type(past_key_values).__name__}")
        if past_key_values is not None and past_key_values.is_static:
            past_key_values.make_dynamic()  # left by graph decoding: eager forwards grow K/V along T
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past_key_values is not None and past_key_values.batch_size() not in (None, B):
            raise ValueError(f"the batch has {B} rows but the cache (past_key_values) holds states of "
                             f"{past_key_values.batch_size()}; decode with the batch the cache was built from")
        if context_parallel is not None:
            # every rank's segment length (and the documents), gathered once and handed to every
            # layer; RoPE positions continue from the earlier ranks' segments (from the start of
            # the document, with packed documents: the segment's positions inside its documents)
            context_parallel = SegmentLayout.gather(context_parallel, T, B, x.device, documents=cu_seqlens)
            past = context_parallel.start
            cu_seqlens = context_parallel.local_documents
        mask, full_mask, position_ids = self._prepare(B, T, past, attention_mask, position_ids, cu_seqlens, x.device)

        hidden_states = (x,) if output_hidden_states else None
        kw = dict(mask=mask, full_mask=full_mask, position_ids=position_ids, cu_seqlens=cu_seqlens,
                  cache=past_key_values)
        if context_parallel is not None:
            kw["context_parallel"] = context_parallel
        mode = self._checkpointing(past_key_values)
        # Under context parallelism a recomputed region reruns its exchanges (halos, summaries) in
        # backward: every rank must rerun all of them, so the recomputation runs to the region's
        # end (no early stop after the last saved tensor, whose place may differ across ranks).
        # They give the forward's results again: same inputs, same layout, deterministic sums.
        no_early_stop = context_parallel is not None and mode != "none"
        with set_checkpoint_early_stop(False) if no_early_stop else contextlib.nullcontext():
            for block in self.layers:
                if mode == "block":
                    x = checkpoint(block, x, use_reentrant=False, **checkpoint_kwargs(), **kw)
                else:
                    x = block(x, checkpoint_mixer=mode == "mixer", checkpoint_mlp=mode == "mlp", **kw)
                if output_hidden_states:
                    hidden_states += (x,)
        x = self.norm(x)
        if past_key_values is not None:
            past_key_values.seen_tokens += T
        return _with_cache(DeltaNetModelOutput(last_hidden_state=x, hidden_states=hidden_states), past_key_values)


class DeltaNetForCausalLM(DeltaNetPreTrainedModel, GenerationMixin):
    """DeltaNet (or hybrid / baseline) language model.

    Example::

        >>> from deltanet.models.presets import get_config
        >>> model = DeltaNetForCausalLM(get_config("tiny", vocab_size=64))
        >>> ids = torch.randint(0, 64, (2, 10))
        >>> out = model.eval()(ids, labels=ids)
        >>> out.logits.shape, out.loss.shape
        (torch.Size([2, 10, 64]), torch.Size([]))
        >>> model.train()(ids, labels=ids).logits is None   # training: fused loss, no logits
        True
    """

    # One-token decode steps on CUDA replay a CUDA graph per generation (``cuda_graph.py``; every
    # layer mix: attention layers decode from a preallocated / ring K/V cache): one launch instead
    # of ~25 per layer. Set to False on an instance (or the class) to decode eagerly.
    cuda_graph_decoding: bool = True
    # ``deltanet.models.decoding.decode`` keeps each captured step for the next generation of the
    # same shapes (no eager first step, no capture then). False: capture every generation anew.
    reuse_decode_graphs: bool = True
    # ``generate``'s greedy search on a device that captures decode steps runs the captured loop
    # (``deltanet.models.decoding.generate_fast``: same tokens, no Python per token); options it does
    # not cover run Hugging Face's loop. False: always Hugging Face's loop (over ``decode_step``).
    fast_generate: bool = True

    # transformers 5 maps tied parameters target -> source; 4.x listed the tied names
    _tied_weights_keys = (
        {"lm_head.weight": "model.embed_tokens.weight"} if int(transformers.__version__.split(".")[0]) >= 5
        else ["lm_head.weight"]
    )

    def __init__(self, config: DeltaNetConfig):
        super().__init__(config)
        self.model = DeltaNetModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """Hugging Face's ``generate``; its greedy search runs the captured decode loop where that
        applies (see ``fast_generate``)."""
        from .decoding import generate_fast

        out = generate_fast(self, inputs, generation_config, kwargs)
        if out is not None:
            return out
        return super().generate(inputs, generation_config=generation_config, **kwargs)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DeltaNetCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        cu_seqlens: torch.Tensor | PackedSequences | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        cache: DeltaNetCache | None = None,
        context_parallel=None,
        **kwargs,
    ) -> DeltaNetCausalLMOutput:
        """Logits, and the next-token loss when ``labels`` are given (shifted inside, -100 ignored).

        ``context_parallel``: a process group whose ranks hold consecutive segments of the same
        rows (``cu_seqlens``: the whole row's document boundaries, as in :class:`DeltaNetModel`).
        ``labels`` are then this segment's targets already shifted (``labels[:, t]`` is the
        token after position t: split ``row[:, 1:]`` as ``input_ids`` splits ``row[:, :-1]``),
        and ``loss`` is this rank's share: the sum of its token losses over the group's count of
        labelled tokens, so that the group's losses add up to the single-device mean."""
        cache = past_key_values if past_key_values is not None else cache
        if context_parallel is not None:
            out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                             position_ids=position_ids, past_key_values=cache, use_cache=use_cache,
                             cu_seqlens=cu_seqlens,
                             output_hidden_states=output_hidden_states, context_parallel=context_parallel)
            h = out.last_hidden_state
            logits = self.lm_head(h)
            loss = None
            if labels is not None:
                loss = _context_parallel_loss(logits, labels.to(h.device), context_parallel)
            return DeltaNetCausalLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        if graph_decodable(self, input_ids, cache, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                           labels=labels, position_ids=position_ids, cu_seqlens=cu_seqlens,
                           output_hidden_states=output_hidden_states):
            logits = decode_step(self, input_ids, attention_mask, cache)
            return _with_cache(DeltaNetCausalLMOutput(logits=logits), cache)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, cu_seqlens=cu_seqlens,
            output_hidden_states=output_hidden_states,
        )
        h = out.last_hidden_state
        if labels is not None and self.config.fuse_linear_cross_entropy and self.training and torch.is_grad_enabled():
            # every position against the next label (the last one against none): no [B, T-1, D]
            # copy of the hidden states for the shift
            labels = labels.to(h.device)
            shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
            loss = fused_linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, shifted.flatten())
            return _with_cache(DeltaNetCausalLMOutput(loss=loss, hidden_states=out.hidden_states), getattr(out, CACHE_FIELD))
        if logits_to_keep and labels is None:
            h = h[:, -logits_to_keep:]  # generation only needs the last position's logits
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            # float32 log-softmax: bf16 cross-entropy over 32K classes is visibly biased
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32)), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        return _with_cache(DeltaNetCausalLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states),
                           getattr(out, CACHE_FIELD))

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None, use_cache=None,
        cache=None, next_sequence_length=None, **kwargs,
    ):
        """Feed only the tokens the cache has not seen (works with transformers' ``cache`` and
        ``past_key_values`` spellings alike)."""
        cache = past_key_values if past_key_values is not None else cache
        inputs = {"attention_mask": attention_mask, "use_cache": use_cache}
        if cache is not None and cache.get_seq_length() > 0:
            inputs["input_ids"] = input_ids[:, cache.get_seq_length():].contiguous()
        elif inputs_embeds is not None:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids.contiguous()
        inputs[CACHE_FIELD] = cache
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs
