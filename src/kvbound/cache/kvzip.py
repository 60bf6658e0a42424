"""``kvzip``: query-agnostic scores from context reconstruction (Kim et al. 2025).

"KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction",
https://arxiv.org/abs/2505.23416 (reference code: https://github.com/snu-mllab/KVzip; NVIDIA
kvpress's ``KVzipPress``). The model is teacher-forced to repeat the context from its own cache;
each cached K/V pair is scored by the largest attention it receives during the repetition, so the
score does not depend on any later question.

Scoring. The tokens not scored yet are reconstructed in chunks of ``chunk`` tokens (default 2048,
as the paper), one forward pass each, through this very cache: the pass feeds a repeat prompt, the
chat template's end of the user turn and start of the assistant's (the ``suffix``), then the chunk's
own ids. The repeat prompt is "\\n\\nRepeat the previous context exactly." for the context's first
chunk and "\\n\\nRepeat the part of the previous context exactly, starting with " plus the last 8
tokens before the chunk for later ones. In every full-attention layer the repeat queries (post
RoPE) attend, for the score, over ``[the sinks; the chunk's cached keys; the repeat keys,
causal]`` with the softmax over that subset only; ``score_i`` is the maximum over the repeat
queries and over the query heads of the KV head. The repeat pass's own K/V are never stored. Its
hidden states see the whole held cache (the model's ordinary attention). Memory stays bounded:
one chunk per pass, the score's logits in blocks of queries.

When. A forward pass of several tokens (a prompt, a prefill chunk, a new turn) that leaves a
layer above the budget is followed, once every layer has run (:meth:`observe_output`), by the
reconstruction of every held token not scored yet, then each layer keeps its best tokens as the
``allocation`` option spreads the budget (:mod:`kvbound.cache.allocation`): ``uniform`` keeps
``budget`` per KV head of each layer; ``ada`` ranks the scores of all KV heads
of a layer together (ragged heads: the paper's non-uniform head budgets, within each layer);
``pyramid`` and ``cake`` spread the budget over layers; ``global`` (the paper's default) ranks the
scores of every layer and KV head together and keeps the top ``layers x heads x budget``
(:func:`~kvbound.cache.allocation.global_counts`), so each head holds what its scores earn; while
decoding each head then keeps its share (its quota) and drops its lowest. The ``sinks`` first tokens are always
kept. So the hot K/V reach ``budget`` + one pass's tokens between the pass and its reconstruction
(``peak_hot_kv_bytes`` shows it); prefill in chunks to bound it. Cost: about one more prefill of
the scored tokens (the paper: 2-3x a prefill). A prefill within the budget scores nothing.

Decoding (the paper compresses once and then lets the cache grow): nothing is re-scored. A step
that overflows evicts the lowest-scored token of each KV head; the generated tokens are unscored
and kept, like a recent window; when no scored token is left (a generation longer than the budget,
or a prompt that fit the budget) the oldest unscored non-sink token goes, as in StreamingLLM. The
next multi-token pass reconstructs every unscored held token, generated ones included. The cache
keeps the ids of the unscored tokens for that (the ``token_ids`` tier, 8 bytes per token).

Prompt. With a chat template the suffix is the template's (as kvpress derives it); a tokenizer
without one gets a plain-text reconstruction ("\\n" as the suffix), and the memory report's
``reconstruction_prompt`` says so. The tokenizer is the option ``tokenizer`` (Python), else the
one saved with the model's folder, else kvbound's byte tokenizer for its tiny 256-token models.

The score needs the repeat queries (projected from the attention input by kvbound's pre-hook),
never the model's attention weights, so it runs with any attention implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import attention
from ..errors import KVBoundError
from .allocation import AllocationOptions, Kept, global_counts, keep_counts
from .base import gather_tokens, nbytes
from .checks import check_int
from .codec import decode_kv
from .evicting import EvictingCache, EvictingLayer
from .registry import register

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with "
LEAD_TOKENS = 8  # tokens before a later chunk quoted in its repeat prompt
PLAIN_SUFFIX = "\n"


@dataclass
class KVzipOptions(AllocationOptions):  # a codec and an allocation; no think
    chunk: int = 2048  # tokens reconstructed per forward pass
    sinks: int = 4  # first tokens always kept (and attended to in every chunk's score)
    tokenizer: Any = None  # Python API: the model's tokenizer (default: the model folder's)


def model_tokenizer(model, given: Any):
    """The tokenizer of the reconstruction prompt (see the module docstring), or a one-line error."""
    if given is not None:
        if isinstance(given, (str, bytes)) or not callable(getattr(given, "encode", None)):
            raise KVBoundError(f"kvzip option tokenizer must be a tokenizer object (Python API), got {given!r}")
        return given
    path = getattr(model, "name_or_path", "") or ""
    if path and Path(path).is_dir():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            pass
    if not path and getattr(model.config, "vocab_size", None) == 256:
        from ..models import byte_tokenizer

        return byte_tokenizer()
    raise KVBoundError("kvzip needs the model's tokenizer for its reconstruction prompt: load the model from a "
                       "folder with one, or pass tokenizer=<tokenizer> (Python API)")


def reconstruction_suffix(tokenizer) -> tuple[str, str]:
    """(text between the repeat prompt and the repeated chunk, which prompt kind): the chat template's
    end of a user turn and start of the assistant's, or a plain newline without a template."""
    if getattr(tokenizer, "chat_template", None) is None:
        return PLAIN_SUFFIX, "plain text (the tokenizer has no chat template)"
    marker = "\n" + "#" * 16
    text = tokenizer.apply_chat_template([{"role": "user", "content": "context" + marker}],
                                         add_generation_prompt=True, tokenize=False)
    return text.split(marker, 1)[1], "chat template"


def encode(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(text, add_special_tokens=False)], dtype=torch.long)


def kvzip_chunk_scores(query: torch.Tensor, sink_keys: torch.Tensor, chunk_keys: torch.Tensor,
                       repeat_keys: torch.Tensor, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """Max attention each chunk key gets from the repeat queries: ``[B, kv_heads, c]`` float32.

    ``query`` ``[B, heads, r, D]`` (post-RoPE, one per repeat token); the softmax of each query runs
    over ``[sink_keys; chunk_keys; repeat_keys]`` (the repeat keys causally); the maximum is over the
    queries and the query heads of each KV head.

    Computed without the softmax matrix: each query's log-sum-exp over that subset comes from two
    fused attention calls (:func:`kvbound.attention.block_attention` over sinks + chunk,
    :func:`kvbound.attention.causal_lse` over the repeat keys), then
    ``max_i exp(logit_ij - lse_i) = exp(max_i (logit_ij - lse_i))`` needs only the chunk's logits, in
    blocks of queries (float32, at most :data:`kvbound.attention.MASS_BLOCK_BYTES`)."""
    b, heads, r, d = query.shape
    kv_heads, c = chunk_keys.shape[1], chunk_keys.shape[-2]
    groups = heads // kv_heads
    out = torch.full((b, kv_heads, c), float("-inf"), dtype=torch.float32, device=chunk_keys.device)
    if r == 0 or c == 0:
        return out.clamp_(min=0.0)
    context = torch.cat([sink_keys, chunk_keys], dim=-2)
    _, lse_context = attention.block_attention(query, context, context, None, scaling, softcap)
    lse_repeat = attention.causal_lse(query, repeat_keys, scaling, softcap)
    lse = torch.logaddexp(lse_context, lse_repeat)  # [B, heads, r]
    keys_t = chunk_keys.float().transpose(-1, -2)
    block = max(1, min(r, attention.MASS_BLOCK_BYTES // (4 * b * heads * c)))
    buf = torch.empty(b * heads * block * c, dtype=torch.float32, device=chunk_keys.device)
    for start in range(0, r, block):
        t = min(block, r - start)
        q = query[:, :, start:start + t].float().reshape(b, kv_heads, groups * t, d)
        logits = torch.matmul(q, keys_t, out=buf[:b * heads * t * c].view(b, kv_heads, groups * t, c)).mul_(scaling)
        if softcap:
            logits.div_(softcap).tanh_().mul_(softcap)
        logits.sub_(lse[:, :, start:start + t].reshape(b, kv_heads, groups * t, 1))
        torch.maximum(out, logits.amax(dim=2), out=out)
    return out.exp_()


class KVzipLayer(EvictingLayer):
    # [B, kv_heads, held] float32 (NaN = not scored yet): gathered, and packed for ragged heads, with the keys
    token_state = {"scores": 2}
    batch_state = (*EvictingLayer.batch_state, "quota")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.scores: torch.Tensor | None = None
        self.quota: torch.Tensor | None = None  # [B, H] tokens each head keeps (allocation=global), else None

    def policy_tiers(self) -> dict[str, int]:
        return {"scores": nbytes(self.scores), "quota": nbytes(self.quota)}

    def reset_policy(self) -> None:
        self.scores = self.quota = None

    def unscored(self) -> int:
        """Held tokens not scored yet (a suffix of every head; counted on the first head)."""
        if self.scores is None:
            return 0
        first = self.scores[:int(self.lengths[0, 0])] if self.lengths is not None else self.scores[0, 0]
        return int(first.isnan().sum())

    def ranking(self, positions: torch.Tensor) -> torch.Tensor:
        """What eviction ranks the held ``scores`` at ``positions`` by: the scores (in [0, 1]); unscored
        tokens above them, oldest lowest; the sinks +inf."""
        rank = torch.where(self.scores.isnan(), 2.0 + positions.float() / (self.seen + 1), self.scores)
        return rank.masked_fill(positions < self.cache.options.sinks, float("inf"))

    def select(self, keys, positions, query, query_pos, mass=None):
        n = keys.shape[-2]
        old = 0 if self.scores is None else self.scores.shape[-1]
        pad = torch.full((*positions.shape[:2], n - old), float("nan"), device=keys.device)
        self.scores = pad if self.scores is None else torch.cat([self.scores, pad], dim=-1)
        if self.quota is not None:  # allocation=global: each head holds its share of the global ranking
            return self._keep_quota(positions, n - old)
        if n <= self.capacity:
            return None
        if n - old > 1:  # several tokens: scored by reconstruction once every layer holds them
            self.cache.overflowed = True
            return None
        return self.keep(self.ranking(positions))  # decoding: the scores stay; evict the lowest

    def _keep_quota(self, positions: torch.Tensor, new: int) -> torch.Tensor | Kept | None:
        """allocation=global after a global selection: a multi-token step that leaves a head above its
        quota is re-ranked with every layer (reconstruction); a decoding step drops the lowest of each
        head above its quota."""
        rank, held = self.ranked(positions, self._valid)
        if bool((held <= self.quota).all()):
            return None
        if new > 1:
            self.cache.overflowed = True
            return None
        return keep_counts(rank, torch.minimum(held, self.quota))

    def ranked(self, positions: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`ranking` of ``positions`` with a ragged step's padding (``valid`` False) at ``-inf``,
        and the tokens each head holds ``[B, H]``."""
        rank = self.ranking(positions)
        if valid is None:
            return rank, torch.full(rank.shape[:2], rank.shape[-1], dtype=torch.long, device=rank.device)
        return rank.masked_fill(~valid, float("-inf")), valid.sum(-1)

    def hold_context(self, keys: torch.Tensor, values: torch.Tensor, seen: int) -> None:
        """Hold all of a prefilled context, not scored yet (NaN scores)."""
        self.compress(keys, values, keys.shape[-2], seen=seen)
        self.scores = torch.full(self.positions.shape, float("nan"), device=keys.device)

    def compress_scored(self, keys: torch.Tensor, values: torch.Tensor, keep: int, scores: torch.Tensor | None,
                        seen: int) -> None:
        """kvpress's protocol: hold the context ``keys``/``values`` (its newest ``n`` of ``seen`` tokens)
        scored by ``scores`` ``[B, kv_heads, n]`` (one reconstruction of the whole context, shared by
        every ratio), the best ``keep`` per KV head; then everything that follows."""
        if self.is_sliding or scores is None:
            return self.compress(keys, values, keep, seen=seen)
        self.hold_context(keys, values, seen)
        self.scores = scores.clone()
        if self.cache.allocation == "global":  # the cache ranks every layer's scores together
            return
        self.capacity = self.cache.compressed_capacity(self.layer_idx, keep, seen)
        self.evict_scored()
        self.capacity = self.UNBOUNDED

    def evict_scored(self) -> None:
        """After the reconstruction: keep the allocation's tokens (``capacity`` per KV head in the mean)."""
        valid = self._unpad()
        self._valid = valid
        try:
            kept = self.keep(self.ranking(self.positions))
        finally:
            self._valid = None
        self._keep((self.keys, self.values), self.positions, kept, valid)

    def keep_quota(self, quota: torch.Tensor, rank: torch.Tensor, held: torch.Tensor, valid: torch.Tensor | None) -> None:
        """allocation=global: hold each head's top ``quota`` ``[B, H]`` by ``rank`` (:meth:`ranked`, with
        ``held`` per head; padded like the held tokens when ``valid`` is given) and keep the quota for
        the decoding steps."""
        self.quota = quota
        kept = None if bool((quota >= held).all()) else keep_counts(rank, quota)
        self._keep((self.keys, self.values), self.positions, kept, valid)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        span = self.cache.scoring
        if span is None:
            return super().update(key_states, value_states, *args, **kwargs)
        # a reconstruction pass: attention sees held + repeat K/V; nothing is stored
        valid = self._unpad()  # ragged heads: padded for the pass, packed again at its end
        held_k, held_v = decode_kv(self.cache.codec, self.keys, self.values, key_states.dtype)
        keys, values = torch.cat([held_k, key_states], dim=-2), torch.cat([held_v, value_states], dim=-2)
        query, self.pending_query = self.pending_query, None
        if not self.is_sliding:
            first, stop = span
            # the chunk: columns of each head's unscored tail (its last seen - first held entries)
            held = held_k.shape[-2] if valid is None else valid.sum(-1, keepdim=True)  # [B, H, 1] if ragged
            cols = (held - (self.seen - first) + torch.arange(stop - first, device=keys.device)).expand(
                *held_k.shape[:2], stop - first)
            sinks = min(self.cache.options.sinks, first)  # held positions 0..sinks-1 (never evicted)
            scores = kvzip_chunk_scores(query, held_k[..., :sinks, :], gather_tokens(held_k, cols),
                                        key_states, self.scaling(), self.cache.softcap)
            self.scores.scatter_(-1, cols, scores)
        if valid is not None or self.cache.allocation != "uniform":  # layers (or heads) hold different counts
            new = key_states.shape[-2]
            bias = None if valid is None else self.step_bias(F.pad(valid, (0, new), value=True), new)
            self.pending_step = attention.TierStep(keys, key_bias=bias, fit_mask=True)
        if valid is not None:
            self._hold(None, valid)
        self.cache.note_transient(nbytes(keys, values, query))
        return keys, values


@register("kvzip",
          "lossy: KVzip (Kim et al. 2025) -- query-agnostic: keeps the K/V the model attends to most while it "
          "repeats the context (reconstruction after each multi-token pass that overflows); takes an allocation",
          exact=False, options=KVzipOptions, beams=True,
          paper="Kim, Kim, Kwon, Yang, Yun, Song 2025, https://arxiv.org/abs/2505.23416")
class KVzipCache(EvictingCache):
    layer_cls = KVzipLayer
    across_layers = ("global",)

    def __init__(self, model, budget: int, **options: Any) -> None:
        opts = self.parse_options(options)
        check_int(opts.chunk, "chunk", "kvzip", 1)
        check_int(opts.sinks, "sinks", "kvzip", 0)
        if budget <= opts.sinks:
            raise KVBoundError(f"kvzip needs budget > sinks, got budget {budget} and sinks {opts.sinks}")
        tokenizer = model_tokenizer(model, opts.tokenizer)
        suffix, self.prompt_kind = reconstruction_suffix(tokenizer)
        self.first_ids, self.next_ids = encode(tokenizer, FIRST_PROMPT), encode(tokenizer, NEXT_PROMPT)
        self.suffix_ids = encode(tokenizer, suffix)
        super().__init__(model, budget, opts)
        self.reset_state()

    def reset_state(self) -> None:
        self.ids: torch.Tensor | None = None  # [B, u]: ids of the unscored held tokens (+ LEAD_TOKENS before)
        self.scoring: tuple[int, int] | None = None  # positions [first, stop) being reconstructed
        self.overflowed = False
        self.ids_missing = False
        self.reconstructed_tokens = 0  # tokens fed to reconstruction passes (prompt + chunk), for the report

    def map_batch_state(self, fn) -> None:
        if self.ids is not None:
            self.ids = fn(self.ids)

    def extra_tiers(self) -> dict[str, int]:
        return {"token_ids": nbytes(self.ids)}

    def memory_report(self) -> dict[str, Any]:
        return {**super().memory_report(), "reconstruction_prompt": self.prompt_kind,
                "reconstructed_tokens": self.reconstructed_tokens}

    # -- hooks ---------------------------------------------------------------------------
    def observe_input_ids(self, input_ids: torch.Tensor | None) -> None:
        if self.scoring is not None:
            return
        if input_ids is None:
            self.ids_missing = True
            return
        self.ids = input_ids if self.ids is None else torch.cat([self.ids, input_ids.to(self.ids.device)], dim=1)

    def observe_attention_input(self, layer_idx: int, hidden_states: torch.Tensor, kwargs: dict) -> None:
        if self.scoring is None:
            return super().observe_attention_input(layer_idx, hidden_states, kwargs)
        if not self.layers[layer_idx].is_sliding:
            self.layers[layer_idx].pending_query = self.driver.query(layer_idx, hidden_states,
                                                                     kwargs["position_embeddings"])

    def observe_output(self) -> None:
        if self.scoring is not None:
            return
        full = [layer for layer in self.layers if not layer.is_sliding]
        if self.overflowed:
            self.overflowed = False
            self.reconstruct(full[0].unscored())
            if self.allocation == "global":
                self.evict_global(self.budget)
            else:
                for layer in full:
                    layer.evict_scored()
        if self.ids is not None and full:  # keep the ids of the unscored tokens and the few before them
            self.ids = self.ids[:, -(full[0].unscored() + LEAD_TOKENS):].clone()

    # -- compressing a context prefilled elsewhere (kvpress's protocol) ---------------------------
    def compress(self, context, keep: int) -> None:
        """Score the context once by reconstruction (this cache holding all of it), leave the scores in
        ``context.shared`` for the other ratios, keep the ``keep`` best per KV head."""
        self.check_compress()
        scores = context.shared.get("kvzip")
        seen = context.tokens()
        recorded = context.recorded()
        if scores is None:
            if context.ids is None or context.ids.shape[1] < seen:
                raise KVBoundError("kvzip reconstructs the context from its token ids; prefill the context "
                                   "recorder with input_ids")
            self.reset()
            for layer, (keys, values, _, _) in zip(self.layers, recorded):
                layer.hold_context(keys, values, seen)
            self.ids = context.ids
            self.reconstruct(seen)
            scores = [None if layer.is_sliding else layer.scores.clone() for layer in self.layers]
            context.shared["kvzip"] = scores
            done = self.reconstructed_tokens
            self.reset()
            self.reconstructed_tokens = done
        for layer, (keys, values, _, _), layer_scores in zip(self.layers, recorded, scores):
            layer.compress_scored(keys, values, keep, layer_scores, seen)
        if self.allocation == "global":  # hold_context left every layer unbounded after the context
            self.evict_global(keep)
        self.ids = None
        self.finish_compress()

    def evict_global(self, mean: int) -> None:
        """allocation=global (the paper's default): rank the held tokens of every full-attention layer
        and KV head together and keep the top ``mean x heads x layers`` (sinks always, unscored tokens
        above every scored one, as :meth:`KVzipLayer.ranking` orders them)."""
        full = [self.layers[i] for i in self.full_layers]
        valids = [layer._unpad() for layer in full]
        ranked = [layer.ranked(layer.positions, valid) for layer, valid in zip(full, valids)]
        counts = global_counts([rank for rank, _ in ranked], mean * self.kv_heads * len(full))
        for layer, (rank, held), valid, quota in zip(full, ranked, valids, counts):
            layer.keep_quota(quota, rank, held, valid)

    # -- reconstruction ------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, unscored: int) -> None:
        """Score the newest ``unscored`` tokens: one repeat pass per ``chunk`` of them."""
        if self.ids_missing or self.ids is None or self.ids.shape[1] < unscored:
            raise KVBoundError("kvzip reconstructs the context from its token ids; call the model with input_ids "
                               "(not inputs_embeds)")
        seen = self.get_seq_length()
        first = seen - unscored
        ids = self.ids.to(self.device_of_model())
        batch = ids.shape[0]
        for a in range(first, seen, self.options.chunk):
            b = min(seen, a + self.options.chunk)
            chunk = ids[:, ids.shape[1] - (seen - a):ids.shape[1] - (seen - b)]
            if a == 0:
                prompt = self.first_ids.to(ids.device).expand(batch, -1)
            else:
                lead = ids[:, max(0, ids.shape[1] - (seen - a) - LEAD_TOKENS):ids.shape[1] - (seen - a)]
                prompt = torch.cat([self.next_ids.to(ids.device).expand(batch, -1), lead], dim=1)
            repeat = torch.cat([prompt, self.suffix_ids.to(ids.device).expand(batch, -1), chunk], dim=1)
            self.scoring = (a, b)
            try:
                self.driver.base(input_ids=repeat, past_key_values=self, use_cache=True)
            finally:
                self.scoring = None
            self.reconstructed_tokens += repeat.shape[1]

    def device_of_model(self) -> torch.device:
        return self.driver.base.embed_tokens.weight.device
