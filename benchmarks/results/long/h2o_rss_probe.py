# Diagnostic used for h2o-prefill-rss.md: RSS / high-water mark per prefill chunk (-v: around each scoring call).
# PYTHONPATH=src python3 benchmarks/results/long/h2o_rss_probe.py h2o 8 [-v]
import gc, sys

import torch
torch.set_num_threads(1)
from kvbound import attention, models, rss
from kvbound.cache import make_cache
from kvbound.bench.inputs import haystack_ids
policy = sys.argv[1]; nchunks = int(sys.argv[2]); chunk = 1024
MB = 2**20
model, tok = models.load("smollm2-135m")
ids, _ = haystack_ids(tok, 7500)
with torch.no_grad():
    model(ids[:, :8], use_cache=False, logits_to_keep=1)
gc.collect()
loaded = rss.current_rss_bytes(); rss.reset_peak_rss()
def rep(tag):
    print(f"{tag:40s} rss+{(rss.current_rss_bytes()-loaded)/MB:7.1f} peak+{(rss.peak_rss_bytes()-loaded)/MB:7.1f}", flush=True)
log = "-v" in sys.argv
def wrap(mod, name):
    real = getattr(mod, name)
    def f(*a, **k):
        if log: rep("before " + name)
        out = real(*a, **k)
        if log: rep("after " + name)
        return out
    setattr(mod, name, f)
wrap(attention, "mass_from_lse"); wrap(attention, "block_attention")
cache = make_cache(model, policy, 512)
rep("cache made")
with torch.no_grad():
    for c in range(nchunks):
        pos = c * chunk
        model(input_ids=ids[:, pos:pos+chunk], attention_mask=torch.ones_like(ids[:, :pos+chunk]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        rep(f"chunk {c}")
