//! The backend extension: the plain-tensor defaults against host references, and (feature
//! `wgpu`) every CubeCL kernel against its default plus the model fixtures on wgpu; the fixtures
//! on CUDA where a GPU is lent (`scripts/gpu-check.sh`).

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use dsv3_backends::{e4m3, DsBackend, Fp8Weight, GroupedWeight};
use dsv3_model::{load_with, LoadOptions, WeightOptions, WeightStorage};

use crate::common::*;
use crate::model::weight_forms::{load_fixture_with, logits_of};

/// Flex's few-row paths (decode batches, MTP verification): one row equals the plain matmul
/// bit for bit; every row of an `m`-row product through the kernel (m ≤ 4 with f32 weights, at
/// widths that split over the pool unevenly and leave a column tail) equals that row multiplied
/// alone, bit for bit, so such a batch decodes exactly what each prompt decodes alone; every
/// `m ≤ 16` (kernel or columns split over the pool) equals a float64
/// product to f32 accumulation error (701 terms of unit normals: |error| ≤ k·2⁻²⁴·Σ|x·w|, well
/// under 1e-4·(1 + Σ|x·w|)). Small and column-narrowed weights agree to f32 rounding; with bf16
/// weights the kernel equals the product with the widened weights; `par_map` keeps the order of
/// its items.
#[test]
fn flex_thin_products_and_par_map_are_exact() {
    let mut rng = Rng::new(41);
    let (k, n) = (701, 1013); // k·n above the split threshold (2^19)
    let wv = rng.normal_vec(k * n, 1.0);
    let w = tensor2(wv.clone(), [k, n]);
    let x16 = rng.normal_vec(16 * k, 1.0);
    let alone = one_by_one(&x16, k, 16, &w);
    // The one-row kernel sums in the order of `gemm`'s AVX2 + FMA kernels, so it equals Flex's
    // matmul bit for bit where those run; on an AVX-512 CPU `gemm` sums in 16 lanes and the two
    // agree to f32 rounding (the float64 checks below hold either way).
    let plain = f32s(tensor2(x16[..k].to_vec(), [1, k]).matmul(w.clone()));
    let bitwise = !gemm_uses_avx512();
    let agree = |a: &[f32], b: &[f32]| {
        a.iter().zip(b).all(|(a, b)| {
            if bitwise {
                a.to_bits() == b.to_bits()
            } else {
                (a - b).abs() <= 1e-5 * (1.0 + a.abs())
            }
        })
    };
    assert!(
        agree(&plain, &alone[0]),
        "one row: max |Δ| {}",
        max_diff(&plain, &alone[0])
    );
    for m in [2, 3, 4, 5, 7, 8, 13, 16] {
        let x = tensor2(x16[..m * k].to_vec(), [m, k]);
        let got = f32s(B::dense_matmul(x, w.clone()));
        assert_eq!(got.len(), m * n);
        for (r, (row, want)) in got.chunks(n).zip(&alone).enumerate() {
            if m <= 4 {
                let same = row
                    .iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "m = {m}, row {r}: max |Δ| {}", max_diff(row, want));
            }
            for c in (0..n).step_by(97).chain([n - 1]) {
                let (mut exact, mut mag) = (0f64, 0f64);
                for i in 0..k {
                    let t = x16[r * k + i] as f64 * wv[i * n + c] as f64;
                    exact += t;
                    mag += t.abs();
                }
                let err = (row[c] as f64 - exact).abs();
                assert!(
                    err <= 1e-4 * (1.0 + mag),
                    "m = {m}, [{r}, {c}]: {} vs {exact}",
                    row[c]
                );
            }
        }
    }
    // Small (one thread) and column-narrowed (row stride > width) weights, and k = 0.
    for (k, n, first, width) in [(37, 53, 0, 53), (301, 517, 9, 200), (0, 5, 0, 5)] {
        let w = tensor2(rng.normal_vec(k * n, 1.0), [k, n]).narrow(1, first, width);
        let x = tensor2(rng.normal_vec(k, 1.0), [1, k]);
        let plain = f32s(x.clone().matmul(w.clone()));
        let ours = f32s(B::dense_matmul(x, w));
        assert_eq!(plain.len(), width);
        assert!(
            plain
                .iter()
                .zip(&ours)
                .all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + a.abs())),
            "k = {k}, n = {n}: max |Δ| {}",
            max_diff(&plain, &ours)
        );
    }
    // bf16 weights (widened as they are read) equal the product with the widened weights.
    for (k, n, first, width) in [(701, 1013, 0, 1013), (37, 53, 3, 41)] {
        let w = tensor2(rng.normal_vec(k * n, 1.0), [k, n])
            .cast(burn::tensor::DType::BF16)
            .narrow(1, first, width);
        let x = tensor2(rng.normal_vec(k, 1.0), [1, k]);
        let plain = f32s(x.clone().matmul(w.clone().cast(burn::tensor::DType::F32)));
        let ours = f32s(B::dense_matmul(x.clone(), w.clone()));
        // Two rows of bf16 weights: each equals its row alone.
        let two = f32s(B::dense_matmul(Tensor::cat(vec![x.clone(), x], 0), w));
        assert!(two
            .chunks(width)
            .all(|r| r.iter().zip(&ours).all(|(a, b)| a.to_bits() == b.to_bits())));
        assert!(
            agree(&plain, &ours),
            "bf16 k = {k}: max |Δ| {}",
            max_diff(&plain, &ours)
        );
    }
    // Weights held as `[N, K]` rows and viewed transposed (BF16 Linear weights used where they
    // lie in the checkpoint's memory map), f32 and bf16: every m (≤ 16 bf16 / ≤ 4 f32 rows
    // through the dot-product kernel, the rest through the general path) equals a float64
    // product of the (widened) weights within f32 accumulation error, and in the kernel each
    // row of a batch equals that row alone, bit for bit.
    for (k, n, bf) in [
        (701, 1013, true),
        (701, 1013, false),
        (37, 53, true),
        (9, 3, true),
    ] {
        let rows = tensor2(rng.normal_vec(n * k, 1.0), [n, k]);
        let rows = if bf {
            rows.cast(burn::tensor::DType::BF16)
        } else {
            rows
        };
        let wide = f32s(rows.clone().cast(burn::tensor::DType::F32)); // [n, k]
        let w = rows.transpose(); // [k, n], strides [1, k]
        let x40 = rng.normal_vec(40 * k, 1.0);
        let alone = one_by_one(&x40, k, 16, &w);
        let w64 = transpose(&wide.iter().map(|&v| v as f64).collect::<Vec<_>>(), n, k);
        for m in [1, 2, 5, 16, 40] {
            let got = f32s(B::dense_matmul(
                tensor2(x40[..m * k].to_vec(), [m, k]),
                w.clone(),
            ));
            assert_eq!(got.len(), m * n);
            let x64: Vec<f64> = x40[..m * k].iter().map(|&v| v as f64).collect();
            let (want, mag) = host_matmul(&x64, &w64, m, k, n);
            assert_within_accumulation(
                &format!("[{n}, {k}]ᵀ bf16 {bf} m = {m}"),
                &got,
                &want,
                &mag,
                k,
            );
            // The kernel takes up to 16 rows of bf16 weights and 4 of f32 (above, the general
            // path's sums run in another order).
            if m <= if bf { 16 } else { 4 } {
                for (r, row) in got.chunks(n).enumerate() {
                    let same = row
                        .iter()
                        .zip(&alone[r])
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "transposed, m = {m}, row {r}: max |Δ| {}",
                        max_diff(row, &alone[r])
                    );
                }
            }
        }
    }
    let squares = B::par_map((0..100u64).collect(), |i| i * i);
    assert_eq!(squares, (0..100u64).map(|i| i * i).collect::<Vec<_>>());
}

/// Flex's matmul, the product under prefill and training, equals a float64 product within f32
/// accumulation error on whichever kernel family the `gemm` crate picks on this CPU (AVX-512
/// where the CPU has it — the workspace builds `gemm`'s `x86-v4` kernels —, AVX2 + FMA
/// otherwise): so the two families agree with each other within twice that bound. Shapes are
/// not multiples of the kernels' tiles: the packed path (many rows), one row (gemv), one column,
/// a transposed (strided) right operand as the autodiff backward passes it, and k = 1.
#[test]
fn flex_matmul_equals_float64_on_either_kernel_family() {
    println!(
        "gemm kernels on this CPU: {}",
        if gemm_uses_avx512() {
            "AVX-512 (x86-v4)"
        } else {
            "AVX2 + FMA or scalar"
        }
    );
    let mut rng = Rng::new(43);
    for (m, k, n) in [
        (333, 517, 259),
        (1, 701, 1013),
        (77, 130, 1),
        (130, 1, 67),
        (520, 192, 576),
    ] {
        let a = rng.normal_vec(m * k, 1.0);
        let b = rng.normal_vec(k * n, 1.0);
        let a64: Vec<f64> = a.iter().map(|&v| v as f64).collect();
        let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
        let (want, mag) = host_matmul(&a64, &b64, m, k, n);
        let got = f32s(tensor2(a, [m, k]).matmul(tensor2(b.clone(), [k, n])));
        assert_within_accumulation(&format!("{m}x{k}x{n}"), &got, &want, &mag, k);
        // The same right operand stored as its transpose and viewed back ([n, k] → [k, n]).
        let bt: Vec<f32> = transpose(&b64, k, n).iter().map(|&v| v as f32).collect();
        let a = tensor2(a64.iter().map(|&v| v as f32).collect(), [m, k]);
        let got_t = f32s(a.matmul(tensor2(bt, [n, k]).transpose()));
        assert_within_accumulation(
            &format!("{m}x{k}x{n} (rhs strided)"),
            &got_t,
            &want,
            &mag,
            k,
        );
    }
}

/// Many-row `DsBackend::dense_matmul` on Flex (with two or more threads: row blocks of 128 as
/// single-threaded `gemm` jobs on the pool) equals Flex's matmul bit for bit — the blocks change
/// the schedule, not any output's sum — and is within the f32 accumulation bound of a float64
/// product; on 1 and 3 threads, with the right operand transposed (the input gradient's
/// `dy · wᵀ`) and the left one (the weight gradient's `xᵀ · dy`), at shapes whose row counts are
/// not multiples of the block (257: one row more than two blocks, which a block of its own would
/// send through `gemm`'s matrix-vector path, in another order). Also as one of three training
/// workers on three threads (`DsBackend::as_worker`: a share of one thread, each product one
/// `gemm` call on the caller's thread), where `parallel_jobs` reads 1 until the worker returns.
#[test]
fn flex_row_blocked_products_equal_flex_matmul() {
    let mut rng = Rng::new(44);
    for (m, k, n) in [
        (333, 517, 259),
        (520, 192, 576),
        (257, 192, 576),
        (1001, 64, 131),
    ] {
        let a = rng.normal_vec(m * k, 1.0);
        let b = rng.normal_vec(k * n, 1.0);
        let a64: Vec<f64> = a.iter().map(|&v| v as f64).collect();
        let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
        let (want, mag) = host_matmul(&a64, &b64, m, k, n);
        let narrow = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<_>>();
        let (at, bt) = (narrow(transpose(&a64, m, k)), narrow(transpose(&b64, k, n)));
        let run = || {
            [
                (tensor2(a.clone(), [m, k]), tensor2(b.clone(), [k, n])),
                (
                    tensor2(a.clone(), [m, k]),
                    tensor2(bt.clone(), [n, k]).transpose(),
                ),
                (
                    tensor2(at.clone(), [k, m]).transpose(),
                    tensor2(b.clone(), [k, n]),
                ),
            ]
            .map(|(x, w)| {
                (
                    f32s(B::dense_matmul(x.clone(), w.clone())),
                    f32s(x.matmul(w)),
                )
            })
        };
        let pool = |t| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let one = pool(1).install(run);
        let three = pool(3).install(run);
        let worker = pool(3).install(|| {
            let r = B::as_worker(3, || {
                assert_eq!(
                    B::parallel_jobs(),
                    1,
                    "a worker's share of 3 threads over 3"
                );
                run()
            });
            assert_eq!(B::parallel_jobs(), 3, "the share ends with the worker");
            r
        });
        for (i, what) in ["plain", "rhs strided", "lhs strided"].iter().enumerate() {
            let case = format!("{m}x{k}x{n} {what}");
            for (threads, (got, flex)) in [
                ("1 thread", &one[i]),
                ("3 threads", &three[i]),
                ("a worker on 3 threads", &worker[i]),
            ] {
                assert!(
                    bits(got) == bits(flex),
                    "{case}, {threads}: dense_matmul differs from Flex's matmul (max {})",
                    max_diff(got, flex)
                );
                assert_within_accumulation(&case, got, &want, &mag, k);
            }
            assert!(
                bits(&one[i].0) == bits(&three[i].0),
                "{case}: 1 and 3 threads differ"
            );
        }
    }
}

/// The float Linear's autodiff node (`DsBackend::dense_matmul` under `Autodiff`: the forward
/// and both gradient products through Flex's `dense_matmul`) gives the value and gradients of
/// autodiff through Burn's matmul, bit for bit, on 3 threads (so through the row blocks), at a
/// shape that is no multiple of the kernels' tiles.
#[test]
fn linear_autodiff_node_equals_autodiff_through_matmul() {
    type A = dsv3_backends::CpuAutodiff;
    let (m, k, n) = (300, 193, 131);
    let mut rng = Rng::new(45);
    let (x, w, r) = (
        rng.normal_vec(m * k, 1.0),
        rng.normal_vec(k * n, 0.1),
        rng.normal_vec(m * n, 1.0),
    );
    let run = |node: bool| {
        let t = |v: &Vec<f32>, s: [usize; 2]| {
            Tensor::<A, 2>::from_data(TensorData::new(v.clone(), s), &device())
        };
        let (xt, wt) = (t(&x, [m, k]).require_grad(), t(&w, [k, n]).require_grad());
        let y = if node {
            A::dense_matmul(xt.clone(), wt.clone())
        } else {
            xt.clone().matmul(wt.clone())
        };
        let grads = (y.clone() * t(&r, [m, n])).sum().backward();
        [
            f32s(y),
            f32s(xt.grad(&grads).unwrap()),
            f32s(wt.grad(&grads).unwrap()),
        ]
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    let (got, want) = pool.install(|| (run(true), run(false)));
    for (what, (g, w)) in ["y", "dL/dx", "dL/dw"].iter().zip(got.iter().zip(&want)) {
        let same = g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "{what}: node differs from autodiff through matmul (max {})",
            max_diff(g, w)
        );
    }
}

/// The plain-tensor dequantizer equals the loader's host dequantization bit for bit, with
/// partial edge blocks on both axes.
#[test]
fn fp8_weight_dequantize_is_bit_exact() {
    let mut rng = Rng::new(7);
    let (e, n, k, b) = (2, 200, 300, 128);
    let (w, codes, scales) = random_fp8::<B>(&mut rng, [e, n, k], b, &device());
    let got = f32s(w.dequantize());
    let per = n.div_ceil(b) * k.div_ceil(b);
    for x in 0..e {
        let want = dsv3_model::fp8::dequantize_blocks(
            &codes[x * n * k..(x + 1) * n * k],
            n,
            k,
            &scales[x * per..(x + 1) * per],
            b,
            false,
        )
        .unwrap();
        for (i, (g, w)) in got[x * n * k..(x + 1) * n * k]
            .iter()
            .zip(&want)
            .enumerate()
        {
            assert_eq!(g.to_bits(), w.to_bits(), "expert {x} element {i}");
        }
    }
    assert_eq!(w.bytes(), e * n * k.div_ceil(4) * 4 + e * per * 4);
}

/// The activation quantizer equals the host encoder: the default (plain tensor ops, which
/// `Autodiff<Flex>` runs) and Flex's host path.
#[test]
fn fp8_quantize_default_matches_host_encoder() {
    type AB = burn::backend::Autodiff<B>;
    let mut rng = Rng::new(11);
    let (m, k, block) = (7, 300, 128);
    let x = rng.normal_vec(m * k, 3.0);
    for (ue8m0, default) in [(false, true), (true, true), (false, false), (true, false)] {
        let q = if default {
            let q = <AB as DsBackend>::fp8_quantize(
                Tensor::<AB, 2>::from_data(TensorData::new(x.clone(), [m, k]), &device()),
                block,
                ue8m0,
            );
            dsv3_backends::Fp8Activations::<B> {
                codes: q.codes.inner(),
                scales: q.scales.inner(),
                cols: q.cols,
                block: q.block,
            }
        } else {
            <B as DsBackend>::fp8_quantize(tensor2(x.clone(), [m, k]), block, ue8m0)
        };
        let scales = f32s(q.scales.clone());
        let codes: Vec<u8> = {
            let words: Vec<i32> = ints(q.codes.clone()).iter().map(|&v| v as i32).collect();
            e4m3::unpack(&words, m, k)
        };
        let t = k.div_ceil(block);
        for r in 0..m {
            for tile in 0..t {
                let span = &x[r * k + tile * block..r * k + ((tile + 1) * block).min(k)];
                let amax = span.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-4);
                let mut s = amax / 448.0;
                if ue8m0 {
                    s = e4m3::ceil_pow2(s);
                }
                assert_eq!(scales[r * t + tile], s, "row {r} tile {tile}");
                for (j, v) in span.iter().enumerate() {
                    let c = codes[r * k + tile * block + j];
                    assert_eq!(c, e4m3::encode(v / s), "row {r} col {}", tile * block + j);
                }
            }
        }
        // Dequantized values are within half an e4m3 step (relative 2^-4) of the input.
        let back = f32s(q.dequantize());
        for (a, b) in back.iter().zip(&x) {
            assert!((a - b).abs() <= b.abs() / 16.0 + 1e-3, "{a} vs {b}");
        }
    }
}

/// Host FP8 quantization of `x: [rows, cols]` (row-major) in `tr × tc` tiles (1×128 activation
/// tiles, 128×1 for the weight gradient, 128×128 weight blocks), partial edge tiles included:
/// per tile `s = max(amax, 1e-4) / 448` (rounded up to a power of two with `pow2`), value
/// `decode(encode(v / s)) · s` (the f32 product, as the operands are dequantized). Uses only the host codec (`e4m3::encode` /
/// `decode`, checked against torch), not the tensor code under test.
pub(crate) fn host_fp8(
    x: &[f32],
    [rows, cols]: [usize; 2],
    [tr, tc]: [usize; 2],
    pow2: bool,
) -> Vec<f64> {
    let mut out = vec![0f64; rows * cols];
    for r0 in (0..rows).step_by(tr) {
        for c0 in (0..cols).step_by(tc) {
            let (r1, c1) = ((r0 + tr).min(rows), (c0 + tc).min(cols));
            let mut amax = 0f32;
            for r in r0..r1 {
                for c in c0..c1 {
                    amax = amax.max(x[r * cols + c].abs());
                }
            }
            let mut s = amax.max(1e-4) / 448.0;
            if pow2 {
                s = e4m3::ceil_pow2(s);
            }
            for r in r0..r1 {
                for c in c0..c1 {
                    let code = e4m3::encode(x[r * cols + c] / s);
                    out[r * cols + c] = (e4m3::decode(code) * s) as f64; // f32 product, as dequantized
                }
            }
        }
    }
    out
}

/// Round to nearest even to bf16 and back (host bit arithmetic; finite inputs).
pub(crate) fn host_bf16(x: f32) -> f64 {
    let b = x.to_bits();
    let r = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000;
    f32::from_bits(r) as f64
}

/// The first `rows` rows of `x [·, k]`, each multiplied by `w` alone (one-row products).
fn one_by_one(x: &[f32], k: usize, rows: usize, w: &Tensor<B, 2>) -> Vec<Vec<f32>> {
    (0..rows)
        .map(|r| {
            f32s(B::dense_matmul(
                tensor2(x[r * k..(r + 1) * k].to_vec(), [1, k]),
                w.clone(),
            ))
        })
        .collect()
}

/// `a [m, k] · b [k, n]` in float64 with, per output, `Σ |a·b|` (the scale of f32's
/// accumulation error).
pub(crate) fn host_matmul(
    a: &[f64],
    b: &[f64],
    m: usize,
    k: usize,
    n: usize,
) -> (Vec<f64>, Vec<f64>) {
    let (mut y, mut mag) = (vec![0f64; m * n], vec![0f64; m * n]);
    for i in 0..m {
        for p in 0..k {
            let av = a[i * k + p];
            for j in 0..n {
                let t = av * b[p * n + j];
                y[i * n + j] += t;
                mag[i * n + j] += t.abs();
            }
        }
    }
    (y, mag)
}

pub(crate) fn transpose(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut t = vec![0f64; a.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = a[r * cols + c];
        }
    }
    t
}

/// Asserts `got` equals the float64 `want` within f32 accumulation error: a sum of `k`
/// products rounded in f32 is off by at most `k · 2^-24 · Σ |terms|` (the standard bound
/// γ_k = k·u for recursive summation; blocked or FMA sums stay inside it), plus 2^-24 ·|want|
/// for the final rounding. Operands that were quantized differently by even one e4m3 step
/// (relative 2^-4) would miss this by orders of magnitude.
fn assert_within_accumulation(what: &str, got: &[f32], want: &[f64], mag: &[f64], k: usize) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let u = 2f64.powi(-24);
    let mut worst = 0f64;
    for (i, ((g, w), m)) in got.iter().zip(want).zip(mag).enumerate() {
        let tol = (k as f64 + 1.0) * u * m + 1e-30;
        let err = (*g as f64 - w).abs();
        assert!(
            err <= tol,
            "{what}[{i}]: {g} vs float64 {w} (|Δ| {err:.3e} > {tol:.3e})"
        );
        worst = worst.max(err / tol);
    }
    println!("{what}: worst error {worst:.3} of the accumulation bound");
}

/// The three training GEMMs of the low-precision Linear (forward, input gradient, weight
/// gradient), run through `Autodiff<Flex>` with the custom backward, equal the float64
/// products of the exactly dequantized operands: FP8 with 1×128 tiles along each GEMM's
/// reduction dimension and 128×128 weight blocks (amax and power-of-two scales), and bf16. Dims
/// are not multiples of 128 (partial tiles and blocks); rows span 2^-3..2^3 in magnitude, one
/// row is zero (its tiles' scales clip) and one tiny value underflows; the FP8 counters add up.
#[test]
fn quantized_linear_gemms_equal_float64_of_dequantized_operands() {
    use dsv3_backends::{GemmPrecision, QuantCounters, QuantGemm};
    type AB = burn::backend::Autodiff<B>;
    let mut rng = Rng::new(131);
    let (m, k, n) = (200, 300, 150);
    let mut x = rng.normal_vec(m * k, 1.0);
    for r in 0..m {
        let f = 2f32.powi((r % 7) as i32 - 3);
        x[r * k..(r + 1) * k].iter_mut().for_each(|v| *v *= f);
    }
    x[5 * k..6 * k].iter_mut().for_each(|v| *v = 0.0); // row 5: three clipped tiles
    x[7 * k + 3] = 1e-9; // flushed to zero next to values of order 1
    let w = rng.normal_vec(k * n, 0.05);
    let dy = rng.normal_vec(m * n, 1e-3);
    let precisions = [
        GemmPrecision::Fp8 { pow2_scales: false },
        GemmPrecision::Fp8 { pow2_scales: true },
        GemmPrecision::Bf16,
    ];
    for precision in precisions {
        let counters = std::sync::Arc::new(QuantCounters::default());
        let gemm = QuantGemm {
            precision,
            counters: Some(counters.clone()),
        };
        let dev = device();
        let xt =
            Tensor::<AB, 2>::from_data(TensorData::new(x.clone(), [m, k]), &dev).require_grad();
        let wt =
            Tensor::<AB, 2>::from_data(TensorData::new(w.clone(), [k, n]), &dev).require_grad();
        let dyt = Tensor::<AB, 2>::from_data(TensorData::new(dy.clone(), [m, n]), &dev);
        let y = <AB as DsBackend>::quantized_linear(xt.clone(), wt.clone(), &gemm);
        let grads = (y.clone() * dyt).sum().backward();
        let (gx, gw) = (xt.grad(&grads).unwrap(), wt.grad(&grads).unwrap());
        let y = f32s(y.inner());
        let (gx, gw) = (f32s(gx), f32s(gw));

        // Operands as each GEMM takes them.
        let (xq, wq, dy_rows, xt_cols, dy_cols) = match precision {
            GemmPrecision::Fp8 { pow2_scales: p } => {
                let xq = host_fp8(&x, [m, k], [1, 128], p);
                let x1: Vec<f32> = xq.iter().map(|&v| v as f32).collect(); // exact
                (
                    xq,
                    host_fp8(&w, [k, n], [128, 128], p),
                    host_fp8(&dy, [m, n], [1, 128], p),
                    host_fp8(&x1, [m, k], [128, 1], p),
                    host_fp8(&dy, [m, n], [128, 1], p),
                )
            }
            GemmPrecision::Bf16 => {
                let r = |v: &[f32]| v.iter().map(|&a| host_bf16(a)).collect::<Vec<_>>();
                (r(&x), r(&w), r(&dy), r(&x), r(&dy))
            }
        };
        let (y_ref, y_mag) = host_matmul(&xq, &wq, m, k, n);
        assert_within_accumulation(&format!("{precision:?} forward"), &y, &y_ref, &y_mag, k);
        let (dx_ref, dx_mag) = host_matmul(&dy_rows, &transpose(&wq, k, n), m, n, k);
        assert_within_accumulation(&format!("{precision:?} dgrad"), &gx, &dx_ref, &dx_mag, n);
        let (dw_ref, dw_mag) = host_matmul(&transpose(&xt_cols, m, k), &dy_cols, k, m, n);
        assert_within_accumulation(&format!("{precision:?} wgrad"), &gw, &dw_ref, &dw_mag, m);

        let c = counters.snapshot();
        match precision {
            GemmPrecision::Fp8 { .. } => {
                // x, w; dy by rows (dgrad); xᵀ and dyᵀ by rows (wgrad).
                assert_eq!(c.values as usize, m * k + k * n + m * n + k * m + n * m);
                let tiles = m * 3 + 3 * 2 + m * 2 + k * 2 + n * 2;
                assert_eq!(c.tiles as usize, tiles);
                assert_eq!(c.clipped_tiles, 3, "the zero row's three tiles");
                assert_eq!(c.overflow, 0);
                assert!(
                    (1..50).contains(&c.underflow),
                    "the planted 1e-9 and at most a few far-below-amax values: {}",
                    c.underflow
                );
            }
            GemmPrecision::Bf16 => assert_eq!(c, Default::default(), "bf16 counts nothing"),
        }
    }
}

/// Flex's host paths for the training GEMMs' rounding (FP8 tiles with their counts, FP8 blocks,
/// dequantization, bf16) equal the plain-tensor defaults (run by `Autodiff<Flex>`), on values
/// with zeros, a tile below the 1e-4 floor and an underflow; both count non-finite values.
#[test]
fn flex_rounding_paths_equal_defaults() {
    type AB = burn::backend::Autodiff<B>;
    let ad = |v: &[f32], shape: [usize; 2]| {
        Tensor::<AB, 2>::from_data(TensorData::new(v.to_vec(), shape), &device())
    };
    let mut rng = Rng::new(23);
    let (m, k) = (9, 300);
    let mut x = rng.normal_vec(m * k, 2.0);
    x[..128].iter_mut().for_each(|v| *v *= 1e-6); // a clipped tile
    x[200] = 0.0;
    x[400] = 1e-12; // underflows
    let mut bad = x.clone();
    bad[500] = f32::INFINITY;
    bad[600] = f32::NAN;
    // Non-finite values are counted as overflows by both (their tiles' codes are not
    // compared: a step with them is rejected anyway).
    let (_, cf) = <B as DsBackend>::fp8_quantize_counted(tensor2(bad.clone(), [m, k]), 128, false);
    let (_, cd) = <AB as DsBackend>::fp8_quantize_counted(ad(&bad, [m, k]), 128, false);
    assert_eq!((cf.overflow, cd.overflow), (2, 2));
    for pow2 in [false, true] {
        let (qf, cf) =
            <B as DsBackend>::fp8_quantize_counted(tensor2(x.clone(), [m, k]), 128, pow2);
        let (qd, cd) = <AB as DsBackend>::fp8_quantize_counted(ad(&x, [m, k]), 128, pow2);
        assert_eq!(
            ints(qf.codes.clone()),
            ints(qd.codes.clone().inner()),
            "codes"
        );
        assert_eq!(
            f32s(qf.scales.clone()),
            f32s(qd.scales.clone().inner()),
            "scales"
        );
        assert_eq!(cf, cd, "counts");
        assert_eq!((cf.clipped_tiles, cf.overflow), (1, 0), "{cf:?}");
        assert!(cf.underflow >= 1);
        let (df, dd) = (
            f32s(<B as DsBackend>::fp8_dequantize(&qf)),
            f32s(<AB as DsBackend>::fp8_dequantize(&qd)),
        );
        let same = df
            .iter()
            .zip(&dd)
            .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
        assert!(same, "dequantized rows");
    }
    // Weights: finite values (a block below the floor included).
    let (n, k) = (200, 300);
    let mut w = rng.normal_vec(n * k, 0.05);
    for r in 128..200 {
        w[r * k..r * k + 128].iter_mut().for_each(|v| *v *= 1e-5);
    }
    for pow2 in [false, true] {
        let (qf, cf) =
            <B as DsBackend>::fp8_quantize_weight(tensor2(w.clone(), [n, k]), 128, pow2, true);
        let (qd, cd) = <AB as DsBackend>::fp8_quantize_weight(ad(&w, [n, k]), 128, pow2, true);
        assert_eq!(
            ints(qf.codes.clone()),
            ints(qd.codes.clone().inner()),
            "weight codes"
        );
        assert_eq!(
            f32s(qf.scales.clone()),
            f32s(qd.scales.clone().inner()),
            "weight scales"
        );
        assert_eq!(cf, cd, "weight counts");
        assert_eq!(cf.clipped_tiles, 1);
        assert_eq!(
            f32s(<B as DsBackend>::fp8_dequantize_weight(&qf)),
            f32s(<AB as DsBackend>::fp8_dequantize_weight(&qd)),
            "dequantized weights"
        );
    }
    // bf16, with values just above a tie (where a cast through f64 by `half` misrounds).
    let mut v = rng.normal_vec(4096, 1.0);
    v.push(f32::from_bits(0x3F80_8001)); // 1 + 2^-8 + 2^-23: rounds up
    v.push(f32::from_bits(0x3F80_8000)); // exact tie: to even (1.0)
    let len = v.len();
    let rf = f32s(<B as DsBackend>::round_bf16(tensor2(v.clone(), [1, len])));
    let rd = f32s(<AB as DsBackend>::round_bf16(ad(&v, [1, len])));
    assert_eq!(rf, rd);
    let want: Vec<f32> = v.iter().map(|&a| host_bf16(a) as f32).collect();
    assert_eq!(rf, want);
    assert_eq!(rf[len - 2].to_bits(), 0x3F81_0000);
    assert_eq!(rf[len - 1].to_bits(), 0x3F80_0000);
}

/// The block quantizer of weights (plain tensor ops) equals the host encoder on a matrix with
/// partial blocks in both directions, with amax and power-of-two scales.
#[test]
fn fp8_weight_quantize_matches_host_encoder() {
    let mut rng = Rng::new(17);
    let (n, k) = (200, 300);
    let w = rng.normal_vec(n * k, 0.1);
    for pow2 in [false, true] {
        let q = Fp8Weight::<B>::quantize(tensor2(w.clone(), [n, k]), 128, pow2).unwrap();
        assert_eq!((q.rows, q.cols, q.block, q.experts()), (n, k, 128, 1));
        let want = host_fp8(&w, [n, k], [128, 128], pow2);
        let got = f32s(q.dequantize());
        let same = got.iter().zip(&want).all(|(g, w)| *g as f64 == *w);
        assert!(same, "pow2 {pow2}: max |Δ| {}", {
            got.iter()
                .zip(&want)
                .map(|(g, w)| (*g as f64 - w).abs())
                .fold(0.0, f64::max)
        });
    }
    assert!(Fp8Weight::<B>::quantize(tensor2(w, [n, k]), 6, false).is_err());
}

/// Host reference of dispatch: stable counting sort of the slots by expert.
pub(crate) fn host_dispatch(ids: &[i64], e: usize) -> (Vec<i64>, Vec<i64>) {
    let mut order = Vec::new();
    let mut offsets = vec![0i64];
    for x in 0..e as i64 {
        order.extend(
            ids.iter()
                .enumerate()
                .filter(|(_, &v)| v == x)
                .map(|(s, _)| s as i64),
        );
        offsets.push(order.len() as i64);
    }
    (order, offsets)
}

/// Distinct random experts per token (as the router produces).
pub(crate) fn random_ids(rng: &mut Rng, t: usize, k: usize, e: usize) -> Vec<i64> {
    let mut ids = Vec::new();
    for _ in 0..t {
        let mut row: Vec<i64> = Vec::new();
        while row.len() < k {
            let x = (rng.next() % e as u64) as i64;
            if !row.contains(&x) {
                row.push(x);
            }
        }
        ids.extend(row);
    }
    ids
}

pub(crate) fn int_tensor<Bk: Backend>(
    v: &[i64],
    shape: [usize; 2],
    device: &Bk::Device,
) -> Tensor<Bk, 2, Int> {
    let v: Vec<i32> = v.iter().map(|&x| x as i32).collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// MoE defaults against a per-token host loop: dispatch is the stable counting sort; grouped
/// matmul + combine equal `base + Σ_j w_j x_t W_{e_j}`.
#[test]
fn moe_defaults_match_host_reference() {
    let mut rng = Rng::new(3);
    let (t, k, e, h, n) = (37, 3, 13, 30, 20);
    let ids = random_ids(&mut rng, t, k, e);
    let dev = device();
    let d = <B as DsBackend>::moe_dispatch(int_tensor::<B>(&ids, [t, k], &dev), e);
    let (order, offsets) = host_dispatch(&ids, e);
    assert_eq!(ints(d.order.clone()), order);
    assert_eq!(ints(d.offsets.clone()), offsets);
    assert_eq!(
        ints(d.tokens.clone()),
        order.iter().map(|s| s / k as i64).collect::<Vec<_>>()
    );
    let pos = ints(d.position.clone());
    for (p, &s) in order.iter().enumerate() {
        assert_eq!(pos[s as usize], p as i64);
    }

    let x = rng.normal_vec(t * h, 1.0);
    let w = rng.normal_vec(e * h * n, 0.3);
    let gw = rng.normal_vec(t * k, 1.0);
    let base = rng.normal_vec(t * n, 1.0);
    let xs = tensor2(x.clone(), [t, h]).select(0, d.tokens.clone());
    let grouped = GroupedWeight::dense(Tensor::<B, 3>::from_data(
        TensorData::new(w.clone(), [e, h, n]),
        &dev,
    ));
    let y = <B as DsBackend>::grouped_matmul(xs, &grouped, &d);
    let out = f32s(<B as DsBackend>::moe_combine(
        y,
        &d,
        tensor2(gw.clone(), [t, k]),
        tensor2(base.clone(), [t, n]),
    ));
    for tok in 0..t {
        for c in 0..n {
            let mut want = base[tok * n + c] as f64;
            for j in 0..k {
                let ex = ids[tok * k + j] as usize;
                let dot: f64 = (0..h)
                    .map(|i| x[tok * h + i] as f64 * w[(ex * h + i) * n + c] as f64)
                    .sum();
                want += gw[tok * k + j] as f64 * dot;
            }
            let got = out[tok * n + c] as f64;
            assert!(
                (got - want).abs() < 1e-4,
                "token {tok} col {c}: {got} vs {want}"
            );
        }
    }
}

/// The model-core fixtures on a GPU backend: logits against the float64 golden (within `tol`)
/// and routing equal to the CPU's, in the per-expert form, the packed (kernel) form, and FP8 in
/// memory.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub(crate) fn fixtures_match_golden_on<Bk: DsBackend>(label: &str, dev: &Bk::Device, tol: f64) {
    let packed = WeightOptions {
        pack_experts: true,
        ..Default::default()
    };
    let fp8 = WeightOptions {
        storage: WeightStorage::Fp8,
        pack_experts: true,
    };
    for (name, weights) in [
        ("tiny-qlora", WeightOptions::default()),
        ("tiny-qlora", packed),
        ("tiny-direct", packed),
        ("tiny-fp8", fp8),
    ] {
        let gpu = load_fixture_with::<Bk>(name, weights, dev);
        let cpu = load_fixture_with::<B>(name, WeightOptions::default(), &device());
        for g in goldens(&fixture(name)) {
            let (logits, routing) = logits_of(&gpu, &g);
            let (_, cpu_routing) = logits_of(&cpu, &g);
            let d = max_abs_diff(&logits, &Golden::read(&g).f("logits").1);
            println!(
                "{label} {name} {weights:?} {}: max |Δlogits| vs golden {d:.2e}",
                g.display()
            );
            assert!(d < tol, "{name}: {label} logits differ by {d:.3e}");
            assert_eq!(
                routing, cpu_routing,
                "{name}: {label} routing differs from the CPU's"
            );
            assert!(!routing.is_empty());
        }
    }
}

/// Every CubeCL kernel against its plain-tensor default (run on Flex), on random inputs whose
/// sizes are not multiples of 128 (nor of CUDA's row pitch), on a GPU backend `G`: run on wgpu
/// by the tests below and on CUDA by `scripts/gpu-check.sh`.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub(crate) mod on_gpu {
    use super::*;
    use dsv3_backends::MoeDispatch;

    fn to_gpu2<G: DsBackend>(dev: &G::Device, v: Vec<f32>, shape: [usize; 2]) -> Tensor<G, 2> {
        Tensor::from_data(TensorData::new(v, shape), dev)
    }

    pub(crate) fn fp8_matmul_kernel_equals_default<G: DsBackend>(dev: &G::Device) {
        let mut rng = Rng::new(21);
        let (m, n, k, b) = (9, 200, 300, 128);
        let (_, codes, scales) = random_fp8::<B>(&mut rng, [1, n, k], b, &device());
        let x = rng.normal_vec(m * k, 1.0);
        let wc = Fp8Weight::<B>::from_codes(&codes, &scales, [1, n, k], b, &device()).unwrap();
        let wg = Fp8Weight::<G>::from_codes(&codes, &scales, [1, n, k], b, dev).unwrap();
        let want = f32s(<B as DsBackend>::fp8_matmul(
            tensor2(x.clone(), [m, k]),
            &wc,
        ));
        let got = f32s(<G as DsBackend>::fp8_matmul(
            to_gpu2::<G>(dev, x, [m, k]),
            &wg,
        ));
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = max_diff(&got, &want);
        println!("fp8 matmul kernel vs default: {d:.2e} (max |y| {scale:.2})");
        assert!(scale > 0.1 && d <= 1e-5 * scale, "differ by {d}");
    }

    pub(crate) fn fp8_quantize_kernel_equals_default<G: DsBackend>(dev: &G::Device) {
        let mut rng = Rng::new(5);
        let (m, k, b) = (6, 333, 128);
        let x = rng.normal_vec(m * k, 2.0);
        for ue8m0 in [false, true] {
            let want = <B as DsBackend>::fp8_quantize(tensor2(x.clone(), [m, k]), b, ue8m0);
            let got =
                <G as DsBackend>::fp8_quantize(to_gpu2::<G>(dev, x.clone(), [m, k]), b, ue8m0);
            assert_eq!(f32s(got.scales), f32s(want.scales), "scales, ue8m0 {ue8m0}");
            assert_eq!(ints(got.codes), ints(want.codes), "codes, ue8m0 {ue8m0}");
        }
    }

    fn dispatch_pair<G: DsBackend>(
        ids: &[i64],
        t: usize,
        k: usize,
        e: usize,
        dev: &G::Device,
    ) -> (MoeDispatch<B>, MoeDispatch<G>) {
        (
            <B as DsBackend>::moe_dispatch(int_tensor::<B>(ids, [t, k], &device()), e),
            <G as DsBackend>::moe_dispatch(int_tensor::<G>(ids, [t, k], dev), e),
        )
    }

    /// 41 tokens: the tiled grouped kernel (several experts per tile); 5 tokens: the
    /// one-thread-per-output kernel.
    pub(crate) fn moe_kernels_equal_defaults<G: DsBackend>(dev: &G::Device) {
        for t in [41, 5] {
            moe_kernels_equal_defaults_at::<G>(t, dev);
        }
    }

    fn moe_kernels_equal_defaults_at<G: DsBackend>(t: usize, dev: &G::Device) {
        let mut rng = Rng::new(17);
        let (k, e, h, n) = (6, 29, 150, 130);
        let ids = random_ids(&mut rng, t, k, e);
        let (dc, dg) = dispatch_pair::<G>(&ids, t, k, e, dev);
        assert_eq!(ints(dg.order.clone()), ints(dc.order.clone()));
        assert_eq!(ints(dg.tokens.clone()), ints(dc.tokens.clone()));
        assert_eq!(ints(dg.experts.clone()), ints(dc.experts.clone()));
        assert_eq!(ints(dg.position.clone()), ints(dc.position.clone()));
        assert_eq!(ints(dg.offsets.clone()), ints(dc.offsets.clone()));

        let s = t * k;
        let xs = rng.normal_vec(s * h, 1.0);
        // Dense grouped matmul.
        let w = rng.normal_vec(e * h * n, 0.2);
        let wc = GroupedWeight::dense(Tensor::<B, 3>::from_data(
            TensorData::new(w.clone(), [e, h, n]),
            &device(),
        ));
        let wg = GroupedWeight::dense(Tensor::<G, 3>::from_data(
            TensorData::new(w, [e, h, n]),
            dev,
        ));
        let yc = f32s(<B as DsBackend>::grouped_matmul(
            tensor2(xs.clone(), [s, h]),
            &wc,
            &dc,
        ));
        let yg = f32s(<G as DsBackend>::grouped_matmul(
            to_gpu2::<G>(dev, xs.clone(), [s, h]),
            &wg,
            &dg,
        ));
        let d = max_diff(&yg, &yc);
        println!("grouped matmul kernel vs default: {d:.2e}");
        assert!(d < 1e-4, "grouped matmul differs by {d}");
        // FP8 grouped matmul: weights [e, n, h].
        let (fc, codes, scales) = random_fp8::<B>(&mut rng, [e, n, h], 128, &device());
        let fg = Fp8Weight::<G>::from_codes(&codes, &scales, [e, n, h], 128, dev).unwrap();
        let yc8 = f32s(<B as DsBackend>::grouped_matmul(
            tensor2(xs.clone(), [s, h]),
            &GroupedWeight::fp8(fc),
            &dc,
        ));
        let yg8 = f32s(<G as DsBackend>::grouped_matmul(
            to_gpu2::<G>(dev, xs, [s, h]),
            &GroupedWeight::fp8(fg),
            &dg,
        ));
        let scale = yc8.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d8 = max_diff(&yg8, &yc8);
        println!("fp8 grouped matmul kernel vs default: {d8:.2e} (max |y| {scale:.2})");
        assert!(
            scale > 0.1 && d8 <= 1e-5 * scale,
            "fp8 grouped differs by {d8}"
        );
        // Combine.
        let y = rng.normal_vec(s * n, 1.0);
        let gw = rng.normal_vec(t * k, 1.0);
        let base = rng.normal_vec(t * n, 1.0);
        let oc = f32s(<B as DsBackend>::moe_combine(
            tensor2(y.clone(), [s, n]),
            &dc,
            tensor2(gw.clone(), [t, k]),
            tensor2(base.clone(), [t, n]),
        ));
        let og = f32s(<G as DsBackend>::moe_combine(
            to_gpu2::<G>(dev, y, [s, n]),
            &dg,
            to_gpu2::<G>(dev, gw, [t, k]),
            to_gpu2::<G>(dev, base, [t, n]),
        ));
        let dcmb = max_diff(&og, &oc);
        println!("combine kernel vs default: {dcmb:.2e}");
        assert!(dcmb < 1e-5, "combine differs by {dcmb}");
    }
}

#[cfg(feature = "wgpu")]
pub(crate) mod wgpu {
    //! The CubeCL kernels (see [`super::on_gpu`]) and the fixtures on wgpu.

    use super::*;
    use dsv3_backends::Wgpu;

    fn wdev() -> burn::backend::wgpu::WgpuDevice {
        Default::default()
    }

    #[test]
    fn fp8_matmul_kernel_equals_default() {
        on_gpu::fp8_matmul_kernel_equals_default::<Wgpu>(&wdev());
    }

    /// Training runs micro-batches one at a time on a GPU backend (threads would add streams
    /// and memory pools to one device) and in parallel threads on Flex, under autodiff too.
    #[test]
    fn micro_batches_run_concurrently_only_on_the_cpu() {
        use burn::backend::{Autodiff, Flex};
        assert!(!<Autodiff<Wgpu> as DsBackend>::concurrent_micro_batches());
        assert!(<Autodiff<Flex> as DsBackend>::concurrent_micro_batches());
    }

    #[test]
    fn fp8_quantize_kernel_equals_default() {
        on_gpu::fp8_quantize_kernel_equals_default::<Wgpu>(&wdev());
    }

    /// 41 tokens: the tiled grouped kernel (several experts per tile); 5 tokens: the
    /// one-thread-per-output kernel.
    #[test]
    fn moe_kernels_equal_defaults() {
        on_gpu::moe_kernels_equal_defaults::<Wgpu>(&wdev());
    }

    /// wgpu cannot hold bf16 tensors (WGSL has no bf16): `--weights bf16` is a clear error there,
    /// not a kernel-compiler panic.
    #[test]
    fn bf16_weights_refused_on_wgpu() {
        let opts = LoadOptions {
            strict: true,
            skip_mtp: false,
            ..Default::default()
        };
        let weights = WeightOptions {
            storage: WeightStorage::Bf16,
            ..Default::default()
        };
        let e = match load_with::<Wgpu>(&fixture("tiny-direct"), &wdev(), &opts, &weights) {
            Ok(_) => panic!("bf16 on wgpu must be refused"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("bf16"), "{e}");
    }

    /// The model-core fixtures on wgpu: see [`fixtures_match_golden_on`].
    #[test]
    fn fixtures_match_golden_on_wgpu() {
        fixtures_match_golden_on::<Wgpu>("wgpu", &wdev(), LOGIT_TOL as f64);
    }
}

/// On a CUDA machine only (`scripts/gpu-check.sh` runs these with `--ignored`): they fail when
/// no GPU is there, rather than skipping.
#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use super::*;
    use dsv3_backends::{BackendKind, Cuda, FloatDtype};

    fn require_gpu() {
        BackendKind::Cuda
            .check(FloatDtype::F32)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// The model-core fixtures on CUDA (f32): see [`fixtures_match_golden_on`]. Burn's f32
    /// matmul on CUDA runs on TF32 tensor cores where the GPU has them (cubek-matmul turns f32
    /// operands into tf32 for its accelerated kernels), which round each operand to 11
    /// significant bits (u = 2⁻¹¹ ≈ 4.9e-4): the fixtures' logits (|logit| ≤ ~15) then move by
    /// ~1e-2 (1.3e-2 measured on an H200), so the bound here is 5e-2, not the 1e-4 of an f32
    /// product. The routing must still equal the CPU's, and the kernels' own tests keep 1e-5.
    #[test]
    #[ignore = "needs a CUDA GPU: scripts/gpu-check.sh"]
    fn cuda_fixtures_match_golden() {
        require_gpu();
        fixtures_match_golden_on::<Cuda>("cuda", &Default::default(), 5e-2);
    }

    /// Every CubeCL kernel against its default on CUDA (see [`super::on_gpu`]): CUDA pads rows
    /// of new tensors to an alignment, which these sizes exercise.
    #[test]
    #[ignore = "needs a CUDA GPU: scripts/gpu-check.sh"]
    fn cuda_kernels_equal_defaults() {
        require_gpu();
        let dev = Default::default();
        on_gpu::fp8_matmul_kernel_equals_default::<Cuda>(&dev);
        on_gpu::fp8_quantize_kernel_equals_default::<Cuda>(&dev);
        on_gpu::moe_kernels_equal_defaults::<Cuda>(&dev);
    }

    /// The NCCL communicator in a world of one (a single GPU can hold only one NCCL rank): every
    /// host-buffer call against the values it must give, and the device-pointer calls on a Burn
    /// CUDA tensor's memory. One rank needs no launcher: the id is "broadcast" over a
    /// `LocalComm` (a multi-rank communicator bootstraps over MPI the same way).
    #[cfg(feature = "nccl")]
    #[test]
    #[ignore = "needs a GPU and libnccl: run by scripts/gpu-check.sh"]
    fn nccl_one_rank_collectives() {
        use dsv3_backends::comm::nccl::{cuda_tensor_ptr, NcclComm};
        use dsv3_backends::comm::{
            Buf, BufMut, CommError, CommExt, Communicator, LocalComm, Owned, ReduceOp,
        };
        use std::sync::Arc;

        require_gpu();
        let world: Arc<dyn Communicator> = LocalComm::new();
        let nccl = NcclComm::new(&world, 0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((nccl.rank(), nccl.size(), nccl.engine()), (0, 1, "nccl"));

        // Reductions over one rank give the input back, in every reducible type.
        let mut f = vec![1.5f32, -2.0, 3.25];
        nccl.all_reduce_in_place(&mut f, ReduceOp::Sum).unwrap();
        assert_eq!(f, [1.5, -2.0, 3.25]);
        let mut d = vec![1.0f64, -7.5];
        nccl.all_reduce_in_place(&mut d, ReduceOp::Max).unwrap();
        assert_eq!(d, [1.0, -7.5]);
        let mut i = vec![7i32, -3, 0];
        nccl.all_reduce_in_place(&mut i, ReduceOp::Min).unwrap();
        assert_eq!(i, [7, -3, 0]);
        assert!(matches!(
            nccl.all_reduce_in_place(&mut [1u16, 2], ReduceOp::Sum),
            Err(CommError::Unsupported { .. })
        ));
        let mut empty: Vec<f32> = vec![];
        nccl.all_reduce_in_place(&mut empty, ReduceOp::Sum).unwrap();

        // bf16 bits travel as bytes.
        let bits = [0x3f80u16, 0xbf80, 0x1234];
        assert_eq!(nccl.all_gather_vec(&bits).unwrap(), bits);
        assert_eq!(nccl.all_gather_vec(&[3u8, 250]).unwrap(), [3, 250]);

        let mut rs = [0f32; 4];
        nccl.reduce_scatter(
            Buf::F32(&[1.0, 2.0, 3.0, 4.0]),
            BufMut::F32(&mut rs),
            ReduceOp::Sum,
        )
        .unwrap();
        assert_eq!(rs, [1.0, 2.0, 3.0, 4.0]);

        assert_eq!(
            nccl.all_to_all_v_vec(&[1i32, 2, 3], &[3], &[3]).unwrap(),
            [1, 2, 3]
        );
        assert_eq!(
            nccl.all_to_all_v_vec(&[5u16, 6], &[2], &[2]).unwrap(),
            [5, 6]
        );
        assert!(nccl
            .all_to_all_v_vec::<f32>(&[], &[0], &[0])
            .unwrap()
            .is_empty());
        assert_eq!(nccl.exchange_counts(&[4], 9).unwrap(), [4]);

        let mut b = [9u8, 8, 7];
        nccl.broadcast(BufMut::U8(&mut b), 0).unwrap();
        assert_eq!(b, [9, 8, 7]);
        assert!(nccl.broadcast(BufMut::U8(&mut b), 1).is_err());

        // To self: the host queue, matched by tag.
        nccl.send(Buf::F32(&[4.0, 5.0]), 0, 3).unwrap();
        nccl.send(Buf::F32(&[6.0]), 0, 2).unwrap();
        let mut r = [0f32];
        nccl.recv(BufMut::F32(&mut r), 0, 2).unwrap();
        assert_eq!(r, [6.0]);
        let mut r = [0f32; 2];
        nccl.recv(BufMut::F32(&mut r), 0, 3).unwrap();
        assert_eq!(r, [4.0, 5.0]);
        let sent = nccl.isend(Owned::I32(vec![1, 2]), 0, 4).unwrap();
        let got = nccl.irecv(Owned::I32(vec![0, 0]), 0, 4).unwrap();
        assert_eq!(got.wait().unwrap(), Owned::I32(vec![1, 2]));
        assert_eq!(sent.wait().unwrap(), Owned::I32(vec![1, 2]));

        nccl.barrier().unwrap();
        let sub = nccl.split(0, 0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((sub.rank(), sub.size(), sub.engine()), (0, 1, "nccl"));
        let mut s = vec![2.5f32];
        sub.all_reduce_in_place(&mut s, ReduceOp::Sum).unwrap();
        assert_eq!(s, [2.5]);
        assert_eq!(nccl.traffic().sent_bytes, 0, "one rank sends nothing");

        // Device pointers of Burn CUDA tensors.
        let dev = Default::default();
        let host = vec![0.5f32, 1.5, -2.5, 4.0, 8.0];
        let a = Tensor::<Cuda, 1>::from_floats(host.as_slice(), &dev);
        let b = Tensor::<Cuda, 1>::zeros([host.len()], &dev);
        let pa = cuda_tensor_ptr(&a.clone().into_primitive().tensor()).unwrap();
        let pb = cuda_tensor_ptr(&b.clone().into_primitive().tensor()).unwrap();
        assert_eq!(pa.len, host.len());
        <Cuda as Backend>::sync(&dev).unwrap();
        // SAFETY: both tensors are alive, contiguous f32 of `len` elements, and synced; `b` is
        // written only here.
        unsafe {
            nccl.all_reduce_device(pa.ptr, pa.len, pa.dtype, ReduceOp::Sum)
                .unwrap();
            nccl.all_to_all_v_device(pa.ptr, &[pa.len], pb.ptr, &[pb.len], pa.dtype)
                .unwrap();
        }
        drop((pa, pb));
        let mut expect = host.clone();
        nccl.all_reduce_in_place(&mut expect, ReduceOp::Sum)
            .unwrap();
        assert_eq!(a.into_data().to_vec::<f32>().unwrap(), expect);
        assert_eq!(b.into_data().to_vec::<f32>().unwrap(), expect);
    }
}

/// `DsBackend::on_pool` on Flex: from a thread outside any pool, the closure runs on a thread
/// of the (global, two or more threads) pool, so the jobs it hands out start there; in place on
/// a pool thread already (inside `install`) and in a training worker whose share is one thread
/// (`as_worker`: its jobs run in order anyway).
#[test]
fn flex_on_pool_runs_on_a_pool_thread() {
    let where_run = || {
        let here = std::thread::current().id();
        let (id, pool_thread) = B::on_pool(|| {
            (
                std::thread::current().id(),
                rayon::current_thread_index().is_some(),
            )
        });
        (id != here, pool_thread)
    };
    let (moved, pool_thread, threads) = std::thread::spawn(move || {
        let (moved, pool_thread) = where_run();
        (moved, pool_thread, rayon::current_num_threads())
    })
    .join()
    .unwrap();
    // With one thread `on_pool` runs in place, which a no-op would pass too: the move is what
    // this checks, so it needs the default pool of a machine with two or more cores.
    assert!(
        threads > 1,
        "needs a global rayon pool of >= 2 threads (RAYON_NUM_THREADS unset on a machine with \
         >= 2 cores); it has {threads}"
    );
    assert_eq!(
        (moved, pool_thread),
        (true, true),
        "outside any pool, with a global pool of {threads} threads"
    );
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    assert_eq!(pool.install(where_run), (false, true), "on a pool thread");
    let worker = std::thread::spawn(move || B::as_worker(64, where_run))
        .join()
        .unwrap();
    assert_eq!(
        worker,
        (false, false),
        "a worker with a share of one thread"
    );
}
