"""``bytes``: bytes one token costs, analytic (from the model config) next to each policy's measured
steady state, by tier."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...cache.model_info import kv_bytes_per_token, text_config
from ..inputs import Budget, Prompt, load_prompts
from ..render import REFERENCE, meta_section, ok_runs, problems, table, times
from ..runner import (
    Bench,
    Context,
    _cache_for,
    _close,
    _failure,
    _memory,
    _seed,
    decode,
    encode_prompt,
    spec,
)

DEFAULT_BUDGETS = "128"
DEFAULT_NEW_TOKENS = 16

SUMMARY = "bytes per token, analytic next to measured, by tier"


def options(args) -> dict[str, Any]:
    return {"prompts": [p.name for p in load_prompts(args.prompt_file, args.prompts_dir)][:1]}


def run(ctx: Context) -> None:
    bytes_per_token(ctx.bench, load_prompts(ctx.args.prompt_file, ctx.args.prompts_dir)[0], ctx.budgets)


def render(data: dict[str, Any], out: Path) -> tuple[str, list[str]]:
    return _markdown(data), []


def analytic_bytes(model) -> dict[str, int]:
    """Bytes one token costs, from the config: full K/V, per-layer residuals, layer-0 residual, token id."""
    cfg = text_config(model)
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    return {
        "full_kv": kv_bytes_per_token(model),
        "per_layer_residual": cfg.num_hidden_layers * cfg.hidden_size * itemsize,
        "layer0_residual": cfg.hidden_size * itemsize,
        "token_id_int64": 8,
        "token_id_int32": 4,
    }


def bytes_per_token(bench: Bench, prompt: Prompt, budgets: list[Budget]) -> None:
    """Each policy's steady state after ``prompt`` + ``max_new_tokens``: bytes held per token, by tier."""
    bench.results.set_extra("analytic_bytes_per_token", analytic_bytes(bench.model))
    ids = encode_prompt(bench.tokenizer, prompt, bench.device)
    order = [REFERENCE] + [p for p in bench.policies if p != REFERENCE]
    jobs = [(p, b) for p in order for b in (budgets if spec(p).needs_budget else budgets[:1])]
    bar = bench.bar(len(jobs), "bytes")
    try:
        for policy, budget in jobs:
            tokens = budget.tokens(ids.shape[1]) if spec(policy).needs_budget else None
            bar.set_postfix_str(f"{policy} @ {tokens}")
            record: dict[str, Any] = {"policy": policy, "exact": spec(policy).exact, "budget": tokens,
                                      "prompt": prompt.name, "status": "ok"}
            cache = None
            try:
                _seed(bench.seed)
                cache = _cache_for(bench.model, policy, tokens)
                got = decode(bench.model, ids, cache, bench.max_new_tokens, keep_logits=False,
                             prefill_chunk=bench.prefill_chunk)
                mem = {**_memory(cache), "peak_rss_bytes": got.peak_rss_bytes, "rss_added_bytes": got.rss_added_bytes}
                seen = max(1, mem["tokens_seen"])
                record.update(mem)
                record["bytes_per_token"] = mem["total_cache_bytes"] / seen
                record["bytes_per_token_by_tier"] = {k: v / seen for k, v in mem["bytes_by_tier"].items()}
            except Exception as exc:
                record["status"], record["reason"] = _failure(exc)
            finally:
                _close(cache)
            bench.save_run(record)
            bar.update()
    finally:
        bar.close()




def _markdown(data: dict[str, Any]) -> str:
    analytic = data["extra"].get("analytic_bytes_per_token", {})
    full = next((r for r in ok_runs(data["runs"]) if r["policy"] == REFERENCE), None)
    full_measured = full["bytes_by_tier"].get("hot_kv", 0) / max(1, full["tokens_seen"]) if full else None
    rows = [[k, f"{v:,}", times(v / analytic["full_kv"]) if analytic.get("full_kv") else "–"] for k, v in analytic.items()]
    rows.append(["full K/V, measured (`full` policy)", "–" if full_measured is None else f"{full_measured:,.0f}",
                 times(full_measured / analytic["full_kv"]) if full_measured and analytic.get("full_kv") else "–"])
    pol = []
    for r in ok_runs(data["runs"]):
        tiers = ", ".join(f"{k} {v:,.0f}" for k, v in r["bytes_per_token_by_tier"].items())
        pol.append([f"`{r['policy']}`", r.get("budget") or "–", r["tokens_seen"], f"{r['bytes_per_token']:,.0f}",
                    times(r["bytes_per_token"] / full_measured if full_measured else None), tiers])
    text = [
        f"# kvbound bench: bytes per token\n\n{meta_section(data)}",
        "\n## Analytic (from the model config, batch 1)\n\nfull_kv = 2 · layers · kv_heads · head_dim · itemsize; "
        "per_layer_residual = layers · hidden · itemsize; layer0_residual = hidden · itemsize.\n",
        table(["what", "bytes / token", "× full K/V"], rows),
        "\n## Measured steady state per policy\n\nAll tiers held after the prompt and the new tokens, divided by "
        "the tokens seen (a bounded policy's bytes/token keeps falling as the context grows).\n",
        table(["policy", "budget", "tokens seen", "bytes / token", "× full", "by tier (bytes / token)"], pol),
        problems(data["runs"], ["policy", "budget"]),
    ]
    return "\n".join(text) + "\n"


