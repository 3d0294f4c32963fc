#!/usr/bin/env bash
# On a machine with a GPU: the cases that tests/test_cuda_emulated.py runs on the emulated CUDA
# kernels (tools/cuda_emu/cases.py: every kernel and path of csrc/cuda/), now on the real kernels
# under compute-sanitizer — memcheck (out-of-bounds and misaligned accesses), racecheck (shared
# memory hazards), synccheck (divergent or invalid barriers, __syncwarp/__shfl*_sync masks) —
# each case's outputs judged against the CPU ops as in the emulated suite. What the emulation
# cannot show (memory ordering between blocks, the device's own instructions and timing) is
# exercised here. Extra args go to run_cases.py (e.g. --only 'passes/gate').
#
#   scripts/gpu_sanitize.sh                 # all three tools
#   TOOLS="memcheck" scripts/gpu_sanitize.sh
source "$(dirname "$0")/env.sh"
"$VPY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else \
'scripts/gpu_sanitize.sh needs a CUDA device; torch sees none')"

CS="${COMPUTE_SANITIZER:-}"
if [ -z "$CS" ]; then
  for c in "$(command -v compute-sanitizer || true)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
           "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer"; do
    if [ -n "$c" ] && [ -x "$c" ]; then CS="$c"; break; fi
  done
fi
if [ -z "$CS" ]; then
  echo "scripts/gpu_sanitize.sh: compute-sanitizer not found (set COMPUTE_SANITIZER)" >&2
  exit 2
fi

# One cudaMalloc per tensor, so that memcheck sees each tensor's own bounds (the caching
# allocator would hand out pieces of larger blocks).
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
status=0
for tool in ${TOOLS:-memcheck racecheck synccheck}; do
  echo "== compute-sanitizer --tool $tool" >&2
  extra=()
  [ "$tool" = racecheck ] && extra=(--racecheck-report all)
  if ! "$CS" --tool "$tool" "${extra[@]}" --error-exitcode 1 --print-limit 50 \
      "$VPY" tools/cuda_emu/run_cases.py --device cuda "$@"; then
    echo "== $tool: FAILED" >&2
    status=1
  fi
done
exit $status
