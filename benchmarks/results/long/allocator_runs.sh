#!/bin/bash
cd /work/h-lead
for pol in offload full; do
for env in "KVBOUND_MMAP_THRESHOLD=1048576" "KVBOUND_MMAP_THRESHOLD=0"; do
  if [ "$pol" = full ]; then b=null; else b=512; fi
  out=$(env $env PYTHONPATH=src python3 -m kvbound.bench.long "{\"model\": \"smollm2-135m\", \"policy\": \"$pol\", \"tokens\": 7500, \"budget\": $b, \"new_tokens\": 8, \"chunk\": 1024, \"threads\": 1}" 2>/dev/null | tail -1)
  echo "$pol [$env] $(echo "$out" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print(r["rss_added_bytes"]/2**20, r["loaded_rss_bytes"]/2**20, r["prefill_seconds"], r["seconds_per_token"], r["cpu_seconds_per_token"])')"
done; done
