#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU and its driver (no CUDA toolkit needed: NVRTC is
# loaded at run time), build with `cuda`, run the model-core fixtures on CUDA (logits against the
# float64 goldens, routing against the CPU, per-expert / packed-kernel / FP8-in-memory forms), and
# time the FP8 block-scaled matmul against a bf16 matmul at DeepSeek-V3's shapes (TFLOP/s and
# error against float64). Prints the markdown rows that go into BENCHMARKS.md.
#
#   bash scripts/gpu-check.sh            # ~5-8 min to build on 16 cores, ~1 min to run
#
# Without a GPU the CUDA tests fail with one line ("backend cuda is not available: ...").
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
# Its own target dir: the cuda feature set must not rebuild the default build's.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/dsv3-target-cuda}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
cargo build --features cuda --bin dsv3 --tests
# Fixtures on CUDA (one test at a time: they share the GPU).
cargo test --features cuda --test integration -- --ignored --nocapture --test-threads=1 \
    kernels::cuda::
# The GPU machine's CPU (issue 12): Flex's matmul against float64 and the few-row kernel
# against it, on whichever `gemm` kernels that CPU picks (AVX-512 where it has AVX-512F; the
# test prints which), and the many-row product's GFLOP/s on its cores.
grep -o -m1 'avx512f' /proc/cpuinfo || echo "this CPU has no AVX-512F"
cargo test --features cuda --test integration -- --nocapture --test-threads=1 \
    kernels::flex_matmul_equals_float64 kernels::flex_thin_products
cargo bench --features cuda --bench kernels -- matmul
# The FP8 vs bf16 matmul timings (a bench, not a test; fails if the FP8 kernel's error >= 1e-5).
cargo bench --features cuda --bench kernels -- gpu-fp8-vs-bf16
# The same input on every backend this build has.
cargo run -q --features cuda --bin dsv3 -- compare --model tests/fixtures/tiny-qlora --backends flex,cuda
cargo run -q --features cuda --bin dsv3 -- compare --model tests/fixtures/tiny-fp8 --backends flex,cuda --weights fp8
# NCCL (feature nccl; libnccl is opened at run time): a communicator of one rank (one GPU holds
# one NCCL rank; its id goes over a world-of-one communicator, no MPI needed), its host-buffer
# collectives and the device-pointer calls on a Burn CUDA tensor. cudarc opens `libnccl.so` but
# NCCL (e.g. the nvidia-nccl-cu* wheel) installs `libnccl.so.2`: link it under that name into a
# folder on LD_LIBRARY_PATH.
nccl_lib="$(find / -path /proc -prune -o -name 'libnccl.so*' -type f -print 2>/dev/null | sort | head -n 1 || true)"
if [ -n "$nccl_lib" ]; then
    nccl_dir="$(mktemp -d)"
    ln -sf "$nccl_lib" "$nccl_dir/libnccl.so"
    ln -sf "$nccl_lib" "$nccl_dir/libnccl.so.2"
    echo "NCCL: $nccl_lib"
    LD_LIBRARY_PATH="$nccl_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        cargo test --features cuda,nccl --test integration -- --ignored --nocapture \
        --test-threads=1 nccl_one_rank
else
    echo "NCCL check FAILED to start: no libnccl.so* on this machine (pip install nvidia-nccl-cu12)"
fi
