"""Kernel benchmark script: ``python benchmarks/bench_kernels.py --dims 64,128`` (same as
``deltanet bench kernels``). See ``deltanet/bench/kernels.py``."""

import sys

from deltanet.cli.bench_kernels import cli_main

if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
