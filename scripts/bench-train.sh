#!/usr/bin/env bash
# Training benchmark (BENCHMARKS.md, section "Training").
#
#  1. The README's main job: `dsv3 train` with the defaults (preset mini, embedded corpus):
#     wall time, final validation bits per byte, expert-load imbalance.
#  2. The same run with γ = 0 (no aux-loss-free bias updates), same seed and steps.
#  3. Training throughput against PyTorch + HF transformers' DeepseekV3ForCausalLM doing the same
#     steps (same shape, float32, same batch, AdamW + clipping) with 1 and 2 threads. HF runs no
#     MTP module, so ours is measured with and without it (num_nextn_predict_layers = 0).
#     Threads: ours RAYON_NUM_THREADS (Flex matmuls) x --workers (parallel micro-batches).
#
# Needs: cargo, python3 with torch + transformers. Output: $OUT (default bench-out/train).
# STEPS overrides the main runs' length (default: the preset's 400); SKIP_RUNS=1 does only step 3.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out/train}
STEPS=${STEPS:-}
SPEED_STEPS=${SPEED_STEPS:-12}
mkdir -p "$OUT"
# BIN=path/to/dsv3 skips the build (e.g. a binary built with the test command's features, which a
# featureless `cargo build` would rebuild the whole stack to replace).
if [ -n "${BIN:-}" ]; then
  DSV3=$BIN
else
  cargo build --release -q
  DSV3="${CARGO_TARGET_DIR:-target}/release/dsv3"
fi
steps_flag=()
[ -n "$STEPS" ] && steps_flag=(--steps "$STEPS")

summary() { # run dir -> final val bpb, imbalance
  python3 - "$1" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
last = recs[-1]
val = [r for r in recs if r.get("val_bits_per_byte") is not None][-1]
print(json.dumps({"step": last["step"], "val_loss": val["val_loss"], "val_bits_per_byte": val["val_bits_per_byte"],
                  "imbalance": dict(zip(map(str, last["moe_layers"]), [round(x, 3) for x in last["imbalance"]])),
                  "imbalance_mean": round(sum(last["imbalance"]) / len(last["imbalance"]), 3),
                  "tokens_per_s": round(last["tokens_per_s"], 1)}))
PY
}

if [ -z "${SKIP_RUNS:-}" ]; then
  for g in 1e-3 0; do
    rm -rf "$OUT/gamma-$g"
    echo "== dsv3 train, bias_gamma $g"
    /usr/bin/time -f "wall %e s, max RSS %M KiB" "$DSV3" train --out "$OUT/gamma-$g" --bias-gamma "$g" \
      --samples 3 "${steps_flag[@]}" | tee "$OUT/gamma-$g.log"
    summary "$OUT/gamma-$g" | tee "$OUT/gamma-$g.json"
  done
fi

echo "== throughput: ours vs PyTorch + HF transformers (no MTP in HF), rounds run back to back"
# The no-MTP config (HF's model has no MTP module): the preset's config with num_nextn_predict_layers 0.
rm -rf "$OUT/cfg"
"$DSV3" train --out "$OUT/cfg" --steps 1 --eval-every 100000 --samples 0 >/dev/null
python3 - "$OUT/cfg/final/config.json" "$OUT/nomtp-config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1])); c["num_nextn_predict_layers"] = 0
json.dump(c, open(sys.argv[2], "w"), indent=1)
PY
ours() { # name, RAYON_NUM_THREADS ("" = all cores), workers, extra args
  rm -rf "$OUT/speed/$1"
  RAYON_NUM_THREADS=$2 "$DSV3" train --out "$OUT/speed/$1" --workers "$3" --steps "$SPEED_STEPS" \
    --log-every "$SPEED_STEPS" --eval-every 100000 --checkpoint-every 0 --samples 0 "${@:4}" >/dev/null
  python3 -c "import json;r=[json.loads(l) for l in open('$OUT/speed/$1/metrics.jsonl')][-1];print('ours $1', round(r['tokens_per_s']), 'tokens/s, load', open('/proc/loadavg').read().split()[0])"
}
hf() { # threads
  python3 scripts/bench_train_hf.py --config "$OUT/nomtp-config.json" --threads "$1" --steps "$SPEED_STEPS" 2>/dev/null \
    | python3 -c "import json,sys;r=json.loads(sys.stdin.read());print('hf threads $1', round(r['tokens_per_s']), 'tokens/s, load', open('/proc/loadavg').read().split()[0])"
}
mkdir -p "$OUT/speed"
for round in 1 2; do
  ours "nomtp-1thread-$round" 1 1 --config "$OUT/nomtp-config.json"
  hf 1
  ours "nomtp-rayon2-w1-$round" 2 1 --config "$OUT/nomtp-config.json"
  ours "nomtp-rayon1-w2-$round" 1 2 --config "$OUT/nomtp-config.json"
  hf 2
  ours "mtp-default-$round" "" 2
done | tee "$OUT/throughput.txt"
