#!/usr/bin/env bash
# The data-parallel checks (issue: training on several GPUs), in one device call on a machine with
# 2 or 4 GPUs. Build the `nccl` binary here and pack it into .gpu/bin as for check.sh, then with
# the device tool (carry [".gpu"]):
#   source .gpu/env.sh && bash tools/gpu/data_parallel.sh
# .gpu/env.sh must put the machine's libnccl.so.2 on LD_LIBRARY_PATH (PyTorch's nvidia/nccl/lib).
# Prints: tokens/s at per-device batch 4 (and 1) on 1, 2 and (where present) 4 GPUs from this one
# call; the first 20 losses of 2 GPUs against 1 GPU with the same global batch; a worker killed
# mid-run and the resume; eval over 2 workers against 1. Logs land in $OUT. DP_BATCHES="4" limits
# the scaling rows to per-device batch 4.
set -uo pipefail
OUT="${OUT:-/tmp/gemmaclip-out}"
mkdir -p "$OUT"
t() { echo "[$(date +%T)] $*"; }
export GEMMACLIP_CACHE=/tmp/gc
GPUS=$(nvidia-smi -L | wc -l)
gemmaclip init --preset gemma-3-4b-it --out /tmp/m > "$OUT/init.log" 2>&1 || { tail -5 "$OUT/init.log"; exit 1; }
M="--model /tmp/m/llm --vision-model /tmp/m/vision"
S="--data assets/scienceqa-sample"

t "scaling (bench train-step, checkpointing, 1024-token rows)"
for b in ${DP_BATCHES:-4 1}; do
  for n in 1 2 4; do
    [ "$n" -gt "$GPUS" ] && continue
    L=""; [ "$n" -gt 1 ] && L="--nproc-per-node $n"
    timeout 120 gemmaclip bench train-step $M --checkpointing on --steps 6 --warmup 2 --batch-size $b $L \
      2>>"$OUT/bench.err" | grep '^{' >> "$OUT/bench.jsonl"
    # the gradients summed in 25 MB buckets while the backward goes on (rows marked "buckets")
    [ "$n" -gt 1 ] && timeout 120 gemmaclip bench train-step $M --checkpointing on --steps 6 --warmup 2 \
      --batch-size $b $L --ddp-bucket-cap-mb 25 2>>"$OUT/bench.err" | grep '^{' >> "$OUT/bench.jsonl"
  done
done
python3 - "$OUT/bench.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
one = {r["batch_size"]: r["tokens_per_s"] for r in rows if r["world"] == 1}
for r in rows:
    print(f'{r["gpu"]} x{r["world"]}{" buckets" if r.get("ddp_bucket_cap_mb") else ""} batch {r["batch_size"]}: {r["step_ms_median"]} ms, {r["tokens_per_s"]} tokens/s '
          f'({r["tokens_per_s"] / one[r["batch_size"]]:.2f}x), peak {r["peak_alloc_gib"]} GiB')
PY

t "loss curves: 2 GPUs x 1 row vs 1 GPU x 2 rows, global batch 8, 20 steps, no dropout"
D="$M $S --max-steps 20 --lora-dropout 0 --gradient-accumulation-steps 4 --logging-steps 5 --save-steps 0"
timeout 200 gemmaclip train $D --output-dir /tmp/g1 --per-device-train-batch-size 2 > "$OUT/g1.log" 2>&1
timeout 200 gemmaclip train $D --output-dir /tmp/g2 --per-device-train-batch-size 1 --nproc-per-node 2 > "$OUT/g2.log" 2>&1
timeout 200 gemmaclip train $D --output-dir /tmp/g2b --per-device-train-batch-size 1 --nproc-per-node 2 \
  --ddp-bucket-cap-mb 25 > "$OUT/g2b.log" 2>&1
python3 - <<'PY'
import json
a = [json.loads(l)["loss"] for l in open("/tmp/g1/steps.jsonl")]
b = [json.loads(l)["loss"] for l in open("/tmp/g2/steps.jsonl")]
c = [json.loads(l)["loss"] for l in open("/tmp/g2b/steps.jsonl")]
print(f"steps {len(a)} / {len(b)}, max relative difference {max(abs(x - y) / abs(x) for x, y in zip(a, b)):.2e}")
# two ranks add a + b in either order alike: buckets must give the same bits
print(f"2 GPUs with 25 MB buckets: {len(c)} steps, {'identical' if b == c else 'DIFFERENT'} losses")
PY
cmp /tmp/g2/lora_adapter/adapter_model.safetensors /tmp/g2b/lora_adapter/adapter_model.safetensors \
  && echo "identical adapters with and without buckets"

t "a worker killed mid-run, then --resume"
K="$M $S --max-steps 1000 --save-steps 2 --gradient-accumulation-steps 1 --max-train-samples 4 --output-dir /tmp/k --nproc-per-node 2"
gemmaclip train $K > "$OUT/kill.log" 2>&1 &
L=$!
for _ in $(seq 1 400); do [ -f /tmp/k/steps.jsonl ] && [ "$(wc -l < /tmp/k/steps.jsonl)" -ge 5 ] && break; sleep 0.2; done
R1=$(for c in $(cat /proc/$L/task/$L/children); do tr '\0' '\n' < /proc/$c/environ | grep -q '^RANK=1$' && echo $c; done)
T0=$(date +%s%N); kill -9 $R1; timeout 90 tail --pid=$L -f /dev/null; wait $L
echo "launcher exit $? after $(( ($(date +%s%N) - T0) / 1000000 )) ms"; grep -E "error" "$OUT/kill.log" | head -3
timeout 120 gemmaclip train $K --resume --stop-after 2 > "$OUT/resume.log" 2>&1; echo "resume exit $?"
grep -E "resumed|stopped|error" "$OUT/resume.log" | head -3

t "eval over 2 workers against 1 (greedy, batch 1)"
E="$M $S --split test --limit 16 --max-new-tokens 16 --batch-size 1 --projector-path /tmp/g1/projector.safetensors"
timeout 100 gemmaclip eval $E --output-dir /tmp/e1 > "$OUT/e1.log" 2>&1
timeout 100 gemmaclip eval $E --output-dir /tmp/e2 --nproc-per-node 2 > "$OUT/e2.log" 2>&1
cmp /tmp/e1/predictions.jsonl /tmp/e2/predictions.jsonl && echo "identical predictions.jsonl ($(wc -l < /tmp/e2/predictions.jsonl) lines)"
t end
