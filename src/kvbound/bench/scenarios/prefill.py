"""``prefill``: time to the first token of ``full`` one-shot vs chunked prefill (``--chunks``), per
prompt length, the variants interleaved in one process; wall and CPU seconds (with one thread the CPU
time is the work done, which a shared CPU barely moves) and whether the first tokens agree. How
:data:`kvbound.generation.DEFAULT_PREFILL_CHUNK` was chosen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...cache import make_cache
from ...generation import Timings, greedy
from ..inputs import haystack_ids
from ..render import fmt, meta_section, ok_runs, problems, table, times
from ..runner import Context, _failure, positive_ints

DEFAULT_LENGTHS = "2048,7500"
DEFAULT_CHUNKS = "0,512,1024,2048"

SUMMARY = "one-shot vs chunked prefill of full (how the default prefill chunk was chosen)"


def add_arguments(group) -> None:
    group.add_argument("--chunks", default=DEFAULT_CHUNKS,
                       help=f"prefill: prompt tokens per forward pass to compare, 0 = one shot (default: {DEFAULT_CHUNKS})")


def options(args) -> dict[str, Any]:
    chunks = [0 if c.strip() == "0" else positive_ints(c, "chunks")[0] for c in args.chunks.split(",") if c.strip()]
    return {"lengths": positive_ints(args.lengths or DEFAULT_LENGTHS, "lengths"), "chunks": chunks,
            "repeats": positive_ints(str(args.rounds), "rounds")[0]}


def run(ctx: Context) -> None:
    bench, opts = ctx.bench, ctx.options
    bar = ctx.bar(len(opts["lengths"]) * opts["repeats"] * len(opts["chunks"]), "prefill")
    try:
        for n in opts["lengths"]:
            ids = haystack_ids(bench.tokenizer, n)[0].to(bench.device)
            for rep in range(opts["repeats"]):
                for chunk in opts["chunks"]:
                    record: dict[str, Any] = {"tokens": n, "chunk": chunk or None, "repeat": rep, "status": "ok"}
                    try:
                        cache, timings = make_cache(bench.model, "full"), Timings()
                        new = greedy(bench.model, ids, cache, 2, stop_at_eos=False, prefill_chunk=chunk or None,
                                     timings=timings)
                        record.update(prefill_seconds=timings.prefill_seconds,
                                      prefill_cpu_seconds=timings.prefill_cpu_seconds, first_tokens=new[0].tolist())
                        del cache
                    except Exception as exc:
                        record["status"], record["reason"] = _failure(exc)
                    ctx.save_run(record)
                    bar.update()
    finally:
        bar.close()


def render(data: dict[str, Any], out: Path) -> tuple[str, list[str]]:
    ok = ok_runs(data["runs"])
    one_shot = {(r["tokens"], r["repeat"]): r for r in ok if r["chunk"] is None}
    rows = []
    for r in ok:
        ref = one_shot.get((r["tokens"], r["repeat"]))
        rows.append([r["tokens"], "one-shot" if r["chunk"] is None else r["chunk"], r["repeat"],
                     fmt(r["prefill_seconds"], 2), fmt(r["prefill_cpu_seconds"], 2),
                     times(ref and r["prefill_cpu_seconds"] / ref["prefill_cpu_seconds"]),
                     "ref" if r is ref else ("–" if ref is None else fmt(r["first_tokens"] == ref["first_tokens"]))])
    text = [f"# kvbound bench: prefill, one-shot vs chunked\n\n{meta_section(data)}",
            "\n`full` cache, time to the first token (every prompt chunk) per prompt length and prefill chunk; "
            "the chunks alternate in one process. `× one-shot` = CPU seconds over the one-shot prefill's at the same "
            "length and round; `same first tokens` compares the two greedy tokens after the prompt.\n",
            table(["prompt tokens", "chunk", "round", "prefill s (wall)", "prefill CPU s", "CPU × one-shot",
                   "same first tokens"], rows),
            problems(data["runs"], ["tokens", "chunk"])]
    return "\n".join(text) + "\n", []
