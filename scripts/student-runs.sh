# Helpers for the distillation studies (sourced by distill-study.sh and distill-unlabelled.sh):
# `run NAME command...` runs a fine-tuning command into $RUNS/NAME (skipped when its final model
# exists; its output in $RUNS/NAME.log), `em NAME` scores that model by greedy exact match on
# $TEST, `val NAME` prints its last held-out loss. Sets BIN (building it when unset).
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN=target/release/dsv3
fi
export BIN
run() {
  local n=$1; shift
  [ -e "$RUNS/$n/final/config.json" ] && return
  rm -rf "${RUNS:?}/$n"
  "$@" --out "$RUNS/$n" > "$RUNS/$n.log" 2>&1 || { echo "$n failed: see $RUNS/$n.log"; tail -3 "$RUNS/$n.log"; exit 1; }
}
em() { "$BIN" eval --model "$RUNS/$1/final" --task gen --data "$TEST" --chat --max-new-tokens 48 --batch-size 16 2>/dev/null \
  | sed -E 's/^gen: exact_match ([0-9.]+) \(([0-9]+\/[0-9]+)\).*/\2/'; }
val() { grep -o 'validation: loss [0-9.]*' "$RUNS/$1.log" | awk '{print $3}'; }
