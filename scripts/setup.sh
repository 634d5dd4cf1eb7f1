#!/usr/bin/env bash
# Create .venv and install the project. torch is pinned first: the CPU build of
# torch==2.13.0 is served locally; an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | { grep -v "^WARNING: Location" || true; }
python -m pip install -q "torch==2.13.0" 2>&1 | { grep -v "^WARNING: Location" || true; }
python -m pip install -q -e ".[test]" 2>&1 | { grep -v "^WARNING: Location" || true; }
python -c "import torch, surgery, registry; print('torch', torch.__version__, '| model-surgery', surgery.__version__)"
