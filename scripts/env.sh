# Sourced by scripts/bench.sh and scripts/test.sh: makes .venv/ with the pinned dependencies and
# builds the extension; each step is skipped when nothing it depends on has changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

stamp() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }

REQ_STAMP="$(stamp requirements.txt)"
if [ "$(cat "$VENV/.req-stamp" 2>/dev/null)" != "$REQ_STAMP" ]; then
  echo "[env] installing pinned dependencies (requirements.txt)" >&2
  "$VPY" -m pip install --disable-pip-version-check -q -r requirements.txt
  echo "$REQ_STAMP" > "$VENV/.req-stamp"
fi

# Rebuild fusedattn._C when a source, the build script or the toolchain switches change.
BUILD_STAMP="$( (stamp setup.py pyproject.toml $(find csrc -type f | sort); \
                echo "${FUSEDATTN_CUDA:-}" "${TORCH_CUDA_ARCH_LIST:-}") | sha256sum | cut -c1-16)"
if [ "$(cat "$VENV/.build-stamp" 2>/dev/null)" != "$BUILD_STAMP" ] || \
   ! ls fusedattn/_C*.so >/dev/null 2>&1; then
  echo "[env] building fusedattn._C (pip install --no-build-isolation -e .)" >&2
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$VPY" -m pip install --disable-pip-version-check -q \
    --no-build-isolation --no-deps -e .
  echo "$BUILD_STAMP" > "$VENV/.build-stamp"
fi
export PATH="$VENV/bin:$PATH"
