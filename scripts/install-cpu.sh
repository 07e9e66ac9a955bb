#!/usr/bin/env bash
# Install vtprune with the CPU build of torch into the active Python environment, exactly as CI tests it:
# every package at the version pinned in requirements/cpu.lock (made by scripts/lock-cpu.sh), nothing resolved
# from whatever the index serves today. --no-deps because the lock is complete on purpose without torchvision
# and timm (see scripts/lock-cpu.sh): lmms-eval lists them, vtprune never calls the code that needs them, and
# PyPI's torchvision breaks `import transformers` beside CPU torch ("operator torchvision::nms does not exist").
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --no-deps -r requirements/cpu.lock
python -m pip install --no-deps -e .
# A venv set up by an older version of this script may still hold them.
python -m pip uninstall -y -q torchvision timm 2>/dev/null || true
python -c "import transformers, torch, lmms_eval, accelerate; print('ok: torch', torch.__version__, 'transformers', transformers.__version__)"
