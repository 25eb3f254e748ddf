//! Low-precision training (DeepSeek-V3 report §3.3): the quantized Linear's custom backward
//! against finite differences of its own forward, training steps in bf16 and FP8 against f32,
//! bf16 optimizer moments, and the settings as checkpoints and the CLI carry them.

use std::sync::Arc;

use burn::optim::Optimizer;
use burn::tensor::{DType, Tensor, TensorData};
use dsv3_backends::{e4m3, Cpu, DsBackend, GemmPrecision, QuantCounters, QuantGemm};
use dsv3_train::{Precision, StateDtype, TrainConfig};

use super::*;

/// Values that FP8 (tiles and blocks of side ≤ 128 along either axis) and bf16 hold exactly:
/// `scale · e4m3 value` with magnitudes ≤ 15, and `±448 · scale` wherever `(r + c) % 37 == 0`,
/// so every 1×128, 128×1 and 128×128 tile (partial ones included, when they span ≥ 37 along
/// their axis) has amax exactly `448 · scale` and its scale is exactly `scale` (a power of two)
/// with amax and with power-of-two scaling alike. Quantization is then the identity.
fn grid(rng: &mut Rng, [rows, cols]: [usize; 2], scale: f32) -> Vec<f32> {
    let mut v = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            let x = if (r + c) % 37 == 0 {
                448.0
            } else {
                // Exponent field ≤ 10: |value| ≤ 2^3 · 1.875 = 15.
                let code = (rng.next() % 88) as u8;
                e4m3::decode(code)
            };
            let sign = if rng.next().is_multiple_of(2) {
                1.0
            } else {
                -1.0
            };
            v.push(sign * x * scale);
        }
    }
    v
}

/// The custom backward of the quantized Linear equals central finite differences of its own
/// forward, per element of `x` and `w`, in FP8 (amax and power-of-two scales) and bf16.
///
/// The inputs are on the grid of [`grid`] and each perturbed element goes 192·s → 256·s and
/// 128·s, still on the grid without changing any tile's amax, so the
/// quantized forward is exactly the bilinear `x · w` at all three points and the central
/// difference is its exact derivative up to f32 rounding. The backward's operands (`dy` by
/// rows and by columns, `x` requantized by columns) are on the grid too. Tolerance: the
/// forward's f32 sums are off by about `K · 2^-24 · Σ|x·w|` per output; with the step of 64·s
/// and these magnitudes that is ~1e-5 of the derivative's scale `Σ|dy·w|`; we allow 1e-3.
#[test]
fn quantized_linear_backward_equals_finite_differences() {
    let (m, k, n) = (170, 300, 170); // partial tiles of 42 and 44
    let precisions = [
        GemmPrecision::Fp8 { pow2_scales: false },
        GemmPrecision::Fp8 { pow2_scales: true },
        GemmPrecision::Bf16,
    ];
    for precision in precisions {
        let mut rng = Rng::new(7);
        let (sx, sw, sd) = (2f32.powi(-2), 2f32.powi(-6), 2f32.powi(-10));
        let mut x = grid(&mut rng, [m, k], sx);
        let mut w = grid(&mut rng, [k, n], sw);
        let dy = grid(&mut rng, [m, n], sd);
        // Elements to perturb (none on an amax position): value 192·s, step 64·s (a step
        // much larger than the f32 rounding of the outputs, which reach ~10³).
        let (base, step) = (192.0, 64.0);
        let xs: Vec<usize> = [(0, 1), (17, 250), (149, 299), (77, 128)]
            .iter()
            .map(|&(r, c)| r * k + c)
            .collect();
        let ws: Vec<usize> = [(0, 5), (131, 139), (299, 0), (128, 64)]
            .iter()
            .map(|&(r, c)| r * n + c)
            .collect();
        xs.iter().for_each(|&i| x[i] = base * sx);
        ws.iter().for_each(|&i| w[i] = base * sw);
        let gemm = QuantGemm {
            precision,
            counters: None,
        };
        let dev = device();
        let t = |v: &[f32], shape: [usize; 2]| {
            Tensor::<AD, 2>::from_data(TensorData::new(v.to_vec(), shape), &dev)
        };
        // L = Σ dy ⊙ (x · w), summed in float64 from the forward's f32 outputs.
        let loss = |x: &[f32], w: &[f32]| -> f64 {
            let y = f32s(<Cpu as DsBackend>::quantized_linear(
                t(x, [m, k]).inner(),
                t(w, [k, n]).inner(),
                &gemm,
            ));
            y.iter().zip(&dy).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let (xt, wt) = (t(&x, [m, k]).require_grad(), t(&w, [k, n]).require_grad());
        let y = <AD as DsBackend>::quantized_linear(xt.clone(), wt.clone(), &gemm);
        let grads = (y * t(&dy, [m, n])).sum().backward();
        let (gx, gw) = (
            f32s(xt.grad(&grads).unwrap()),
            f32s(wt.grad(&grads).unwrap()),
        );
        for &i in &xs {
            let (r, c) = (i / k, i % k);
            let h = step * sx;
            let (mut up, mut down) = (x.clone(), x.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (loss(&up, &w) - loss(&down, &w)) / (2.0 * h as f64);
            let scale: f64 = (0..n)
                .map(|j| (dy[r * n + j] as f64 * w[c * n + j] as f64).abs())
                .sum();
            let d = (gx[i] as f64 - fd).abs();
            assert!(
                d <= 1e-3 * scale,
                "{precision:?} dL/dx[{r},{c}]: backward {} vs finite difference {fd} (scale {scale:.3e})",
                gx[i]
            );
        }
        for &i in &ws {
            let (r, c) = (i / n, i % n);
            let h = step * sw;
            let (mut up, mut down) = (w.clone(), w.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (loss(&x, &up) - loss(&x, &down)) / (2.0 * h as f64);
            let scale: f64 = (0..m)
                .map(|j| (x[j * k + r] as f64 * dy[j * n + c] as f64).abs())
                .sum();
            let d = (gw[i] as f64 - fd).abs();
            assert!(
                d <= 1e-3 * scale,
                "{precision:?} dL/dw[{r},{c}]: backward {} vs finite difference {fd} (scale {scale:.3e})",
                gw[i]
            );
        }
    }
}

/// On inputs off the grid, FP8 rounding moves the forward by up to 2^-4 of each operand: the
/// FP8 product differs from the f32 one, by no more than that (a check that quantization is
/// applied at all, and is not wildly off).
#[test]
fn fp8_forward_rounds_its_operands() {
    let mut rng = Rng::new(3);
    let (m, k, n) = (40, 200, 30);
    let x = tensor2(rng.normal_vec(m * k, 1.0), [m, k]);
    let w = tensor2(rng.normal_vec(k * n, 0.1), [k, n]);
    let exact = f32s(x.clone().matmul(w.clone()));
    let counters = Arc::new(QuantCounters::default());
    let gemm = QuantGemm {
        precision: GemmPrecision::Fp8 { pow2_scales: false },
        counters: Some(counters.clone()),
    };
    let q = f32s(<Cpu as DsBackend>::quantized_linear(x, w, &gemm));
    let rel = exact
        .iter()
        .zip(&q)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        .sqrt()
        / exact
            .iter()
            .map(|a| (*a as f64).powi(2))
            .sum::<f64>()
            .sqrt();
    // Relative RMS error of e4m3 rounding is ~2^-4/√3 per operand: ~0.05 for the product.
    assert!(rel > 1e-3 && rel < 0.08, "relative difference {rel}");
    assert_eq!(counters.snapshot().values as usize, m * k + k * n);
}

fn cfg_with(precision: Precision) -> TrainConfig {
    TrainConfig {
        steps: 8,
        precision,
        ..tiny_cfg()
    }
}

/// Training steps in bf16 and FP8 follow the f32 steps closely from the same seed, without
/// being identical to them; FP8 counts its quantizations, f32 and bf16 count none. The layers
/// the report keeps in higher precision (lm_head, the MTP projection) stay f32.
#[test]
fn bf16_and_fp8_steps_follow_f32() {
    let run = |precision| {
        let mut t = trainer(cfg_with(precision), 8);
        let stats: Vec<_> = (0..6).map(|_| t.train_step().unwrap()).collect();
        (t, stats)
    };
    let (t32, s32) = run(Precision::F32);
    let (t16, s16) = run(Precision::Bf16);
    let (t8, s8) = run(Precision::Fp8);
    assert!(t32.model.lm_head.gemm.is_none());
    for t in [&t16, &t8] {
        assert!(t.model.lm_head.gemm.is_none(), "lm_head stays f32");
        assert!(
            t.model.model.mtp[0].eh_proj.gemm.is_none(),
            "eh_proj stays f32"
        );
        let attn = &t.model.model.layers[0].self_attn;
        assert!(attn.o_proj.gemm.is_some() && attn.kv_b_proj.gemm.is_some());
        let moe = t.model.model.layers[1].mlp.moe().unwrap();
        assert!(moe.experts.iter().all(|e| e.down_proj.gemm.is_some()));
    }
    for (i, ((a, b), c)) in s32.iter().zip(&s16).zip(&s8).enumerate() {
        let rel16 = (b.loss - a.loss).abs() / a.loss;
        let rel8 = (c.loss - a.loss).abs() / a.loss;
        // bf16 rounds to 2^-9 relative, FP8 to 2^-4: a handful of steps keeps the loss within
        // 1% and 5% of f32's (measured: ~1e-4 and ~1e-3).
        assert!(rel16 < 0.01, "step {i}: bf16 {} vs f32 {}", b.loss, a.loss);
        assert!(rel8 < 0.05, "step {i}: fp8 {} vs f32 {}", c.loss, a.loss);
        assert!(a.fp8.is_none() && b.fp8.is_none());
        let q = c.fp8.expect("fp8 counts");
        assert!(q.values > 0 && q.tiles > 0 && q.overflow == 0, "{q:?}");
    }
    assert_ne!(s32[5].loss, s16[5].loss, "bf16 changed nothing");
    assert_ne!(s32[5].loss, s8[5].loss, "fp8 changed nothing");
    assert_ne!(s16[5].loss, s8[5].loss);
}

/// `optimizer_state = bf16` keeps AdamW's moments in bf16 between steps, and the run stays
/// close to the f32-state run (moments rounded to 2^-9 relative).
#[test]
fn bf16_optimizer_state() {
    let run = |state| {
        let mut t = trainer(
            TrainConfig {
                optimizer_state: state,
                ..cfg_with(Precision::F32)
            },
            8,
        );
        for _ in 0..4 {
            t.train_step().unwrap();
        }
        t
    };
    let (t32, t16) = (run(StateDtype::F32), run(StateDtype::Bf16));
    // Both moments of every 2-D parameter (the matrices).
    let dtypes = |t: &dsv3_train::Trainer<AD>| -> Vec<DType> {
        use burn::optim::record::{AdaptorRecord, AdaptorRecordV1};
        t.optim
            .to_record()
            .into_values()
            .filter_map(|r| match r {
                AdaptorRecord::V1(AdaptorRecordV1::Rank2(s)) => Some(s.momentum),
                _ => None,
            })
            .flat_map(|m| [m.moment_1.dtype(), m.moment_2.dtype()])
            .collect()
    };
    let d16 = dtypes(&t16);
    assert!(
        !d16.is_empty() && d16.iter().all(|d| *d == DType::BF16),
        "{d16:?}"
    );
    assert!(dtypes(&t32).iter().all(|d| *d == DType::F32));
    let (p32, p16) = (params(&t32.model), params(&t16.model));
    let mut worst = 0f32;
    let mut differ = false;
    for ((_, a), (_, b)) in p32.iter().zip(&p16) {
        for (x, y) in a.iter().zip(b) {
            worst = worst.max((x - y).abs());
            differ |= x != y;
        }
    }
    // 4 steps of lr ≤ 3e-3: AdamW moves a weight by ≤ ~lr per step; bf16 moments change the
    // update by a small fraction of that.
    assert!(differ, "bf16 moments changed nothing");
    assert!(worst < 2e-3, "max |Δ parameter| {worst}");
}

/// Configs written before these settings existed load as f32; the settings round-trip.
#[test]
fn precision_settings_serialize() {
    let old: TrainConfig = serde_json::from_str(r#"{"steps": 5, "seq_len": 16}"#).unwrap();
    assert_eq!(
        (old.precision, old.optimizer_state, old.fp8_pow2_scales),
        (Precision::F32, StateDtype::F32, false)
    );
    let cfg = TrainConfig {
        precision: Precision::Fp8,
        fp8_pow2_scales: true,
        optimizer_state: StateDtype::Bf16,
        ..TrainConfig::default()
    };
    let text = serde_json::to_string(&cfg).unwrap();
    assert!(text.contains(r#""precision":"fp8""#) && text.contains(r#""optimizer_state":"bf16""#));
    assert_eq!(serde_json::from_str::<TrainConfig>(&text).unwrap(), cfg);
}

/// `dsv3 train --precision fp8` logs the FP8 counts in metrics.jsonl and keeps the settings in
/// its checkpoints; `dsv3 plot-runs` draws runs together; bad values are usage errors.
#[test]
fn cli_precision_flags() {
    let dir = scratch("train-fp8-cli");
    let o = dir.to_str().unwrap();
    let out = dsv3(&[
        "train",
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--log-every",
        "1",
        "--eval-every",
        "2",
        "--precision",
        "fp8",
        "--fp8-pow2-scales",
        "--optimizer-state",
        "bf16",
        "--samples",
        "0",
        "--out",
        o,
    ])
    .unwrap();
    assert!(out.contains("fp8 underflow"), "{out}");
    let recs = dsv3_train::metrics::read(&dir.join("metrics.jsonl")).unwrap();
    assert_eq!(recs.len(), 2);
    for r in &recs {
        assert!(
            r.fp8_values.unwrap() > 0 && r.fp8_overflow == Some(0),
            "{r:?}"
        );
        let share = r.fp8_clipped_tile_share.unwrap();
        assert!((0.0..=1.0).contains(&share));
    }
    let (_, newest) = dsv3_train::checkpoint::complete(&dir)
        .pop()
        .expect("a checkpoint");
    let state = dsv3_train::checkpoint::read_state(&newest).unwrap();
    assert_eq!(state.train.precision, Precision::Fp8);
    assert!(state.train.fp8_pow2_scales);
    assert_eq!(state.train.optimizer_state, StateDtype::Bf16);
    let e = dsv3(&[
        "train",
        "--preset",
        "tiny",
        "--precision",
        "fp9",
        "--out",
        o,
    ])
    .unwrap_err();
    assert!(e.contains("fp9"), "{e}");
    let e = dsv3(&[
        "train",
        "--preset",
        "tiny",
        "--fp8-pow2-scales",
        "--precision",
        "bf16",
        "--out",
        o,
    ])
    .unwrap_err();
    assert!(e.contains("--precision fp8"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The training-memory model's parameter split on the released 671B shape, against counts
/// worked out by hand from the config (61 layers + 1 MTP block; 3 dense).
#[test]
fn training_memory_split_of_671b() {
    let cfg = dsv3_model::DeepseekV3Config::preset("671b").unwrap();
    let s = dsv3_train::memory::split(&cfg);
    // Attention per layer: q_a 7168·1536, q_b 1536·128·192, kv_a 7168·576, kv_b 512·128·256,
    // o 128·128·7168.
    let attn: u64 =
        7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168;
    assert_eq!(attn, 187_105_280);
    let dense_mlp: u64 = 3 * 7168 * 18432;
    let shared: u64 = 3 * 7168 * 2048;
    assert_eq!(s.quantized_dense, 62 * attn + 3 * dense_mlp + 59 * shared);
    assert_eq!(s.experts, 59 * 256 * 3 * 7168 * 2048);
    // What stays in higher precision: embedding + head (129280·7168 each), 59 routers
    // (256·7168 + 256), norms, the MTP projection 2·7168·7168 and its norms.
    let v = 129_280u64 * 7168;
    assert!(s.other > 2 * v + 2 * 7168 * 7168 && s.other < 2 * v + 2 * 7168 * 7168 + 200_000_000);
    let rows = dsv3_train::memory::per_gpu(&cfg, dsv3_train::memory::Layout::REPORT).unwrap();
    let (f32_, bf16, fp8) = (&rows[0], &rows[1], &rows[2]);
    // One GPU holds 1/16 of the dense part and 1/1024 of the experts.
    let held = (s.quantized_dense + s.other) as f64 / 16.0 + s.experts as f64 / 1024.0;
    assert!((f32_.weights - 4.0 * held).abs() < 1.0 && (fp8.grads - 4.0 * held).abs() < 1.0);
    assert!(fp8.weights < 0.6 * bf16.weights && bf16.weights == 0.5 * f32_.weights);
    assert_eq!(f32_.master, 0.0);
    assert!(fp8.activations_per_token_layer < 0.52 * bf16.activations_per_token_layer);
    let bad = dsv3_train::memory::Layout {
        gpus: 100,
        pp: 16,
        ep: 64,
    };
    assert!(dsv3_train::memory::per_gpu(&cfg, bad).is_err());
}
