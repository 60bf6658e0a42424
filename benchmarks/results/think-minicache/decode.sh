#!/bin/bash
# decode time per token at 7.5k prompt tokens: snapkv@512 vs snapkv@512 + think=0.5 (alternated, 2 rounds)
cd /work/wt/think-minicache
export PYTHONPATH=src OMP_NUM_THREADS=1
out=/tmp/tm/decode.jsonl
: > $out
for round in 1 2; do
  for opt in "" "--option think=0.5"; do
    load=$(cat /proc/loadavg)
    line=$(nice python3 -m kvbound.cli generate --prompt-file /tmp/tm/acts-7500.txt --policy snapkv --budget 512 $opt \
      --max-new-tokens 64 --json 2>/dev/null | tail -1)
    python3 -c "
import json,sys
r=json.loads(sys.argv[1]); c=r['cache']
print(json.dumps({'round':$round,'options':'$opt','load_before':'$load','load_after':open('/proc/loadavg').read().strip(),
 'prompt_tokens':r['prompt_tokens'],'new_tokens':len(r['token_ids']),'prefill_seconds':r['prefill_seconds'],'decode_seconds':r['decode_seconds'],
 'decode_s_per_token':r['decode_seconds']/(len(r['token_ids'])-1),'hot_kv_bytes':c['hot_kv_bytes'],'key_bytes':c.get('key_bytes'),
 'bytes_by_tier':c['bytes_by_tier'],'text':r['text']}))" "$line" >> $out
  done
done
