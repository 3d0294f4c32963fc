#!/usr/bin/env bash
# On a machine with a GPU: the whole test suite (CUDA cases included), the emulated-CUDA cases
# under compute-sanitizer (scripts/gpu_sanitize.sh), then the benchmark for
# each GPU backend (fp16, bf16, fp32; GB/s and % of peak bandwidth) into benchmarks/results/.
source "$(dirname "$0")/env.sh"
"$VPY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else \
'scripts/gpu.sh needs a CUDA device; torch sees none')"
"$VPY" -m pytest -q "$@"
"$(dirname "$0")/gpu_sanitize.sh"
for backend in triton cuda; do
  "$VPY" -m fusedattn.bench --device cuda --backend "$backend" --ops simam,ham,se,eca,cbam,aaconv
done
