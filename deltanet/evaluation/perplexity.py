"""Perplexity and bits per byte of a model on packed held-out text; ``deltanet eval ppl``.

Bits per byte divides the summed NLL (in bits) by the UTF-8 bytes of the predicted tokens
(EOS counts zero bytes), so it compares models with different tokenizers.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["cli_main", "evaluate_rows", "nll_sums"]


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


@torch.no_grad()
def evaluate_rows(model, rows: Iterable[np.ndarray], *, eos_id: int, token_bytes: np.ndarray, device,
                  doc_mask: bool = True, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Summed ``[nll, targets, bytes]`` over batches of packed rows ``[B, T]`` (see :func:`nll_sums`)."""
    from deltanet.training.data import make_batch

    was_training = model.training
    model.eval()
    tb = torch.as_tensor(token_bytes, device=device)
    total = torch.zeros(3, dtype=torch.float64, device=device)
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
            total += nll_sums(logits, labels, tb)
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


def cli_main(argv: list[str]) -> int:
    """``deltanet eval ppl --checkpoint DIR [--data SPEC] [--split val] [--max-tokens N]``."""
    from deltanet.cli import CliParser

    p = CliParser(prog="deltanet eval ppl", description="Loss, perplexity and bits per byte of a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="run directory (uses its latest) or checkpoint directory")
    p.add_argument("--data", help="data spec (default: the run's own data); its held-out split is used")
    p.add_argument("--split", choices=("val", "train"), default="val")
    p.add_argument("--seq-len", type=int, help="default: the run's seq_len")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=0, help="evaluate at most this many tokens (0 = all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    import json

    from deltanet.training.checkpoint import find_checkpoint, load_model
    from deltanet.training.config import DataConfig
    from deltanet.training.data import PackedTokens, build_token_cache, eval_positions, open_corpus
    from deltanet.training.distributed import configure_cpu_threads
    from deltanet.training.tokenizer import load_tokenizer

    ckpt = find_checkpoint(args.checkpoint)
    tokenizer = load_tokenizer(ckpt)
    state_path = ckpt / "trainer_state.json"
    run_data = json.loads(state_path.read_text())["config"]["data"] if state_path.is_file() else {}
    data_cfg = DataConfig(**{k: v for k, v in run_data.items() if k in DataConfig.__dataclass_fields__})
    if args.data:
        data_cfg.data = args.data
    seq_len = args.seq_len or data_cfg.seq_len
    if seq_len <= 0 or args.batch_size <= 0 or args.max_tokens < 0:
        raise ValueError("--seq-len and --batch-size must be > 0, --max-tokens >= 0")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cpu":
        configure_cpu_threads()
    model = load_model(ckpt, device)
    corpus = open_corpus(data_cfg.data, data_cfg.val_fraction)
    cache = build_token_cache(corpus, tokenizer, data_cfg.resolved_cache_dir())
    packed = PackedTokens(cache.tokens(args.split), seq_len, shuffle=False)
    if packed.n_rows == 0:
        raise ValueError(f"the {args.split} split of {data_cfg.data} has fewer than seq_len={seq_len} tokens")
    # all rows, or (--max-tokens) rows spread over the split, as the trainer's validation does
    positions = eval_positions(packed.n_rows, max(1, args.max_tokens // seq_len) if args.max_tokens else packed.n_rows)
    chunks = [positions[i:i + args.batch_size] for i in range(0, len(positions), args.batch_size)]
    if len(chunks) > 4 and device.type == "cpu":
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="eval", leave=False)
    rows = (packed.rows(c) for c in chunks)
    amp = torch.bfloat16 if device.type == "cuda" else None
    res = summarize(evaluate_rows(model, rows, eos_id=tokenizer.eos_id, token_bytes=tokenizer.token_bytes(),
                                  device=device, doc_mask=data_cfg.doc_mask, autocast_dtype=amp))
    res.update(checkpoint=str(ckpt), data=data_cfg.data, split=args.split)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{ckpt}  {data_cfg.data} [{args.split}]  {res['tokens']:,} tokens, {res['bytes']:,} bytes")
        print(f"loss {res['loss']:.4f} | perplexity {res['ppl']:.2f} | bits/byte {res['bpb']:.4f}")
    return 0
