#!/usr/bin/env bash
# The GPU checks of the QLoRA core, in one device call (the GPU machine has no Rust: build and pack
# here first). From the repository root, on this machine:
#   GPU_TESTS=gpu <build script for the GPU machines> && pack bitsandbytes into .gpu/py && cp tools/bench/hf_stack.py .gpu/
# then run with the device tool, carry [".gpu"]:
#   source .gpu/env.sh && bash tools/gpu/check.sh
# Logs land in $OUT (test-gpu.log, bench.jsonl).
set -uo pipefail
OUT="${OUT:-/tmp/gemmaclip-out}"
mkdir -p "$OUT"
STEPS="${STEPS:-5}"
WARMUP="${WARMUP:-2}"

echo "== GPU tests (tiny model: CUDA vs CPU vs transformers/PEFT/bitsandbytes fixtures)"
test-gpu --nocapture --test-threads 1 2>&1 | tee "$OUT/test-gpu.log" | grep -vE '^\s*$' | tail -30

echo "== gemmaclip init --preset gemma-3-4b-it"
/usr/bin/time -f "init: %e s, max RSS %M KiB" gemmaclip init --preset gemma-3-4b-it --out /tmp/g4b 2>&1 | tail -2

echo "== gemmaclip bench train-step (NF4 base, LoRA r=64 on 7 projections, 1024 tokens, 256 supervised)"
gemmaclip bench train-step --model /tmp/g4b/llm --vision-model /tmp/g4b/vision \
  --checkpointing both --steps "$STEPS" --warmup "$WARMUP" 2>&1 | tee "$OUT/bench.jsonl"

echo "== where a step's time goes (device synchronized between phases)"
for c in on off; do
  GEMMACLIP_PHASES=1 gemmaclip bench train-step --model /tmp/g4b/llm --vision-model /tmp/g4b/vision \
    --checkpointing $c --steps 2 --warmup 1 2>&1 | grep phases | tail -1
done

echo "== gemmaclip train, 20 steps, batch 1, grad-accum 1, on init's gemma-3-4b-it + the bundled ScienceQA sample"
for ckpt in "--gradient-checkpointing=true" "--gradient-checkpointing=false"; do
  gemmaclip train --model /tmp/g4b/llm --vision-model /tmp/g4b/vision --data assets/scienceqa-sample \
    --output-dir "/tmp/run4b${ckpt#*=}" --max-steps 20 --per-device-train-batch-size 1 --gradient-accumulation-steps 1 \
    --logging-steps 5 --save-steps 0 $ckpt 2>&1 | tail -6 | tee -a "$OUT/train.log"
  cp "/tmp/run4b${ckpt#*=}/metrics.jsonl" "$OUT/train-metrics-ckpt-${ckpt#*=}.jsonl" 2>/dev/null
done

echo "== gemmaclip bench generate (800-token prompt with the image block, 256 new tokens, batch 1)"
gemmaclip bench generate --model /tmp/g4b/llm --vision-model /tmp/g4b/vision 2>&1 | tee -a "$OUT/bench.jsonl"
GEMMACLIP_NO_NF4_GEMV=1 gemmaclip bench generate --model /tmp/g4b/llm --vision-model /tmp/g4b/vision 2>&1 | sed 's/gemmaclip_generate/gemmaclip_generate_without_nf4_gemv/' | tee -a "$OUT/bench.jsonl"
gemmaclip bench generate --model /tmp/g4b/llm --vision-model /tmp/g4b/vision --lora-r 64 2>&1 | tee -a "$OUT/bench.jsonl"

if [ -f .gpu/hf_stack.py ]; then
  echo "== transformers + PEFT + bitsandbytes, same shapes, same GPU"
  python3 .gpu/hf_stack.py train-step --checkpointing both --steps "$STEPS" --warmup "$WARMUP" --attn sdpa 2>&1 | grep '^{' | tee -a "$OUT/bench.jsonl"
  python3 .gpu/hf_stack.py generate --attn sdpa 2>&1 | grep '^{' | tee -a "$OUT/bench.jsonl"
  python3 .gpu/hf_stack.py generate --attn sdpa --lora-r 64 2>&1 | grep '^{' | tee -a "$OUT/bench.jsonl"
fi
