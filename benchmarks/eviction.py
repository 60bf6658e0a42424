"""Lossy eviction baselines vs ``full`` on SmolLM2 -- a thin wrapper over ``kvbound bench``.

Runs the budget-sweep scenario for the lossy policies on the built-in canals prompt at budgets
32/64/128 with 64 greedy new tokens: token match, first divergence, KL, memory by tier and time
per token as a ratio to ``full`` measured in the same run. Extra arguments go to ``kvbound bench``
(later ones win, e.g. ``--threads 1 --out DIR``).

``benchmarks/results/eviction.md`` was measured by this script's earlier standalone version (see
git history); this wrapper repeats its measurement in the bench's own format.

Usage: ``python benchmarks/eviction.py [kvbound bench options]``
"""

import sys
from importlib.resources import files

from kvbound.cli import main

PROMPT = files("kvbound") / "data" / "prompts" / "canals.txt"
ARGS = ["bench", "--scenario", "budget-sweep", "--policies", "full,window,streaming,h2o,tova,snapkv",
        "--prompt-file", str(PROMPT), "--budgets", "32,64,128", "--max-new-tokens", "64",
        "--out", "benchmarks/results/eviction"]

if __name__ == "__main__":
    sys.exit(main([*ARGS, *sys.argv[1:]]))
