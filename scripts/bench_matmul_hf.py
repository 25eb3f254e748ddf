"""The many-row f32 products of `bench-kernels.sh matmul`, timed in PyTorch (what HF transformers
runs on) and, where the system has it, OpenBLAS (`libopenblas.so.0`, through its C interface),
on the same threads: `python3 scripts/bench_matmul_hf.py THREADS`. Prints GFLOP/s, best of 7."""

import ctypes
import sys
import time

import numpy as np
import torch

SHAPES = [(512, 512, 8000), (512, 512, 1408), (512, 192, 512), (2048, 192, 576)]


def best(f, runs=7):
    f()
    t = []
    for _ in range(runs):
        s = time.perf_counter()
        f()
        t.append(time.perf_counter() - s)
    return min(t)


def main():
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    torch.set_num_threads(threads)
    try:
        blas = ctypes.CDLL("libopenblas.so.0")
        blas.openblas_set_num_threads(threads)
    except OSError:
        blas = None
    print(f"| M×K×N | PyTorch {torch.__version__} GFLOP/s | OpenBLAS GFLOP/s | threads |")
    print("|---|---|---|---|")
    for m, k, n in SHAPES:
        a = np.random.rand(m, k).astype(np.float32)
        b = np.random.rand(k, n).astype(np.float32)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        flops = 2 * m * k * n
        t_torch = best(lambda: ta @ tb)
        ob = "-"
        if blas is not None:
            c = np.zeros((m, n), np.float32)
            p = ctypes.c_void_p
            one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)

            def run():
                # RowMajor, NoTrans, NoTrans
                blas.cblas_sgemm(101, 111, 111, m, n, k, one, a.ctypes.data_as(p), k,
                                 b.ctypes.data_as(p), n, zero, c.ctypes.data_as(p), n)

            ob = f"{flops / best(run) / 1e9:.1f}"
            assert np.allclose(c, a @ b, rtol=1e-3)
        print(f"| {m}×{k}×{n} | {flops / t_torch / 1e9:.1f} | {ob} | {threads} |")


if __name__ == "__main__":
    main()
