"""``kvbound bench``: run a scenario, render results pages, or merge runs.

  kvbound bench --scenario NAME [options]              run NAME, write DIR/results.json, report.md, plots
  kvbound bench report PATH [PATH ...] [--out DIR]     re-render report.md (and plots) of results.json files
  kvbound bench report --all ROOT --out DOCS_DIR       every results.json under ROOT to a page, with an index
  kvbound bench merge RUN_DIR [RUN_DIR ...] --out DIR  merge runs of one scenario (each cell once)

``kvbound.cli`` registers the subcommand with :func:`add_arguments` and calls :func:`run`.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any, Callable

from ..errors import KVBoundError
from . import scenarios

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_OUT = "bench-results"
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}  # --dtype -> torch attribute
ACTIONS = ("run", "report", "merge")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``kvbound bench``'s options to ``parser``: the shared ones here, each scenario's own from
    its module's ``add_arguments`` (in a group named for the scenario)."""
    from ..generation import DEFAULT_PREFILL_CHUNK

    parser.epilog = "scenarios:\n" + "\n".join(f"  {name:<16} {scenarios.summary(name)}" for name in scenarios.names())
    parser.add_argument("action", nargs="?", choices=ACTIONS, default="run",
                        help="run a scenario (default), re-render results pages, or merge runs")
    parser.add_argument("paths", nargs="*", metavar="PATH",
                        help="report: results.json files or their folders; merge: the run folders")
    parser.add_argument("--all", metavar="ROOT", default=None,
                        help="report: every results.json under ROOT, pages into --out with an index.md")
    parser.add_argument("--scenario", choices=scenarios.names(), default="budget-sweep",
                        help="what to measure (default: budget-sweep; list below)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model name or path, or random:CONFIG.json for that architecture with random weights "
                             f"and a byte tokenizer (timing where no weights are available) (default: {DEFAULT_MODEL}); "
                             "long, serve-load: a comma-separated list")
    parser.add_argument("--policies", default=None,
                        help="comma-separated policies (default: every registered policy); a variant with options "
                             "is name:key=value,... (e.g. full,kivi:bits=2,group=32,offload:codec=int8)")
    parser.add_argument("--budgets", default=None,
                        help="comma-separated budgets: tokens kept per layer (64,128) or fractions of the prompt in "
                             "(0,1] (0.25,0.5); each scenario has its default")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="new tokens per run / per reply (default: the scenario's)")
    parser.add_argument("--prompt-file", action="append", default=None, metavar="PATH",
                        help="a prompt text file (repeatable); default: the built-in long prompts")
    parser.add_argument("--prompts-dir", default=None, metavar="DIR",
                        help="use every *.txt in DIR as a prompt (answers.json may map a name to a needle answer)")
    parser.add_argument("--turns", type=int, default=None,
                        help="multiturn, serve-parking, cluster: turns per conversation (default: 20, 10, 3)")
    parser.add_argument("--conversations", type=int, default=None,
                        help="serve-parking, cluster: conversations played (default: 50, 1000)")
    parser.add_argument("--lengths", default=None,
                        help="context lengths in tokens (latency, needle, long, decode, prefill; each has its default)")
    parser.add_argument("--chunk", type=int, default=None, metavar="C",
                        help="tokens per forward pass: perplexity scoring chunk (default: 16; 1 = strict token by "
                             "token) / needle prompt prefill chunk (default: 256)")
    parser.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, metavar="N",
                        help=f"feed prompts N tokens per forward pass (default: {DEFAULT_PREFILL_CHUNK})")
    parser.add_argument("--speculate", type=int, default=None, metavar="K",
                        help="long, decode: also run exact policies with exact self-speculative decoding, K drafts "
                             "per verification")
    parser.add_argument("--device", default="cpu", help="torch device to run on (default: cpu)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="model precision; every policy, the reference `full` included, runs in it "
                             "(default: float32; ruler: bfloat16, as the field's leaderboards run)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is faster on a CPU shared with other jobs; "
                             "serve-parking, serve-load, cluster: per server / replica, default 2, 1, 1)")
    parser.add_argument("--rounds", type=int, default=1, metavar="N",
                        help="prefill, allocation, serve-load: measure every cell N times, round after round "
                             "(default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"output directory (default: {DEFAULT_OUT}; report: beside each results.json)")
    parser.add_argument("--report-only", action="store_true",
                        help="re-render report.md and plots from DIR/results.json without running anything "
                             "(same as `kvbound bench report DIR`)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    for name in scenarios.names():
        module = scenarios.get(name)
        if hasattr(module, "add_arguments"):
            module.add_arguments(parser.add_argument_group(f"{name} scenario"))


def select_policies(text: str | None) -> list[str]:
    """Policies (or variants ``name:key=value,...``) named in ``text``, or every registered one."""
    from ..cache import registered
    from .runner import policy_name, policy_options, split_policies

    known = registered()
    if text is None or not text.strip():
        return list(known)
    names = split_policies(text)
    unknown = [p for p in names if policy_name(p) not in known]
    if unknown:
        raise KVBoundError(f"unknown policy {policy_name(unknown[0])!r}; valid policies: {', '.join(known)}")
    for name in names:
        policy_options(name)  # a malformed option is an error now, not after the reference ran
    return list(dict.fromkeys(names))


def _check(args: argparse.Namespace) -> None:
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise KVBoundError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.threads is not None and args.threads < 1:
        raise KVBoundError(f"--threads must be >= 1, got {args.threads}")
    if args.prefill_chunk < 1:
        raise KVBoundError(f"--prefill-chunk must be >= 1 tokens, got {args.prefill_chunk}")
    if args.speculate is not None and args.speculate < 1:
        raise KVBoundError(f"--speculate must be >= 1 drafted tokens, got {args.speculate}")
    if args.chunk is not None and args.chunk < 1:
        raise KVBoundError(f"--chunk must be >= 1 token, got {args.chunk}")


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
    from . import report

    if args.action == "report" or args.report_only:
        if args.all is not None:
            paths = report.render_all(args.all, args.out)
        else:
            targets = args.paths or [args.out or DEFAULT_OUT]
            if args.out and len(targets) > 1:
                raise KVBoundError("report --out takes one results.json (use --all ROOT --out DIR for many)")
            paths = [p for t in targets for p in report.render(report.results_dir(t), args.out)]
        for path in paths:
            print(path)
        return 0
    if args.action == "merge":
        from .merge import merge

        if not args.paths or not args.out:
            raise KVBoundError("merge needs the run folders and --out DIR: kvbound bench merge RUN1 RUN2 --out DIR")
        for path in merge(args.out, args.paths):
            print(path)
        return 0
    if args.paths:
        raise KVBoundError(f"unexpected argument {args.paths[0]!r} (did you mean `kvbound bench report ...`?)")
    return _run_scenario(args, model_and_tokenizer, on_record, argv)


def _run_scenario(args, model_and_tokenizer, on_record, argv) -> int:
    from .inputs import parse_budgets
    from .results import Results, make_meta
    from .runner import Bench, Context

    _check(args)
    module = scenarios.get(args.scenario)
    out = args.out or DEFAULT_OUT
    args.policy_list = select_policies(args.policies)
    args.budget_list = parse_budgets(args.budgets or getattr(module, "DEFAULT_BUDGETS", None) or "128")
    args.new_tokens = args.max_new_tokens or getattr(module, "DEFAULT_NEW_TOKENS", 0)
    args.dtype = args.dtype or getattr(module, "DEFAULT_DTYPE", "float32")
    scenario_options = module.options(args)  # validates before anything loads or runs
    options = {"scenario": args.scenario, "policies": args.policy_list,
               "budgets": [b.label for b in args.budget_list], "max_new_tokens": args.new_tokens,
               "seed": args.seed, "dtype": args.dtype, "threads": args.threads, "prompts": [],
               **scenario_options}

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    bench = None
    if getattr(module, "NEEDS_MODEL", True):
        if model_and_tokenizer is None:
            model, tokenizer = load_model(args.model, args.seed)
        else:
            model, tokenizer = model_and_tokenizer
        try:
            import torch

            model = model.to(device=args.device, dtype=getattr(torch, DTYPES[args.dtype]))
        except (RuntimeError, AssertionError) as exc:
            raise KVBoundError(f"cannot use device {args.device!r}: {str(exc).splitlines()[0]}") from None
        results = Results(out, args.scenario, make_meta(args.model, model, argv, options, args.device))
        progress = None
        if not args.no_progress:
            from tqdm.auto import tqdm

            progress = tqdm
        bench = Bench(model, tokenizer, args.policy_list, results, args.new_tokens, args.seed, progress,
                      on_record or (lambda record: None), args.prefill_chunk)
    else:
        results = Results(out, args.scenario, make_meta(args.model, None, argv, options, args.device))
    ctx = Context(args, scenario_options, results, bench, args.policy_list, args.budget_list)
    return _drive(results, out, lambda: module.run(ctx))


def _drive(results, out: str, body: Callable[[], None]) -> int:
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
        results.finish(interrupted)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    for path in report.render(out):
        print(path)
    failed = [r for r in results.runs if r.get("status") == "error"]
    for r in failed:
        where = f" at {r['tokens']} tokens" if "tokens" in r and results.data["scenario"] == "long" else ""
        print(f"kvbound bench: {r.get('policy') or 'run'!r}{where} failed: {r.get('reason')}", file=sys.stderr)
    if interrupted:
        return 130
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - convenience entry point
    parser = argparse.ArgumentParser(prog="kvbound bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args, argv=None if argv is None else ["kvbound", "bench", *argv])
    except KVBoundError as exc:
        print(f"kvbound bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
