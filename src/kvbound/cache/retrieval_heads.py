"""Retrieval heads found without training, as RazorAttention does (Tang et al. 2024,
https://arxiv.org/abs/2407.15891): one forward pass over a block of random tokens repeated a few
times, with the model's own (eager) attention weights.

* An **echo** head attends, from a token of a later copy, to the same token in earlier copies.
* An **induction** head attends to the token *after* each earlier occurrence (what comes next).

Each head's score is the attention mass it puts on those positions, averaged over the queries of
the later copies; a KV head takes the maximum over the query heads of its group (GQA). Uniform
attention would put ``chance`` on them; a head qualifies only above ``threshold x chance``.

The scores are computed once per model and cached as JSON under ``$KVBOUND_HOME/razor/`` (the name
from the model's config, the content stamped with a fingerprint of its weights and
:data:`VERSION`); a corrupt or stale file is rebuilt, with a warning that says so.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..models import home
from .model_info import layer_windows, text_config

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

VERSION = 1  # bump when the calibration changes: cached maps of older versions are rebuilt
BLOCK, REPEATS, SEED = 64, 4, 0


@dataclass
class HeadScores:
    """Per full-attention layer (model order) and KV head: echo and induction scores, and chance."""

    layers: list[int]
    echo: list[list[float]]
    induction: list[list[float]]
    chance_echo: float
    chance_induction: float


FINGERPRINT_SAMPLES = 64  # entries read from each fingerprinted weight (a fault maps up to 64 KiB around each)


def _fingerprint(model: "PreTrainedModel") -> str:
    """A digest of a few of the model's weights (a changed checkpoint makes the map stale).

    It reads :data:`FINGERPRINT_SAMPLES` evenly spaced entries of each of six weights, not a stride
    through all of them: a converted model's weights are memory-mapped, and a stride shorter than a
    page would fault a whole embedding matrix into the process (Qwen2.5-0.5B's is 519 MiB in float32)."""
    h = hashlib.sha256()
    params = list(model.parameters())
    for p in params[:3] + params[-3:]:
        flat = p.detach().reshape(-1)
        k = min(flat.numel(), FINGERPRINT_SAMPLES)
        idx = torch.arange(k, dtype=torch.int64) * (flat.numel() - 1) // max(k - 1, 1)  # integers: exact for any size
        sample = flat[idx].to(torch.bfloat16).double()  # one map for a checkpoint loaded in fp32 or bf16
        h.update(f"{tuple(p.shape)}:{float(sample.sum()):.8e}:{float(sample.abs().sum()):.8e}".encode())
    return h.hexdigest()[:32]


def map_path(model: "PreTrainedModel") -> Path:
    cfg = text_config(model).to_json_string(use_diff=False)
    return home() / "razor" / f"heads-{hashlib.sha256(cfg.encode()).hexdigest()[:16]}.json"


def measure(model: "PreTrainedModel") -> HeadScores:
    """Run the calibration pass (eager attention, restored afterwards) and score every head."""
    cfg = text_config(model)
    vocab = cfg.vocab_size
    gen = torch.Generator().manual_seed(SEED)
    block = torch.randint(min(3, vocab - 1), vocab, (BLOCK,), generator=gen)
    ids = block.repeat(REPEATS).unsqueeze(0).to(next(model.parameters()).device)
    before = model.config._attn_implementation
    try:
        model.set_attn_implementation("eager")
        with torch.no_grad():
            out = model(ids, use_cache=False, output_attentions=True)
    finally:
        model.set_attn_implementation(before)
    t = ids.shape[-1]
    q = torch.arange(BLOCK, t)  # queries of the later copies
    echo_t = torch.zeros(len(q), t, dtype=torch.bool)
    ind_t = torch.zeros(len(q), t, dtype=torch.bool)
    for r, i in enumerate(q.tolist()):
        for k in range(1, i // BLOCK + 1):
            echo_t[r, i - k * BLOCK] = True
            ind_t[r, i - k * BLOCK + 1] = True
    visible = (torch.arange(t)[None, :] <= q[:, None]).sum(-1).float()
    chance_echo = float((echo_t.sum(-1) / visible).mean())
    chance_ind = float((ind_t.sum(-1) / visible).mean())
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    layers = [i for i, w in enumerate(layer_windows(model)) if w is None]
    echo, induction = [], []
    for i in layers:
        a = out.attentions[i][0, :, q].float().cpu()  # [heads, len(q), t]
        e = (a * echo_t).sum(-1).mean(-1)  # [heads]
        s = (a * ind_t).sum(-1).mean(-1)
        groups = a.shape[0] // kv_heads
        echo.append(e.view(kv_heads, groups).amax(-1).tolist())
        induction.append(s.view(kv_heads, groups).amax(-1).tolist())
    return HeadScores(layers, echo, induction, chance_echo, chance_ind)


def _read_cached(model: "PreTrainedModel", path: Path, fingerprint: str) -> tuple[HeadScores | None, str | None]:
    """The scores cached at ``path`` if the file is there and valid for ``model`` (whose weights'
    digest is ``fingerprint``), else ``None`` and why not (``None`` when there is no file)."""
    if not path.exists():
        return None, None
    try:
        data = json.loads(path.read_text())
        if data.get("version") != VERSION or data.get("fingerprint") != fingerprint:
            return None, "stale (another calibration version or other weights)"
        scores = HeadScores(**data["scores"])
        expect = [i for i, w in enumerate(layer_windows(model)) if w is None]
        if scores.layers != expect or len(scores.echo) != len(expect) or len(scores.induction) != len(expect):
            raise ValueError("layers do not match the model")
        if not all(math.isfinite(x) for row in scores.echo + scores.induction for x in row):
            raise ValueError("scores are not finite")
        return scores, None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return None, f"corrupt ({type(exc).__name__}: {exc})"


def is_cached(model: "PreTrainedModel") -> bool:
    """Whether :func:`load_scores` will read ``model``'s map from disk (no calibration pass)."""
    return _read_cached(model, map_path(model), _fingerprint(model))[0] is not None


def ensure_scores(model: "PreTrainedModel") -> tuple[HeadScores, bool]:
    """:func:`load_scores`, and whether it measured them (a calibration pass) rather than read them."""
    path, fingerprint = map_path(model), _fingerprint(model)
    scores, problem = _read_cached(model, path, fingerprint)
    if scores is not None:
        return scores, False
    scores = measure(model)
    if problem:
        warnings.warn(f"kvbound razor: the cached head map {path} was {problem}; rebuilt it", stacklevel=4)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": VERSION, "fingerprint": fingerprint, "scores": scores.__dict__}))
    tmp.replace(path)
    return scores, True


def load_scores(model: "PreTrainedModel") -> HeadScores:
    """The cached scores of ``model``, measured (and cached) if missing; a corrupt or stale file is
    rebuilt with a warning."""
    return ensure_scores(model)[0]


def pick(scores: HeadScores, count: int, threshold: float) -> tuple[list[tuple[int, int]], int]:
    """The ``count`` retrieval heads ``(layer, kv_head)``: the top echo heads (1/15 of them, as the
    paper's 1% of 15%) then the top induction heads, among heads above ``threshold x chance``.
    Returns them and how many heads qualify."""
    heads = [(l, h) for li, l in enumerate(scores.layers) for h in range(len(scores.echo[li]))]
    idx = {(l, h): (li, h) for li, l in enumerate(scores.layers) for h in range(len(scores.echo[li]))}

    def echo(k):
        li, h = idx[k]
        return scores.echo[li][h]

    def ind(k):
        li, h = idx[k]
        return scores.induction[li][h]

    ok_e = [k for k in heads if echo(k) > threshold * scores.chance_echo]
    ok_i = [k for k in heads if ind(k) > threshold * scores.chance_induction]
    qualified = len(set(ok_e) | set(ok_i))
    chosen: list[tuple[int, int]] = sorted(ok_e, key=echo, reverse=True)[:round(count / 15)]
    for k in sorted(ok_i, key=ind, reverse=True):
        if len(chosen) >= count:
            break
        if k not in chosen:
            chosen.append(k)
    for k in sorted(ok_e, key=echo, reverse=True):
        if len(chosen) >= count:
            break
        if k not in chosen:
            chosen.append(k)
    return chosen, qualified
