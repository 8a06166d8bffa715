"""Model benchmarks (training throughput and memory; decoding speed): a thin wrapper.

    python benchmarks/bench_model.py model --lengths 2048,4096,8192 --out benchmarks/results/model.md
    python benchmarks/bench_model.py decode --batch 1,32 --out benchmarks/results/decode.md

Same as ``deltanet bench model|decode``; see ``deltanet/bench/model.py`` for the options.
"""

import sys

from deltanet.bench.model import cli_main

if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
