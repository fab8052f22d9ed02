"""One decoder layer's linears on every CPU path (torch fp32/bf16, mquant W4A8, torchao, OpenVINO),
side by side in one run: the same as `mquant bench peers` (see its --help).

    # torchao and OpenVINO (neither pulls torch; absent ones are skipped), in an environment of their
    # own: with torchao installed transformers imports it in every mquant command, warnings and all
    python3 -m venv .venv-peers && .venv-peers/bin/pip install -q torch==2.13.0 && .venv-peers/bin/pip install -q -e '.[peers]'
    .venv-peers/bin/python benchmarks/cpu_peers.py --out docs/latency/cpu-peers-amd-epyc.json
"""

import sys

from mquant.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "peers", *sys.argv[1:]]))
