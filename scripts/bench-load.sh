#!/usr/bin/env bash
# Load benchmark: a random V3-shaped checkpoint of ~1.7 GB (BF16, ~874M parameters incl. MTP),
# loaded into f32 on the CPU backend. Compares against reading the files once (`cat`, page cache
# warm) and reports peak RSS against the loaded weights' bytes.
# Usage: scripts/bench-load.sh [WORKDIR]   (needs ~6 GB of RAM and ~2 GB of disk)
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-${TMPDIR:-/tmp}/dsv3-bench-load}"
mkdir -p "$work"
# BIN=path/to/dsv3 skips the build (e.g. a binary built with the test command's features).
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN="${CARGO_TARGET_DIR:-target}/release/dsv3"
fi
bin=$BIN
cat > "$work/config.json" <<'JSON'
{"vocab_size": 32000, "hidden_size": 1536, "intermediate_size": 4096, "moe_intermediate_size": 512,
 "num_hidden_layers": 8, "first_k_dense_replace": 1, "num_attention_heads": 12, "num_key_value_heads": 12,
 "q_lora_rank": 512, "kv_lora_rank": 256, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64,
 "n_routed_experts": 32, "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
 "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 1, "max_position_embeddings": 4096,
 "rope_theta": 10000}
JSON
if [ ! -f "$work/model/model.safetensors" ]; then
  "$bin" init --config "$work/config.json" --out "$work/model" --dtype bf16
fi
cat "$work/model/model.safetensors" > /dev/null   # warm the page cache
echo "== read the file once (cat, warm cache)"
/usr/bin/time -f "cat: %e s wall, %M KiB peak RSS" cat "$work/model/model.safetensors" > /dev/null
echo "== dsv3 inspect --load (bf16 file -> f32 weights)"
/usr/bin/time -f "dsv3: %e s wall, %M KiB peak RSS" "$bin" inspect --model "$work/model" --load | tail -1
echo "== dsv3 inspect --load --weights bf16 (bf16 file -> bf16 Linear weights, the rest f32)"
/usr/bin/time -f "dsv3: %e s wall, %M KiB peak RSS" "$bin" inspect --model "$work/model" --load --weights bf16 | tail -1
