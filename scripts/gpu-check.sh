#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU and its driver (no CUDA toolkit needed: NVRTC is
# loaded at run time), run
#   1. every CubeCL kernel against its CPU default, the model-core fixtures on CUDA (logits
#      against the float64 goldens, routing against the CPU, per-expert / packed-kernel /
#      FP8-in-memory forms) and NCCL in a world of one;
#   2. the same input on Flex and CUDA (`dsv3 compare`, f32 and FP8 weights);
#   3. the FP8 block-scaled matmul against a bf16 matmul at DeepSeek-V3's shapes (TFLOP/s, error
#      against float64);
#   4. FP8 training against bf16 (issue 13): `dsv3 train --backend cuda --preset small` (the
#      ~100M-class shape) for $STEPS steps at each precision, tokens/s and losses;
#   5. this machine's CPU (issue 12): Flex's products against float64 and the few-row kernel on
#      whichever `gemm` kernels the CPU picks (AVX-512 where it has AVX-512F), the many-row
#      product's GFLOP/s, and the model fixtures on Flex against their float64 goldens.
# Each step has its own time limit and a failed step does not stop the others; a summary with
# every step's exit status and time ends the output, and the logs and metrics land in $OUT_DIR.
#
#   bash scripts/gpu-check.sh                  # builds with cargo (features cuda,nccl) first
#   BIN_DIR=dir bash scripts/gpu-check.sh      # prebuilt dir/dsv3, dir/integration, dir/kernels
#                                              # (a GPU machine without a Rust toolchain)
#   STEPS=50 OUT_DIR=gpu-check-out             # the defaults
#   SKIP="cpu-products cpu-matmul cpu-fixtures" # steps to leave out, by name
#
# Prebuilt binaries: `cargo build --release --features cuda,nccl --bin dsv3 --bench kernels`
# and `cargo test --features cuda,nccl --no-run` (the `integration` test binary). The test
# binary finds the fixtures under the path it was built in (`CARGO_MANIFEST_DIR`): run it from
# a checkout at that path, or link one there.
# Without a GPU the CUDA steps fail with one line ("backend cuda is not available: ...").
set -uo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
STEPS="${STEPS:-50}"
OUT_DIR="${OUT_DIR:-gpu-check-out}"
mkdir -p "$OUT_DIR"

if [ -n "${BIN_DIR:-}" ]; then
    DSV3="$BIN_DIR/dsv3" ITEST="$BIN_DIR/integration" KBENCH="$BIN_DIR/kernels"
else
    # Its own target dir: the cuda feature set must not rebuild the default build's.
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/dsv3-target-cuda}"
    exe() { sed -n 's/^ *Executable .*(\(.*\))$/\1/p' | tail -n 1; }
    cargo build --release --features cuda,nccl --bin dsv3 || exit 1
    DSV3="$CARGO_TARGET_DIR/release/dsv3"
    ITEST="$(cargo test --features cuda,nccl --test integration --no-run 2>&1 | tee /dev/stderr | exe)"
    KBENCH="$(cargo bench --features cuda,nccl --bench kernels --no-run 2>&1 | tee /dev/stderr | exe)"
fi
for b in "$DSV3" "$ITEST" "$KBENCH"; do
    [ -x "$b" ] || { echo "error: no executable at '$b'"; exit 1; }
done

# NVRTC and NCCL are opened at run time by name (libnvrtc.so.<major>, libnccl.so); a CUDA
# image often has them only in a toolkit folder or in pip's nvidia-* wheels: put the first
# folder holding each on LD_LIBRARY_PATH, and link libnccl.so.2 under the name cudarc opens.
libs="$(mktemp -d)"
for name in 'libnvrtc.so*' 'libnccl.so*'; do
    found="$(find /usr /opt /lib /lib64 -name "$name" \( -type f -o -type l \) 2>/dev/null |
        grep -v stub | sort | head -n 1)"
    if [ -n "$found" ]; then
        echo "found $found"
        LD_LIBRARY_PATH="$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        case "$name" in libnccl*) ln -sf "$found" "$libs/libnccl.so" ;; esac
    else
        echo "no $name on this machine"
    fi
done
export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"

summary=()
# step NAME SECONDS COMMAND...: runs COMMAND under a time limit, output to the terminal and
# $OUT_DIR/NAME.log; records its exit status and wall time.
step() {
    local name=$1 secs=$2 start rc
    shift 2
    case " ${SKIP:-} " in *" $name "*) return ;; esac
    echo "=== $name"
    start=$(date +%s%N)
    timeout "$secs" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    rc=${PIPESTATUS[0]}
    summary+=("$(printf '%-16s exit %3s  %5d s' "$name" "$rc" $((($(date +%s%N) - start) / 1000000000)))")
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
lscpu | grep -E 'Model name|^CPU\(s\)' || true
grep -o -m1 'avx512f' /proc/cpuinfo || echo "this CPU has no AVX-512F"

# 1. The kernels and fixtures on CUDA, NCCL in a world of one (one test at a time: they share
#    the GPU).
step cuda-tests 90 "$ITEST" --ignored --nocapture --test-threads=1 kernels::cuda::
# 2. The same input on every backend this build has.
step compare-f32 60 "$DSV3" compare --model tests/fixtures/tiny-qlora --backends flex,cuda
step compare-fp8 60 "$DSV3" compare --model tests/fixtures/tiny-fp8 --backends flex,cuda --weights fp8
# 3. The FP8 vs bf16 matmul timings (fails if the FP8 kernel's error >= 1e-5).
step fp8-matmul 90 "$KBENCH" --bench gpu-fp8-vs-bf16
# 4. FP8 against bf16 training on the GPU, same seed, data and steps.
for p in bf16 fp8; do
    rm -rf "$OUT_DIR/train-$p"
    step "train-$p" 240 "$DSV3" train --backend cuda --preset small --precision "$p" --steps "$STEPS" \
        --seed 0 --log-every 5 --eval-every "$STEPS" --checkpoint-every 0 --samples 0 \
        --out "$OUT_DIR/train-$p"
done
# 5. The CPU's products (AVX-512 where the CPU has it; the tests print which kernels ran).
step cpu-products 60 "$ITEST" --nocapture --test-threads=1 kernels::flex_matmul_equals_float64 \
    kernels::flex_thin_products kernels::flex_row_blocked_products kernels::linear_autodiff_node
step cpu-matmul 45 "$KBENCH" --bench matmul
# ...and the model fixtures on Flex against their float64 goldens on that CPU's kernels.
step cpu-fixtures 180 "$ITEST" --test-threads=4 model::golden:: infer::cache:: infer::generate:: \
    files::configs::

echo "=== summary"
printf '%s\n' "${summary[@]}" | tee "$OUT_DIR/summary.txt"
for p in bf16 fp8; do
    [ -f "$OUT_DIR/train-$p/metrics.jsonl" ] && cp "$OUT_DIR/train-$p/metrics.jsonl" "$OUT_DIR/metrics-$p.jsonl"
done
exit 0
