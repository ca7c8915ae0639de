#!/usr/bin/env bash
# One prepared check for a machine with an NVIDIA GPU and the CUDA toolkit
# (nothing here can run one; see README, Platforms). Under 10 minutes on one GPU:
#   1. builds the CUDA library and llama-server from the pinned source for this
#      GPU's architecture only, and dist/mesh-linux-x64-cuda from them;
#   2. smoke-tests the file (serve on the demo model, every layer on CUDA0);
#   3. runs the engine tests with every layer on the GPU (the guard test fails
#      if the engine did not offload them all to CUDA0);
#   4. runs the engine benchmark against llama-server built with CUDA from the
#      same source (same GGUF, threads, slots, batch; every layer on the GPU);
# and prints a short table. Output also goes to ${GPU_CHECK_OUT:-gpu-check-out}/.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${GPU_CHECK_OUT:-gpu-check-out}
mkdir -p "$out"
command -v nvidia-smi >/dev/null || { echo "gpu-check: nvidia-smi not found: this needs an NVIDIA GPU and its driver" >&2; exit 2; }
command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || { echo "gpu-check: nvcc not found: install the CUDA toolkit (or add /usr/local/cuda/bin to PATH)" >&2; exit 2; }
export PATH="$PATH:/usr/local/cuda/bin"
[ -x node_modules/.bin/bun ] || npm ci --no-audit --no-fund >"$out/npm.log" 2>&1 || { echo "gpu-check: npm ci failed (see $out/npm.log)" >&2; exit 1; }
bun=./node_modules/.bin/bun
gpu=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.[:space:]')
jobs=$(nproc)
declare -A result
t0=$(date +%s)
stage() { printf '\n=== %s (%ss)\n' "$1" "$(( $(date +%s) - t0 ))"; }

stage "build: CUDA library + llama-server for sm_$arch, then dist/mesh-linux-x64-cuda"
if $bun run build.ts native --cuda --cuda-arch "${arch}-real" --with-llama-server --jobs "$jobs" >"$out/build.log" 2>&1 &&
  $bun run build.ts compile --cuda --cuda-arch "${arch}-real" --jobs "$jobs" >>"$out/build.log" 2>&1; then
  result[build]="ok ($(( $(date +%s) - t0 ))s)"
else
  result[build]="FAILED (see $out/build.log)"
  tail -20 "$out/build.log"
fi

stage "smoke test of the file on the GPU"
if [ -x dist/mesh-linux-x64-cuda ] && scripts/smoke.sh dist/mesh-linux-x64-cuda --expect-log "device name=CUDA0" --expect-log "layers on CUDA0" >"$out/smoke.log" 2>&1; then
  result[smoke]="ok: $(grep -o 'layers placed.*' "$out/smoke.log" | head -1)"
else
  result[smoke]="FAILED (see $out/smoke.log)"
fi

stage "engine tests, every layer on CUDA0"
MESH_NATIVE_LIB=vendor/llama.cpp/build/cuda/libmeshllama.so MESH_EXPECT_GPU=CUDA \
  timeout 300 $bun test --timeout 120000 ./tests/platforms/offload.platform.ts tests/engine/engine.test.ts >"$out/tests.log" 2>&1
rc=$?
pass=$(grep -Eo '^ *[0-9]+ pass' "$out/tests.log" | tail -1 | tr -dc 0-9)
fail=$(grep -Eo '^ *[0-9]+ fail' "$out/tests.log" | tail -1 | tr -dc 0-9)
result[tests]="$([ $rc -eq 0 ] && echo ok || echo FAILED): ${pass:-0} pass, ${fail:-?} fail (see $out/tests.log)"

stage "engine benchmark: mesh vs llama-server (CUDA, same source), every layer on the GPU"
MESH_NATIVE_LIB=vendor/llama.cpp/build/cuda/libmeshllama.so timeout 240 $bun run src/bench/engine.ts --model bench \
  --llama-server vendor/llama.cpp/build/cuda/bin/llama-server --n-gpu-layers 999 --threads 4 \
  --gen-tokens 64 --repeats 3 >"$out/bench.txt" 2>"$out/bench.log"
result[bench]="$([ $? -eq 0 ] && echo ok || echo "FAILED (see $out/bench.log)")"

printf '\n%s\n' "gpu-check on $gpu (sm_$arch), $(( $(date +%s) - t0 ))s"
printf '%-8s %s\n' "build" "${result[build]}" "smoke" "${result[smoke]}" "tests" "${result[tests]}" "bench" "${result[bench]}"
echo
cat "$out/bench.txt" 2>/dev/null
case "${result[build]} ${result[smoke]} ${result[tests]} ${result[bench]}" in *FAILED*) exit 1 ;; esac
