#!/usr/bin/env bash
# Wheels for a GPU machine that has torch (and numpy, pandas, matplotlib, pyyaml, safetensors, accelerate, pillow)
# but cannot reach a package index: the packages `vtprune bench / cost / report` need beyond those, at the versions
# pinned in requirements/cpu.lock, for that machine's Python (default 3.12, x86_64 Linux). lmms-eval is not among
# them: benchmarks never import it. scripts/bench_gpu.sh --wheels DIR installs them beside the machine's torch.
#
#   bash scripts/gpu_wheels.sh [DIR]          # default DIR: .whl (add /.whl/ to .git/info/exclude)
#   GPU_PYTHON=3.11 bash scripts/gpu_wheels.sh /tmp/whl   # for another Python
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.whl}"
# transformers >= 5.20 is what vtprune supports (the GPU image held 5.17); huggingface-hub 2 brings httpx2 /
# httpcore2 / truststore; typer 0.29 brings pydantic.
carried="transformers huggingface-hub httpx2 httpcore2 truststore tokenizers hf-xet typer pydantic pydantic-core
annotated-types typing-inspection annotated-doc shellingham rich"
pins=()
for name in $carried; do
  pin=$(grep -E "^${name}==" requirements/cpu.lock | awk '{print $1}')
  [ -n "$pin" ] || { echo "gpu_wheels.sh: $name is not pinned in requirements/cpu.lock" >&2; exit 2; }
  pins+=("$pin")
done
platforms=()
for n in 39 35 34 31 28 27 24 17 5; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" "${pins[@]}"
echo "$(ls "$dir"/*.whl | wc -l) wheels in $dir ($(du -sh "$dir" | cut -f1))"
