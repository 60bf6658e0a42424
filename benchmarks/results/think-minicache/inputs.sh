#!/bin/bash
# The two text files the runs read (run from the worktree root): KJV Acts, and its first 7,500 SmolLM2 tokens.
mkdir -p /tmp/tm
PYTHONPATH=src python3 -c "
from kvbound.quality.corpus import book_text
from kvbound.models import load
t = book_text('Acts'); open('/tmp/tm/acts.txt', 'w').write(t)
_, tok = load('smollm2-135m')
open('/tmp/tm/acts-7500.txt', 'w').write(tok.decode(tok(t)['input_ids'][:7500]))"
