#!/usr/bin/env bash
# Create ./.venv with the CPU build of PyTorch and medcam3d (editable) plus the requested extras.
# Usage: bash scripts/setup_env.sh [EXTRAS]      e.g. EXTRAS="dev,napari,reports"
# Works on a fresh machine: installs the CPU torch wheel first so no multi-GB CUDA build is pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
if [ -n "$extras" ]; then
  python -m pip install -q -e ".[${extras}]"
  if [[ ",${extras}," == *",dev,"* ]]; then
    # test-only oracle; --no-deps: its torchvision requirement would replace the CPU torch (see pyproject, dev)
    python -m pip install -q --no-deps "grad-cam==1.5.7"
  fi
else
  python -m pip install -q -e .
fi
echo "medcam3d installed in $(pwd)/.venv (activate with: . .venv/bin/activate)"
