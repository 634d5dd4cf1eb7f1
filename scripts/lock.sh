#!/usr/bin/env bash
# Rewrite requirements/test.lock from the newest releases, once `scripts/test.sh --newest` passes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --newest
. .venv-newest/bin/activate
{
  echo "# The test environment, pinned: scripts/setup.sh installs with -c this file."
  echo "# Made by scripts/lock.sh from the newest releases that passed scripts/test.sh --newest."
  python -m pip freeze --exclude-editable 2>/dev/null | grep -v "^#" | sed 's/^torch==2.13.0+cpu$/torch==2.13.0/' | sort -f
} > requirements/test.lock
echo "wrote requirements/test.lock ($(grep -vc '^#' requirements/test.lock) packages)"
