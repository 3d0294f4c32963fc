#!/usr/bin/env bash
# The whole test suite (sets up .venv and the build first). Extra args go to pytest.
source "$(dirname "$0")/env.sh"
exec "$VPY" -m pytest -q "$@"
