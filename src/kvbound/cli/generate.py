"""``kvbound generate``: greedy continuation of one prompt through a kvbound cache, with the cache's
measured memory (``--json``: one object on the last line); ``--speculate K`` drafts with a lossy cache and
verifies with the exact one."""

from __future__ import annotations

import json
import math
import sys
import time

import torch

from ..errors import KVBoundError
from . import common

EXAMPLES_GENERATE = """\
examples:
  kvbound generate --chat --prompt "What is the capital of France?"
  kvbound generate --prompt-file story.txt --policy window --budget 128 --max-new-tokens 32 --json
  kvbound generate --model gemma3-270m --prompt "The capital of France is"
  kvbound generate --model tiny-llama --prompt "hello" --json        # random tiny model, instant
"""


def add(sub) -> None:
    gen = sub.add_parser("generate", help="continue one prompt through a kvbound cache (greedy)",
                         description="Greedy-generate a continuation of one prompt through a kvbound cache and "
                                     "report the cache's measured memory.",
                         epilog=common.epilog(EXAMPLES_GENERATE),
                         formatter_class=common.FORMATTER)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="the prompt text")
    src.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a file ('-' = stdin)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    common.add_model_args(gen)
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object (model, policy, budget, prompt_tokens, token_ids, text, cache, "
                          "seconds, prefill_seconds, decode_seconds, tokens_per_s, peak_rss_bytes) on the last line "
                          "of stdout")
    spec = gen.add_argument_group("exact speculative decoding")
    spec.add_argument("--speculate", type=int, metavar="K",
                      help="draft K tokens with a lossy cache, verify them with the exact --policy")
    spec.add_argument("--draft", metavar="NAME",
                      help="lossy policy that drafts when --speculate is given (default: kvbound.speculative's)")
    gen.set_defaults(func=cmd_generate)


def speculate(model, input_ids: torch.Tensor, cache, args, timings) -> tuple[torch.Tensor, dict]:
    """Exact self-speculative decoding (``kvbound.speculative``) into ``cache``: returns (new ids, stats)."""
    if args.speculate < 1:
        raise KVBoundError(f"--speculate must be >= 1 drafted tokens, got {args.speculate}")
    try:
        from ..speculative import speculative_greedy
    except ImportError as exc:
        if exc.name == "kvbound.speculative":
            raise KVBoundError("--speculate needs kvbound.speculative, which this install does not have") from None
        raise
    draft = {} if args.draft is None else {"draft": args.draft}
    try:
        new_ids, stats = speculative_greedy(model, input_ids, cache, budget=args.budget, k=args.speculate,
                                            max_new_tokens=args.max_new_tokens,
                                            eos_token_id=model.generation_config.eos_token_id,
                                            prefill_chunk=args.prefill_chunk, timings=timings, **draft)
    except BaseException:
        cache.close()
        raise
    report = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in stats.as_dict().items()}
    return new_ids, report


def cmd_generate(args) -> int:
    from ..generation import Timings, greedy
    from ..rss import peak_rss_bytes

    prompt = common.read_prompt(args)
    model, tokenizer = common.load(args)
    if args.chat:
        input_ids = common.apply_template(tokenizer, [{"role": "user", "content": prompt}], args)
    else:
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if input_ids.shape[1] == 0:
        raise KVBoundError("the prompt tokenized to zero tokens; give some text")
    common.check_length(model, args, input_ids.shape[1])

    speculation = None
    timings = Timings()
    cache = common.make_cache(model, args)
    try:  # close: an offload store's files go at once, also when generation fails (e.g. a full disk)
        start = time.perf_counter()
        if args.speculate is not None:
            new, speculation = speculate(model, input_ids, cache, args, timings)
        else:
            new = greedy(model, input_ids, cache, args.max_new_tokens, prefill_chunk=args.prefill_chunk,
                         timings=timings)
        seconds = time.perf_counter() - start
        report = cache.memory_report()
    finally:
        cache.close()  # offload: the store's files go now, not at exit
    token_ids = new[0].tolist()
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    result = {
        "model": args.model,
        "policy": args.policy,
        "budget": args.budget,
        "options": dict(args.option),
        "prompt_tokens": int(input_ids.shape[1]),
        "token_ids": token_ids,
        "text": text,
        "cache": report,
        "seconds": round(seconds, 4),
        "prefill_seconds": round(timings.prefill_seconds, 4),  # time to the first token
        "decode_seconds": round(timings.decode_seconds, 4),  # the rest
        "prefill_chunk": args.prefill_chunk,
        "tokens_per_s": round(len(token_ids) / seconds, 3) if seconds > 0 else None,
        "peak_rss_bytes": peak_rss_bytes(),  # the whole process's high-water mark (model load included)
    }
    if speculation is not None:
        result["speculation"] = speculation
    if args.json:
        print(json.dumps(result))
    else:
        print(text)
        print(f"[{len(token_ids)} tokens in {seconds:.2f}s (first after {timings.prefill_seconds:.2f}s), "
              f"{result['tokens_per_s']} tok/s; {args.policy} cache: {report['tokens_seen']} tokens seen, "
              f"peak hot K/V {report['peak_hot_kv_bytes'] / 2**20:.2f} MiB; "
              f"process peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB]", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- perplexity
