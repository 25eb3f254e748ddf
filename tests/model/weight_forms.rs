//! The weight forms a model can be held in (f32, bf16, FP8 codes, packed experts) compute what
//! the plain f32 model computes.

use std::path::Path;

use burn::tensor::{Tensor, TensorData};
use dsv3_backends::DsBackend;
use dsv3_model::{
    load_with, DeepseekV3, ForwardOptions, LoadOptions, WeightOptions, WeightStorage,
};

use crate::common::*;

pub(crate) fn load_fixture_with<Bk: DsBackend>(
    name: &str,
    weights: WeightOptions,
    device: &Bk::Device,
) -> DeepseekV3<Bk> {
    let opts = LoadOptions {
        strict: true,
        skip_mtp: false,
        ..Default::default()
    };
    load_with::<Bk>(&fixture(name), device, &opts, &weights)
        .unwrap_or_else(|e| panic!("loading {name}: {e}"))
        .0
}

/// Logits (and recorded routing) of the golden's input.
pub(crate) fn logits_of<Bk: DsBackend>(
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

pub(crate) fn sorted(e: &[Vec<u32>]) -> Vec<Vec<u32>> {
    e.iter()
        .map(|r| {
            let mut r = r.clone();
            r.sort();
            r
        })
        .collect()
}

/// bf16 weights in memory: on a BF16 checkpoint the values are the checkpoint's exactly (the
/// file's bytes, memory-mapped), so the logits equal the f32-weight model's up to f32 rounding —
/// the weights are used as the file's `[out, in]` rows, so each product sums in another order
/// (dot products along K) than the f32 model's `gemm` (measured 2.9e-6 on logits up to 12.4,
/// 2.3e-7 relative; bound 1e-5 relative to the largest logit) — and routing and greedy decode
/// are the same, in half the bytes. On an f32 checkpoint the weights are rounded to nearest bf16 (relative 2⁻⁹, enough to flip this random
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
    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
    println!("largest |logit| {scale:.3}");
    assert!(d <= 1e-5 * scale.max(1.0), "logits differ by {d:e}");
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
        },
        WeightOptions {
            storage: WeightStorage::Fp8,
            pack_experts: true,
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
            },
            &dev,
        ),
        &scratch("packed-save"),
        dsv3_model::SaveDtype::F32,
    )
    .unwrap_err();
    assert!(e.to_string().contains("packed"), "{e}");
}
