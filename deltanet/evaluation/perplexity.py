"""Perplexity and bits per byte of a model on packed held-out text (behind ``deltanet eval ppl``).

Bits per byte divides the summed NLL (in bits) by the UTF-8 bytes of the predicted tokens
(EOS counts zero bytes), so it compares models with different tokenizers.

``seq_len`` evaluates at another context length than the run trained with (length
extrapolation). ``recall_split`` also reports the loss on associative-recall "hit" tokens
and on all others (Zoology, Arora et al. 2023): token ``x_i`` is a hit when the bigram
``(x_{i-1}, x_i)`` already occurred earlier in the same document, i.e. the context holds the
answer and a model that can look it up predicts it. Documents are the EOS-delimited segments
of a packed row; earlier documents in the row, and the part of a document cut off before the
row starts, don't count (the model cannot see them either).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["evaluate", "evaluate_checkpoint", "evaluate_rows", "nll_sums", "recall_hit_mask", "summarize"]


def nll_sums(logits: torch.Tensor, labels: torch.Tensor, token_bytes: torch.Tensor) -> torch.Tensor:
    """``[sum NLL (nats), number of targets, sum target bytes]`` for HF-style (unshifted) labels.

    >>> logits = torch.zeros(1, 3, 4)           # uniform over 4 tokens
    >>> out = nll_sums(logits, torch.tensor([[-100, 1, 2]]), torch.ones(4))
    >>> [round(x, 4) for x in out.tolist()]
    [2.7726, 2.0, 2.0]
    """
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    valid = targets != -100
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum")
    n_bytes = token_bytes[targets[valid]].sum()
    return torch.stack([nll.double(), valid.sum().double(), n_bytes.double()])


def recall_hit_mask(rows: np.ndarray, eos_id: int) -> np.ndarray:
    """Boolean ``[B, T]``: position ``i`` is an associative-recall hit when the bigram
    ``(x_{i-1}, x_i)`` occurred at an earlier position of the same document in the same row.

    Every document starts with EOS (see ``deltanet.training.data``), so an EOS at ``i - 1``
    opens a new document and forgets the bigrams seen so far; position 0 (no context) is never a hit.

    >>> recall_hit_mask(np.array([[0, 5, 6, 7, 5, 6, 0, 5, 6, 5, 6]]), eos_id=0).astype(int).tolist()
    [[0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]]
    """
    rows = np.asarray(rows)
    if rows.ndim != 2:
        raise ValueError(f"rows must be [B, T], got shape {rows.shape}")
    B, T = rows.shape
    hit = np.zeros((B, T), dtype=bool)
    if T < 2:
        return hit
    x = rows.astype(np.int64)
    prev, cur = x[:, :-1], x[:, 1:]
    # document index of the context token x_{i-1}: the number of EOS at or before i - 1
    doc = np.cumsum(x == eos_id, axis=1)[:, :-1]
    width = int(x.max()) + 1
    # one integer per (row, document, bigram); the first occurrence of each is not a hit
    key = ((np.arange(B)[:, None] * (T + 1) + doc) * width + prev) * width + cur
    if (B * (T + 1)) * width * width >= 2**63:
        raise ValueError("rows too large for the bigram key (B * T * vocab^2 >= 2^63)")
    _, first = np.unique(key.reshape(-1), return_index=True)
    flat = np.ones(key.size, dtype=bool)
    flat[first] = False
    hit[:, 1:] = flat.reshape(B, T - 1)
    return hit


def _split_nll_sums(logits: torch.Tensor, labels: torch.Tensor, token_bytes: torch.Tensor,
                    hit: torch.Tensor) -> torch.Tensor:
    """``[[nll, targets, bytes] of hits, [nll, targets, bytes] of the other targets]``."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    valid = targets != -100
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                          reduction="none").view_as(targets).double()
    nbytes = token_bytes[targets.clamp(min=0)].double()
    out = []
    for m in (valid & hit[:, 1:], valid & ~hit[:, 1:]):
        out.append(torch.stack([(nll * m).sum(), m.sum().double(), (nbytes * m).sum()]))
    return torch.stack(out)


@torch.no_grad()
def evaluate_rows(model, rows: Iterable[np.ndarray], *, eos_id: int, token_bytes: np.ndarray, device,
                  doc_mask: bool = True, autocast_dtype: torch.dtype | None = None,
                  recall_split: bool = False) -> torch.Tensor:
    """Summed ``[nll, targets, bytes]`` over batches of packed rows ``[B, T]`` (see :func:`nll_sums`).

    With ``recall_split`` the result is ``[3, 3]``: all targets, recall hits, the other targets
    (see :func:`recall_hit_mask`).
    """
    from deltanet.training.data import make_batch

    was_training = model.training
    model.eval()
    tb = torch.as_tensor(token_bytes, device=device)
    total = torch.zeros((3, 3) if recall_split else 3, dtype=torch.float64, device=device)

    def amp():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype)

    try:
        for r in rows:
            batch = {k: v.to(device) for k, v in make_batch(r, eos_id, doc_mask).items()}
            labels = batch.pop("labels")
            with amp():
                logits = model(**batch, use_cache=False).logits
            all_ = nll_sums(logits, labels, tb)
            if recall_split:
                hit = torch.from_numpy(recall_hit_mask(r, eos_id)).to(device).reshape(labels.shape)
                total += torch.cat([all_[None], _split_nll_sums(logits, labels, tb, hit)])
            else:
                total += all_
    finally:
        model.train(was_training)
    return total


def summarize(total: torch.Tensor) -> dict[str, float]:
    """Loss (nats/token), perplexity and bits per byte from summed ``[nll, targets, bytes]``."""
    nll, n, n_bytes = (float(x) for x in total.tolist())
    if n == 0:
        raise ValueError("no targets were evaluated")
    loss = nll / n
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "bpb": nll / math.log(2) / max(n_bytes, 1.0),
            "tokens": int(n), "bytes": int(n_bytes)}


def _summarize_split(part: torch.Tensor) -> dict:
    # a split with no targets (e.g. no repeated bigram in a short text) reports its count only
    return summarize(part) if float(part[1]) > 0 else {"tokens": 0, "bytes": 0}


def evaluate(model, tokenizer, tokens: np.ndarray, *, seq_len: int, batch_size: int = 8, max_tokens: int = 0,
             device="cpu", doc_mask: bool = True, recall_split: bool = False, autocast_dtype=None,
             progress: bool = False) -> dict:
    """Loss, perplexity and bits per byte of ``model`` on a token stream cut into ``seq_len`` rows.

    ``max_tokens`` (0 = all) evaluates that many tokens' worth of rows spread evenly over the
    stream, as the trainer's validation does. With ``recall_split`` the result also holds
    ``"recall": {"hit": {...}, "other": {...}, "hit_fraction": f}`` (see :func:`recall_hit_mask`).
    """
    from deltanet.training.data import PackedTokens, eval_positions

    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    packed = PackedTokens(tokens, seq_len, shuffle=False)
    if packed.n_rows == 0:
        raise ValueError(f"the evaluation split has {len(tokens)} tokens, fewer than seq_len={seq_len}")
    positions = eval_positions(packed.n_rows, max(1, max_tokens // seq_len) if max_tokens else packed.n_rows)
    chunks = [positions[i:i + batch_size] for i in range(0, len(positions), batch_size)]
    if progress and len(chunks) > 4:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=f"eval T={seq_len}", leave=False)
    total = evaluate_rows(model, (packed.rows(c) for c in chunks), eos_id=tokenizer.eos_id,
                          token_bytes=tokenizer.token_bytes(), device=device, doc_mask=doc_mask,
                          autocast_dtype=autocast_dtype, recall_split=recall_split)
    if not recall_split:
        return {**summarize(total), "seq_len": seq_len}
    res = {**summarize(total[0]), "seq_len": seq_len}
    hit, other = _summarize_split(total[1]), _summarize_split(total[2])
    res["recall"] = {"hit": hit, "other": other, "hit_fraction": hit["tokens"] / max(1, res["tokens"])}
    return res


def evaluate_checkpoint(checkpoint, *, data: str | None = None, split: str = "val", seq_len: int | None = None,
                        batch_size: int = 8, max_tokens: int = 0, recall_split: bool = False,
                        device: str = "auto", progress: bool | None = None) -> dict:
    """:func:`evaluate` on a saved run: its model and tokenizer, on a split of its own data (or of
    ``data``), at its training length (or ``seq_len``).

    ``checkpoint`` is a run directory (its latest checkpoint) or a checkpoint directory. The
    result is :func:`evaluate`'s plus ``checkpoint``, ``data``, ``split`` and ``train_seq_len``.
    ``progress`` (default: on CPU) shows a progress bar.
    """
    import json

    from deltanet.training.checkpoint import find_checkpoint, load_model
    from deltanet.training.config import DataConfig
    from deltanet.training.data import build_token_cache, open_corpus
    from deltanet.training.distributed import configure_cpu_threads
    from deltanet.training.tokenizer import load_tokenizer

    if split not in ("val", "train"):
        raise ValueError(f"split must be 'val' or 'train', got {split!r}")
    ckpt = find_checkpoint(checkpoint)
    tokenizer = load_tokenizer(ckpt)
    state_path = ckpt / "trainer_state.json"
    run_data = json.loads(state_path.read_text())["config"]["data"] if state_path.is_file() else {}
    data_cfg = DataConfig(**{k: v for k, v in run_data.items() if k in DataConfig.__dataclass_fields__})
    if data:
        data_cfg.data = data
    seq_len = data_cfg.seq_len if seq_len is None else seq_len
    if seq_len <= 0 or batch_size <= 0 or max_tokens < 0:
        raise ValueError(f"seq_len and batch_size must be > 0, max_tokens >= 0; got {seq_len}, {batch_size}, "
                         f"{max_tokens}")
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          ("cpu" if device == "auto" else device))
    if device.type == "cpu":
        configure_cpu_threads()
    model = load_model(ckpt, device)
    corpus = open_corpus(data_cfg.data, data_cfg.val_fraction)
    cache = build_token_cache(corpus, tokenizer, data_cfg.resolved_cache_dir())
    tokens = cache.tokens(split)
    if len(tokens) < seq_len:
        raise ValueError(f"the {split} split of {data_cfg.data} has fewer than seq_len={seq_len} tokens")
    amp = torch.bfloat16 if device.type == "cuda" else None
    res = evaluate(model, tokenizer, tokens, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens,
                   device=device, doc_mask=data_cfg.doc_mask, recall_split=recall_split, autocast_dtype=amp,
                   progress=device.type == "cpu" if progress is None else progress)
    res.update(checkpoint=str(ckpt), data=data_cfg.data, split=split, train_seq_len=data_cfg.seq_len)
    return res
