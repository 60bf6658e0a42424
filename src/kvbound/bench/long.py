"""``kvbound bench --scenario long``: every policy on one long prompt, each run in a fresh process.

A fresh Python process per (model, length, policy) makes the process's peak RSS that run's own:
the worker loads the model, runs an 8-token forward (weights loaded from safetensors are mapped
from the file and only become resident when first read), lowers the RSS high-water mark to the
loaded model's resident size
(:func:`kvbound.rss.reset_peak_rss`), generates, and reports the peak, the RSS added above the
loaded model, the cache's tensor bytes by tier, the time to the first token (every prompt chunk)
and the decode time per token after it. The prompt is :func:`~kvbound.bench.inputs.haystack_ids`:
the bundled passages repeated to the requested length, ending in a question about the first one.

Run one job by hand: ``python -m kvbound.bench.long '{"model": "smollm2-135m", "policy": "full",
"tokens": 2048}'`` (prints one JSON record on its last line).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import KVBoundError

ONE_SHOT = "one-shot"  # the ``chunk`` label of a run that prefills in one forward pass


@dataclass
class LongJob:
    """One run of the long scenario."""

    model: str
    policy: str
    tokens: int  # prompt length
    budget: int | None = None
    new_tokens: int = 16
    chunk: int | None = None  # prefill chunk; None = one forward pass
    threads: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    speculate: int | None = None  # exact self-speculative decoding with this many drafts

    @property
    def label(self) -> str:
        spec = f"+speculate{self.speculate}" if self.speculate else ""
        return f"{self.model} {self.tokens} {self.policy}{spec}@{self.budget} chunk={self.chunk or ONE_SHOT}"


PREPARED = "prepared"  # a worker's answer when the policy's once-per-model set-up ran: run the job again


def run_job(job: LongJob) -> dict[str, Any]:
    """Run ``job`` in this process (call it in a fresh one: the RSS figures are the process's)."""
    import torch

    from ..cache import make_cache, registered
    from ..generation import Timings, greedy
    from ..models import load
    from ..rss import current_rss_bytes, peak_rss_bytes, reset_peak_rss
    from .inputs import haystack_ids
    from .results import describe_model

    if job.threads:
        torch.set_num_threads(job.threads)
    record: dict[str, Any] = {**asdict(job), "exact": registered()[job.policy].exact}
    model, tokenizer = load(job.model)
    record["model_info"] = describe_model(job.model, model)
    ids, answer = haystack_ids(tokenizer, job.tokens)
    with torch.no_grad():  # touch every weight: file-mapped weight pages count in RSS once read
        model(ids[:, :8], use_cache=False, logits_to_keep=1)
    if registered()[job.policy].build.prepare(model):  # once-per-model set-up (razor's head map) is not the run's:
        return {**asdict(job), "status": PREPARED}  # its freed memory would sit in the baseline; measure afresh
    gc.collect()
    record["load_peak_rss_bytes"] = peak_rss_bytes()
    record["loaded_rss_bytes"] = loaded = current_rss_bytes()
    record["peak_rss_reset"] = reset_peak_rss()
    cache = make_cache(model, job.policy, job.budget if registered()[job.policy].needs_budget else None, **job.options)
    timings = Timings()
    try:
        if job.speculate:
            from ..speculative import speculative_greedy

            new, stats = speculative_greedy(model, ids, cache, budget=job.budget, k=job.speculate,
                                            max_new_tokens=job.new_tokens, prefill_chunk=job.chunk, timings=timings)
            record["speculation"] = {k: v for k, v in stats.as_dict().items() if v != float("inf")}
        else:
            new = greedy(model, ids, cache, job.new_tokens, stop_at_eos=False, prefill_chunk=job.chunk,
                         timings=timings)
        record["peak_rss_bytes"] = peak = peak_rss_bytes()
        memory = cache.memory_report()
    finally:
        cache.close()
    tokens = new[0].tolist()
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    record.update(
        status="ok",
        rss_added_bytes=peak - loaded,
        hot_kv_bytes=memory["hot_kv_bytes"],
        peak_hot_kv_bytes=memory["peak_hot_kv_bytes"],
        bytes_by_tier=memory["bytes_by_tier"],
        total_cache_bytes=memory["total_bytes"],
        peak_transient_bytes=memory["peak_transient_bytes"],
        full_kv_bytes=memory["kv_bytes_per_token"] * (job.tokens + len(tokens) - 1),
        prefill_seconds=timings.prefill_seconds,
        decode_seconds=timings.decode_seconds,
        seconds_per_token=timings.seconds_per_token,
        prefill_cpu_seconds=timings.prefill_cpu_seconds,
        cpu_seconds_per_token=timings.cpu_seconds_per_token,
        token_ids=tokens,
        kept_tokens=memory.get("kept_tokens"),
        continuation=text,
        needle_found=(answer.lower() in text.lower()) if answer else None,
    )
    return record


def _failed(job: LongJob, status: str, reason: str) -> dict[str, Any]:
    return {**asdict(job), "status": status, "reason": reason}


def spawn(job: LongJob, timeout: float | None = None) -> dict[str, Any]:
    """Run ``job`` in a fresh Python process (in a second one when the first had to prepare the
    policy, e.g. measure razor's head map); a failure becomes a record with ``status`` and ``reason``."""
    record = _spawn_once(job, timeout)
    return _spawn_once(job, timeout) if record.get("status") == PREPARED else record


def _spawn_once(job: LongJob, timeout: float | None) -> dict[str, Any]:
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "kvbound.bench.long", json.dumps(asdict(job))], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return _failed(job, "error", f"timed out after {timeout:.0f} s")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return _failed(job, "error", err[-1] if err else f"worker exited with status {proc.returncode}")
    record = json.loads(lines[-1])
    record["wall_seconds"] = time.perf_counter() - start
    return record


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: one JSON job in ``argv[0]``, one JSON record on the last stdout line."""
    argv = sys.argv[1:] if argv is None else argv
    job = LongJob(**json.loads(argv[0]))
    try:
        record = run_job(job)
    except KVBoundError as exc:
        record = _failed(job, "skipped", str(exc).splitlines()[0])
    print(json.dumps(record))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


# --------------------------------------------------------------------------- the scenario

# model -> (prompt lengths, new tokens): SmolLM2 has 8192 positions, so ~7.5k leaves room for the
# new tokens; Gemma 3 270M has 32k. Few new tokens at Gemma's lengths: kv-direct rebuilds the
# whole evicted span (a forward over it) for every decoding step.
DEFAULT_PLAN: dict[str, tuple[list[int], int]] = {
    "smollm2-135m": ([2048, 4096, 7500], 16),
    "gemma3-270m": ([8192, 16384, 32768 - 8], 4),
}
DEFAULT_LONG_MODEL = "smollm2-135m"
DEFAULT_LONG_BUDGET = "512"
REFERENCE = "full"


def plan_jobs(models: list[str], lengths: list[int] | None, policies: list[str], budgets: list[int],
              new_tokens: int | None, chunk: int | None, threads: int | None, one_shot_max: int,
              speculate: int | None) -> list[LongJob]:
    """The runs, ``full`` first at each (model, length): every other run is compared with it."""
    from ..cache import registered

    specs = registered()
    jobs: list[LongJob] = []
    for model in models:
        default_lengths, default_new = DEFAULT_PLAN.get(model, ([2048, 4096], 16))
        new = new_tokens or default_new
        for tokens in lengths or default_lengths:
            jobs.append(LongJob(model, REFERENCE, tokens, None, new, chunk, threads))
            if chunk is not None and tokens <= one_shot_max and tokens > chunk:
                jobs.append(LongJob(model, REFERENCE, tokens, None, new, None, threads))
            for policy in policies:
                if policy == REFERENCE:
                    continue
                for budget in budgets if specs[policy].needs_budget else [None]:
                    jobs.append(LongJob(model, policy, tokens, budget, new, chunk, threads))
                    if speculate and policy == "offload":
                        jobs.append(LongJob(model, policy, tokens, budget, new, chunk, threads, speculate=speculate))
    return jobs


def compare(record: dict[str, Any], ref: dict[str, Any] | None) -> dict[str, Any]:
    """``record`` with its agreement and ratios against ``full``'s run (same model, length, chunk)."""
    from . import metrics

    if record.get("status") != "ok" or ref is None or ref.get("status") != "ok":
        return record
    mine, theirs = record["token_ids"], ref["token_ids"]
    record.update(
        token_match=metrics.token_match(theirs, mine),
        first_divergence=metrics.first_divergence(theirs, mine),
        rss_added_ratio_vs_full=record["rss_added_bytes"] / ref["rss_added_bytes"] if ref["rss_added_bytes"] else None,
        prefill_ratio_vs_full=record["prefill_seconds"] / ref["prefill_seconds"],
        decode_ratio_vs_full=record["seconds_per_token"] / ref["seconds_per_token"],
        prefill_cpu_ratio_vs_full=_ratio(record, ref, "prefill_cpu_seconds"),
        decode_cpu_ratio_vs_full=_ratio(record, ref, "cpu_seconds_per_token"),
    )
    return record


def _ratio(record: dict[str, Any], ref: dict[str, Any], key: str) -> float | None:
    mine, theirs = record.get(key), ref.get(key)
    return mine / theirs if mine is not None and theirs else None


def compare_with_reference(record: dict[str, Any], ref: dict[str, Any] | None) -> dict[str, Any]:
    """:func:`compare`, and for ``full``'s one-shot run its chunked prefill's ratio to it."""
    record = compare(record, ref)
    if record.get("policy") == REFERENCE and record.get("chunk") is None and "prefill_ratio_vs_full" in record:
        record["chunked_over_one_shot_prefill"] = 1 / record["prefill_ratio_vs_full"]
    return record


def recompare(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``runs`` (merged from several runs) each compared again with the first ``full`` of its
    (model, length) among them, so every ratio in a merged table has one reference."""
    refs: dict[tuple[str, int], dict[str, Any]] = {}
    for record in runs:
        if record.get("policy") == REFERENCE:
            refs.setdefault((record.get("model"), record.get("tokens")), record)
    out = []
    for record in runs:
        ref = refs.get((record.get("model"), record.get("tokens")))
        out.append(record if record is ref else compare_with_reference(dict(record), ref))
    return out


def run_scenario(jobs: list[LongJob], results, bar, timeout: float | None) -> None:
    """Spawn every job in turn, compare it with its ``full`` reference and save it at once.

    The reference of a (model, length) is ``full`` with the scenario's prefill chunk; ``full``'s
    one-shot run is compared with that too (``chunked_over_one_shot_prefill``)."""
    refs: dict[tuple[str, int], dict[str, Any]] = {}
    for job in jobs:
        bar.set_postfix_str(job.label)
        record = spawn(job, timeout)
        key = (job.model, job.tokens)
        if job.policy == REFERENCE and key not in refs:
            refs[key] = record
        else:
            record = compare_with_reference(record, refs.get(key))
        results.add_run(record)
        bar.update()
