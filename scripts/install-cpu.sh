#!/usr/bin/env bash
# Install vtprune with the CPU build of torch into the active Python environment.
# Why the three steps: lmms-eval depends on torchvision; an unconstrained resolve picks the newest torchvision,
# which pulls a multi-GB CUDA torch. Pinning torch keeps the CPU wheel, and the torchvision pip then installs
# is built for CUDA torch and breaks `import transformers` ("operator torchvision::nms does not exist"), so it
# is removed: vtprune and the lmms-eval tasks it runs do not need it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install torch==2.13.0
python -m pip install -e ".[dev]" -c constraints-cpu.txt
python -m pip uninstall -y torchvision
python -c "import transformers, torch; print('ok: torch', torch.__version__, 'transformers', transformers.__version__)"
