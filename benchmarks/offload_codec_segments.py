"""``offload`` decode at ~7.5k tokens on SmolLM2: fp32 records vs int8 records decoded in segments of
several sizes (``kvbound.cache.offload.DECODE_CHUNK``), stepped round-robin in one process (the store
files stay in the OS page cache). Prints the median step time of each and its ratio to fp32.

    python3 benchmarks/offload_codec_segments.py [threads] [steps]
"""

import statistics
import sys
import time

import torch

import kvbound
import kvbound.cache.offload as offload
from kvbound.bench.inputs import haystack_ids
from kvbound.generation import prefill
from kvbound.models import load


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    model, tok = load("smollm2-135m")
    ids, _ = haystack_ids(tok, 7500)
    caches = {"fp32": kvbound.make_cache(model, "offload", 1024),
              "int8": kvbound.make_cache(model, "offload", 1024, codec="int8")}
    nxt = {}
    for name, cache in caches.items():
        t = time.perf_counter()
        prefill(model, ids[:, :-1], cache, 1024)
        nxt[name] = ids[:, -1:]
        print(name, f"prefill {time.perf_counter() - t:.1f} s", flush=True)
    variants = [("fp32", None), ("int8", 4096), ("int8", 1024), ("int8", 512), ("int8", 256)]
    times: dict = {v: [] for v in variants}
    with torch.no_grad():
        for _ in range(steps):
            for name, segment in variants:
                if segment:
                    offload.DECODE_CHUNK = segment  # read when a step builds its lazy blocks
                t = time.perf_counter()
                logits = model(nxt[name], past_key_values=caches[name], use_cache=True).logits[:, -1]
                times[(name, segment)].append(time.perf_counter() - t)
                nxt[name] = logits.argmax(-1, keepdim=True)
    base = statistics.median(times[("fp32", None)])
    for (name, segment), ts in times.items():
        label = name if segment is None else f"{name} segments of {segment}"
        print(f"{label:26s} {statistics.median(ts) * 1000:7.1f} ms  {statistics.median(ts) / base:.2f}x fp32")
    for cache in caches.values():
        cache.close()


if __name__ == "__main__":
    main()
