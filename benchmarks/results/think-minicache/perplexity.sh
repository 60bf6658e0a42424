#!/bin/bash
# perplexity of think / minicache beside snapkv at the same bytes (SmolLM2, KJV Acts, first 2048 tokens, chunk 16)
cd /work/wt/think-minicache
export PYTHONPATH=src OMP_NUM_THREADS=1
out=/tmp/tm/ppl.jsonl
: > $out
ppl() {  # args: policy, budget (or -), options...
  local pol=$1 budget=$2; shift 2
  local b=""; [ "$budget" != "-" ] && b="--budget $budget"
  local load=$(cat /proc/loadavg)
  nice python3 -m kvbound.cli perplexity --text-file /tmp/tm/acts.txt --max-tokens 2048 --chunk 16 --policy $pol $b "$@" --json 2>/dev/null \
    | tail -1 | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); r['load_before']='$load'; r['load_after']=open('/proc/loadavg').read().strip(); print(json.dumps(r))" >> $out
}
same_bytes() {  # budget holding the hot K/V bytes of the last run: hot_kv_bytes / kv_bytes_per_token
  tail -1 $out | python3 -c "import json,sys; c=json.loads(sys.stdin.read())['cache']; print(round(c['hot_kv_bytes']/c['kv_bytes_per_token']))"
}
ppl full -
ppl think - --option ratio=0.5
ppl snapkv $(same_bytes)
ppl minicache -
ppl snapkv $(same_bytes)
ppl snapkv 256 --option think=0.5
ppl snapkv $(same_bytes)
ppl snapkv 256
