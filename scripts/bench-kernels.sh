#!/usr/bin/env bash
# Timing runs of the backend extension's operations, printed as the tables in BENCHMARKS.md:
#   fp8-bytes     FP8-in-memory bytes against bf16 at DeepSeek-V3's Linear shapes
#   moe-experts   one MoE layer with 16 vs 256 routed experts (per-expert, packed, wgpu kernels)
#   few-rows      decode products at 1-16 rows: the few-row kernel vs Flex matmul (not in the default)
#   matmul        prefill/training products (many rows): Flex matmul GFLOP/s (not in the default)
#   absorbed      decode's absorbed attention operation by operation, and other forms (not in the default)
#   pool-wakeup   rayon::join on a two-thread pool after a serial stretch vs one thread (not in the default)
#   gpu-fp8-vs-bf16  FP8 block matmul vs bf16 matmul on CUDA (needs a GPU; see gpu-check.sh)
#
#   bash scripts/bench-kernels.sh [NAME...]     # default: fp8-bytes moe-experts
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
cargo bench --features wgpu,cuda,mpi,nccl --bench kernels -- ${@:-fp8-bytes moe-experts}
