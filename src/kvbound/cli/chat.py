"""``kvbound chat``: multi-turn chat on stdin, one cache kept across all turns."""

from __future__ import annotations

import sys

import torch

from ..errors import KVBoundError
from . import common

EXAMPLES_CHAT = """\
examples:
  kvbound chat                                  # type a message, Enter; /exit or Ctrl-D ends
  printf 'Hi!\\nWhat did I just say?\\n' | kvbound chat --policy full --max-new-tokens 48
"""


def add(sub) -> None:
    chat = sub.add_parser("chat", help="multi-turn chat on stdin, one cache kept across turns",
                          description="Chat with the model: each line on stdin is a user message; the reply is "
                                      "printed on stdout. One cache lives across all turns. Ends on EOF or /exit.",
                          epilog=common.epilog(EXAMPLES_CHAT),
                          formatter_class=common.FORMATTER)
    common.add_model_args(chat)
    chat.set_defaults(func=cmd_chat)


def next_turn_ids(tokenizer, messages: list[dict], history: torch.Tensor | None, user_text: str, args) -> torch.Tensor:
    """Token ids for the whole conversation after ``user_text``, reusing ``history`` (the exact ids the
    cache has seen plus the last reply) as the prefix so the cache never holds a retokenized variant."""
    turn = messages + [{"role": "user", "content": user_text}]
    if history is None:
        return common.apply_template(tokenizer, turn, args)
    before = common.apply_template(tokenizer, messages, args, add_generation_prompt=False, tokenize=False)
    after = common.apply_template(tokenizer, turn, args, tokenize=False)
    if not after.startswith(before):  # template rewrites earlier turns: fall back to its full rendering
        return common.apply_template(tokenizer, turn, args)
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
    model, tokenizer = common.load(args)
    if not getattr(tokenizer, "chat_template", None):
        raise KVBoundError(f"model {args.model!r} has no chat template, so 'kvbound chat' cannot format turns")
    cache = common.make_cache(model, args)
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
    from ..generation import greedy

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
        common.check_length(model, args, ids.shape[1])
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
