#!/usr/bin/env bash
# Run the test suite against an old torch, by hand: CI tests torch 2.13 only, while dcp-ext supports
# torch >= 2.7 (docs/architecture.md, "The torch floor", has the last results and the costs).
#
#   tests/old_torch.sh [VERSION] [-- PYTEST ARGS...]
#
#   tests/old_torch.sh                                  # torch 2.7.1 (the floor), the suite (not -m slow)
#   tests/old_torch.sh 2.9.1 -- tests/test_staging.py   # another torch, some files
#
# It builds a virtual environment outside the checkout ($OLD_TORCH_VENV, default
# /tmp/dcp-ext-torch-VERSION; reused when it already has that torch), installs torch==VERSION from
# PyPI and then this checkout's '.[test]' extra with torch pinned by a constraints file (so pip
# cannot swap it), and runs pytest from the checkout root with PYTHONPATH on it. PyPI's Linux
# torch wheels are CUDA builds: torch 2.7.1 is about 2.8 GB to download and 5.2 GB installed (2.9.1:
# 6.8 GB); the CPU code paths run on them without a GPU. Remove the environment afterwards with
# rm -rf on the path it prints.
set -euo pipefail

version="2.7.1"
if [[ $# -gt 0 && "$1" != "--" ]]; then
    version="$1"
    shift
fi
if [[ $# -gt 0 && "$1" == "--" ]]; then
    shift
fi
if [[ ! "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
    echo "old_torch.sh: expected a torch version like 2.7.1, got '$version'" >&2
    exit 2
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${OLD_TORCH_VENV:-/tmp/dcp-ext-torch-$version}"
python="${PYTHON:-python3}"

have="$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
if [[ "$have" != "$version" ]]; then
    echo "old_torch.sh: building $venv with torch==$version (several GB from PyPI)" >&2
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --no-cache-dir -q "torch==$version" numpy
fi
constraints="$venv/torch-constraint.txt"
echo "torch==$version" > "$constraints"
"$venv/bin/python" -m pip install -q -c "$constraints" -e "$root[test]"
"$venv/bin/python" -c "import torch; print('old_torch.sh: torch', torch.__version__, 'in $venv')"

cd "$root"
if [[ $# -eq 0 ]]; then
    # everything but the slow packaging test: it builds the wheel and installs torch 2.13 into
    # a fresh venv of its own, so it tests packaging, not this torch
    set -- tests -m "not slow"
fi
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "$venv/bin/python" -m pytest -q -rs "$@"
