"""``quantization``: quantized and codec'd K/V variants side by side (the quantization table):
perplexity over the same text fed ``--chunk`` tokens per pass through each cache, the bytes it holds,
then greedy decode steps of every variant round-robin (token match with ``full``, time per token as a
ratio to ``full``'s, or to the first variant where ``full`` is not among them).

Variants are policies with options: ``--policies full,kivi:bits=4,offload:codec=int8`` (``--budgets``
for the policies that need one, default 256). ``--stages perplexity,decode`` picks the stages;
``--lengths`` decodes after a haystack of those lengths instead of the perplexity text, with
``--cold-store`` for offload's store read from disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import KVBoundError
from ..inputs import haystack_ids, load_prompts
from ..render import REFERENCE, fmt, meta_section, mib, ok_runs, problems, table, times
from ..runner import Context, _failure, positive_ints, spec
from .decode import _Run
from .perplexity import _perplexity_one

DEFAULT_POLICIES = ("full,kivi:bits=8,kivi:bits=4,kivi:bits=2,kivi:bits=2,group=32,hf-quantized:backend=quanto,bits=4,"
                    "hf-quantized:backend=quanto,bits=2,hf-quantized:backend=fp8,offload,offload:codec=int8,"
                    "offload:codec=int4")
DEFAULT_BUDGETS = "256"
DEFAULT_NEW_TOKENS = 32
DEFAULT_TOKENS = 2048
DEFAULT_CHUNK = 32
STAGES = ("perplexity", "decode")

SUMMARY = "quantized / codec'd variants: perplexity, bytes, token match, decode time"


def add_arguments(group) -> None:
    group.add_argument("--stages", default=",".join(STAGES),
                       help="quantization: stages to run, of perplexity,decode (default: both)")


def options(args) -> dict[str, Any]:
    from ..runner import split_policies

    if not args.policies:
        args.policy_list = split_policies(DEFAULT_POLICIES)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if not stages or set(stages) - set(STAGES):
        raise KVBoundError(f"--stages must be from {', '.join(STAGES)}, got {args.stages!r}")
    tokens = args.max_tokens or DEFAULT_TOKENS
    if tokens < 2:
        raise KVBoundError(f"--max-tokens must be >= 2, got {tokens}")
    return {"text": args.text_file or "built-in prompts", "max_tokens": tokens, "chunk": args.chunk or DEFAULT_CHUNK,
            "stages": stages, "lengths": positive_ints(args.lengths, "lengths") if args.lengths else None,
            "cold_store": args.cold_store, "fill": "model", "prefill_chunk": args.prefill_chunk}


def _text_ids(ctx: Context):
    from ...prompts import read_prompt_file

    path = ctx.args.text_file
    text = read_prompt_file(path, "text file") if path else "\n\n".join(p.text for p in load_prompts())
    ids = ctx.bench.tokenizer(text, return_tensors="pt").input_ids[:, :ctx.options["max_tokens"]]
    return ids.to(ctx.bench.device)


def run(ctx: Context) -> None:
    opts, policies = ctx.options, ctx.policies
    budget = ctx.budgets[0]
    ids = _text_ids(ctx)
    ctx.results.set_extra("text_tokens", int(ids.shape[1]))
    contexts = [haystack_ids(ctx.bench.tokenizer, n)[0].to(ctx.bench.device) for n in opts["lengths"]] \
        if opts["lengths"] else [ids]
    stages = opts["stages"]
    bar = ctx.bar(len(policies) * (("perplexity" in stages) + len(contexts) * ("decode" in stages)), "quantization")
    try:
        if "perplexity" in stages:
            ref: dict[str, Any] = {}
            for policy in policies:
                tokens = budget.tokens(ids.shape[1]) if spec(policy).needs_budget else None
                bar.set_postfix_str(f"perplexity: {policy}")
                record = _perplexity_one(ctx.bench, policy, tokens, budget if tokens else None, ids, opts["chunk"], ref)
                if policy == REFERENCE and record["status"] == "ok":
                    ref = record
                ctx.save_run({"stage": "perplexity", "tokens": int(ids.shape[1]), **record})
                bar.update()
        if "decode" in stages:
            for context in contexts:
                _decode(ctx, context, budget, bar)
    finally:
        bar.close()


def _decode(ctx: Context, ids, budget, bar) -> None:
    n = int(ids.shape[1])
    runs = []
    for policy in ctx.policies:
        tokens = budget.tokens(n) if spec(policy).needs_budget else None
        bar.set_postfix_str(f"decode {n}: prefill {policy}")
        try:
            runs.append(_Run(ctx, policy, tokens, ids))
        except Exception as exc:
            status, reason = _failure(exc)
            ctx.save_run({"stage": "decode", "policy": policy, "budget": tokens, "tokens": n, "status": status,
                          "reason": reason})
            bar.update()
    for _ in range(ctx.bench.max_new_tokens):
        for r in runs:
            r.step(ctx.bench.model, ctx.options["cold_store"])
    ref = None
    for r in runs:
        record = {"stage": "decode", **r.record(n, budget.label if r.budget is not None else None)}
        r.cache.close()
        ref = ref or record
        if record is not ref:
            record["token_match"] = sum(a == b for a, b in zip(record["token_ids"], ref["token_ids"])) / max(
                1, len(ref["token_ids"]))
            record["time_ratio_vs_ref"] = record["seconds_per_token"] / ref["seconds_per_token"]
            if record.get("cold_seconds_per_token") and ref.get("cold_seconds_per_token"):
                record["cold_ratio_vs_ref"] = record["cold_seconds_per_token"] / ref["cold_seconds_per_token"]
        ctx.save_run(record)
        bar.update()


def _held(r: dict[str, Any]) -> float | None:
    """Bytes held: every tier but file space reserved ahead and not yet written (``offload_slack``)."""
    if r.get("total_cache_bytes") is None:
        return None
    return r["total_cache_bytes"] - r.get("bytes_by_tier", {}).get("offload_slack", 0)


def render(data: dict[str, Any], out: Path) -> tuple[str, list[str]]:
    ok = ok_runs(data["runs"])
    ppl = [r for r in ok if r.get("stage") == "perplexity"]
    dec = [r for r in ok if r.get("stage") == "decode"]
    text_tokens = data["extra"].get("text_tokens") or (ppl[0]["tokens"] if ppl else None)
    ref_ppl = next((r for r in ppl if r["policy"] == REFERENCE), ppl[0] if ppl else None)
    same_text = {r["policy"]: r for r in dec if r["tokens"] == text_tokens}
    opts = data["meta"].get("options", {})
    parts = [f"# kvbound bench: quantized K/V\n\n{meta_section(data)}"]
    if ppl:
        rows = []
        for r in ppl:
            d = same_text.get(r["policy"], {})
            held, ref_held = _held(r), _held(ref_ppl)
            rows.append([f"`{r['policy']}`", r.get("budget") or "–", "yes" if r.get("exact") else "no",
                         fmt(r["perplexity"], 3), f"{(r['perplexity'] / ref_ppl['perplexity'] - 1) * 100:+.2f}%",
                         mib(held), fmt(held / ref_held if held and ref_held else None, 3),
                         "ref" if d and "token_match" not in d else (f"{d['token_match']:.0%}" if d else "–"),
                         times(d.get("time_ratio_vs_ref")) if d and "token_match" in d else ("1.00×" if d else "–")])
        parts += [f"\nPerplexity over {text_tokens} tokens of {opts.get('text', 'the text')}, fed {opts.get('chunk', '?')} "
                  "tokens per pass through each cache; bytes = every tier held after that pass (offload's file space "
                  "reserved ahead, `offload_slack`, left out), as a ratio to the first row's; decode = median greedy step "
                  "after the same text, the variants stepped round-robin in one process; token match and time per token "
                  f"against `{ref_ppl['policy']}`.\n",
                  table(["variant", "budget", "exact", "perplexity", "Δ vs first", "cache MiB", "× first", "token match",
                         "time/token × first"], rows)]
        first = same_text.get(ref_ppl["policy"])
        if first:
            parts.append(f"\n`{first['policy']}`'s decode step: {1000 * first['seconds_per_token']:.1f} ms (median).")
    for n in sorted({r["tokens"] for r in dec if r["tokens"] != text_tokens or not ppl}):
        mine = [r for r in dec if r["tokens"] == n]
        rows = [[f"`{r['policy']}`", r.get("budget") or "–", mib(r.get("bytes_by_tier", {}).get("offloaded")),
                 fmt(1000 * r["seconds_per_token"], 1), times(r.get("time_ratio_vs_ref", 1.0)),
                 fmt(r.get("cold_seconds_per_token") and 1000 * r["cold_seconds_per_token"], 1),
                 times(r.get("cold_ratio_vs_ref", 1.0 if r.get("cold_seconds_per_token") else None)),
                 f"{r['token_match']:.0%}" if "token_match" in r else "ref"] for r in mine]
        parts += [f"\n## Decode at {n} tokens\n\nMedian of {mine[0].get('steps', '?')} greedy steps per variant, stepped "
                  f"round-robin in one process; ratios and token match against `{mine[0]['policy']}`. Warm: the offload "
                  "store sits in the OS page cache; cold: a step right after the store files were dropped from it "
                  "(read from disk).\n",
                  table(["variant", "budget", "offloaded MiB", "ms/token warm", "× first", "ms/token cold", "× first",
                         "token match"], rows)]
    parts.append(problems(data["runs"], ["stage", "policy", "budget", "tokens"]))
    return "\n".join(parts) + "\n", []
