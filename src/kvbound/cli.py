"""``kvbound`` command line: ``generate`` (one prompt), ``chat`` (multi-turn on stdin), ``perplexity``
(of a text file), ``bench`` and ``serve``.

Bad input (``KVBoundError``) exits with status 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any, Sequence

import torch

from .errors import KVBoundError
from .prompts import read_prompt_file

EXAMPLES_GENERATE = """\
examples:
  kvbound generate --chat --prompt "What is the capital of France?"
  kvbound generate --prompt-file story.txt --policy window --budget 128 --max-new-tokens 32 --json
  kvbound generate --model gemma3-270m --prompt "The capital of France is"
  kvbound generate --model tiny-llama --prompt "hello" --json        # random tiny model, instant
"""

EXAMPLES_CHAT = """\
examples:
  kvbound chat                                  # type a message, Enter; /exit or Ctrl-D ends
  printf 'Hi!\\nWhat did I just say?\\n' | kvbound chat --policy full --max-new-tokens 48
"""

DESCRIPTION = """\
kvbound keeps a transformer's KV cache inside a memory budget. Pick a cache policy (--policy)
and a budget in tokens per layer (--budget); the exact policies give the same tokens as the
full cache, the lossy ones trade accuracy for memory. Generation is greedy.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) so bad input reads like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- help text


def _policies_epilog() -> str:
    from . import policies
    from .cache.registry import registered

    specs = registered()
    width = max(len(n) for n in policies())
    lines = ["policies (--policy):"]
    for name, desc in policies().items():
        spec = specs[name]
        tags = ("exact" if spec.exact else "lossy") + (", needs --budget" if spec.needs_budget else "")
        lines.append(f"  {name:<{width}}  [{tags}] {desc}")
    return "\n".join(lines)


def _models_epilog() -> str:
    from .models import BUILTIN, DEFAULT_MODEL
    from .tiny import TINY

    lines = ["models (--model): a built-in name, a local Hugging Face model folder, a .gguf file, or a hub id"]
    for name, spec in BUILTIN.items():
        lines.append(f"  {name:<13} {spec.description}{'  (default)' if name == DEFAULT_MODEL else ''}")
    lines.append(f"  {', '.join(TINY)}: random-init test models with a byte tokenizer")
    return "\n".join(lines)


# --------------------------------------------------------------------------- arguments


def _option(text: str) -> tuple[str, Any]:
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


def _add_model_args(p: argparse.ArgumentParser, new_tokens: bool = True) -> None:
    from .models import DEFAULT_MODEL

    g = p.add_argument_group("model and cache")
    g.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME",
                   help=f"built-in name, model folder, .gguf file or hub id (default: {DEFAULT_MODEL})")
    g.add_argument("--policy", default="full", metavar="NAME", help="cache policy, see the list below (default: full)")
    g.add_argument("--budget", type=int, metavar="N", help="tokens of K/V kept hot per layer (policies that need one)")
    g.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="policy option (repeatable), e.g. --option sinks=4")
    if not new_tokens:
        return
    g.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate per reply (default: 64)")
    from .generation import DEFAULT_PREFILL_CHUNK

    g.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, metavar="N",
                   help="feed the prompt N tokens per forward pass: the cache evicts or spills between chunks, so "
                        f"memory is bounded by budget + N (default: {DEFAULT_PREFILL_CHUNK}; a chunk longer than "
                        "the prompt = one pass)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="kvbound", description=DESCRIPTION, formatter_class=fmt,
                     epilog=_policies_epilog() + "\n\n" + EXAMPLES_GENERATE + "\nRun 'kvbound COMMAND --help' for details.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"kvbound {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    gen = sub.add_parser("generate", help="continue one prompt through a kvbound cache (greedy)",
                         description="Greedy-generate a continuation of one prompt through a kvbound cache and "
                                     "report the cache's measured memory.",
                         epilog=_policies_epilog() + "\n\n" + _models_epilog() + "\n\n" + EXAMPLES_GENERATE,
                         formatter_class=fmt)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="the prompt text")
    src.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a file ('-' = stdin)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    _add_model_args(gen)
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

    chat = sub.add_parser("chat", help="multi-turn chat on stdin, one cache kept across turns",
                          description="Chat with the model: each line on stdin is a user message; the reply is "
                                      "printed on stdout. One cache lives across all turns. Ends on EOF or /exit.",
                          epilog=_policies_epilog() + "\n\n" + _models_epilog() + "\n\n" + EXAMPLES_CHAT,
                          formatter_class=fmt)
    _add_model_args(chat)
    chat.set_defaults(func=cmd_chat)

    _add_perplexity(sub, fmt)
    _add_bench(sub)
    _add_serve(sub, fmt)
    return parser


EXAMPLES_SERVE = """\
examples:
  kvbound serve --policy full --memory-budget 256MiB --port 8000
  kvbound serve --model tiny-llama --policy kv-direct --budget 32 --memory-budget 1MB
  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi!"}], "temperature": 0}'
"""


def _add_serve(sub, fmt) -> None:
    serve = sub.add_parser(
        "serve", help="OpenAI-compatible chat server; idle conversations parked as token ids under --memory-budget",
        description="Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
                    "/v1/models, /health, /stats). Each conversation keeps one cache under --policy; a request "
                    "continues the stored conversation that shares its longest token prefix. When the caches of "
                    "all conversations hold more than --memory-budget, the least recently used idle ones are "
                    "parked as token ids (4 bytes per token) and restored by a prefill on their next request: with an "
                    "exact policy the replies are those of a server without a budget. "
                    "Needs the serve extra: pip install 'kvbound[serve]'.",
        epilog=_policies_epilog() + "\n\n" + _models_epilog() + "\n\n" + EXAMPLES_SERVE, formatter_class=fmt)
    from .batching import ROW_GROUP
    from .generation import DEFAULT_PREFILL_CHUNK
    from .models import DEFAULT_MODEL

    g = serve.add_argument_group("model and cache")
    g.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME",
                   help=f"built-in name, model folder, .gguf file or hub id; clients ask for it by this name "
                        f"(default: {DEFAULT_MODEL})")
    g.add_argument("--policy", default="full", metavar="NAME", help="each conversation's cache policy (default: full)")
    g.add_argument("--budget", type=int, metavar="N", help="tokens of K/V kept hot per layer (policies that need one)")
    g.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="policy option (repeatable)")
    s = serve.add_argument_group("server")
    s.add_argument("--memory-budget", metavar="SIZE",
                   help="bytes all hot conversations' caches may hold, e.g. 64MiB, 1GB or 1000000 "
                        "(default: no limit, nothing is parked)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    s.add_argument("--max-queue", type=int, default=16, metavar="N",
                   help="requests that may wait for the model; more are answered 429 (default: 16)")
    s.add_argument("--max-conversations", type=int, default=4096, metavar="N",
                   help="conversations stored, hot or parked; the least recently used is forgotten (default: 4096)")
    s.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, metavar="N",
                   help=f"prompt tokens per forward pass when prefilling or restoring (default: {DEFAULT_PREFILL_CHUNK})")
    s.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="conversations whose next tokens are decoded together in one forward pass (continuous "
                        "batching; policies that cannot run batched decode one conversation per pass) (default: 8)")
    s.add_argument("--row-group", type=int, default=ROW_GROUP, metavar="N",
                   help="pad each batched pass to a multiple of N rows so a greedy reply does not depend on the "
                        f"conversations it shares passes with; 1: no padding, fastest alone (default: {ROW_GROUP})")
    s.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    serve.set_defaults(func=cmd_serve)


EXAMPLES_PERPLEXITY = """\
examples:
  kvbound perplexity --text-file book.txt --max-tokens 1024 --json
  kvbound perplexity --text-file book.txt --policy window --budget 64 --chunk 1   # strict token-by-token
  kvbound perplexity --model tiny-llama --text-file README.md --max-tokens 200
"""


def _add_perplexity(sub, fmt) -> None:
    from .quality import DEFAULT_CHUNK

    ppl = sub.add_parser("perplexity", help="perplexity of a long text, scored through a kvbound cache",
                         description="Perplexity of a text file: the text is fed --chunk tokens per forward pass "
                                     "through the policy's cache and every token is predicted from what the cache "
                                     "holds at that point plus the chunk. --chunk 1 is strict token-by-token "
                                     f"scoring; the default {DEFAULT_CHUNK} lets a lossy policy at budget B see "
                                     f"B..B+{DEFAULT_CHUNK - 1} past tokens (exact policies are unaffected).",
                         epilog=_policies_epilog() + "\n\n" + _models_epilog() + "\n\n" + EXAMPLES_PERPLEXITY,
                         formatter_class=fmt)
    ppl.add_argument("--text-file", required=True, metavar="PATH", help="UTF-8 text to score")
    _add_model_args(ppl, new_tokens=False)
    ppl.add_argument("--max-tokens", type=int, metavar="N",
                     help="score only the first N tokens (default: the whole text, up to the model's positions)")
    ppl.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, metavar="C",
                     help=f"tokens per forward pass (default: {DEFAULT_CHUNK}; 1 = strict token-by-token)")
    ppl.add_argument("--json", action="store_true",
                     help="print one JSON object (perplexity, tokens, mean_nll, seconds, peak_rss_bytes, chunk, "
                          "model, policy, budget, options, cache) on the last line of stdout")
    ppl.set_defaults(func=cmd_perplexity)


def _add_bench(sub) -> None:
    """Register ``bench`` from ``kvbound.bench.cli``; a broken bench never breaks the other commands."""
    try:
        from .bench import cli as bench_cli

        bench_cli.add_arguments(_Parser(prog="kvbound bench"))  # dry run: a failure leaves no half parser
        bench = sub.add_parser("bench", help="hold every policy to the same test: token match, memory, speed",
                               description=(bench_cli.__doc__ or "").strip() or None,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        bench_cli.add_arguments(bench)
        bench.set_defaults(func=bench_cli.run)
    except Exception as exc:  # noqa: BLE001 -- report it when 'bench' is actually used
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        stub = sub.add_parser("bench", help=f"(unavailable: {reason})")
        stub.add_argument("rest", nargs=argparse.REMAINDER)

        def unavailable(_args) -> int:
            raise KVBoundError(f"kvbound bench is unavailable in this install: {reason}")

        stub.set_defaults(func=unavailable)


# --------------------------------------------------------------------------- shared steps


def _load(args):
    from .models import load

    if args.max_new_tokens < 1:
        raise KVBoundError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.prefill_chunk < 1:
        raise KVBoundError(f"--prefill-chunk must be >= 1 tokens, got {args.prefill_chunk}")
    return load(args.model)


def _make_cache(model, args):
    from . import make_cache

    return make_cache(model, args.policy, args.budget, **dict(args.option))


def _check_length(model, args, total_prompt: int) -> None:
    """As :func:`kvbound.generation.check_positions`, naming the command-line flag to change."""
    from .generation import check_positions, max_positions

    limit = max_positions(model)
    if limit is not None and total_prompt <= limit < total_prompt + args.max_new_tokens:
        raise KVBoundError(
            f"prompt ({total_prompt} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the model's "
            f"{limit} positions; use --max-new-tokens {limit - total_prompt} or less"
        )
    check_positions(model, total_prompt, args.max_new_tokens, args.model)


def _apply_template(tokenizer, messages: list[dict], args, add_generation_prompt: bool = True, tokenize: bool = True):
    if not getattr(tokenizer, "chat_template", None):
        raise KVBoundError(f"model {args.model!r} has no chat template; drop --chat (or use 'generate' with a plain prompt)")
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=tokenize,
                                        return_dict=tokenize, return_tensors="pt" if tokenize else None)
    return out["input_ids"] if tokenize else out


def _read_prompt(args) -> str:
    if args.prompt is not None:
        text = args.prompt
    elif args.prompt_file == "-":
        text = sys.stdin.read()
    else:
        text = read_prompt_file(args.prompt_file)
    if not text.strip():
        raise KVBoundError("the prompt is empty; give some text with --prompt or --prompt-file")
    return text


# --------------------------------------------------------------------------- generate


def _speculate(model, input_ids: torch.Tensor, cache, args, timings) -> tuple[torch.Tensor, dict]:
    """Exact self-speculative decoding (``kvbound.speculative``) into ``cache``: returns (new ids, stats)."""
    if args.speculate < 1:
        raise KVBoundError(f"--speculate must be >= 1 drafted tokens, got {args.speculate}")
    try:
        from .speculative import speculative_greedy
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
    from .generation import Timings, greedy
    from .rss import peak_rss_bytes

    prompt = _read_prompt(args)
    model, tokenizer = _load(args)
    if args.chat:
        input_ids = _apply_template(tokenizer, [{"role": "user", "content": prompt}], args)
    else:
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if input_ids.shape[1] == 0:
        raise KVBoundError("the prompt tokenized to zero tokens; give some text")
    _check_length(model, args, input_ids.shape[1])

    speculation = None
    timings = Timings()
    cache = _make_cache(model, args)
    try:  # close: an offload store's files go at once, also when generation fails (e.g. a full disk)
        start = time.perf_counter()
        if args.speculate is not None:
            new, speculation = _speculate(model, input_ids, cache, args, timings)
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


def cmd_perplexity(args) -> int:
    from tqdm.auto import tqdm

    from .models import load
    from .quality import perplexity
    from .generation import max_positions

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
    cache = _make_cache(model, args)
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


# --------------------------------------------------------------------------- chat


def next_turn_ids(tokenizer, messages: list[dict], history: torch.Tensor | None, user_text: str, args) -> torch.Tensor:
    """Token ids for the whole conversation after ``user_text``, reusing ``history`` (the exact ids the
    cache has seen plus the last reply) as the prefix so the cache never holds a retokenized variant."""
    turn = messages + [{"role": "user", "content": user_text}]
    if history is None:
        return _apply_template(tokenizer, turn, args)
    before = _apply_template(tokenizer, messages, args, add_generation_prompt=False, tokenize=False)
    after = _apply_template(tokenizer, turn, args, tokenize=False)
    if not after.startswith(before):  # template rewrites earlier turns: fall back to its full rendering
        return _apply_template(tokenizer, turn, args)
    # What the template puts after the last reply (e.g. "<|im_end|>\n"), minus an EOS we already generated.
    reply = messages[-1]["content"]
    at = before.rfind(reply) if reply else -1
    closing = before[at + len(reply):] if at >= 0 else ""
    eos_text = tokenizer.decode(history[0, -1:].tolist())
    if history[0, -1].item() in _eos_ids(tokenizer) and closing.startswith(eos_text):
        closing = closing[len(eos_text):]
    delta = tokenizer(closing + after[len(before):], add_special_tokens=False, return_tensors="pt")["input_ids"]
    return torch.cat([history, delta], dim=1)


def _eos_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return ids


def cmd_chat(args) -> int:
    model, tokenizer = _load(args)
    if not getattr(tokenizer, "chat_template", None):
        raise KVBoundError(f"model {args.model!r} has no chat template, so 'kvbound chat' cannot format turns")
    cache = _make_cache(model, args)
    try:
        messages = _chat_loop(model, tokenizer, cache, args)
        report = cache.memory_report()
    finally:
        cache.close()
    print(f"[{len(messages) // 2} turns; {args.policy} cache: {report['tokens_seen']} tokens seen, "
          f"peak hot K/V {report['peak_hot_kv_bytes'] / 2**20:.2f} MiB]", file=sys.stderr)
    return 0


def _chat_loop(model, tokenizer, cache, args) -> list[dict]:
    """Read user lines until EOF or /exit, reply to each on one cache; returns the messages."""
    from .generation import greedy

    messages: list[dict] = []
    history: torch.Tensor | None = None
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if text == "/exit":
            break
        if not text:
            continue
        ids = next_turn_ids(tokenizer, messages, history, text, args)
        _check_length(model, args, ids.shape[1])
        seen = cache.get_seq_length()
        if seen and not torch.equal(ids[:, :seen], history[:, :seen]):
            # The template rewrote earlier turns: the cache holds another past. Rebuild it from the
            # full rendering rather than continue from a misaligned context.
            cache.reset()
            print("[the chat template rewrote earlier turns: cache rebuilt from the whole conversation]",
                  file=sys.stderr)
        new = greedy(model, ids, cache, args.max_new_tokens, prefill_chunk=args.prefill_chunk)
        reply = tokenizer.decode(new[0].tolist(), skip_special_tokens=True).strip()
        print(reply, flush=True)
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        history = torch.cat([ids, new], dim=1)
    return messages


# --------------------------------------------------------------------------- serve


def cmd_serve(args) -> int:
    from .generation import check_chunk
    from .serve.config import ServeConfig, parse_size

    try:
        import uvicorn

        from .serve import create_app
    except ImportError as exc:
        raise KVBoundError(f"kvbound serve needs the serve extra ({exc.name} is missing): "
                           "pip install 'kvbound[serve]'") from None
    if not 0 < args.port < 65536:
        raise KVBoundError(f"--port must be 1..65535, got {args.port}")
    if args.threads is not None:
        if args.threads < 1:
            raise KVBoundError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    check_chunk(args.prefill_chunk)
    config = ServeConfig(model=args.model, policy=args.policy, budget=args.budget, options=dict(args.option),
                         memory_budget=None if args.memory_budget is None else parse_size(args.memory_budget),
                         max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                         max_conversations=args.max_conversations, max_batch=args.max_batch,
                         row_group=args.row_group)
    sock = _listen(args.host, args.port)  # a taken port fails here, before the model loads
    with sock:
        app = create_app(config)
        print(f"kvbound serve: {args.model} ({args.policy} cache) on http://{args.host}:{args.port}/v1",
              file=sys.stderr)
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0


def _listen(host: str, port: int):
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise KVBoundError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``kvbound``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own bar covers the slow first load
        return int(args.func(args) or 0)
    except KVBoundError as exc:
        print(f"kvbound: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
