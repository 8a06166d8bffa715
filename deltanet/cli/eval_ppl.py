"""``deltanet eval ppl``: loss, perplexity and bits per byte of a checkpoint
(:func:`deltanet.evaluation.perplexity.evaluate_checkpoint`)."""

from __future__ import annotations

import json

from deltanet.cli import CliParser

__all__ = ["cli_main", "ppl_parser"]


def ppl_parser() -> CliParser:
    p = CliParser(prog="deltanet eval ppl", description="Loss, perplexity and bits per byte of a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="run directory (uses its latest) or checkpoint directory")
    p.add_argument("--data", help="data spec (default: the run's own data); its held-out split is used")
    p.add_argument("--split", choices=("val", "train"), default="val")
    p.add_argument("--seq-len", type=int, help="context length of the evaluated rows (default: the run's "
                   "seq_len; 2x or 4x of it measures length extrapolation)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward")
    p.add_argument("--max-tokens", type=int, default=0, help="evaluate at most this many tokens (0 = all)")
    p.add_argument("--recall-split", action="store_true",
                   help="also report loss on associative-recall hits (the bigram (x[i-1], x[i]) occurred "
                        "earlier in the same document) and on all other tokens")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def cli_main(argv: list[str]) -> int:
    """``deltanet eval ppl --checkpoint DIR [--data SPEC] [--split val] [--seq-len N] [--recall-split]``."""
    args = ppl_parser().parse_args(argv)
    if (args.seq_len is not None and args.seq_len <= 0) or args.batch_size <= 0 or args.max_tokens < 0:
        raise ValueError("--seq-len and --batch-size must be > 0, --max-tokens >= 0")
    from deltanet.evaluation.perplexity import evaluate_checkpoint

    res = evaluate_checkpoint(args.checkpoint, data=args.data, split=args.split, seq_len=args.seq_len,
                              batch_size=args.batch_size, max_tokens=args.max_tokens,
                              recall_split=args.recall_split, device=args.device)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{res['checkpoint']}  {res['data']} [{args.split}]  seq_len {res['seq_len']} "
          f"(trained at {res['train_seq_len']})  {res['tokens']:,} tokens, {res['bytes']:,} bytes")
    print(f"loss {res['loss']:.4f} | perplexity {res['ppl']:.2f} | bits/byte {res['bpb']:.4f}")
    if args.recall_split:
        rec = res["recall"]
        for name in ("hit", "other"):
            r = rec[name]
            line = (f"loss {r['loss']:.4f} | perplexity {r['ppl']:.2f} | bits/byte {r['bpb']:.4f}"
                    if r["tokens"] else "no such tokens")
            print(f"  recall {name:5s} {r['tokens']:>10,} tokens: {line}")
        print(f"  hit fraction {rec['hit_fraction']:.3f}")
    return 0
