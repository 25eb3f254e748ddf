//! Timing runs of the backend extension's operations (not tests: they print the tables recorded
//! in BENCHMARKS.md). Run: `scripts/bench-kernels.sh [fp8-bytes|moe-experts|few-rows|matmul|absorbed|pool-wakeup|gpu-fp8-vs-bf16]`,
//! i.e. `cargo bench --bench kernels --features wgpu -- NAME` (`--features cuda` for the GPU one).

use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor, TensorData};
use dsv3_backends::{Cpu, DsBackend, Fp8Weight, SplitMix64};
use dsv3_model::{Moe, MoeConfig, RouterConfig};

/// Median wall time in seconds of `runs` calls of `f` (each ends in a host read or a device
/// sync), after one warm-up call.
fn median_secs(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut v: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[runs / 2]
}

/// FP8 codes without the two NaN codes.
fn codes(rng: &mut SplitMix64, n: usize) -> Vec<u8> {
    (0..n)
        .map(|_| {
            let c = (rng.next_u64() >> 56) as u8;
            if c & 0x7F == 0x7F {
                c ^ 1
            } else {
                c
            }
        })
        .collect()
}

fn block_scales(rng: &mut SplitMix64, n: usize, k: usize, lo: f32, width: f32) -> Vec<f32> {
    (0..n.div_ceil(128) * k.div_ceil(128))
        .map(|_| lo + rng.uniform() as f32 * width)
        .collect()
}

/// FP8 in memory against bf16 for DeepSeek-V3's real Linear shapes (one expert, attention).
fn fp8_bytes() {
    let mut rng = SplitMix64::new(1);
    let device = Default::default();
    println!("| weight | shape [out, in] | bf16 bytes | FP8 in memory (codes + scales) | ratio |");
    println!("|---|---|---|---|---|");
    for (name, n, k) in [
        ("experts.E.gate_proj / up_proj", 2048, 7168),
        ("experts.E.down_proj", 7168, 2048),
        ("self_attn.q_b_proj", 24576, 1536),
        ("self_attn.kv_a_proj_with_mqa", 576, 7168),
        ("self_attn.kv_b_proj", 32768, 512),
        ("self_attn.o_proj", 7168, 16384),
    ] {
        let scales = block_scales(&mut rng, n, k, 0.001, 0.01);
        let w =
            Fp8Weight::<Cpu>::from_codes(&codes(&mut rng, n * k), &scales, [1, n, k], 128, &device)
                .expect("valid FP8 weight");
        let bf16 = n * k * 2;
        println!(
            "| {name} | [{n}, {k}] | {bf16} | {} | {:.4} |",
            w.bytes(),
            w.bytes() as f64 / bf16 as f64
        );
    }
}

/// One MoE layer (hidden 512, expert width 128, top-8, one shared expert) with 16 and 256
/// routed experts: the cost should follow the active experts, not the total.
fn bench_moe<B: DsBackend>(label: &str, packed: bool, device: &B::Device) {
    let (h, i, k) = (512, 128, 8);
    let mut rows = Vec::new();
    for tokens in [1usize, 128] {
        for experts in [16usize, 256] {
            B::seed(device, 0);
            let mut m: Moe<B> =
                MoeConfig::new(h, i, 1, RouterConfig::new(experts, k, 1, 1)).init(device);
            if packed {
                m.pack().expect("pack");
            }
            let x = Tensor::<B, 3>::random(
                [1, tokens, h],
                burn::tensor::Distribution::Normal(0.0, 1.0),
                device,
            );
            let (_, r) = m.forward(x.clone(), true);
            let active = r
                .expect("routing recorded")
                .experts
                .iter()
                .flatten()
                .collect::<std::collections::BTreeSet<_>>()
                .len();
            let s = median_secs(5, || {
                let (y, _) = m.forward(x.clone(), false);
                std::hint::black_box(y.sum().into_scalar().elem::<f32>());
            });
            println!(
                "{label}: tokens {tokens:>3}, experts {experts:>3} ({active:>3} active): {:.2} ms",
                s * 1e3
            );
            rows.push((tokens, experts, s));
        }
    }
    for t in [1usize, 128] {
        let get = |e| {
            rows.iter()
                .find(|r| r.0 == t && r.1 == e)
                .map_or(f64::NAN, |r| r.2)
        };
        println!(
            "{label}: tokens {t}: 256 / 16 experts = {:.2}x",
            get(256) / get(16)
        );
    }
}

fn moe_experts() {
    bench_moe::<Cpu>("flex per-expert", false, &Default::default());
    bench_moe::<Cpu>("flex packed (trait defaults)", true, &Default::default());
    #[cfg(feature = "wgpu")]
    bench_moe::<dsv3_backends::Wgpu>("wgpu packed (CubeCL kernels)", true, &Default::default());
}

/// FP8 block-scaled matmul (codes dequantized in the kernel, f32 activations) against a bf16
/// matmul of the same shape, DeepSeek-V3's shapes: TFLOP/s and error against float64 (over the
/// first 4 rows). Needs a CUDA GPU.
#[cfg(feature = "cuda")]
fn gpu_fp8_vs_bf16() {
    use dsv3_backends::{BackendKind, Cuda, FloatDtype};
    type Bf = Cuda<burn::tensor::bf16>;
    if let Err(e) = BackendKind::Cuda.check(FloatDtype::F32) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    let dev = Default::default();
    let f32s =
        |t: Tensor<Cuda, 2>| -> Vec<f32> { t.into_data().convert::<f32>().to_vec().expect("f32") };
    let f32b =
        |t: Tensor<Bf, 2>| -> Vec<f32> { t.into_data().convert::<f32>().to_vec().expect("f32") };
    println!("| M×K×N | what | FP8 kernel TFLOP/s | bf16 matmul TFLOP/s | FP8 max rel err vs f64 | bf16 max rel err vs f64 |");
    println!("|---|---|---|---|---|---|");
    let mut rng = SplitMix64::new(99);
    for (m, k, n, what) in [
        (4096, 7168, 2048, "expert gate/up"),
        (4096, 2048, 7168, "expert down_proj"),
        (4096, 1536, 24576, "q_b_proj"),
        (4096, 7168, 576, "kv_a_proj_with_mqa"),
        (4096, 512, 32768, "kv_b_proj"),
        (4096, 16384, 7168, "o_proj"),
        (64, 7168, 2048, "expert gate/up, 64 tokens"),
    ] {
        let c = codes(&mut rng, n * k);
        let scales = block_scales(&mut rng, n, k, 0.0005, 0.001);
        let x: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
        let w8 = Fp8Weight::<Cuda>::from_codes(&c, &scales, [1, n, k], 128, &dev).expect("FP8");
        let xg = Tensor::<Cuda, 2>::from_data(TensorData::new(x.clone(), [m, k]), &dev);
        let deq = dsv3_model::fp8::dequantize_blocks(&c, n, k, &scales, 128, true).expect("deq"); // [k, n]
        let wb = Tensor::<Bf, 2>::from_data(TensorData::new(deq.clone(), [k, n]), &dev);
        let xb = Tensor::<Bf, 2>::from_data(TensorData::new(x.clone(), [m, k]), &dev);
        let mut y8 = None;
        let t8 = median_secs(5, || {
            let y = <Cuda as DsBackend>::fp8_matmul(xg.clone(), &w8);
            <Cuda as Backend>::sync(&dev).expect("sync");
            y8 = Some(y);
        });
        let mut yb = None;
        let tb = median_secs(5, || {
            let y = xb.clone().matmul(wb.clone());
            <Bf as Backend>::sync(&dev).expect("sync");
            yb = Some(y);
        });
        let rows = 4.min(m);
        let y8 = f32s(y8.expect("ran").narrow(0, 0, rows));
        let yb = f32b(yb.expect("ran").narrow(0, 0, rows));
        let (mut e8, mut eb, mut scale) = (0f64, 0f64, 0f64);
        for r in 0..rows {
            for col in 0..n {
                let want: f64 = (0..k)
                    .map(|i| x[r * k + i] as f64 * deq[i * n + col] as f64)
                    .sum();
                scale = scale.max(want.abs());
                e8 = e8.max((y8[r * n + col] as f64 - want).abs());
                eb = eb.max((yb[r * n + col] as f64 - want).abs());
            }
        }
        let flops = 2.0 * (m * k * n) as f64;
        println!(
            "| {m}×{k}×{n} | {what} | {:.2} | {:.2} | {:.1e} | {:.1e} |",
            flops / t8 / 1e12,
            flops / tb / 1e12,
            e8 / scale,
            eb / scale
        );
        // f32 accumulation over K ≤ 16384 products: far below 1e-5 of the largest output.
        if e8 / scale >= 1e-5 {
            eprintln!(
                "error: FP8 kernel relative error {:.2e} >= 1e-5 at {m}×{k}×{n}",
                e8 / scale
            );
            std::process::exit(1);
        }
    }
}

/// Decode's products at a few rows: `DsBackend::dense_matmul` (Flex: the few-row kernel, each
/// weight read once for all rows) against Flex's general matmul (the `gemm` crate), on the
/// `small` preset's shapes, f32 and bf16 weights. Prints weight GB/s and GFLOP/s.
fn few_rows() {
    let dev = Default::default();
    let mut rng = SplitMix64::new(5);
    println!("| [K, N] | weights | rows | dense_matmul (µs) | GB/s of weights | GFLOP/s | Flex matmul (µs) | ratio |");
    println!("|---|---|---|---|---|---|---|---|");
    for (k, n) in [(512, 1408), (1408, 512), (512, 8000)] {
        let wv: Vec<f32> = (0..k * n).map(|_| rng.uniform() as f32 - 0.5).collect();
        let w32 = Tensor::<Cpu, 2>::from_data(TensorData::new(wv, [k, n]), &dev);
        for bf in [false, true] {
            let w = if bf {
                w32.clone().cast(burn::tensor::DType::BF16)
            } else {
                w32.clone()
            };
            let wide = w.clone().cast(burn::tensor::DType::F32);
            for m in [1, 2, 4, 8, 16] {
                let xv: Vec<f32> = (0..m * k).map(|_| rng.uniform() as f32 - 0.5).collect();
                let x = Tensor::<Cpu, 2>::from_data(TensorData::new(xv, [m, k]), &dev);
                let ours = median_secs(21, || {
                    let y = Cpu::dense_matmul(x.clone(), w.clone());
                    std::hint::black_box(y.into_data());
                });
                // Flex's matmul on f32 weights (a user of bf16 storage would widen first).
                let flex = median_secs(21, || {
                    let y = x.clone().matmul(wide.clone());
                    std::hint::black_box(y.into_data());
                });
                let bytes = (k * n * if bf { 2 } else { 4 }) as f64;
                println!(
                    "| [{k}, {n}] | {} | {m} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2}x |",
                    if bf { "bf16" } else { "f32" },
                    ours * 1e6,
                    bytes / ours / 1e9,
                    (2 * m * k * n) as f64 / ours / 1e9,
                    flex * 1e6,
                    flex / ours
                );
            }
        }
    }
}

/// Prefill's and training's products (many rows): Flex's general matmul (the `gemm` crate) in
/// GFLOP/s at the `small` and `mini` presets' shapes, to set against PyTorch's on the same
/// threads (`scripts/bench_matmul_hf.py`).
fn matmul() {
    let dev = Default::default();
    let mut rng = SplitMix64::new(6);
    println!("| M×K×N | Flex matmul (ms) | GFLOP/s | dense_matmul (ms) | GFLOP/s |");
    println!("|---|---|---|---|---|");
    for (m, k, n) in [
        (512, 512, 8000),
        (512, 512, 1408),
        (512, 192, 512),
        (2048, 192, 576),
    ] {
        let mut t = |r: usize, c: usize| {
            let v: Vec<f32> = (0..r * c).map(|_| rng.uniform() as f32 - 0.5).collect();
            Tensor::<Cpu, 2>::from_data(TensorData::new(v, [r, c]), &dev)
        };
        let (x, w) = (t(m, k), t(k, n));
        let s = median_secs(7, || {
            std::hint::black_box(x.clone().matmul(w.clone()).into_data());
        });
        let d = median_secs(7, || {
            std::hint::black_box(Cpu::dense_matmul(x.clone(), w.clone()).into_data());
        });
        let gflops = |s: f64| (2 * m * k * n) as f64 / s / 1e9;
        println!(
            "| {m}×{k}×{n} | {:.2} | {:.1} | {:.2} | {:.1} |",
            s * 1e3,
            gflops(s),
            d * 1e3,
            gflops(d)
        );
    }
}

/// Decode's absorbed attention (`model/src/mla.rs`, `attend_absorbed`) operation by operation
/// at the `small` preset's widths (8 heads, nope 48, rope 24, latent 128, value 48), one query
/// over S keys, through Flex's general matmul as the model runs it (`W_UK`/`W_UV` strided views
/// of `kv_b_proj`'s weight, the latent a narrowed view of a longer cache buffer), the whole
/// with the scores query-major (`q_abs·cᵀ`, as before) and keys-major (`c·q_absᵀ`, the model's
/// form since the eleventh session); then single products in other forms: keys-major, with a
/// contiguous `cᵀ`, and through the few-row kernel (`dense_matmul`, two groups of four heads).
/// Median µs per call.
fn absorbed() {
    let dev = Default::default();
    let mut rng = SplitMix64::new(7);
    let mut t = |dims: [usize; 3]| {
        let v: Vec<f32> = (0..dims.iter().product::<usize>())
            .map(|_| rng.uniform() as f32 - 0.5)
            .collect();
        Tensor::<Cpu, 3>::from_data(TensorData::new(v, dims), &dev)
    };
    let us = |f: &mut dyn FnMut()| median_secs(101, f) * 1e6;
    let (nh, dn, dr, r, dv) = (8, 48, 24, 128, 48);
    println!("| S | q·W_UKᵀ | q_abs·cᵀ | q_pe·k_peᵀ | + | softmax | p·c | ·W_UV | all, scores query-major | all, scores keys-major | c·q_absᵀ | k_pe·q_peᵀ | q_abs·(cᵀ contiguous) | q_abs·cᵀ, few-row | p·c, few-row |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for s in [512, 2000, 8192] {
        let w = t([r, nh, dn + dv]);
        let w_uk = w.clone().narrow(2, 0, dn).swap_dims(0, 1); // [nh, r, dn]
        let w_uv = w.narrow(2, dn, dv).swap_dims(0, 1); // [nh, r, dv]
        let c = t([1, s + 100, r]).narrow(1, 0, s);
        let k_pe = t([1, s + 100, dr]).narrow(1, 0, s);
        let (q_nope, q_pe) = (t([nh, 1, dn]), t([1, nh, dr]));
        let q_abs = q_nope
            .clone()
            .matmul(w_uk.clone().swap_dims(1, 2))
            .reshape([1, nh, r]);
        let scores = q_abs.clone().matmul(c.clone().swap_dims(1, 2))
            + q_pe.clone().matmul(k_pe.clone().swap_dims(1, 2));
        let p = dsv3_backends::fused::softmax(scores.clone());
        let o = p.clone().matmul(c.clone()).reshape([nh, 1, r]);
        // The whole attention as `attend_absorbed` runs it, with the scores query-major
        // (`q_abs·cᵀ`) or keys-major (`c·q_absᵀ`, its `scores` since the eleventh session).
        let attention = |keys_major: bool| {
            let q_abs = q_nope
                .clone()
                .matmul(w_uk.clone().swap_dims(1, 2))
                .reshape([1, nh, r]);
            let scores = if keys_major {
                (c.clone().matmul(q_abs.swap_dims(1, 2))
                    + k_pe.clone().matmul(q_pe.clone().swap_dims(1, 2)))
                .swap_dims(1, 2)
            } else {
                q_abs.matmul(c.clone().swap_dims(1, 2))
                    + q_pe.clone().matmul(k_pe.clone().swap_dims(1, 2))
            };
            let p = dsv3_backends::fused::softmax(scores);
            p.matmul(c.clone()).reshape([nh, 1, r]).matmul(w_uv.clone())
        };
        let run = |f: &dyn Fn() -> Tensor<Cpu, 3>| {
            us(&mut || {
                std::hint::black_box(f().into_data());
            })
        };
        let ops = [
            run(&|| q_nope.clone().matmul(w_uk.clone().swap_dims(1, 2))),
            run(&|| q_abs.clone().matmul(c.clone().swap_dims(1, 2))),
            run(&|| q_pe.clone().matmul(k_pe.clone().swap_dims(1, 2))),
            run(&|| scores.clone() + scores.clone()),
            run(&|| dsv3_backends::fused::softmax(scores.clone())),
            run(&|| p.clone().matmul(c.clone())),
            run(&|| o.clone().matmul(w_uv.clone())),
            run(&|| attention(false)),
            run(&|| attention(true)),
        ];
        let ct = Tensor::<Cpu, 3>::from_data(c.clone().swap_dims(1, 2).into_data(), &dev);
        let (qa, c2) = (q_abs.clone().reshape([nh, r]), c.clone().reshape([s, r]));
        let p2 = p.clone().reshape([nh, s]);
        let halves = |x: &Tensor<Cpu, 2>, w: &Tensor<Cpu, 2>| {
            Tensor::cat(
                vec![
                    Cpu::dense_matmul(x.clone().narrow(0, 0, 4), w.clone()),
                    Cpu::dense_matmul(x.clone().narrow(0, 4, 4), w.clone()),
                ],
                0,
            )
            .unsqueeze::<3>()
        };
        let forms = [
            run(&|| {
                c.clone()
                    .matmul(q_abs.clone().swap_dims(1, 2))
                    .swap_dims(1, 2)
            }),
            run(&|| {
                k_pe.clone()
                    .matmul(q_pe.clone().swap_dims(1, 2))
                    .swap_dims(1, 2)
            }),
            run(&|| q_abs.clone().matmul(ct.clone())),
            run(&|| halves(&qa, &c2.clone().transpose())),
            run(&|| halves(&p2, &c2)),
        ];
        let cells: Vec<String> = ops
            .iter()
            .chain(&forms)
            .map(|v| format!("{v:.1}"))
            .collect();
        println!("| {s} | {} |", cells.join(" | "));
    }
}

/// What handing work to the pool costs after a serial stretch: two halves of `work` units run
/// by `rayon::join` on a two-thread pool against both on one thread, after `gap` units run
/// alone (the other thread idle, as during a decode step's attention). Prints µs per round and
/// what the join saved; negative means the second thread's wake-up cost more than it did.
fn pool_wakeup() {
    fn spin(units: usize) -> f32 {
        let mut s = 0f32;
        for i in 0..units {
            s = s * 0.999 + i as f32;
        }
        std::hint::black_box(s)
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("a two-thread pool");
    println!("| serial stretch (µs) | each half (µs) | joined (µs/round) | one thread (µs/round) | saved (µs) |");
    println!("|---|---|---|---|---|");
    pool.install(|| {
        // Units of `spin` per µs on this core (a million units take this many seconds): the
        // median of 7 timings after a warm-up.
        let per_us = 1.0
            / median_secs(7, || {
                spin(1_000_000);
            });
        // The stretch and a half as measured (µs), not as asked for.
        let took = |units: usize| {
            median_secs(21, || {
                spin(units);
            }) * 1e6
        };
        for gap_us in [0.0, 40.0, 400.0] {
            for half_us in [2.0, 20.0, 100.0] {
                let (gap, half) = ((gap_us * per_us) as usize, (half_us * per_us) as usize);
                let (gap_us, half_us) = (took(gap), took(half));
                let rounds = 1000;
                let round = |joined: bool| {
                    let t = Instant::now();
                    for _ in 0..rounds {
                        spin(gap);
                        if joined {
                            rayon::join(|| spin(half), || spin(half));
                        } else {
                            spin(half);
                            spin(half);
                        }
                    }
                    t.elapsed().as_secs_f64() * 1e6 / rounds as f64
                };
                let (j, one) = (round(true), round(false));
                println!(
                    "| {gap_us:.0} | {half_us:.0} | {j:.1} | {one:.1} | {:.1} |",
                    one - j
                );
            }
        }
    });
}

fn main() {
    // `cargo bench` passes `--bench`; the first other argument names the run.
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let all = which.is_empty();
    let want = |n: &str| all || which.iter().any(|w| w == n);
    if want("fp8-bytes") {
        fp8_bytes();
    }
    if want("moe-experts") {
        moe_experts();
    }
    if which.iter().any(|w| w == "matmul") {
        matmul();
    }
    if which.iter().any(|w| w == "few-rows") {
        few_rows();
    }
    if which.iter().any(|w| w == "absorbed") {
        absorbed();
    }
    if which.iter().any(|w| w == "pool-wakeup") {
        pool_wakeup();
    }
    #[cfg(feature = "cuda")]
    if which.iter().any(|w| w == "gpu-fp8-vs-bf16") {
        gpu_fp8_vs_bf16();
    }
    #[cfg(not(feature = "cuda"))]
    if which.iter().any(|w| w == "gpu-fp8-vs-bf16") {
        eprintln!("error: gpu-fp8-vs-bf16 needs the cuda feature (cargo bench --bench kernels --features cuda)");
        std::process::exit(2);
    }
}
