"""Prefill/decode latency of the integer runtime: the same as `mquant bench latency` (see its --help).

    python benchmarks/latency.py --preset qwen2-vl-2b --out docs/latency/latency-qwen2-vl-2b-cpu.json
"""

import sys

from mquant.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "latency", *sys.argv[1:]]))
