#!/usr/bin/env bash
# Set up from scratch, run the static checks (ruff with the complexity limit, mypy; settings in pyproject.toml) and
# the whole test suite (the README's test command; CI runs it too).
# Needs an X server for the napari tests and Chromium for the report test: on a fresh Debian/Ubuntu machine
# (as root) they are installed with apt-get here.
set -euo pipefail
cd "$(dirname "$0")/.."
APT_PACKAGES="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-cursor0 libgl1-mesa-dri chromium"
if ! command -v xvfb-run >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $APT_PACKAGES >/dev/null
  else
    echo "scripts/test.sh: needs xvfb-run and chromium; run: sudo apt-get install -y $APT_PACKAGES" >&2
    exit 1
  fi
fi
bash scripts/setup_env.sh "dev,napari,reports,slurm,pdf"
# shellcheck disable=SC1091
. .venv/bin/activate
export QT_API=pyqt6 PYTEST_QT_API=pyqt6 CI="${CI:-true}"
ruff check medcam3d scripts tests  # one line each: under set -e a failure in "a && b" would not stop the script
mypy
xvfb-run -a python -m pytest -q "$@"
