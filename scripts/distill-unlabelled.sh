#!/usr/bin/env bash
# Distillation where a teacher earns its keep: few labels, many prompts without answers
# (BENCHMARKS.md, "Distillation", "Few labels"). Every two-digit sum but the 300 held-out ones is
# drawn (`make-task`); LABELS of them keep their worked answers, the rest are prompts only, which
# the teacher answers (`dsv3 generate --chat`, sequence-level distillation). Then, for each seed,
# the same student, the same steps:
#   hard:      `sft` on the LABELS labelled conversations alone;
#   distilled: `distill` (τ 2, α 0.5: the teacher's logits too) on those plus the teacher's answers.
# Both are validated on the held-out conversations and scored by greedy exact match.
#
# Usage: [SEEDS="0 1 2"] [LABELS=500] [STEPS=1600] bash scripts/distill-unlabelled.sh [OUT]
# (default runs/post; BIN=path/to/dsv3 skips the build). Needs distill-study.sh's teacher and
# post-train.sh's student in OUT (built first if absent). A run whose output exists is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/post}
SEEDS=${SEEDS-0 1 2}
LABELS=${LABELS:-500}
STEPS=${STEPS:-1600}
D=$OUT/distill-study
U=$OUT/distill-unlabelled
RUNS=$U TEST=$U/add/test.jsonl
. scripts/student-runs.sh
[ -e "$D/teacher/final/config.json" ] || SEEDS="" bash scripts/distill-study.sh "$OUT"
mkdir -p "$U"
# All 5,050 unordered two-digit sums: 300 held out, the other 4,750 for training.
[ -e "$U/add/train.jsonl" ] || "$BIN" make-task --task addition --out "$U/add" --seed 0 --digits 2 --train 4750 --test 300 > /dev/null
head -n "$LABELS" "$U/add/train.jsonl" > "$U/labelled.jsonl"
if [ ! -s "$U/teacher-answers.jsonl" ]; then
  tail -n +"$((LABELS + 1))" "$U/add/train_prompts.jsonl" > "$U/unlabelled.jsonl"
  "$BIN" generate --model "$D/teacher/final" --prompts "$U/unlabelled.jsonl" --chat --batch-size 16 \
    --max-new-tokens 48 > "$U/teacher-answers.jsonl" 2> "$U/generate.log"
fi
# `generate` writes each conversation with its reply under "messages", which `sft` reads as is.
cat "$U/labelled.jsonl" "$U/teacher-answers.jsonl" > "$U/union.jsonl"
echo "| student ($STEPS steps, lr 1e-3) | seed | held-out exact match (300) | held-out loss per assistant token |"
echo "|---|---|---|---|"
for s in $SEEDS; do
  S=(--model "$OUT/student/final" --val-data "$U/add/test_chat.jsonl" --steps "$STEPS" --lr 1e-3
     --checkpoint-every "$STEPS" --eval-every $((STEPS / 4)) --log-every 100 --seed "$s")
  run "hard-$LABELS-s$s" "$BIN" sft --data "$U/labelled.jsonl" "${S[@]}"
  run "kd-$LABELS-s$s" "$BIN" distill --teacher "$D/teacher/final" --temperature 2 --alpha 0.5 \
    --data "$U/union.jsonl" "${S[@]}"
  echo "| $LABELS labels (sft) | $s | $(em "hard-$LABELS-s$s") | $(val "hard-$LABELS-s$s") |"
  echo "| distilled on them + the teacher's answers | $s | $(em "kd-$LABELS-s$s") | $(val "kd-$LABELS-s$s") |"
done
