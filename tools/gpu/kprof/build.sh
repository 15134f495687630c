#!/usr/bin/env bash
# Builds the kernel-time profiler (kprof.c) into .gpu/kprof with the CUPTI 13.0 library it loads
# (4 MB, from PyPI nvidia-cuda-cupti); run from the repository root after ../shared/gpu/build.sh
# (which starts .gpu afresh). The CUDA headers come from the build toolkit (cuda-toolkit.sh).
set -euo pipefail
ROOT="$(git rev-parse --show-toplevel)"; cd "$ROOT"
eval "$(../shared/gpu/cuda-toolkit.sh 2>/dev/null)" || true
CU="$(ls -d /opt/cuda-pip/venv/lib/python3*/site-packages/nvidia/cu13)"
tmp="$(mktemp -d)"
/opt/cuda-pip/venv/bin/pip download -q --no-deps -d "$tmp" "nvidia-cuda-cupti==13.0.85"
unzip -q -o "$tmp"/nvidia_cuda_cupti-*.whl -d "$tmp/x"
mkdir -p .gpu/kprof
cp "$tmp/x/nvidia/cu13/lib/libcupti.so.13" .gpu/kprof/
gcc -O2 -shared -fPIC -I "$tmp/x/nvidia/cu13/include" -I "$CU/include" tools/gpu/kprof/kprof.c \
  -o .gpu/kprof/libkprof.so -L .gpu/kprof -l:libcupti.so.13 -lstdc++
gzip -9 -f .gpu/kprof/libcupti.so.13
rm -rf "$tmp"
du -sh .gpu/kprof | sed 's/^/packed /'
