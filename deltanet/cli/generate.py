"""``deltanet generate``: stream text from a checkpoint."""

from __future__ import annotations

import sys

from deltanet.cli import CliParser

__all__ = ["cli_main", "generate_parser"]


def generate_parser() -> CliParser:
    p = CliParser(prog="deltanet generate", description="Stream text from a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="run directory (uses its latest) or checkpoint directory")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling, in (0, 1] (default 0.95)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    return p


def cli_main(argv: list[str]) -> int:
    """``deltanet generate --checkpoint DIR [--prompt TEXT] ...``."""
    p = generate_parser()
    args = p.parse_args(argv)
    # checked before the model loads and the prompt is printed
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0 (0 = greedy), got {args.temperature:g}")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p:g}")

    import torch

    from deltanet.training.checkpoint import find_checkpoint, load_model
    from deltanet.training.generation import generate_text
    from deltanet.training.tokenizer import load_tokenizer

    ckpt = find_checkpoint(args.checkpoint)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    tokenizer = load_tokenizer(ckpt)
    if device == "cpu":
        from deltanet.training.distributed import configure_cpu_threads

        configure_cpu_threads()
    model = load_model(ckpt, device)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_p=args.top_p, seed=args.seed, stream=True)
    sys.stdout.write("\n")
    return 0
