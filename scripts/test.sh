#!/usr/bin/env bash
# Set up from scratch and run the whole test suite (the README's test command; CI runs it too).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh "dev"
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pytest -q "$@"
