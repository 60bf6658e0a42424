"""GPU smoke run -- a thin wrapper over ``kvbound bench`` on CUDA (unchanged code, every policy).

1. Each tiny random-init family, every registered policy at budgets 1/7/12 on short prompts:
   the exact policies must match ``full`` token for token (checked here from ``results.json``).
2. A random-weights model of SmolLM2-135M's shape (its config, committed beside the H100 latency
   results; no weights travel to a GPU box) at a budget of 25% of the prompt: time per token of
   each policy as a ratio to ``full`` in the same run.

Each run writes the bench's own results.json (render it with ``kvbound bench report --all DIR``); an
earlier standalone version's summary (H100, every exact policy equal to ``full``) is in git history
(``git show 79a3f1f:benchmarks/results/gpu_smoke_h100.json``).
Usage: ``python benchmarks/gpu_smoke.py [--device cuda] [--out DIR]``
"""

import argparse
import json
import sys
from pathlib import Path

from kvbound.cache.registry import registered
from kvbound.cli import main

HERE = Path(__file__).parent
PROMPTS = HERE / "results" / "precision" / "prompts"  # three short prompts (90-150 SmolLM2 tokens)
SMOLLM2_SHAPE = HERE / "results" / "latency-h100" / "smollm2-135m-config.json"
FAMILIES = ["tiny-llama", "tiny-qwen3", "tiny-gemma3", "tiny-mha", "tiny-mistral", "tiny-qwen2"]


def bench(out: Path, *args: str) -> int:
    return main(["bench", "--prompts-dir", str(PROMPTS), "--no-progress", "--out", str(out), *args])


def main_smoke() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="gpu-smoke")
    args = ap.parse_args()
    out, failures, status = Path(args.out), [], 0
    for name in FAMILIES:
        status |= bench(out / name, "--model", name, "--device", args.device, "--budgets", "1,7,12",
                        "--max-new-tokens", "24")
        runs = json.loads((out / name / "results.json").read_text())["runs"]
        failures += [(name, r["policy"], r["budget"]) for r in runs
                     if r["status"] == "ok" and registered()[r["policy"]].exact and r["token_match"] != 1.0]
    status |= bench(out / "smollm2-shape", "--model", f"random:{SMOLLM2_SHAPE}", "--device", args.device,
                    "--budgets", "0.25", "--max-new-tokens", "32")
    print("exact policies that differed from full:", failures or "none")
    return 1 if failures else status


if __name__ == "__main__":
    sys.exit(main_smoke())
