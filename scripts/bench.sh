#!/usr/bin/env bash
# The main job: fused vs eager vs torch.compile on this machine's device (sets up .venv first).
# Extra args go to `python -m fusedattn.bench`.
source "$(dirname "$0")/env.sh"
exec "$VPY" -m fusedattn.bench "$@"
