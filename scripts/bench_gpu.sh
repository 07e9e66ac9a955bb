#!/usr/bin/env bash
# The headline speed tables on one GPU: LLaMA-3.2-11B-Vision with trimmed_llama, LLaVA-NeXT-7B with AdaV at the
# paper's budgets, each next to its unpruned row. Random weights (architecture configs only: no download, no
# token), bf16, synthetic inputs. Results: results/gpu/<device>/<run>/{bench.jsonl,run.json}, cost.json, REPORT.md.
#
#   bash scripts/bench_gpu.sh            # needs one CUDA GPU with ~80 GB (LLaVA-NeXT unpruned at batch 16)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error

device=$(python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(0))")
out="results/gpu/$(echo "$device" | tr -cs 'A-Za-z0-9' '-' | sed 's/-*$//')"
arch="$PWD/configs/architectures"
mkdir -p "$out/configs"

# One config per model written here, so that weights, dtype and device are pinned whatever the shipped YAML says.
config() {  # name, architecture dir, strategy, options
  cat > "$out/configs/$1.yaml" <<YAML
name: $1
model: {path: $arch/$2, weights: random, dtype: bfloat16, device: cuda, attn_implementation: sdpa}
pruning: {strategy: $3, keep_ratio: 1.0, options: $4}
bench: {prompt_tokens: 64, new_tokens: 32, warmup: 2, repeats: 5}
YAML
  echo "$out/configs/$1.yaml"
}

# Random weights give random attention: trimmed_llama's adaptive union over heads would keep almost every token,
# so the speed table uses mode budget (exactly ceil(r·N) kept), the keep count the paper's K-ratio aims at.
llama=$(config llama-3.2-11b-vision-trimmed llama-3.2-11b-vision trimmed_llama "{mode: budget}")
vtprune bench --config "$llama" --strategies none,trimmed_llama --ratios 1.0,0.75,0.5,0.25 --batch-sizes 1,8,32 --output-dir "$out"
vtprune cost --config "$llama" --strategies none,trimmed_llama --ratios 1.0,0.75,0.5,0.25 --batch-sizes 1,8,32 --json > "$out/llama-3.2-11b-vision-cost.json"

# AdaV budgets 640 / 320 / 144 tokens of the paper's 2880 (configs/llava-next-7b/adav-*.yaml). Batch 16, not 32:
# unpruned LLaVA-NeXT holds ~3000 tokens per sample, 1.5 GiB of KV cache each.
next=$(config llava-next-7b-adav llava-next-7b adav "{}")
vtprune bench --config "$next" --strategies none,adav --ratios 0.2222222222,0.1111111111,0.05 --batch-sizes 1,8,16 --output-dir "$out"
vtprune cost --config "$next" --strategies none,adav --ratios 0.2222222222,0.1111111111,0.05 --batch-sizes 1,8,16 --json > "$out/llava-next-7b-cost.json"

# The field's methods at the budget most papers report (keep 0.25: 144 of LLaVA-1.5's 576 tokens), with the
# baselines UniPruneBench and VTC-Bench call mandatory (random, pool / downsample), on LLaVA-1.5-7B and Qwen2.5-VL-7B.
field="none,random,pool,downsample,fastv,pdrop,dart,visionzip,vispruner,cdpruner,fastervlm"
llava=$(config llava-1.5-7b-field llava-1.5-7b adav "{}")
vtprune bench --config "$llava" --strategies "$field" --ratios 0.25 --batch-sizes 1,8,32 --output-dir "$out"
qwen=$(config qwen2.5-vl-7b-field qwen2.5-vl-7b adav "{}")
vtprune bench --config "$qwen" --strategies "$field" --ratios 0.25 --batch-sizes 1,8,32 --output-dir "$out"

vtprune report "$out" -o "$out/REPORT.md"
echo "results in $out"
