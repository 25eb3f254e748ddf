//! The backend extension: the plain-tensor defaults against host references, FP8 in memory and
//! packed experts against the ordinary model, backend errors, `dsv3 compare`, and (feature
//! `wgpu`) every CubeCL kernel against its default plus the fixtures on wgpu.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use dsv3_backends::{e4m3, DsBackend, Fp8Weight, GroupedWeight};
use dsv3_model::{
    load_with, DeepseekV3, ForwardOptions, LoadOptions, WeightOptions, WeightStorage,
};

use crate::common::*;

/// Test inputs drawn from the workspace's one generator.
struct Rng(SplitMix64);
impl Rng {
    fn new(seed: u64) -> Self {
        Self(SplitMix64::new(seed))
    }
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn uniform(&mut self) -> f32 {
        self.0.uniform() as f32
    }
    fn normal_vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| (self.uniform() + self.uniform() + self.uniform() - 1.5) * 2.0 * scale)
            .collect()
    }
    /// FP8 codes without the two NaN codes.
    fn codes(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                let c = (self.next() >> 56) as u8;
                if c & 0x7F == 0x7F {
                    c ^ 1
                } else {
                    c
                }
            })
            .collect()
    }
}

fn f32s<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

fn ints<Bk: Backend, const D: usize>(t: Tensor<Bk, D, Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().to_vec().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Random FP8 weights `[e, n, k]` with random positive block scales.
fn random_fp8<Bk: DsBackend>(
    rng: &mut Rng,
    [e, n, k]: [usize; 3],
    block: usize,
    device: &Bk::Device,
) -> (Fp8Weight<Bk>, Vec<u8>, Vec<f32>) {
    let codes = rng.codes(e * n * k);
    let scales: Vec<f32> = (0..e * n.div_ceil(block) * k.div_ceil(block))
        .map(|_| 0.001 + rng.uniform() * 0.01)
        .collect();
    let w = Fp8Weight::from_codes(&codes, &scales, [e, n, k], block, device).unwrap();
    (w, codes, scales)
}

/// Flex's thin-product paths (the one-row kernel, columns split over the thread pool) give
/// exactly the plain matmul for one row (decode) and a few rows, at widths that do not split
/// evenly, and agree to f32 rounding on small and column-narrowed weights; with bf16 weights
/// the kernel equals the product with the widened weights; `par_map` keeps the order of its
/// items.
#[test]
fn flex_thin_products_and_par_map_are_exact() {
    let mut rng = Rng::new(41);
    let (k, n) = (701, 1013); // k·n above the split threshold (2^19)
    let w = tensor2(rng.normal_vec(k * n, 1.0), [k, n]);
    for m in [1, 3, 16] {
        let x = tensor2(rng.normal_vec(m * k, 1.0), [m, k]);
        let plain = f32s(x.clone().matmul(w.clone()));
        let split = f32s(B::dense_matmul(x, w.clone()));
        assert_eq!(plain.len(), m * n);
        let same = plain
            .iter()
            .zip(&split)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "m = {m}: max |Δ| {}", max_diff(&plain, &split));
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
        let ours = f32s(B::dense_matmul(x, w));
        let same = plain
            .iter()
            .zip(&ours)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "bf16 k = {k}: max |Δ| {}", max_diff(&plain, &ours));
    }
    let squares = B::par_map((0..100u64).collect(), |i| i * i);
    assert_eq!(squares, (0..100u64).map(|i| i * i).collect::<Vec<_>>());
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

/// The default activation quantizer (plain tensor ops) equals the host encoder.
#[test]
fn fp8_quantize_default_matches_host_encoder() {
    let mut rng = Rng::new(11);
    let (m, k, block) = (7, 300, 128);
    let x = rng.normal_vec(m * k, 3.0);
    for ue8m0 in [false, true] {
        let q = <B as DsBackend>::fp8_quantize(tensor2(x.clone(), [m, k]), block, ue8m0);
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

/// Host reference of dispatch: stable counting sort of the slots by expert.
fn host_dispatch(ids: &[i64], e: usize) -> (Vec<i64>, Vec<i64>) {
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
fn random_ids(rng: &mut Rng, t: usize, k: usize, e: usize) -> Vec<i64> {
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

fn int_tensor<Bk: Backend>(
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

fn load_fixture_with<Bk: DsBackend>(
    name: &str,
    weights: WeightOptions,
    device: &Bk::Device,
) -> DeepseekV3<Bk> {
    let opts = LoadOptions {
        strict: true,
        skip_mtp: false,
    };
    load_with::<Bk>(&fixture(name), device, &opts, &weights)
        .unwrap_or_else(|e| panic!("loading {name}: {e}"))
        .0
}

/// Logits (and recorded routing) of the golden's input.
fn logits_of<Bk: DsBackend>(
    model: &DeepseekV3<Bk>,
    golden: &Path,
) -> (Vec<f32>, Vec<Vec<Vec<u32>>>) {
    let g = Golden::read(golden);
    let tokens = model.tokens_tensor(&g.ids()).unwrap();
    let opts = ForwardOptions {
        record_routing: true,
        ..Default::default()
    };
    let out = model.forward(tokens.clone(), g.offset(), None, &opts);
    let mut routing: Vec<Vec<Vec<u32>>> = out
        .routing
        .iter()
        .map(|r| sorted(&r.routing.experts))
        .collect();
    if g.f.contains_key("mtp_logits") {
        let m = model.mtp_logits(tokens, &out, g.offset(), &opts).unwrap();
        routing.extend(m.routing.iter().map(|r| sorted(&r.routing.experts)));
    }
    (f32s(out.logits), routing)
}

fn sorted(e: &[Vec<u32>]) -> Vec<Vec<u32>> {
    e.iter()
        .map(|r| {
            let mut r = r.clone();
            r.sort();
            r
        })
        .collect()
}

/// bf16 weights in memory: on a BF16 checkpoint the values are the checkpoint's exactly, so the
/// logits, routing and greedy decode equal the f32-weight model's (the products widen each
/// weight to the same f32 value; measured bit-identical), in half the bytes. On an f32
/// checkpoint the weights are rounded to nearest bf16 (relative 2⁻⁹, enough to flip this random
/// model's closest expert choices, so no comparison with its f32 golden is meaningful).
#[test]
fn bf16_weights_in_memory() {
    let dev = device();
    let bf16 = WeightOptions {
        storage: WeightStorage::Bf16,
        ..Default::default()
    };
    let golden = goldens(&fixture("tiny-direct"))[0].clone();
    let mut f32w = load_fixture_with::<B>("tiny-direct", WeightOptions::default(), &dev);
    let mut bfw = load_fixture_with::<B>("tiny-direct", bf16, &dev);
    let (want, want_routing) = logits_of(&f32w, &golden);
    let (got, routing) = logits_of(&bfw, &golden);
    let d = max_diff(&got, &want);
    println!("tiny-direct (BF16 file): bf16 vs f32 weights max |Δlogits| {d:.2e}");
    assert!(d <= 1e-6, "logits differ by {d:e}");
    assert_eq!(routing, want_routing);
    let (b16, b32) = (bfw.linear_weight_bytes(), f32w.linear_weight_bytes());
    // Half the f32 bytes, except kv_b_proj (kept f32: attention reads it per head every step).
    let kv_b: usize = f32w
        .linears_mut()
        .iter()
        .filter(|(n, _)| n.ends_with("kv_b_proj"))
        .map(|(_, l)| l.weight_bytes())
        .sum();
    assert!(kv_b > 0);
    assert_eq!(
        2 * (b16 - kv_b),
        b32 - kv_b,
        "bf16 Linear weights take half the f32 bytes"
    );
    // Everything else is held as before.
    assert_eq!(f32w.weight_bytes() - bfw.weight_bytes(), b32 - b16);
    // Decode (one-row products read bf16 directly) follows the same greedy path.
    let ids = Golden::read(&golden).ids();
    let greedy = |m: &DeepseekV3<B>| {
        let opts = dsv3_infer::GenerateOptions {
            max_new_tokens: 8,
            eos_token_ids: Some(vec![]),
            ..Default::default()
        };
        dsv3_infer::generate(m, None, &ids, &opts, |_| {})
            .unwrap()
            .tokens
    };
    assert_eq!(greedy(&bfw), greedy(&f32w));
    // An f32 checkpoint is rounded to nearest bf16 (ties to even): the model then computes
    // exactly what the f32 model computes with every bf16-held Linear weight rounded by hand.
    let g = fixture("tiny-qlora").join("golden.safetensors");
    let m = load_fixture_with::<B>("tiny-qlora", bf16, &dev);
    let mut rounded = load_fixture_with::<B>("tiny-qlora", WeightOptions::default(), &dev);
    let to_bf16 = |v: f32| {
        let b = v.to_bits();
        f32::from_bits((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000)
    };
    for (name, l) in rounded.linears_mut() {
        if name.ends_with("kv_b_proj") {
            continue; // kept f32 (see WeightStorage::Bf16)
        }
        let w = l.weight.val();
        let shape = w.dims();
        let values: Vec<f32> = f32s(w).into_iter().map(to_bf16).collect();
        let w = Tensor::<B, 2>::from_data(TensorData::new(values, shape), &dev);
        l.weight = burn::module::Param::initialized(burn::module::ParamId::new(), w);
    }
    let (got, routing) = logits_of(&m, &g);
    let (want, want_routing) = logits_of(&rounded, &g);
    let d = max_diff(&got, &want);
    println!("tiny-qlora (f32 file): bf16 weights vs f32-rounded-to-bf16 weights {d:.2e}");
    assert!(d <= 1e-6, "logits differ by {d:e}");
    assert_eq!(routing, want_routing);
}

/// FP8 weights kept in memory (and the experts packed for the grouped kernels) compute what
/// the dequantized model computes, in about a quarter of the f32 bytes.
#[test]
fn fp8_in_memory_equals_dequantized_model() {
    let dev = device();
    let dense = load_fixture_with::<B>("tiny-fp8", WeightOptions::default(), &dev);
    let golden = fixture("tiny-fp8").join("golden.safetensors");
    let (want, want_routing) = logits_of(&dense, &golden);
    for weights in [
        WeightOptions {
            storage: WeightStorage::Fp8,
            pack_experts: false,
            ..Default::default()
        },
        WeightOptions {
            storage: WeightStorage::Fp8,
            pack_experts: true,
            ..Default::default()
        },
    ] {
        let mut m = load_fixture_with::<B>("tiny-fp8", weights, &dev);
        let fp8_linears = m
            .linears_mut()
            .iter()
            .filter(|(_, l)| l.fp8.is_some())
            .count();
        let (got, routing) = logits_of(&m, &golden);
        let d = max_diff(&got, &want);
        println!("{weights:?}: {fp8_linears} FP8 linears, max |Δlogits| vs dequantized {d:.2e}");
        assert!(fp8_linears > 0, "FP8 form was not used");
        assert!(d < 2e-5, "{weights:?}: logits differ by {d:.3e}");
        assert_eq!(routing, want_routing, "{weights:?}: routing differs");
    }
    let mut fp8 = load_fixture_with::<B>(
        "tiny-fp8",
        WeightOptions {
            storage: WeightStorage::Fp8,
            pack_experts: true,
            ..Default::default()
        },
        &dev,
    );
    assert!(fp8.is_packed());
    let mut dense = dense;
    let (b_fp8, b_f32) = (fp8.linear_weight_bytes(), dense.linear_weight_bytes());
    println!("linear weights: fp8 {b_fp8} bytes, f32 {b_f32} bytes");
    assert!(
        (b_fp8 as f64) < 0.6 * (b_f32 as f64),
        "FP8 form must be much smaller than f32 ({b_fp8} vs {b_f32})"
    );
}

/// Packed experts (the backend's dispatch / grouped matmul / combine) against the per-expert
/// form on the CPU, and against the golden.
#[test]
fn packed_experts_match_per_expert_model() {
    let dev = device();
    for name in ["tiny-qlora", "tiny-direct"] {
        let plain = load_fixture_with::<B>(name, WeightOptions::default(), &dev);
        let packed = load_fixture_with::<B>(
            name,
            WeightOptions {
                storage: WeightStorage::F32,
                pack_experts: true,
                ..Default::default()
            },
            &dev,
        );
        for g in goldens(&fixture(name)) {
            let (a, ra) = logits_of(&plain, &g);
            let (b, rb) = logits_of(&packed, &g);
            let d = max_diff(&a, &b);
            let golden = max_abs_diff(&b, &Golden::read(&g).f("logits").1);
            println!(
                "{}: packed vs per-expert {d:.2e}, vs golden {golden:.2e}",
                g.display()
            );
            assert!(d < 1e-5, "{name}: packed experts differ by {d:.3e}");
            assert!(golden < LOGIT_TOL as f64);
            assert_eq!(ra, rb);
        }
    }
    let e = dsv3_model::save(
        &load_fixture_with::<B>(
            "tiny-qlora",
            WeightOptions {
                storage: WeightStorage::F32,
                pack_experts: true,
                ..Default::default()
            },
            &dev,
        ),
        &scratch("packed-save"),
        dsv3_model::SaveDtype::F32,
    )
    .unwrap_err();
    assert!(e.to_string().contains("packed"), "{e}");
}

/// Asking for a backend that is missing gives one line (never a driver panic).
#[test]
fn backend_errors_are_one_line() {
    let d = fixture("tiny-qlora");
    let d = d.to_str().unwrap();
    for backend in ["cuda", "tpu"] {
        let e = dsv3(&[
            "score",
            "--model",
            d,
            "--tokens",
            "1,2",
            "--backend",
            backend,
        ])
        .unwrap_err();
        assert!(e.contains("not available") && !e.contains('\n'), "{e}");
    }
    let e = dsv3(&["score", "--model", d, "--tokens", "1,2", "--dtype", "bf16"]).unwrap_err();
    assert!(
        e.contains("does not support dtype bf16") && !e.contains('\n'),
        "{e}"
    );
    #[cfg(feature = "wgpu")]
    {
        let e = dsv3(&[
            "score",
            "--model",
            d,
            "--tokens",
            "1,2",
            "--backend",
            "wgpu",
            "--dtype",
            "bf16",
        ])
        .unwrap_err();
        assert!(e.contains("does not support dtype bf16"), "{e}");
    }
    #[cfg(not(feature = "wgpu"))]
    {
        let e = dsv3(&[
            "score",
            "--model",
            d,
            "--tokens",
            "1,2",
            "--backend",
            "wgpu",
        ])
        .unwrap_err();
        assert!(e.contains("not available in this build"), "{e}");
    }
}

/// `dsv3 compare` on a fixture: the CPU row agrees with the float64 golden, the other backends
/// are either measured or reported as unavailable, and the JSON has one row per backend.
#[test]
fn compare_reports_every_backend() {
    let d = fixture("tiny-qlora");
    let s = dsv3(&[
        "compare",
        "--model",
        d.to_str().unwrap(),
        "--backends",
        "flex,wgpu,cuda",
        "--json",
        "--decode",
        "3",
    ])
    .unwrap();
    let j: serde_json::Value = serde_json::from_str(&s).unwrap();
    assert_eq!(j["baseline"], "float64 golden");
    let rows = j["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["status"], "ok");
    assert!(rows[0]["max_abs_diff"].as_f64().unwrap() < LOGIT_TOL as f64);
    assert_eq!(rows[0]["greedy"].as_array().unwrap().len(), 3);
    let wgpu_ok = rows[1]["status"] == "ok";
    assert_eq!(wgpu_ok, cfg!(feature = "wgpu"), "{}", rows[1]);
    if wgpu_ok {
        assert!(rows[1]["max_abs_diff"].as_f64().unwrap() < LOGIT_TOL as f64);
        assert_eq!(rows[1]["greedy_agrees"], true);
    }
    // No GPU on CI: CUDA is reported, not fatal.
    if rows[2]["status"] != "ok" {
        assert!(rows[2]["status"]
            .as_str()
            .unwrap()
            .contains("not available"));
    }
    let table = dsv3(&[
        "compare",
        "--model",
        d.to_str().unwrap(),
        "--backends",
        "flex",
    ])
    .unwrap();
    assert!(table.contains("flex") && table.contains("agree"), "{table}");
}

/// The model-core fixtures on a GPU backend: logits against the float64 golden (1e-4) and
/// routing equal to the CPU's, in the per-expert form, the packed (kernel) form, and FP8 in
/// memory.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn fixtures_match_golden_on<Bk: DsBackend>(label: &str, dev: &Bk::Device) {
    let packed = WeightOptions {
        pack_experts: true,
        ..Default::default()
    };
    let fp8 = WeightOptions {
        storage: WeightStorage::Fp8,
        pack_experts: true,
        ..Default::default()
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
            assert!(
                d < LOGIT_TOL as f64,
                "{name}: {label} logits differ by {d:.3e}"
            );
            assert_eq!(
                routing, cpu_routing,
                "{name}: {label} routing differs from the CPU's"
            );
            assert!(!routing.is_empty());
        }
    }
}

#[cfg(feature = "wgpu")]
mod wgpu {
    //! Every CubeCL kernel against its plain-tensor default (run on Flex), on random inputs
    //! whose sizes are not multiples of 128, and the fixtures on wgpu.

    use super::*;
    use dsv3_backends::{MoeDispatch, Wgpu};

    fn wdev() -> burn::backend::wgpu::WgpuDevice {
        Default::default()
    }

    fn to_wgpu2(v: Vec<f32>, shape: [usize; 2]) -> Tensor<Wgpu, 2> {
        Tensor::from_data(TensorData::new(v, shape), &wdev())
    }

    #[test]
    fn fp8_matmul_kernel_equals_default() {
        let mut rng = Rng::new(21);
        let (m, n, k, b) = (9, 200, 300, 128);
        let (_, codes, scales) = random_fp8::<B>(&mut rng, [1, n, k], b, &device());
        let x = rng.normal_vec(m * k, 1.0);
        let wc = Fp8Weight::<B>::from_codes(&codes, &scales, [1, n, k], b, &device()).unwrap();
        let wg = Fp8Weight::<Wgpu>::from_codes(&codes, &scales, [1, n, k], b, &wdev()).unwrap();
        let want = f32s(<B as DsBackend>::fp8_matmul(
            tensor2(x.clone(), [m, k]),
            &wc,
        ));
        let got = f32s(<Wgpu as DsBackend>::fp8_matmul(to_wgpu2(x, [m, k]), &wg));
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = max_diff(&got, &want);
        println!("fp8 matmul kernel vs default: {d:.2e} (max |y| {scale:.2})");
        assert!(scale > 0.1 && d <= 1e-5 * scale, "differ by {d}");
    }

    #[test]
    fn fp8_quantize_kernel_equals_default() {
        let mut rng = Rng::new(5);
        let (m, k, b) = (6, 333, 128);
        let x = rng.normal_vec(m * k, 2.0);
        for ue8m0 in [false, true] {
            let want = <B as DsBackend>::fp8_quantize(tensor2(x.clone(), [m, k]), b, ue8m0);
            let got = <Wgpu as DsBackend>::fp8_quantize(to_wgpu2(x.clone(), [m, k]), b, ue8m0);
            assert_eq!(f32s(got.scales), f32s(want.scales), "scales, ue8m0 {ue8m0}");
            assert_eq!(ints(got.codes), ints(want.codes), "codes, ue8m0 {ue8m0}");
        }
    }

    fn dispatch_pair(
        ids: &[i64],
        t: usize,
        k: usize,
        e: usize,
    ) -> (MoeDispatch<B>, MoeDispatch<Wgpu>) {
        (
            <B as DsBackend>::moe_dispatch(int_tensor::<B>(ids, [t, k], &device()), e),
            <Wgpu as DsBackend>::moe_dispatch(int_tensor::<Wgpu>(ids, [t, k], &wdev()), e),
        )
    }

    /// 41 tokens: the tiled grouped kernel (several experts per tile); 5 tokens: the
    /// one-thread-per-output kernel.
    #[test]
    fn moe_kernels_equal_defaults() {
        for t in [41, 5] {
            moe_kernels_equal_defaults_at(t);
        }
    }

    fn moe_kernels_equal_defaults_at(t: usize) {
        let mut rng = Rng::new(17);
        let (k, e, h, n) = (6, 29, 150, 130);
        let ids = random_ids(&mut rng, t, k, e);
        let (dc, dg) = dispatch_pair(&ids, t, k, e);
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
        let wg = GroupedWeight::dense(Tensor::<Wgpu, 3>::from_data(
            TensorData::new(w, [e, h, n]),
            &wdev(),
        ));
        let yc = f32s(<B as DsBackend>::grouped_matmul(
            tensor2(xs.clone(), [s, h]),
            &wc,
            &dc,
        ));
        let yg = f32s(<Wgpu as DsBackend>::grouped_matmul(
            to_wgpu2(xs.clone(), [s, h]),
            &wg,
            &dg,
        ));
        let d = max_diff(&yg, &yc);
        println!("grouped matmul kernel vs default: {d:.2e}");
        assert!(d < 1e-4, "grouped matmul differs by {d}");
        // FP8 grouped matmul: weights [e, n, h].
        let (fc, codes, scales) = random_fp8::<B>(&mut rng, [e, n, h], 128, &device());
        let fg = Fp8Weight::<Wgpu>::from_codes(&codes, &scales, [e, n, h], 128, &wdev()).unwrap();
        let yc8 = f32s(<B as DsBackend>::grouped_matmul(
            tensor2(xs.clone(), [s, h]),
            &GroupedWeight::fp8(fc),
            &dc,
        ));
        let yg8 = f32s(<Wgpu as DsBackend>::grouped_matmul(
            to_wgpu2(xs, [s, h]),
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
        let og = f32s(<Wgpu as DsBackend>::moe_combine(
            to_wgpu2(y, [s, n]),
            &dg,
            to_wgpu2(gw, [t, k]),
            to_wgpu2(base, [t, n]),
        ));
        let dcmb = max_diff(&og, &oc);
        println!("combine kernel vs default: {dcmb:.2e}");
        assert!(dcmb < 1e-5, "combine differs by {dcmb}");
    }

    /// wgpu cannot hold bf16 tensors (WGSL has no bf16): `--weights bf16` is a clear error there,
    /// not a kernel-compiler panic.
    #[test]
    fn bf16_weights_refused_on_wgpu() {
        let opts = LoadOptions {
            strict: true,
            skip_mtp: false,
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
        fixtures_match_golden_on::<Wgpu>("wgpu", &wdev());
    }
}

/// On a CUDA machine only (`scripts/gpu-check.sh` runs these with `--ignored`): they fail when
/// no GPU is there, rather than skipping.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use dsv3_backends::{BackendKind, Cuda, FloatDtype};

    fn require_gpu() {
        BackendKind::Cuda
            .check(FloatDtype::F32)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// The model-core fixtures on CUDA (f32): see [`fixtures_match_golden_on`].
    #[test]
    #[ignore = "needs a CUDA GPU: scripts/gpu-check.sh"]
    fn cuda_fixtures_match_golden() {
        require_gpu();
        fixtures_match_golden_on::<Cuda>("cuda", &Default::default());
    }
}
