#!/usr/bin/env bash
# Inference benchmark: a ~100M-parameter V3-shaped model with random weights (`dsv3 init --preset
# small`: 6 layers, 32 experts top-4, MLA with kv latent 128; 103M main + 27M MTP parameters),
# run side by side by this project (release, Flex CPU backend) and by PyTorch + HF transformers
# (float32, eager attention) on the same machine with the same number of threads:
#   prefill tokens/s at 512 tokens, decode tokens/s at batch 1 from a 512-token context,
#   KV-cache bytes per token, decode as a fraction of the memory-bandwidth limit, and batched
#   decode at batch 1, 4, 16 (`dsv3 generate --prompts` vs HF `generate`, tokens/s summed over rows);
#   the bandwidth limit is the measured copy bandwidth / bytes of weights one decode step reads.
# Prints a markdown table (the one recorded in BENCHMARKS.md, section "Inference").
# Usage: scripts/bench-infer.sh [WORKDIR]   (needs torch + transformers; ~1 GB of disk)
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-${TMPDIR:-/tmp}/dsv3-bench-infer}"
new=${NEW_TOKENS:-64}
# Both sides get the same threads: Flex's rayon pool (RAYON_NUM_THREADS) and torch's
# (OMP_NUM_THREADS / set_num_threads). Default: every core.
threads=${THREADS:-$(nproc)}
mkdir -p "$work"
# BIN=path/to/dsv3 skips the build (e.g. a binary built with the test command's features).
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN="${CARGO_TARGET_DIR:-target}/release/dsv3"
fi
bin=$BIN
[ -f "$work/model/model.safetensors" ] || "$bin" init --preset small --out "$work/model" --seed 1 > /dev/null
python3 -c "import random; r = random.Random(7); print(','.join(str(r.randrange(2, 8000)) for _ in range(512)))" > "$work/ids"
ids=$(cat "$work/ids")

run() { RAYON_NUM_THREADS=$threads "$bin" generate --model "$work/model" --tokens "$ids" --max-new-tokens "$new" \
          --ignore-eos --prefill-chunk 512 --json "$@"; }
run > /dev/null   # warm the page cache
for i in 1 2 3; do run > "$work/ours.$i.json"; done
run --speculative mtp > "$work/spec.json"
OMP_NUM_THREADS=$threads python3 scripts/bench_infer_hf.py "$work/model" "$work/ids" "$new" "$threads" \
  2> "$work/hf.log" > "$work/hf.json"

# Batched decode: 16 prompts of 128 random ids (seed 11), the first B of them as one batch,
# B = 1, 4, 16; tokens/s summed over the rows (best of 2 on our side).
python3 -c "
import json, random
r = random.Random(11)
for _ in range(16): print(json.dumps({'tokens': [r.randrange(2, 8000) for _ in range(128)]}))" > "$work/prompts.jsonl"
batches="1 4 16"
for b in $batches; do
  head -n "$b" "$work/prompts.jsonl" > "$work/prompts.$b.jsonl"
  for i in 1 2; do
    RAYON_NUM_THREADS=$threads "$bin" generate --model "$work/model" --prompts "$work/prompts.$b.jsonl" \
      --batch-size "$b" --max-new-tokens "$new" --ignore-eos 2> /dev/null > "$work/batch.$b.$i.jsonl"
  done
done
OMP_NUM_THREADS=$threads python3 scripts/bench_batch_hf.py "$work/model" "$work/prompts.jsonl" "$new" "$threads" \
  $batches 2>> "$work/hf.log" > "$work/hf.batch.json"

python3 - "$work" "$new" "$threads" $batches <<'PY'
import json, sys
work, new, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
batches = [int(b) for b in sys.argv[4:]]
ours = [json.load(open(f"{work}/ours.{i}.json")) for i in (1, 2, 3)]
spec = json.load(open(f"{work}/spec.json"))
hf = json.load(open(f"{work}/hf.json"))
pre = max(o["stats"]["prefill_tokens_per_sec"] for o in ours)
dec = max(o["stats"]["decode_tokens_per_sec"] for o in ours)
kv = ours[0]["stats"]["cache_bytes_per_token"]
bw, wbytes = hf["copy_bandwidth_bytes_per_sec"], hf["decode_weight_bytes_per_token"]
limit = bw / wbytes
agree = sum(a == b for a, b in zip(ours[0]["tokens"], hf["hf_greedy_tokens"]))
sp = spec["stats"]["speculative"]
sdec = spec["stats"]["decode_tokens_per_sec"]
print(f"| | this project (Burn Flex, release) | PyTorch {hf['torch']} + transformers {hf['transformers']} (eager, f32) | ratio |")
print("|---|---|---|---|")
print(f"| prefill, 512 tokens (tok/s) | {pre:.0f} | {hf['hf_prefill_tokens_per_sec']:.0f} | {pre / hf['hf_prefill_tokens_per_sec']:.2f}x |")
print(f"| decode, batch 1, 512-token context (tok/s) | {dec:.1f} | {hf['hf_decode_tokens_per_sec']:.1f} | {dec / hf['hf_decode_tokens_per_sec']:.2f}x |")
print(f"| KV cache (bytes/token, f32) | {kv} | {hf['hf_kv_bytes_per_token']:.0f} | |")
print(f"| decode / bandwidth limit | {dec / limit:.0%} | {hf['hf_decode_tokens_per_sec'] / limit:.0%} | |")
hfb = {x["batch"]: x for x in json.load(open(f"{work}/hf.batch.json"))["batches"]}
same = []
for b in batches:
    runs = [[json.loads(l) for l in open(f"{work}/batch.{b}.{i}.jsonl")] for i in (1, 2)]
    ours_b = max(r[0]["stats"]["decode_tokens_per_sec"] for r in runs)
    hf_b = hfb[b]["decode_tokens_per_sec"]
    print(f"| decode, batch {b}, 128-token prompts (tok/s summed over rows; HF `generate`) | {ours_b:.1f} | {hf_b:.1f} | {ours_b / hf_b:.2f}x |")
    same += [sum(a == c for a, c in zip(row["tokens"], h)) for row, h in zip(runs[0], hfb[b]["tokens"])]
print()
print(f"batched rows: greedy tokens identical to HF's for {sum(same)}/{len(same) * new} steps over all rows.")
print(f"threads: {threads}; {new} new tokens; experts: HF `{hf['experts_implementation']}`; greedy tokens identical "
      f"for {agree}/{new} steps.")
print(f"bandwidth limit: copy bandwidth {bw / 1e9:.1f} GB/s (read + write, 512 MiB numpy copy) / "
      f"{wbytes / 1e6:.1f} MB of f32 weights per decode step = {limit:.0f} tok/s.")
print(f"MTP speculative decoding (random weights): {sp['accepted']}/{sp['drafted']} drafts accepted "
      f"({sp['acceptance_rate']:.1%}), decode {sdec:.1f} tok/s = {sdec / dec:.2f}x plain.")
PY
