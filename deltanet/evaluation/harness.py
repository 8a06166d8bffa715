"""lm-evaluation-harness adapter: evaluate our checkpoints on lm-eval tasks.

Our model is a Hugging Face ``PreTrainedModel``, so the adapter reuses lm-eval's ``HFLM``
(batching, request sorting, context/continuation splitting, rolling windows, generation)
with two things it cannot find by itself: the model loaded from our checkpoint layout
(``deltanet.training.checkpoint``) and a ``transformers`` tokenizer built from the tokenizer
the run stored (byte-level BPE ``tokenizer.json``, or raw bytes). It is registered with
lm-eval as model ``"deltanet"`` when first used (importing this module alone never imports
lm-eval), so after ``from deltanet.evaluation.harness import DeltaNetLM``::

    lm_eval.simple_evaluate(model="deltanet", model_args="pretrained=runs/x", tasks=[...])

works, and ``deltanet eval harness runs/x --tasks hellaswag`` (:mod:`deltanet.cli.eval_harness`)
wraps exactly that.
lm-eval is an optional dependency: ``pip install 'deltanet[eval]'`` (``lm-eval>=0.4.5``).

Loglikelihoods are conditioned on the tokenizer's EOS when the context is empty (HFLM's
``prefix_token_id`` falls back to EOS because our tokenizers define no BOS): training packs
documents separated by EOS, so EOS is what our models saw at a document start.

Local tasks (no hub access needed) are YAML files over local JSONL, e.g.::

    task: my_task
    dataset_path: json
    dataset_kwargs: {data_files: {test: /abs/path/data.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{question}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: "{{answer}}"
    metric_list: [{metric: acc}]

and ``deltanet eval harness CKPT --tasks my_task --include-path DIR_WITH_YAML``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

__all__ = ["DeltaNetLM", "hf_tokenizer", "evaluate"]

_INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'deltanet[eval]' (lm-eval>=0.4.5)"


def _lm_eval():
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401
    except ImportError as e:  # fail loudly with the fix, not with a NoneType error later
        raise ImportError(f"{_INSTALL_HINT} ({e})") from None
    return lm_eval


def hf_tokenizer(tokenizer):
    """A ``transformers.PreTrainedTokenizerFast`` that encodes exactly like our ``tokenizer``.

    ``tokenizer`` is what ``deltanet.training.tokenizer.load_tokenizer`` returns. Byte-level
    BPE tokenizers wrap their ``tokenizers.Tokenizer`` object; the raw-bytes tokenizer
    becomes a byte-level model with one token per byte (id = byte value) and EOS at 256.

    >>> from deltanet.training.tokenizer import ByteTokenizer
    >>> tok = hf_tokenizer(ByteTokenizer())
    >>> tok.encode("hé"), tok.eos_token_id, tok.decode([104, 195, 169])
    ([104, 195, 169], 256, 'hé')
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from deltanet.training.tokenizer import EOS_TOKEN, ByteTokenizer, HFTokenizer, _bytes_to_unicode

    if isinstance(tokenizer, ByteTokenizer):
        byte_char = _bytes_to_unicode()
        vocab = {byte_char[b]: b for b in range(256)}
        # No merges: BPE over the byte alphabet is one token per byte, ids = byte values.
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([EOS_TOKEN])
        if tok.token_to_id(EOS_TOKEN) != tokenizer.eos_id:
            raise RuntimeError("byte tokenizer: EOS did not land on id 256")
        eos = EOS_TOKEN
    elif isinstance(tokenizer, HFTokenizer):
        tok = tokenizer.tok
        eos = tok.id_to_token(tokenizer.eos_id)
    else:
        raise TypeError(f"tokenizer must be a ByteTokenizer or HFTokenizer, got {type(tokenizer).__name__}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)


def _load(pretrained: str | Path, device: torch.device, dtype: torch.dtype):
    from deltanet.training.checkpoint import find_checkpoint, load_model
    from deltanet.training.tokenizer import load_tokenizer

    ckpt = find_checkpoint(pretrained)
    model = load_model(ckpt, device=device).to(dtype)
    return model, hf_tokenizer(load_tokenizer(ckpt))


@functools.cache
def _lm_class():
    """Define (once) and register the lm-eval model class; lm-eval is imported only here."""
    lm_eval = _lm_eval()
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    @register_model("deltanet")
    class _DeltaNetLM(HFLM):
        """lm-eval model ``deltanet``: ``pretrained`` is a run or checkpoint directory (or a
        loaded ``DeltaNetForCausalLM``, then ``tokenizer`` must be given)."""

        def __init__(self, pretrained, tokenizer=None, device: str = "auto",
                     dtype: str | torch.dtype = "float32", batch_size: int | str = 1,
                     max_length: int | None = None, **kwargs):
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" \
                else torch.device(device)
            dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            if isinstance(pretrained, (str, Path)):
                model, tok = _load(pretrained, dev, dt)
                tokenizer = tokenizer if tokenizer is not None else tok
            else:
                if tokenizer is None:
                    raise ValueError("tokenizer is required when pretrained is a model instance")
                model = pretrained.to(dev)
            if not hasattr(tokenizer, "encode") or not hasattr(tokenizer, "pad_token_id"):
                tokenizer = hf_tokenizer(tokenizer)  # one of ours -> transformers tokenizer
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=int(batch_size)
                             if str(batch_size).isdigit() else batch_size,
                             max_length=max_length or model.config.max_position_embeddings,
                             backend="causal", **kwargs)

        def _model_call(self, inps, attn_mask=None, labels=None):
            # Scoring never needs the recurrent/KV cache our model would build in eval mode.
            with torch.no_grad():
                return self.model(inps, use_cache=False).logits

    del lm_eval
    return _DeltaNetLM


def __getattr__(name: str):
    # ``from deltanet.evaluation.harness import DeltaNetLM`` builds the class on first use, so
    # importing this module never requires lm-eval.
    if name == "DeltaNetLM":
        return _lm_class()
    raise AttributeError(name)


def evaluate(
    pretrained,
    tasks: list[str],
    *,
    tokenizer=None,
    include_path: str | Path | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    device: str = "auto",
    dtype: str = "float32",
    log_samples: bool = False,
    seed: int = 0,
) -> dict:
    """Run lm-eval ``tasks`` on a checkpoint (or model + tokenizer); returns lm-eval's results.

    ``include_path`` adds a directory of local task YAMLs. ``results["results"][task]`` holds
    the metrics, e.g. ``"acc,none"``; with ``log_samples`` ``results["samples"][task]`` holds
    each document's requests and responses (loglikelihoods).
    """
    lm_eval = _lm_eval()
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("tasks must name at least one lm-eval task")
    lm = _lm_class()(pretrained, tokenizer=tokenizer, device=device, dtype=dtype,
                     batch_size=batch_size)
    tm = None
    if include_path is not None:
        # Indexing lm-eval's thousands of built-in YAMLs takes ~20 s; skip it when the local
        # directory already defines every requested task.
        tm = TaskManager(include_path=str(include_path), include_defaults=False)
        if any(t not in tm.all_tasks for t in tasks):
            tm = None
    if tm is None:
        tm = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise ValueError(f"tasks: unknown lm-eval task(s) {unknown} (add --include-path for local YAMLs)")
    return lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=tm, num_fewshot=num_fewshot, limit=limit,
        log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed,
    )
