#!/usr/bin/env bash
# Regenerate requirements/cpu.lock, the complete pinned dependency set that scripts/install-cpu.sh installs.
# Run it after changing dependencies in pyproject.toml, then run .ci/run from a fresh clone. It keeps the
# existing pins where they still fit; `bash scripts/lock-cpu.sh --upgrade` moves every package to its newest.
# It resolves with pip-tools (pip's own resolver) in a throw-away venv, on Python 3.11 / Linux x86_64, with torch
# held at the CPU build 2.13.0. torchvision and timm are left out on purpose: lmms-eval asks for them for model
# wrappers vtprune does not use, PyPI's torchvision breaks `import transformers` beside CPU torch, and timm
# imports torchvision, which breaks `accelerate launch` (accelerate imports timm when it is installed).
# Where torch 2.13.0+cpu is not a local wheel, set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu first.
set -euo pipefail
cd "$(dirname "$0")/.."
tools="$(mktemp -d)"
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install -q pip-tools==7.6.2
"$tools/venv/bin/pip-compile" pyproject.toml --extra dev --strip-extras --no-header --annotation-style line \
    --no-emit-index-url --no-emit-find-links \
    --upgrade-package torch==2.13.0 --unsafe-package torchvision --unsafe-package timm \
    --output-file requirements/cpu.lock "$@"
