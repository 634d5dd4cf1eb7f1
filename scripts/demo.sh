#!/usr/bin/env bash
# Set everything up, then run the demo (inject, train, merge, move the delta, remove).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
surgery demo "$@"
