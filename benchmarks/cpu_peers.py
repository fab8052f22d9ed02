"""One decoder layer's linears on every CPU path (torch fp32/bf16, mquant W4A8, torchao, OpenVINO),
side by side in one run: the same as `mquant bench peers` (see its --help).

    pip install -e ".[peers]"   # torchao and OpenVINO (neither pulls torch); absent ones are skipped
    python benchmarks/cpu_peers.py --out docs/latency/cpu-peers-amd-epyc.json
"""

import sys

from mquant.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "peers", *sys.argv[1:]]))
