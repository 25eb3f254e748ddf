#!/usr/bin/env bash
# Expert parallelism benchmark (BENCHMARKS.md, section "Expert parallelism").
#
# A model with a 1.2 GB f32 checkpoint, almost all of it routed experts (hidden 512, 5 layers:
# 1 dense + 4 MoE with 64 experts of width 768, 4 per token in 8 groups, top-4 groups), run as
# N = 1, 2, 4 processes on this machine with the experts split N ways:
#  1. `dsv3 score --ep N` on the checkpoint: wall time and peak RSS of each rank (each rank reads
#     only its own experts from the memory-mapped file);
#  2. `dsv3 train --config ... --ep N` (fresh weights of the same shape, byte vocabulary): seconds
#     per optimiser step, bytes each rank sent per step (all collectives) and the forward expert
#     exchanges' bytes against the analytic volume, ranks reached per token, peak RSS per rank.
# N = 1 is the plain single-process run (no mpirun), the baseline a user has without EP.
#
# Needs: cargo, python3 (standard library), OpenMPI (`apt-get install libopenmpi-dev
# openmpi-bin libclang-dev`). FEATURES overrides the cargo features (default: mpi).
# Output: $OUT (default bench-out/ep); the table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out/ep}
FEATURES=${FEATURES:-mpi}
STEPS=${STEPS:-4}
mkdir -p "$OUT"
cargo build --release -q --features "$FEATURES" --bin dsv3
DSV3="$PWD/${CARGO_TARGET_DIR:-target}/release/dsv3"
# OpenMPI refuses root without these; more ranks than cores need oversubscription; one Flex
# thread per rank (4 ranks x 2 threads on 2 cores would thrash).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-1}

python3 - "$OUT/config.json" <<'PY'
import json, sys
cfg = json.load(open("tests/fixtures/tiny-qlora/config.json"))
cfg.update({
    "vocab_size": 320, "hidden_size": 512, "intermediate_size": 1536,
    "moe_intermediate_size": 768, "num_hidden_layers": 5, "first_k_dense_replace": 1,
    "num_attention_heads": 8, "num_key_value_heads": 8, "q_lora_rank": 192,
    "kv_lora_rank": 128, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
    "n_routed_experts": 64, "n_shared_experts": 1, "num_experts_per_tok": 4,
    "n_group": 8, "topk_group": 4, "num_nextn_predict_layers": 0,
    "max_position_embeddings": 256,
})
cfg["rope_scaling"] = None
json.dump(cfg, open(sys.argv[1], "w"), indent=1)
PY
MODEL="$OUT/model"
[ -f "$MODEL/model.safetensors" ] || "$DSV3" init --config "$OUT/config.json" --out "$MODEL" --seed 1 >/dev/null
du -h "$MODEL/model.safetensors" | sed 's/^/checkpoint: /'

run() { # N args... : the plain binary for N = 1 (its peak RSS from the kernel's rusage, in the
        # format the ranks print), mpirun otherwise
  local n=$1; shift
  if [ "$n" = 1 ]; then
    python3 -c '
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True)
kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print("peak RSS per rank: %.2f GiB" % (kb / 2**20) if kb >= 2**20 else "peak RSS per rank: %.2f MiB" % (kb / 2**10))
' "$DSV3" "$@"
  else
    mpirun -n "$n" --oversubscribe "$DSV3" "$@" --ep "$n"
  fi
}

TOKENS=$(python3 -c "print(','.join(str((i * 37) % 256) for i in range(64)))")
for n in 1 2 4; do
  start=$(date +%s.%N)
  run "$n" score --model "$MODEL" --tokens "$TOKENS" > "$OUT/score-ep$n.txt" 2>/dev/null
  end=$(date +%s.%N)
  echo "$start $end" > "$OUT/score-ep$n.time"
  rm -rf "$OUT/train-ep$n"
  run "$n" train --config "$OUT/config.json" --steps "$STEPS" --batch-size 4 --seq-len 64 \
    --samples 0 --eval-every 100000 --checkpoint-every 0 --log-every 1 --warmup 1 \
    --out "$OUT/train-ep$n" > "$OUT/train-ep$n.txt" 2>/dev/null
done

python3 - "$OUT" <<'PY'
import json, re, sys
out = sys.argv[1]
def rss(path):
    m = re.search(r"peak RSS per rank: (.*)", open(path).read())
    return m.group(1) if m else "?"
rows = []
for n in (1, 2, 4):
    t0, t1 = map(float, open(f"{out}/score-ep{n}.time").read().split())
    recs = [json.loads(l) for l in open(f"{out}/train-ep{n}/metrics.jsonl")]
    steps = recs[1:]  # the first step pays the start-up
    dt = (steps[-1]["elapsed_s"] - recs[0]["elapsed_s"]) / max(len(steps), 1)
    last = recs[-1]
    sent = last.get("comm_sent_bytes")
    ep_m, ep_a = last.get("ep_sent_bytes"), last.get("ep_analytic_bytes")
    rows.append((n, t1 - t0, rss(f"{out}/score-ep{n}.txt"), dt,
                 " / ".join(f"{b/1e6:.1f}" for b in sent) if sent else "-",
                 " / ".join(f"{m/1e6:.2f} vs {a/1e6:.2f}" for m, a in zip(ep_m, ep_a)) if ep_m else "-",
                 f"{last['ep_ranks_per_token']:.2f}" if last.get("ep_ranks_per_token") else "-",
                 rss(f"{out}/train-ep{n}.txt"), last["loss"]))
print("| EP | score wall s | score peak RSS per rank | train s/step | MB sent per rank per step | forward EP exchange MB per rank: measured vs analytic | ranks per token | train peak RSS per rank | loss at last step |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r[0]} | {r[1]:.2f} | {r[2]} | {r[3]:.2f} | {r[4]} | {r[5]} | {r[6]} | {r[7]} | {r[8]:.4f} |")
PY
