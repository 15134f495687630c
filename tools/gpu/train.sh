#!/usr/bin/env bash
# Training speed and the fused path's loss curve on one GPU, both stacks in one device call. Build
# and pack here first (README "GPU build"), then with the device tool, carry [".gpu"]:
#   bash tools/gpu/train.sh
# Prints a summary; logs land in $OUT. HF=0 skips the Python stack, CURVE=0 the 20-step runs.
set -uo pipefail
source .gpu/env.sh
OUT="${OUT:-/tmp/gemmaclip-out}"
mkdir -p "$OUT"
STEPS="${STEPS:-5}"
WARMUP="${WARMUP:-2}"
gemmaclip init --preset gemma-3-4b-it --out /tmp/m > "$OUT/init.log" 2>&1 || { tail -5 "$OUT/init.log"; exit 1; }
M="--model /tmp/m/llm --vision-model /tmp/m/vision"
show() { python3 -c "
import json,sys
keep=('what','batch_size','grad_ckpt','step_ms_median','tokens_per_s','peak_alloc_gib','step1_loss','step1_grad_norm')
for l in sys.stdin:
    if not l.startswith('{'): continue
    d=json.loads(l); print(' '.join(f'{k}={d[k]}' for k in keep if k in d), d.get('gpu',''))
"; }
echo "== gemmaclip bench train-step (1024-token rows, LoRA r=64 on 7 projections, 256 supervised)"
gemmaclip bench train-step $M --checkpointing both --steps "$STEPS" --warmup "$WARMUP" 2>>"$OUT/train.err" | tee -a "$OUT/train.jsonl" | show
gemmaclip bench train-step $M --checkpointing both --batch-size 4 --steps "$STEPS" --warmup "$WARMUP" 2>>"$OUT/train.err" | tee -a "$OUT/train.jsonl" | show
echo "== the same with candle's autograd for each layer's backward (GEMMACLIP_COMPOSED=backward)"
for b in 1 4; do
  GEMMACLIP_COMPOSED=backward gemmaclip bench train-step $M --checkpointing both --batch-size $b --steps "$STEPS" --warmup "$WARMUP" \
    2>>"$OUT/train.err" | sed 's/gemmaclip_train_step/gemmaclip_train_step_autograd/' | tee -a "$OUT/train.jsonl" | show
done
tail -2 "$OUT/train.err"
if [ "${CURVE:-1}" = 1 ]; then
  echo "== gemmaclip train, 20 steps x 8 micro-batches on the bundled sample: fused (default; also without checkpointing) vs composed (GEMMACLIP_COMPOSED=all)"
  for mode in fused fused-nockpt composed; do
    env $([ $mode = composed ] && echo GEMMACLIP_COMPOSED=all) gemmaclip train $M --data assets/scienceqa-sample \
      --output-dir "/tmp/run-$mode" --max-steps 20 --per-device-train-batch-size 1 --gradient-accumulation-steps 8 \
      $([ $mode = fused-nockpt ] && echo --gradient-checkpointing false) \
      --logging-steps 1 --save-steps 0 > "$OUT/train-$mode.log" 2>&1 || tail -3 "$OUT/train-$mode.log"
    cp "/tmp/run-$mode/metrics.jsonl" "$OUT/metrics-$mode.jsonl" 2>/dev/null
  done
  python3 - "$OUT/metrics-composed.jsonl" "$OUT/metrics-fused.jsonl" "$OUT/metrics-fused-nockpt.jsonl" <<'PY'
import json, sys
def losses(p):
    return [json.loads(l)["loss"] for l in open(p) if '"loss"' in l]
c = losses(sys.argv[1])
print("composed           ", " ".join(f"{x:.4f}" for x in c))
for name, p in [("fused", sys.argv[2]), ("fused, no ckpting", sys.argv[3])]:
    f = losses(p)
    if not f or not c:
        print(f"{name}: no logged losses to compare (see {p} and the train-*.log beside it)")
        continue
    worst = max(abs(a - b) / abs(b) for a, b in zip(f, c))
    print(f"{name:19}", " ".join(f"{x:.4f}" for x in f))
    print(f"  {len(f)} logged losses vs {len(c)} composed; worst relative difference per step {worst:.2e}")
PY
fi
[ "${HF:-1}" = 1 ] || exit 0
echo "== transformers + PEFT + bitsandbytes, same shapes, same GPU"
python3 tools/bench/hf_stack.py train-step --checkpointing both --attn sdpa --steps "$STEPS" --warmup "$WARMUP" 2>>"$OUT/hf.err" | grep '^{' | tee -a "$OUT/hf.jsonl" | show
python3 tools/bench/hf_stack.py train-step --checkpointing both --batch-size 4 --attn sdpa --steps "$STEPS" --warmup "$WARMUP" 2>>"$OUT/hf.err" | grep '^{' | tee -a "$OUT/hf.jsonl" | show
tail -2 "$OUT/hf.err"
