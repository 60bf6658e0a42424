"""``kvbound perplexity``: perplexity of a text file, scored through a kvbound cache."""

from __future__ import annotations

import json
import sys

from ..errors import KVBoundError
from ..prompts import read_prompt_file
from . import common

EXAMPLES_PERPLEXITY = """\
examples:
  kvbound perplexity --text-file book.txt --max-tokens 1024 --json
  kvbound perplexity --text-file book.txt --policy window --budget 64 --chunk 1   # strict token-by-token
  kvbound perplexity --model tiny-llama --text-file README.md --max-tokens 200
"""


def add(sub) -> None:
    from ..quality import DEFAULT_CHUNK

    ppl = sub.add_parser("perplexity", help="perplexity of a long text, scored through a kvbound cache",
                         description="Perplexity of a text file: the text is fed --chunk tokens per forward pass "
                                     "through the policy's cache and every token is predicted from what the cache "
                                     "holds at that point plus the chunk. --chunk 1 is strict token-by-token "
                                     f"scoring; the default {DEFAULT_CHUNK} lets a lossy policy at budget B see "
                                     f"B..B+{DEFAULT_CHUNK - 1} past tokens (exact policies are unaffected).",
                         epilog=common.epilog(EXAMPLES_PERPLEXITY),
                         formatter_class=common.FORMATTER)
    ppl.add_argument("--text-file", required=True, metavar="PATH", help="UTF-8 text to score")
    common.add_model_args(ppl, new_tokens=False)
    ppl.add_argument("--max-tokens", type=int, metavar="N",
                     help="score only the first N tokens (default: the whole text, up to the model's positions)")
    ppl.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, metavar="C",
                     help=f"tokens per forward pass (default: {DEFAULT_CHUNK}; 1 = strict token-by-token)")
    ppl.add_argument("--json", action="store_true",
                     help="print one JSON object (perplexity, tokens, mean_nll, seconds, peak_rss_bytes, chunk, "
                          "model, policy, budget, options, cache) on the last line of stdout")
    ppl.set_defaults(func=cmd_perplexity)


def cmd_perplexity(args) -> int:
    from tqdm.auto import tqdm

    from ..generation import max_positions
    from ..models import load
    from ..quality import perplexity

    if args.chunk < 1:
        raise KVBoundError(f"--chunk must be >= 1 token, got {args.chunk}")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise KVBoundError(f"--max-tokens must be >= 2 (one token to predict from, one to predict), got {args.max_tokens}")
    text = read_prompt_file(args.text_file, "text file")
    model, tokenizer = load(args.model)
    limit = max_positions(model)
    if args.max_tokens is not None and limit is not None and args.max_tokens > limit:
        raise KVBoundError(f"--max-tokens {args.max_tokens} is beyond model {args.model!r}'s {limit} positions; "
                           f"use --max-tokens {limit} or less")
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    if ids.shape[1] < 2:
        raise KVBoundError(f"text file {args.text_file} is {ids.shape[1]} token(s); perplexity needs at least 2")
    if args.max_tokens is not None:
        ids = ids[:, :args.max_tokens]
    elif limit is not None and ids.shape[1] > limit:
        raise KVBoundError(f"text file {args.text_file} is {ids.shape[1]} tokens but model {args.model!r} handles "
                           f"at most {limit} positions; pass --max-tokens {limit} or less")
    cache = common.make_cache(model, args)
    try:
        with tqdm(total=ids.shape[1] - 1, unit="tok", desc=f"perplexity {args.policy}", disable=None,
                  file=sys.stderr, leave=False) as bar:
            result = perplexity(model, ids, cache, chunk=args.chunk, progress=lambda done: bar.update(done - bar.n))
    finally:
        cache.close()
    out = {**result.as_dict(), "model": args.model, "policy": args.policy, "budget": args.budget,
           "options": dict(args.option), "cache": cache.memory_report()}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens (mean NLL {result.mean_nll:.4f} nats; "
              f"chunk {result.chunk}; {result.seconds:.1f}s; peak RSS {result.peak_rss_bytes / 2**20:.0f} MiB)")
    return 0
