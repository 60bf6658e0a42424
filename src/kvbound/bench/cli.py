"""``kvbound bench``: arguments and the driver. ``kvbound.cli`` registers the subcommand with
:func:`add_arguments` and calls :func:`run`."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any, Callable

from ..errors import KVBoundError

from . import quality, ruler

SCENARIOS = ("budget-sweep", "multiturn", "bytes", "latency", *quality.SCENARIOS, "long", "ruler")
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_BUDGETS = {"budget-sweep": "64,256", "multiturn": "128", "bytes": "128", "latency": "128",
                   **quality.DEFAULT_BUDGETS, "long": "512"}
DEFAULT_NEW_TOKENS = {"budget-sweep": 16, "multiturn": 16, "bytes": 16, "latency": 0, "perplexity": 0, "needle": 0}
DEFAULT_LENGTHS = "128,512,1024,4096"
DEFAULT_BATCHES = "1,8,64"
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}  # --dtype -> torch attribute


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``kvbound bench``'s options to ``parser``."""
    parser.add_argument("--scenario", choices=SCENARIOS, default="budget-sweep",
                        help="what to measure (default: budget-sweep)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model name or path, or random:CONFIG.json for that architecture with random weights "
                             f"and a byte tokenizer (timing where no weights are available) (default: {DEFAULT_MODEL}); "
                             "long: a comma-separated list")
    parser.add_argument("--policies", default=None,
                        help="comma-separated policies (default: every registered policy)")
    parser.add_argument("--budgets", default=None,
                        help="comma-separated budgets: tokens kept per layer (64,128) or fractions of the prompt in "
                             "(0,1] (0.25,0.5); default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_BUDGETS.items()
                                                                        if k != "latency"))
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="new tokens per run / per reply (default: 16)")
    parser.add_argument("--prompt-file", action="append", default=None, metavar="PATH",
                        help="a prompt text file (repeatable); default: the built-in long prompts")
    parser.add_argument("--prompts-dir", default=None, metavar="DIR",
                        help="use every *.txt in DIR as a prompt (answers.json may map a name to a needle answer)")
    parser.add_argument("--turns", type=int, default=20, help="multiturn: number of turns (default: 20)")
    parser.add_argument("--lengths", default=None,
                        help=f"latency: cached tokens per sequence (default: {DEFAULT_LENGTHS}); needle: context "
                             f"lengths (default: {quality.DEFAULT_NEEDLE_LENGTHS}); long: prompt tokens (default: "
                             "smollm2-135m 2048,4096,7500; gemma3-270m 8192,16384,32760)")
    parser.add_argument("--batch-sizes", default=DEFAULT_BATCHES,
                        help=f"latency: batch sizes (default: {DEFAULT_BATCHES})")
    from ..generation import DEFAULT_PREFILL_CHUNK

    parser.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, metavar="N",
                        help=f"feed prompts N tokens per forward pass (default: {DEFAULT_PREFILL_CHUNK})")
    parser.add_argument("--one-shot-max", type=int, default=8192, metavar="N",
                        help="long: also run full with one-shot prefill at lengths up to N, to compare prefill "
                             "times (default: 8192; 0 = never)")
    parser.add_argument("--speculate", type=int, default=None, metavar="K",
                        help="long: also run offload with exact self-speculative decoding, K drafts per verification")
    parser.add_argument("--timeout", type=float, default=3600, metavar="S",
                        help="long: seconds one run (a fresh process) may take (default: 3600)")
    parser.add_argument("--device", default="cpu", help="torch device to run on (default: cpu)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="model precision; every policy, the reference `full` included, runs in it "
                             "(default: float32)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is faster on a CPU shared with other jobs)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", default="bench-results", metavar="DIR",
                        help="output directory for results.json, report.md and plots (default: bench-results)")
    parser.add_argument("--report-only", action="store_true",
                        help="re-render report.md and plots from DIR/results.json without running anything")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    quality.add_arguments(parser)
    ruler.add_arguments(parser)


def _positive_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise KVBoundError(f"--{what} must be comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise KVBoundError(f"--{what} must be comma-separated whole numbers >= 1, got {text!r}")
    return values


def select_policies(text: str | None) -> list[str]:
    """Policies named in ``text`` (comma-separated), or every registered one."""
    from ..cache import registered

    known = registered()
    if text is None or not text.strip():
        return list(known)
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in known]
    if unknown:
        raise KVBoundError(f"unknown policy {unknown[0]!r}; valid policies: {', '.join(known)}")
    return list(dict.fromkeys(names))


def _check(args: argparse.Namespace) -> None:
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise KVBoundError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.turns < 1:
        raise KVBoundError(f"--turns must be >= 1, got {args.turns}")
    if args.threads is not None and args.threads < 1:
        raise KVBoundError(f"--threads must be >= 1, got {args.threads}")
    if args.prefill_chunk < 1:
        raise KVBoundError(f"--prefill-chunk must be >= 1 tokens, got {args.prefill_chunk}")
    if args.speculate is not None and args.speculate < 1:
        raise KVBoundError(f"--speculate must be >= 1 drafted tokens, got {args.speculate}")


RANDOM_PREFIX = "random:"


def load_model(name: str, seed: int = 0):
    """``(model, tokenizer)`` for ``--model``: ``random:CONFIG.json`` builds that architecture with
    random weights (seeded) and the tiny models' byte tokenizer; anything else is :func:`kvbound.models.load`."""
    from .. import models

    if not name.startswith(RANDOM_PREFIX):
        return models.load(name)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = name[len(RANDOM_PREFIX):]
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise KVBoundError(f"--model {name}: cannot read a model config from {path!r} "
                           f"({str(exc).splitlines()[0]})") from None
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    return model, models.byte_tokenizer()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _sigterm_as_interrupt():
    """Treat SIGTERM like Ctrl-C (keep finished runs, render the report); returns the old handler."""
    try:
        return signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        return None


def run(args: argparse.Namespace, *, model_and_tokenizer: tuple[Any, Any] | None = None,
        on_record: Callable[[dict[str, Any]], None] | None = None, argv: list[str] | None = None) -> int:
    """Run ``kvbound bench``; returns the exit code (0 ok, 1 if a policy failed, 130 on Ctrl-C).

    ``model_and_tokenizer`` skips loading ``args.model`` (tests inject tiny models); ``on_record``
    is called after each saved run record.
    """
    from . import report, scenarios
    from .inputs import load_messages, load_prompts, parse_budgets
    from .results import Results, make_meta

    if args.report_only:
        for path in report.render(args.out):
            print(path)
        return 0
    _check(args)
    if args.scenario == "long":
        return _run_long(args, argv)
    if args.scenario == "ruler":
        return _run_ruler(args, argv, model_and_tokenizer, on_record)
    policies = select_policies(args.policies)
    budgets = parse_budgets(args.budgets or DEFAULT_BUDGETS[args.scenario])
    max_new = args.max_new_tokens or DEFAULT_NEW_TOKENS[args.scenario]
    prompts = load_prompts(args.prompt_file, args.prompts_dir) if args.scenario in ("budget-sweep", "bytes") else []
    lengths = _positive_ints(args.lengths or DEFAULT_LENGTHS, "lengths") if args.scenario == "latency" else []
    if args.scenario == "needle":
        lengths = _positive_ints(args.lengths or quality.DEFAULT_NEEDLE_LENGTHS, "lengths")
    quality_opts = quality.options(args, lengths) if args.scenario in quality.SCENARIOS else {}
    batches = _positive_ints(args.batch_sizes, "batch-sizes") if args.scenario == "latency" else []
    if args.scenario == "multiturn" and budgets[0].is_fraction:
        raise KVBoundError("multiturn needs a budget in tokens (the context grows each turn), e.g. --budgets 128")

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if model_and_tokenizer is None:
        model, tokenizer = load_model(args.model, args.seed)
    else:
        model, tokenizer = model_and_tokenizer
    try:
        import torch

        model = model.to(device=args.device, dtype=getattr(torch, DTYPES[args.dtype]))
    except (RuntimeError, AssertionError) as exc:
        raise KVBoundError(f"cannot use device {args.device!r}: {str(exc).splitlines()[0]}") from None

    options = {"scenario": args.scenario, "policies": policies, "budgets": [b.label for b in budgets],
               "max_new_tokens": max_new, "seed": args.seed, "prompts": [p.name for p in prompts],
               "dtype": args.dtype}
    if args.scenario == "multiturn":
        options["turns"] = args.turns
    if args.scenario == "latency":
        options.update(lengths=lengths, batch_sizes=batches)
    options.update(quality_opts)
    results = Results(args.out, args.scenario, make_meta(args.model, model, argv, options, args.device))
    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm
    bench = scenarios.Bench(model, tokenizer, policies, results, max_new, args.seed, progress,
                            on_record or (lambda record: None), args.prefill_chunk)

    def body() -> None:
        if args.scenario == "budget-sweep":
            scenarios.budget_sweep(bench, prompts, budgets)
        elif args.scenario == "multiturn":
            scenarios.multiturn(bench, load_messages(), args.turns, int(budgets[0].value))
        elif args.scenario in quality.SCENARIOS:
            quality.run(bench, args, budgets, quality_opts)
        elif args.scenario == "bytes":
            scenarios.bytes_per_token(bench, prompts[0], budgets)
        else:
            scenarios.latency(bench, lengths, batches)

    return _drive(results, args.out, body)


def _drive(results, out: str, body: Callable[[], None], on_exit: Callable[[], None] = lambda: None) -> int:
    """Run ``body`` (SIGTERM acts like Ctrl-C and keeps finished runs), then render the report;
    returns the exit code (0 ok, 1 if a run failed, 130 when interrupted)."""
    from . import report

    interrupted = False
    previous = _sigterm_as_interrupt()
    try:
        body()
    except KeyboardInterrupt:
        interrupted = True
        print(f"\ninterrupted: keeping the {len(results.runs)} finished run(s)", file=sys.stderr)
    finally:
        on_exit()
        results.finish(interrupted)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    for path in report.render(out):
        print(path)
    failed = [r for r in results.runs if r.get("status") == "error"]
    for r in failed:
        where = f" at {r['tokens']} tokens" if "tokens" in r and results.data["scenario"] == "long" else ""
        print(f"kvbound bench: policy {r.get('policy')!r}{where} failed: {r.get('reason')}", file=sys.stderr)
    if interrupted:
        return 130
    return 1 if failed else 0


def _run_long(args: argparse.Namespace, argv: list[str] | None) -> int:
    """``--scenario long``: each run in a fresh process (see :mod:`kvbound.bench.long`)."""
    from . import long
    from .inputs import parse_budgets
    from .results import Results, make_meta

    models = [m.strip() for m in args.model.split(",") if m.strip()]
    budgets = parse_budgets(args.budgets or DEFAULT_BUDGETS["long"])
    if budgets[0].is_fraction:
        raise KVBoundError("the long scenario needs budgets in tokens, e.g. --budgets 512")
    lengths = _positive_ints(args.lengths, "lengths") if args.lengths else None
    jobs = long.plan_jobs(models, lengths, select_policies(args.policies), [int(b.value) for b in budgets],
                          args.max_new_tokens, args.prefill_chunk, args.threads, args.one_shot_max, args.speculate)
    options = {"scenario": "long", "models": models, "lengths": lengths, "budgets": [b.label for b in budgets],
               "prefill_chunk": args.prefill_chunk, "one_shot_max": args.one_shot_max, "speculate": args.speculate,
               "jobs": len(jobs)}
    meta = make_meta(",".join(models), None, argv, options, "cpu")
    results = Results(args.out, "long", meta)
    if args.no_progress:
        from .scenarios import _NoBar

        bar = _NoBar()
    else:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="long", unit="run", dynamic_ncols=True)
    return _drive(results, args.out, lambda: long.run_scenario(jobs, results, bar, args.timeout), bar.close)


def _run_ruler(args: argparse.Namespace, argv: list[str] | None, model_and_tokenizer, on_record) -> int:
    """``--scenario ruler`` (see :mod:`kvbound.bench.ruler`)."""
    from .results import Results, make_meta
    from .scenarios import Bench

    policies = select_policies(args.policies) if args.policies else ruler.default_policies()
    ruler.options(args, policies)  # bad input fails before the model loads
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    model, tokenizer = model_and_tokenizer or load_model(args.model, args.seed)
    opts = ruler.options(args, policies, model)
    results = Results(args.out, "ruler", make_meta(args.model, model, argv, {"scenario": "ruler", **opts}, args.device))
    progress = None if args.no_progress else __import__("tqdm.auto", fromlist=["tqdm"]).tqdm
    bench = Bench(model, tokenizer, opts["policies"], results, 0, args.seed, progress,
                  on_record or (lambda record: None), args.prefill_chunk)
    return _drive(results, args.out, lambda: ruler.run(bench, opts))


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - convenience entry point
    parser = argparse.ArgumentParser(prog="kvbound bench", description="Hold every policy to the same test.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args, argv=None if argv is None else ["kvbound", "bench", *argv])
    except KVBoundError as exc:
        print(f"kvbound bench: error: {exc}", file=sys.stderr)
        return 2
