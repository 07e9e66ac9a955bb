#!/usr/bin/env bash
# The headline speed tables on one CUDA GPU, in parts sized for a short lease (each part ~2-4 min on an H100,
# estimated from `vtprune cost`, the model's random init included), most important first:
#   llama        LLaMA-3.2-11B-Vision: none and trimmed_llama (mode budget) at keep 0.75 / 0.5 / 0.25, batch 1 / 8 / 32:
#                the paper's claim that the latency gain grows with the batch size
#   next         LLaVA-NeXT-7B: none and adav at the paper's budgets 640 / 320 / 144 of 2880 tokens, batch 1 / 8 / 16
#   field-llava  LLaVA-1.5-7B: the field's methods at keep 0.25, batch 1 / 8 / 32
#   field-qwen   Qwen2.5-VL-7B: the same
#   serve        LLaVA-1.5-7B served on vLLM: none, adav and uniform at keep 0.25 under 1 / 4 / 16 / 64 clients
#                (`vtprune serve-bench`); needs a Python with vLLM (--vllm-python), else skipped with one line
# Random weights (architecture configs only: no download, no token), bf16, synthetic inputs, `cost --json` beside
# each bench. Results: results/gpu/<device>/<run>/{bench.jsonl,run.json}, <run>-cost.json, REPORT.md.
#
#   bash scripts/bench_gpu.sh [--wheels DIR] [--pack DIR] [--out DIR] [--rehearse] [--vllm-python PY] [PART ...]
#                                                                                       (default: llama next)
#
# --wheels DIR  install the wheels in DIR (scripts/gpu_wheels.sh makes them) into /tmp/vtprune-site first and run
#               vtprune from this checkout on them: for a GPU image that has torch but not vtprune's pinned
#               transformers / typer (nothing is fetched).
# --pack DIR    after every part, write DIR/gpu-results.tar.gz (the output folder) and keep the log in DIR/bench_gpu.log,
#               so that a lease cut off mid-way still returns the parts already done.
# --rehearse    the same steps on this CPU with the tiny models (float32, batch 1 / 2, 2 rounds, 2 new tokens) into
#               results/tmp-rehearsal/: checks every command, strategy name and option before a GPU is spent on it.
# --out DIR     write there instead of results/gpu/<device> (or results/tmp-rehearsal).
# --vllm-python PY  the Python whose environment has vLLM (for part serve; default python3): the lent GPU image has
#               none, and vLLM's CUDA wheels are larger than a device call carries, so serve runs where one is installed
#               (pip install vllm==0.32.0, then `pip install --no-deps -e .` of this checkout beside it).
#               With --rehearse: micro:llava on this CPU (.venv-vllm/bin/python).
#
# On this project's lent GPU (device tool; 15 min of device time per session, 10 min per command), in the repo root:
#   bash scripts/gpu_wheels.sh            # here, once: .whl/ (ignored by git)
#   git commit, then run(command="VTPRUNE_GIT_COMMIT=<that hash> bash scripts/bench_gpu.sh --wheels .whl --pack $OUT",
#                        carry=[".whl"], timeout_s=540)   # llama + next; field-llava field-qwen in a second call
# then `tar xzf gpu-results.tar.gz -C results/gpu` here and commit results/gpu/<device> (REPORT.md included).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1

wheels="" pack="" out="" rehearse="" vllm_python="python3" parts=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="$2"; shift 2 ;;
    --pack) pack="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --rehearse) rehearse=1; shift ;;
    --vllm-python) vllm_python="$2"; shift 2 ;;
    llama|next|field-llava|field-qwen|serve) parts+=("$1"); shift ;;
    *) echo "bench_gpu.sh: unknown argument '$1' (allowed: --wheels DIR, --pack DIR, --out DIR, --rehearse, --vllm-python PY, llama, next, field-llava, field-qwen, serve)" >&2; exit 2 ;;
  esac
done
[ ${#parts[@]} -gt 0 ] || parts=(llama next)
if [ -n "$pack" ]; then
  mkdir -p "$pack"
  exec > >(tee -a "$pack/bench_gpu.log") 2>&1
fi

if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vtprune-site "$wheels"/*.whl
  export PYTHONPATH="/tmp/vtprune-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
vtprune() { python3 -m vtprune "$@"; }
# run.json's git_commit: the GPU machine gets the working tree without .git
VTPRUNE_GIT_COMMIT="${VTPRUNE_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
export VTPRUNE_GIT_COMMIT

if [ -n "$rehearse" ]; then
  if [ -z "$out" ]; then out="results/tmp-rehearsal"; rm -rf "$out"; fi
else
  device=$(python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(0))")
  out="${out:-results/gpu/$(echo "$device" | tr -cs 'A-Za-z0-9' '-' | sed 's/-*$//')}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
arch="$PWD/configs/architectures"
mkdir -p "$out/configs"

# One config per model written here, so that weights, dtype and device are pinned whatever the shipped YAML says.
config() {  # name, architecture dir, tiny family (for --rehearse), strategy, options
  local model="{path: $arch/$2, weights: random, dtype: bfloat16, device: cuda, attn_implementation: sdpa}"
  local bench="{prompt_tokens: 64, new_tokens: 32, warmup: 1, repeats: 5}"
  if [ -n "$rehearse" ]; then
    model="{path: 'tiny:$3', weights: random, dtype: float32, device: cpu, attn_implementation: sdpa}"
    bench="{prompt_tokens: 8, new_tokens: 2, warmup: 0, repeats: 2}"
  fi
  cat > "$out/configs/$1.yaml" <<YAML
name: $1
model: $model
pruning: {strategy: $4, keep_ratio: 1.0, options: $5}
bench: $bench
YAML
  echo "$out/configs/$1.yaml"
}

batches() { if [ -n "$rehearse" ]; then echo "1,2"; else echo "$1"; fi; }
pack_results() { if [ -n "$pack" ]; then tar czf "$pack/gpu-results.tar.gz" -C "$(dirname "$out")" "$(basename "$out")"; fi; }

part() {  # config, strategies, ratios, batch sizes: cost first (it fails in seconds on a bad name), then bench
  local name start
  name=$(basename "$1" .yaml) start=$SECONDS
  vtprune cost --config "$1" --strategies "$2" --ratios "$3" --batch-sizes "$(batches "$4")" --json > "$out/$name-cost.json"
  vtprune bench --config "$1" --strategies "$2" --ratios "$3" --batch-sizes "$(batches "$4")" --output-dir "$out"
  echo "== part $name: $((SECONDS - start)) s"
  pack_results
}

serve_part() {  # LLaVA-1.5-7B (random weights, bf16) on vLLM under load; micro:llava on this CPU when rehearsing
  local start=$SECONDS name=llava-1.5-7b-serve
  if ! PYTHONPATH="$PWD" "$vllm_python" -c "import vllm" 2>/dev/null; then
    echo "== part $name: skipped (no vLLM in $vllm_python; see --vllm-python)"
    return 0
  fi
  local model="{path: $arch/llava-1.5-7b, weights: random, dtype: bfloat16, device: cuda}"
  local load=(--concurrency 1,4,16,64 --rounds 3 --warmup 1 --requests-per-client 2 --min-requests 8 --new-tokens 32)
  if [ -n "$rehearse" ]; then
    model="{path: 'micro:llava', dtype: float32, device: cpu}"
    load=(--concurrency 1,2 --rounds 1 --warmup 0 --requests-per-client 1 --min-requests 2 --new-tokens 2)
  fi
  printf 'name: %s\nengine: vllm\nmodel: %s\npruning: {strategy: adav, keep_ratio: 0.25}\n' "$name" "$model" \
    > "$out/configs/$name.yaml"
  # This checkout on the path, not the --wheels site: vLLM pins its own transformers.
  PYTHONPATH="$PWD" "$vllm_python" -m vtprune serve-bench --config "$out/configs/$name.yaml" --strategies adav,uniform --ratios 0.25 \
    "${load[@]}" --output-dir "$out"
  echo "== part $name: $((SECONDS - start)) s"
  pack_results
}

# The field's methods at the budget most papers report (keep 0.25: 144 of LLaVA-1.5's 576 tokens), with the
# baselines UniPruneBench and VTC-Bench call mandatory (random, pool / downsample).
field="none,random,pool,downsample,fastv,pdrop,dart,visionzip,vispruner,cdpruner,fastervlm"
for p in "${parts[@]}"; do
  case "$p" in
    # Random weights give random attention: trimmed_llama's adaptive union over heads would keep almost every
    # token, so the speed table uses mode budget (exactly ceil(r·N) kept), the keep count the paper's K-ratio aims at.
    llama) part "$(config llama-3.2-11b-vision-trimmed llama-3.2-11b-vision mllama trimmed_llama "{mode: budget}")" \
             none,trimmed_llama 0.75,0.5,0.25 1,8,32 ;;
    # AdaV budgets 640 / 320 / 144 tokens of the paper's 2880 (configs/llava-next-7b/adav-*.yaml). Batch 16, not 32:
    # unpruned LLaVA-NeXT holds ~3000 tokens per sample, 1.5 GiB of KV cache each.
    next) part "$(config llava-next-7b-adav llava-next-7b llava_next adav "{}")" \
            none,adav 0.2222222222,0.1111111111,0.05 1,8,16 ;;
    field-llava) part "$(config llava-1.5-7b-field llava-1.5-7b llava adav "{}")" "$field" 0.25 1,8,32 ;;
    field-qwen) part "$(config qwen2.5-vl-7b-field qwen2.5-vl-7b qwen2_5_vl adav "{}")" "$field" 0.25 1,8,32 ;;
    serve) serve_part ;;
  esac
done

vtprune report "$out" -o "$out/REPORT.md" || echo "report failed: the benches are done; run vtprune report here"
pack_results
echo "results in $out"
