#!/usr/bin/env bash
# Generation speed and exactness on one GPU, both stacks in one device call. Build and pack here
# first (README "GPU build"; .gpu/bin holds gemmaclip and test-gpu, .gpu/py bitsandbytes), then
# with the device tool, carry [".gpu"]:  bash tools/gpu/generate.sh
# Prints a summary; logs land in $OUT. BATCHES and NEW override the batch sizes and new tokens;
# TESTS=0 skips test-gpu, HF=0 the Python stack.
set -uo pipefail
source .gpu/env.sh
OUT="${OUT:-/tmp/gemmaclip-out}"
mkdir -p "$OUT"
export GEMMACLIP_CACHE=/tmp/gc
BATCHES="${BATCHES:-1,8,32,64}"
NEW="${NEW:-128}"
if [ "${TESTS:-1}" = 1 ]; then
  echo "== test-gpu"
  test-gpu --nocapture --test-threads 1 > "$OUT/test-gpu.log" 2>&1
  grep -E "^test |test result|tokens x|panicked" "$OUT/test-gpu.log" | grep -v " ok$" | tail -12
fi
gemmaclip init --preset gemma-3-4b-it --out /tmp/m > "$OUT/init.log" 2>&1 || { tail -5 "$OUT/init.log"; exit 1; }
M="--model /tmp/m/llm --vision-model /tmp/m/vision"
show() { python3 -c "
import json,sys
for l in sys.stdin:
    if not l.startswith('{'): continue
    d=json.loads(l); print(' '.join(f'{k}={d[k]}' for k in d if k not in ('gpu','four_bit','prompt_tokens')), d.get('gpu',''))
"; }
echo "== gemmaclip bench generate (800-token prompt with the image block, $NEW new tokens)"
for r in 0 64; do
  gemmaclip bench generate $M --lora-r $r --new "$NEW" --batch-size "$BATCHES" 2>>"$OUT/gen.err" | tee -a "$OUT/gen.jsonl" | show
done
echo "== the same with eager decode steps (GEMMACLIP_COMPOSED=graph), batch 1 and 32"
for r in 0 64; do
  GEMMACLIP_COMPOSED=graph gemmaclip bench generate $M --lora-r $r --new "$NEW" --batch-size 1,32 2>>"$OUT/gen.err" \
    | sed 's/gemmaclip_generate/gemmaclip_generate_eager/' | tee -a "$OUT/gen.jsonl" | show
done
echo "== exactness: 64 greedy tokens, graph vs eager vs recomputation (base, then r=64 adapter)"
for r in 0 64; do
  gemmaclip bench generate $M --lora-r $r --new 2 --compare 64 2>>"$OUT/gen.err" | grep exactness | show
done
tail -3 "$OUT/gen.err"
[ "${HF:-1}" = 1 ] || exit 0
echo "== transformers + PEFT + bitsandbytes, same GPU"
for r in 0 64; do
  python3 tools/bench/hf_stack.py generate --attn sdpa --lora-r $r --new "$NEW" --batch-size "${HF_BATCHES:-1,8,32}" 2>>"$OUT/hf.err" | grep '^{' | tee -a "$OUT/hf.jsonl" | show
done
tail -3 "$OUT/hf.err"
