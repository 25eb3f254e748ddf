#!/usr/bin/env bash
# The post-training pipeline of the README ("Post-training and evaluation"), end to end on the
# generated addition task, with held-out exact match after each stage:
#
#   pre-train `mini` (dsv3 train) → sft → rl (GRPO, number reward)
#   distillation: a smaller student (scripts/student-config.json, pre-trained the same way) fine-tuned
#   on the hard labels vs. distilled from the sft model, the same steps.
#
# Usage: bash scripts/post-train.sh [OUT]   (default runs/post; BIN=path/to/dsv3 to skip the build)
# About 20 minutes on 2 idle cores. Every stage writes into OUT; a stage whose output exists is skipped,
# so an interrupted run continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/post}
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN=target/release/dsv3
fi
RL_STEPS=${RL_STEPS:-60}
mkdir -p "$OUT"
T0=$(date +%s)
stage() { # NAME DIR command...
  local name=$1 dir=$2; shift 2
  if [ -e "$dir/final/config.json" ]; then echo "== $name: $dir exists, skipped"; return; fi
  echo "== $name"
  local t=$(date +%s)
  "$@" > "$OUT/$name.log" 2>&1 || { echo "$name failed: see $OUT/$name.log"; tail -3 "$OUT/$name.log"; exit 1; }
  echo "   $(( $(date +%s) - t )) s; $(tail -1 "$OUT/$name.log")"
}
em() { # MODEL → exact match on the held-out sums
  "$BIN" eval --model "$1" --task gen --data "$OUT/add/test.jsonl" --chat --max-new-tokens 48 --batch-size 16 2>/dev/null \
    | sed -E 's/^gen: exact_match ([0-9.]+) \(([0-9]+\/[0-9]+)\).*/\2/'
}
[ -e "$OUT/add/test.jsonl" ] || "$BIN" make-task --task addition --out "$OUT/add" --seed 0 --digits 2 --train 2000 --test 300 > /dev/null
stage pretrain "$OUT/base" "$BIN" train --out "$OUT/base"
stage sft "$OUT/sft" "$BIN" sft --model "$OUT/base/final" --data "$OUT/add/train.jsonl" --out "$OUT/sft" \
  --steps 400 --lr 1e-3 --checkpoint-every 400 --eval-every 100 --log-every 50
stage rl "$OUT/rl" "$BIN" rl --model "$OUT/sft/final" --data "$OUT/add/train_prompts.jsonl" --chat --out "$OUT/rl" \
  --steps "$RL_STEPS" --prompts-per-step 8 --group-size 8 --max-new-tokens 40 --temperature 0.7 --lr 1e-5 --warmup 10 \
  --eval-data "$OUT/add/test.jsonl" --eval-every 20
stage student-pretrain "$OUT/student" "$BIN" train --config scripts/student-config.json --out "$OUT/student"
S=(--model "$OUT/student/final" --data "$OUT/add/train.jsonl" --steps 300 --lr 1e-3 --checkpoint-every 300 --eval-every 100 --log-every 50)
stage student-sft "$OUT/student-sft" "$BIN" sft "${S[@]}" --out "$OUT/student-sft"
stage student-distill "$OUT/student-distill" "$BIN" distill --teacher "$OUT/sft/final" --temperature 1 --alpha 0.5 "${S[@]}" --out "$OUT/student-distill"
val() { grep -o 'validation: loss [0-9.]*' "$OUT/$1.log" | awk '{print $3}'; }
echo
echo "| model | held-out exact match (300 sums) | val loss per assistant token |"
echo "|---|---|---|"
echo "| mini, pre-trained | $(em "$OUT/base/final") | - |"
echo "| + sft 400 steps | $(em "$OUT/sft/final") | $(val sft) |"
echo "| + rl $RL_STEPS steps | $(em "$OUT/rl/final") | - |"
echo "| student, pre-trained | $(em "$OUT/student/final") | - |"
echo "| student + sft 300 steps (hard labels) | $(em "$OUT/student-sft/final") | $(val student-sft) |"
echo "| student + distill 300 steps from the sft model | $(em "$OUT/student-distill/final") | $(val student-distill) |"
echo
echo "total $(( $(date +%s) - T0 )) s; reward curve: $OUT/rl/rl.png"
