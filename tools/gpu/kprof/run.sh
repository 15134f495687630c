#!/usr/bin/env bash
# On the GPU machine: runs a command under the kernel-time profiler (kprof.c), its table into
# $KPROF_OUT (default $OUT/kprof.tsv). Example, after source .gpu/env.sh:
#   KPROF_OUT=$OUT/step.tsv tools/gpu/kprof/run.sh gemmaclip bench train-step ...
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../../.." && pwd)"
K="$ROOT/.gpu/kprof"
[ -f "$K/libcupti.so.13" ] || gunzip -k "$K/libcupti.so.13.gz"
export KPROF_OUT="${KPROF_OUT:-${OUT:-/tmp}/kprof.tsv}"
LD_LIBRARY_PATH="$K${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" CUDA_INJECTION64_PATH="$K/libkprof.so" "$@"
