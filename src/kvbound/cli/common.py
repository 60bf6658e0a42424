"""What every ``kvbound`` command shares: the one-line-error parser, the model/cache arguments, help text
listing policies and models, and the steps that load a model, make a cache and check a prompt."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import KVBoundError
from ..prompts import read_prompt_file

FORMATTER = argparse.RawDescriptionHelpFormatter


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) so bad input reads like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- help text


def policies_epilog() -> str:
    from .. import policies
    from ..cache.registry import registered

    specs = registered()
    width = max(len(n) for n in policies())
    lines = ["policies (--policy; 'kvbound policies' lists their options and papers):"]
    for name, desc in policies().items():
        spec = specs[name]
        tags = ("exact" if spec.exact else "lossy") + (", needs --budget" if spec.needs_budget else "")
        lines.append(f"  {name:<{width}}  [{tags}] {desc}")
    return "\n".join(lines)


def models_epilog() -> str:
    from ..models import BUILTIN, DEFAULT_MODEL
    from ..tiny import TINY

    lines = ["models (--model): a built-in name, a local Hugging Face model folder, a .gguf file, or a hub id"]
    for name, spec in BUILTIN.items():
        lines.append(f"  {name:<13} {spec.description}{'  (default)' if name == DEFAULT_MODEL else ''}")
    lines.append(f"  {', '.join(TINY)}: random-init test models with a byte tokenizer")
    return "\n".join(lines)


def epilog(examples: str) -> str:
    """A command's help epilog: the policies, the models, then its examples."""
    return policies_epilog() + "\n\n" + models_epilog() + "\n\n" + examples


# --------------------------------------------------------------------------- arguments


def option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with int, float and true/false parsing."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"option {text!r} must look like KEY=VALUE")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    return key, value


def add_model_args(p: argparse.ArgumentParser, new_tokens: bool = True) -> None:
    from ..models import DEFAULT_MODEL

    g = p.add_argument_group("model and cache")
    g.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME",
                   help=f"built-in name, model folder, .gguf file or hub id (default: {DEFAULT_MODEL})")
    g.add_argument("--policy", default="full", metavar="NAME", help="cache policy, see the list below (default: full)")
    g.add_argument("--budget", type=int, metavar="N", help="tokens of K/V kept hot per layer (policies that need one)")
    g.add_argument("--option", type=option, action="append", default=[], metavar="KEY=VALUE",
                   help="policy option (repeatable), e.g. --option sinks=4")
    if not new_tokens:
        return
    g.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate per reply (default: 64)")
    from ..generation import DEFAULT_PREFILL_CHUNK

    g.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, metavar="N",
                   help="feed the prompt N tokens per forward pass: the cache evicts or spills between chunks, so "
                        f"memory is bounded by budget + N (default: {DEFAULT_PREFILL_CHUNK}; a chunk longer than "
                        "the prompt = one pass)")


# --------------------------------------------------------------------------- shared steps


def load(args):
    from ..models import load
    if args.max_new_tokens < 1:
        raise KVBoundError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.prefill_chunk < 1:
        raise KVBoundError(f"--prefill-chunk must be >= 1 tokens, got {args.prefill_chunk}")
    return load(args.model)


def make_cache(model, args):
    from .. import make_cache

    return make_cache(model, args.policy, args.budget, **dict(args.option))


def check_length(model, args, total_prompt: int) -> None:
    """As :func:`kvbound.generation.check_positions`, naming the command-line flag to change."""
    from ..generation import check_positions, max_positions
    limit = max_positions(model)
    if limit is not None and total_prompt <= limit < total_prompt + args.max_new_tokens:
        raise KVBoundError(
            f"prompt ({total_prompt} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the model's "
            f"{limit} positions; use --max-new-tokens {limit - total_prompt} or less"
        )
    check_positions(model, total_prompt, args.max_new_tokens, args.model)


def apply_template(tokenizer, messages: list[dict], args, add_generation_prompt: bool = True, tokenize: bool = True):
    if not getattr(tokenizer, "chat_template", None):
        raise KVBoundError(f"model {args.model!r} has no chat template; drop --chat (or use 'generate' with a plain prompt)")
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=tokenize,
                                        return_dict=tokenize, return_tensors="pt" if tokenize else None)
    return out["input_ids"] if tokenize else out


def read_prompt(args) -> str:
    if args.prompt is not None:
        text = args.prompt
    elif args.prompt_file == "-":
        text = sys.stdin.read()
    else:
        text = read_prompt_file(args.prompt_file)
    if not text.strip():
        raise KVBoundError("the prompt is empty; give some text with --prompt or --prompt-file")
    return text


