#!/usr/bin/env bash
# Pipeline-parallel step times on this machine (BENCHMARKS.md, "Pipeline parallelism"):
# `dsv3 train` on the mini shape with 8 decoder layers and no MTP module (a pipeline runs none
# yet), one process (PP = 1) and under `mpirun -n PP --pp PP` for each schedule at PP = 2 and 4.
# Every process runs one Flex thread. Prints, per run, the seconds per optimiser step over
# steps 2..STEPS-1 (from metrics.jsonl's elapsed_s; the first step warms up, the last one also
# validates), the last step's loss, and the peak RSS of each rank (`dsv3 train`'s `peak RSS per
# rank` line; GNU time's maximum RSS for the single process).
#
#   FEATURES=wgpu,cuda,mpi,nccl bash scripts/bench-pp.sh   (or BIN=path/to/dsv3 to skip the build)
set -euo pipefail
cd "$(dirname "$0")/.."
FEATURES=${FEATURES:-mpi}
STEPS=${STEPS:-5}
DIR=${DIR:-$(mktemp -d /tmp/dsv3-bench-pp.XXXXXX)}
BIN=${BIN:-}
if [ -z "$BIN" ]; then
  cargo build --release --features "$FEATURES" --bin dsv3 >&2
  BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/dsv3
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export RAYON_NUM_THREADS=1

"$BIN" init --preset mini --out "$DIR/init" >/dev/null
sed -E 's/"num_nextn_predict_layers": *[0-9]+/"num_nextn_predict_layers": 0/;
        s/"num_hidden_layers": *[0-9]+/"num_hidden_layers": 8/' \
  "$DIR/init/config.json" > "$DIR/cfg.json"
ARGS=(train --config "$DIR/cfg.json" --batch-size 2 --seq-len 128 --grad-accum 8
      --steps "$STEPS" --log-every 1 --eval-every 1000 --checkpoint-every 0 --samples 0
      --workers 1)

report() { # label run-dir rss
  python3 - "$1" "$2/metrics.jsonl" "$3" <<'EOF'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
dt = (recs[-2]["elapsed_s"] - recs[0]["elapsed_s"]) / (len(recs) - 2)
print(f"| {sys.argv[1]} | {dt:.2f} | {recs[-1]['loss']:.6f} | {sys.argv[3]} |")
EOF
}

echo "| run | s/step (steps 2..$((STEPS - 1))) | loss at step $STEPS | peak RSS per rank |"
echo "|---|---|---|---|"
if [ -x /usr/bin/time ]; then
  /usr/bin/time -f '%M' -o "$DIR/pp1.rss" "$BIN" "${ARGS[@]}" --out "$DIR/pp1" >/dev/null
  rss="$(( $(cat "$DIR/pp1.rss") / 1024 )) MiB"
else
  "$BIN" "${ARGS[@]}" --out "$DIR/pp1" >/dev/null
  rss="-"
fi
report "PP = 1 (one process)" "$DIR/pp1" "$rss"
for pp in 2 4; do
  for s in 1f1b zb1p dualpipe dualpipev; do
    out=$(mpirun -q -n "$pp" "$BIN" "${ARGS[@]}" --pp "$pp" --schedule "$s" --out "$DIR/pp$pp-$s")
    rss=$(printf '%s\n' "$out" | sed -n 's/^peak RSS per rank: //p')
    report "PP = $pp, $s" "$DIR/pp$pp-$s" "$rss"
  done
done
rm -rf "$DIR"
