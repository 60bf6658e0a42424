"""Latency scenario on a GPU machine that has no model files: SmolLM2-135M's architecture
(its config.json, copied here) with random weights -- the timing of a norm + k/v projection +
RoPE does not depend on the weight values. Usage: PYTHONPATH=src python run.py OUT DTYPE"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kvbound.bench import cli

out, dtype = sys.argv[1], getattr(torch, sys.argv[2])
config = AutoConfig.from_pretrained(Path(__file__).with_name("smollm2-135m-config.json"))
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
parser = argparse.ArgumentParser()
cli.add_arguments(parser)
argv = ["--scenario", "latency", "--model", f"smollm2-135m (config only, random {sys.argv[2]} weights)",
        "--device", "cuda", "--out", out, "--no-progress"]
sys.exit(cli.run(parser.parse_args(argv), model_and_tokenizer=(model, None),
                 argv=["python", "benchmarks/results/latency-h100/run.py", out, sys.argv[2]]))
