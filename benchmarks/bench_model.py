"""Model benchmarks (training throughput and memory; decoding speed): a thin wrapper.

    python benchmarks/bench_model.py model --lengths 2048,4096,8192 --out benchmarks/results/model.md
    python benchmarks/bench_model.py decode --batch 1,32 --out benchmarks/results/decode.md

Activation checkpointing, memory vs speed (deltanet-340m, 32K tokens per step, bf16 autocast,
one row per mode and length: tokens/s and peak memory; run on one H100)::

    python benchmarks/bench_model.py model --models deltanet-340m --lengths 2048,8192 --tokens 32768 \
        --activation-checkpointing none,mixer,block --out benchmarks/results/DATE-h100-activation-checkpointing.md

Peak memory and tokens/s against fla's DeltaNet in both training regimes (bf16 parameters;
float32 parameters + bf16 autocast), with the A/B of our memory options, in one budgeted call::

    python benchmarks/gpu_memory_check.py OUT_DIR --budget-s 540

Same as ``deltanet bench model``; ``deltanet bench model --help`` lists the options.
"""

import sys

from deltanet.cli.bench_model import cli_main

if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
