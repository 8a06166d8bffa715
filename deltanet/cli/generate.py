"""``deltanet generate``: stream text from a checkpoint."""

from __future__ import annotations

from deltanet.cli import CliParser

__all__ = ["cli_main", "generate_parser"]


def generate_parser() -> CliParser:
    p = CliParser(prog="deltanet generate", description="Stream text from a checkpoint (tokens/s on stderr).")
    p.add_argument("--checkpoint", required=True, help="run directory (uses its latest) or checkpoint directory")
    p.add_argument("--prompt", default="")
    p.add_argument("--batch-file", help="prompts, one per line, generated as one left-padded batch")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling, in (0, 1] (default 0.95)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0: off)")
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
    if args.top_k < 0:
        p.error(f"--top-k must be >= 0 (0 = off), got {args.top_k}")

    import torch

    from deltanet.training.checkpoint import find_checkpoint, load_model
    from deltanet.training.generation import print_generation, read_prompts
    from deltanet.training.tokenizer import load_tokenizer

    prompts = read_prompts(args.batch_file) if args.batch_file else [args.prompt]
    ckpt = find_checkpoint(args.checkpoint)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    tokenizer = load_tokenizer(ckpt)
    if device == "cpu":
        from deltanet.training.distributed import configure_cpu_threads

        configure_cpu_threads()
    model = load_model(ckpt, device)
    print_generation(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    return 0
