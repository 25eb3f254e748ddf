#!/usr/bin/env bash
# Distillation against hard labels with a teacher much stronger than the student, paired seeds
# (BENCHMARKS.md, "Distillation"). Builds on scripts/post-train.sh's output directory (run first
# if absent): its task split, the `mini` SFT model and the pre-trained student.
#
#   teacher = post-train's sft/final + 1200 more SFT steps (≈ 99% held-out exact match)
#   for each seed: the student fine-tuned STEPS (default 800) steps on the hard labels (`sft`)
#   vs distilled from the teacher (`distill --temperature 2 --alpha 0.5`), the same data order;
#   both validated on the held-out conversations (test_chat.jsonl) and scored by greedy exact
#   match on test.jsonl.
#
# Usage: [SEEDS="0 1 2"] [STEPS=800] bash scripts/distill-study.sh [OUT]   (default runs/post;
# BIN=path/to/dsv3 skips the build). Measured on 2 cores shared with other runs: 2–6 minutes
# per student run, 12 for the teacher. A run whose output exists is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/post}
SEEDS=${SEEDS-0 1 2}
STEPS=${STEPS:-800}
D=$OUT/distill-study
RUNS=$D TEST=$OUT/add/test.jsonl
. scripts/student-runs.sh
[ -e "$OUT/student/final/config.json" ] && [ -e "$OUT/sft/final/config.json" ] || bash scripts/post-train.sh "$OUT"
# make-task is seeded: writing the split again gives the same files, plus test_chat.jsonl.
[ -e "$OUT/add/test_chat.jsonl" ] || "$BIN" make-task --task addition --out "$OUT/add" --seed 0 --digits 2 --train 2000 --test 300 > /dev/null
mkdir -p "$D"
# (The teacher validates on every 20th training conversation, as post-train's sft does.)
run teacher "$BIN" sft --model "$OUT/sft/final" --data "$OUT/add/train.jsonl" \
  --steps 1200 --lr 1e-3 --checkpoint-every 1200 --eval-every 400 --log-every 100
echo "| student ($STEPS steps, lr 1e-3) | seed | held-out exact match (300) | held-out loss per assistant token |"
echo "|---|---|---|---|"
echo "| teacher: sft model + 1200 steps | - | $(em teacher) | - |"
for s in $SEEDS; do
  S=(--model "$OUT/student/final" --data "$OUT/add/train.jsonl" --val-data "$OUT/add/test_chat.jsonl" --steps "$STEPS" --lr 1e-3
     --checkpoint-every "$STEPS" --eval-every $((STEPS / 4)) --log-every 100 --seed "$s")
  run "hard-$STEPS-s$s" "$BIN" sft "${S[@]}"
  run "kd-$STEPS-s$s" "$BIN" distill --teacher "$D/teacher/final" --temperature 2 --alpha 0.5 "${S[@]}"
  echo "| hard labels (sft) | $s | $(em "hard-$STEPS-s$s") | $(val "hard-$STEPS-s$s") |"
  echo "| distilled, τ 2, α 0.5 | $s | $(em "kd-$STEPS-s$s") | $(val "kd-$STEPS-s$s") |"
done
