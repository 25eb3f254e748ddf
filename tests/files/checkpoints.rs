//! Checkpoints as tools convert, trim and shard them.

use dsv3_model::{load, AttentionMode, LoadOptions};
use safetensors::Dtype;
use serde_json::json;

use crate::common::*;
use crate::model::check_golden;

use super::*;

/// An index naming a shard that is missing, or mapping a tensor to a shard that lacks it: one
/// line naming the shard and the tensor.
#[test]
fn sharded_index_faults_name_shard_and_tensor() {
    let dir = copy_fixture("tiny-direct");
    let index = read_json(&dir.join("model.safetensors.index.json"));
    std::fs::copy(
        dir.join("model-00002-of-00002.safetensors"),
        dir.join("keep.bin"),
    )
    .unwrap();
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let e = load::<B>(&dir, &device(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    let in_second = index["weight_map"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(_, f)| *f == "model-00002-of-00002.safetensors")
        .map(|(n, _)| n.clone())
        .unwrap();
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
    assert!(e.contains("does not exist"), "{e}");
    std::fs::rename(
        dir.join("keep.bin"),
        dir.join("model-00002-of-00002.safetensors"),
    )
    .unwrap();
    loads(&dir);

    // A tensor the index maps to shard 1, which does not hold it (a hand-edited index).
    let mut bad = index.clone();
    bad["weight_map"][&in_second] = json!("model-00001-of-00002.safetensors");
    write_json(&dir.join("model.safetensors.index.json"), &bad);
    let e = load::<B>(&dir, &device(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&in_second) && e.contains("model-00001-of-00002.safetensors"),
        "{e}"
    );
}

/// Shards without `__metadata__` (written by tools other than torch's `save_file`) load and
/// give the golden logits.
#[test]
fn shards_without_metadata_load() {
    let dir = copy_fixture("tiny-direct");
    for shard in ["model-00001-of-00002", "model-00002-of-00002"] {
        rewrite_safetensors(&dir.join(format!("{shard}.safetensors")), |_| {});
    }
    let ckpt = dsv3_model::checkpoint::Checkpoint::open(&dir).unwrap();
    assert!(ckpt.file_metadata(0).is_none() && ckpt.file_metadata(1).is_none());
    let (model, report) = loads(&dir);
    assert!(report.warnings.is_empty());
    check_golden(
        &model,
        &fixture("tiny-direct").join("golden.safetensors"),
        AttentionMode::Absorbed,
    );
}

/// A BF16 conversion that still carries the FP8 `quantization_config` (common in converted
/// uploads): loads the weights as stored, with a warning, for both `f32` and `fp8` weight
/// forms.
#[test]
fn bf16_conversion_with_fp8_quantization_config_loads_with_warning() {
    let dir = copy_fixture("tiny-direct");
    let mut c = read_json(&dir.join("config.json"));
    c["quantization_config"] = json!({"activation_scheme": "dynamic", "fmt": "e4m3",
        "quant_method": "fp8", "weight_block_size": [128, 128]});
    write_json(&dir.join("config.json"), &c);
    for storage in [WeightStorage::F32, WeightStorage::Fp8] {
        let (model, report) = load_as(&dir, storage).unwrap();
        assert!(
            report
                .warnings
                .iter()
                .any(|w| w.contains("quantization_config") && w.contains("F8_E4M3")),
            "{:?}",
            report.warnings
        );
        check_golden(
            &model,
            &fixture("tiny-direct").join("golden.safetensors"),
            AttentionMode::Absorbed,
        );
    }
}

/// FP8 scales of another scheme (1-D per-channel) or of the wrong grid: one line naming the
/// weight, its scale and the expected block grid, on both weight forms.
#[test]
fn fp8_scale_faults_are_clear_errors() {
    let weight = "model.layers.0.self_attn.o_proj.weight";
    let scale = format!("{weight}_scale_inv");
    for (tag, new_shape) in [("per-channel", vec![200usize]), ("grid", vec![1usize, 1])] {
        let dir = copy_fixture("tiny-fp8");
        rewrite_safetensors(&dir.join("model.safetensors"), |t| {
            for x in t.iter_mut().filter(|x| x.0 == scale) {
                let numel: usize = new_shape.iter().product();
                (x.1, x.2, x.3) = (Dtype::F32, new_shape.clone(), vec![0x3c; 4 * numel]);
            }
        });
        for storage in [WeightStorage::F32, WeightStorage::Fp8] {
            let e = load_as(&dir, storage).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains(weight) && e.contains(&scale), "{tag}: {e}");
            assert!(e.contains("[2, 1]"), "{tag}: expected grid named: {e}");
            if tag == "per-channel" {
                assert!(e.contains("per-channel"), "{e}");
            }
            assert!(!e.contains('\n'));
        }
    }
}

/// `kv_a_proj_with_mqa` of the released shape has 576 = 4·128 + 64 rows: its last block row is
/// partial. Dequantization is exact (torch's e4m3 decode times the block scale, one f32
/// multiply), in both orientations, and the FP8-in-memory product equals the float64 product
/// of the dequantized weight.
#[test]
fn fp8_partial_block_576_rows_is_exact() {
    let (rows, cols, block) = (576usize, 200usize, 128usize);
    let table = Golden::read(&fixtures().join("e4m3.safetensors"))
        .f("values")
        .1
        .clone();
    let mut rng = SplitMix64::new(576);
    let codes: Vec<u8> = (0..rows * cols)
        .map(|_| loop {
            let c = rng.below(256) as u8;
            if c & 0x7f != 0x7f {
                break c; // not NaN
            }
        })
        .collect();
    let grid = [rows.div_ceil(block), cols.div_ceil(block)];
    assert_eq!(grid, [5, 2]);
    let scales: Vec<f32> = (0..10)
        .map(|_| (1.0 + symmetric(&mut rng)) as f32 * 1e-3)
        .collect();
    let dir = scratch("fp8-576");
    let path = dir.join("w.safetensors");
    let sbytes: Vec<u8> = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
    let views = vec![
        (
            "w.weight".to_string(),
            safetensors::tensor::TensorView::new(Dtype::F8_E4M3, vec![rows, cols], &codes).unwrap(),
        ),
        (
            "w.weight_scale_inv".to_string(),
            safetensors::tensor::TensorView::new(Dtype::F32, grid.to_vec(), &sbytes).unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let ckpt = dsv3_model::checkpoint::Checkpoint::open(&path).unwrap();
    let want: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let (r, c) = (i / cols, i % cols);
            (table[codes[i] as usize] as f32) * scales[(r / block) * 2 + c / block]
        })
        .collect();
    let got = ckpt
        .read_f32("w.weight", &[rows, cols], false, block)
        .unwrap();
    assert!(got
        .iter()
        .zip(&want)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    let got_t = ckpt
        .read_f32("w.weight", &[rows, cols], true, block)
        .unwrap();
    for r in 0..rows {
        for c in 0..cols {
            assert_eq!(got_t[c * rows + r].to_bits(), want[r * cols + c].to_bits());
        }
    }
    // The FP8-in-memory form: x [3, cols] · Wᵀ against float64.
    let w = dsv3_backends::Fp8Weight::<B>::from_codes(
        &codes,
        &scales,
        [1, rows, cols],
        block,
        &device(),
    )
    .unwrap();
    let x: Vec<f32> = (0..3 * cols).map(|_| symmetric(&mut rng) as f32).collect();
    let y = to_vec(<B as dsv3_backends::DsBackend>::fp8_matmul(
        tensor2(x.clone(), [3, cols]),
        &w,
    ));
    let mut worst = 0f64;
    for m in 0..3 {
        for n in 0..rows {
            let exact: f64 = (0..cols)
                .map(|k| x[m * cols + k] as f64 * want[n * cols + k] as f64)
                .sum();
            let scale: f64 = (0..cols)
                .map(|k| (x[m * cols + k] as f64 * want[n * cols + k] as f64).abs())
                .sum();
            worst = worst.max((y[m * rows + n] as f64 - exact).abs() / scale.max(1e-30));
        }
    }
    // f32 accumulation over 200 products: relative to the sum of |terms|, < 200 · 2^-24 ≈ 1.2e-5.
    assert!(worst < 1.2e-5, "fp8_matmul relative error {worst:e}");
}

/// A checkpoint without `e_score_correction_bias` (converted by tools that dropped the buffer)
/// loads with a warning and computes what explicit zero biases compute, as HF does.
#[test]
fn missing_router_bias_is_zeros_with_warning() {
    let dropped = copy_fixture("tiny-qlora");
    let zeroed = copy_fixture("tiny-qlora");
    let bias = |x: &RawTensor| x.0.ends_with("e_score_correction_bias");
    rewrite_safetensors(&dropped.join("model.safetensors"), |t| {
        t.retain(|x| !bias(x))
    });
    rewrite_safetensors(&zeroed.join("model.safetensors"), |t| {
        t.iter_mut().filter(|x| bias(x)).for_each(|x| x.3.fill(0));
    });
    let (a, ra) = loads(&dropped);
    let (z, rz) = loads(&zeroed);
    assert!(rz.warnings.is_empty());
    assert!(
        ra.warnings
            .iter()
            .any(|w| w.contains("e_score_correction_bias") && w.contains("zeros")),
        "{:?}",
        ra.warnings
    );
    let ids = golden_ids(&fixture("tiny-qlora"));
    let (la, lz) = (logits(&a, &ids), logits(&z, &ids));
    assert!(la.iter().zip(&lz).all(|(x, y)| x.to_bits() == y.to_bits()));
    // And the bias matters in this fixture, so the zeros were really used.
    let (orig, _) = loads(&fixture("tiny-qlora"));
    assert!(logits(&orig, &ids) != la);
}

/// MTP declared but absent (a checkpoint converted without layer 61), or present but not
/// declared: the main model loads and matches the golden, with a warning saying what was done.
#[test]
fn mtp_declared_absent_or_present_undeclared_warns() {
    let golden = fixture("tiny-qlora").join("golden.safetensors");
    // Declared (num_nextn_predict_layers 1), absent from the file.
    let absent = copy_fixture("tiny-qlora");
    rewrite_safetensors(&absent.join("model.safetensors"), |t| {
        t.retain(|x| !x.0.starts_with("model.layers.3."));
    });
    let (model, report) = loads(&absent);
    assert!(model.model.mtp.is_empty());
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("num_nextn_predict_layers = 1") && w.contains("without MTP")),
        "{:?}",
        report.warnings
    );
    let g = Golden::read(&golden);
    let d = max_abs_diff(&logits(&model, &g.ids()), &g.f("logits").1);
    assert!(d < LOGIT_TOL as f64, "{d}");

    // Present, undeclared (num_nextn_predict_layers 0).
    let undeclared = copy_fixture("tiny-qlora");
    let mut c = read_json(&undeclared.join("config.json"));
    c["num_nextn_predict_layers"] = json!(0);
    write_json(&undeclared.join("config.json"), &c);
    let (model, report) = loads(&undeclared);
    assert!(model.model.mtp.is_empty());
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("layer(s) 3") && w.contains("num_nextn_predict_layers = 0")),
        "{:?}",
        report.warnings
    );
    assert!(report.unexpected.is_empty());
    let d = max_abs_diff(&logits(&model, &g.ids()), &g.f("logits").1);
    assert!(d < LOGIT_TOL as f64, "{d}");
}

/// `--weights fp8`: every parameter is counted whether held as FP8 codes or as floats, and a
/// float checkpoint (nothing to hold as FP8) says so instead of pretending.
#[test]
fn fp8_weight_form_counts_every_parameter_and_warns_on_float_files() {
    let report = |name: &str, storage| load_as(&fixture(name), storage).unwrap().1;
    let f32 = report("tiny-fp8", WeightStorage::F32);
    let fp8 = report("tiny-fp8", WeightStorage::Fp8);
    assert_eq!(fp8.params, f32.params);
    assert!(fp8.warnings.is_empty(), "{:?}", fp8.warnings);
    let float = report("tiny-qlora", WeightStorage::Fp8);
    assert!(
        float.warnings.iter().any(|w| w.contains("no F8_E4M3")),
        "{:?}",
        float.warnings
    );
}

/// A config whose `num_hidden_layers` is smaller than the checkpoint's: the layers past it are
/// plain blocks, not MTP modules, and loading says so (it used to drop them silently).
#[test]
fn layers_past_num_hidden_layers_that_are_not_mtp_warn() {
    let dir = copy_fixture("tiny-qlora");
    let mut c = read_json(&dir.join("config.json"));
    c["num_hidden_layers"] = json!(2);
    write_json(&dir.join("config.json"), &c);
    let (_, report) = dsv3_model::load::<B>(
        &dir,
        &device(),
        &LoadOptions {
            strict: false,
            skip_mtp: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("layer(s) 2") && w.contains("not MTP modules")),
        "{:?}",
        report.warnings
    );
}

/// `read_bf16` (what `--weights bf16` loads through) gives exactly what reading f32 and rounding
/// to nearest even gives — a BF16 tensor's own bits — for BF16, F16 and F32 storage, plain and
/// transposed, on a tensor large enough to be split over the cores (515 × 1031, not multiples of
/// the 64-element transpose tile) and on a small one.
#[test]
fn read_bf16_equals_rounded_f32_read() {
    use dsv3_model::checkpoint::{write_safetensors, Checkpoint, TensorSource};
    let dir = scratch("read-bf16");
    let mut rng = Rng::new(11);
    let mut tensors = Vec::new();
    let mut shapes = Vec::new();
    for (dtype, tag) in [
        (Dtype::BF16, "bf16"),
        (Dtype::F16, "f16"),
        (Dtype::F32, "f32"),
    ] {
        for shape in [vec![515usize, 1031], vec![3, 5], vec![7]] {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|_| (rng.uniform() - 0.5) * 8.0).collect();
            let name = format!("{tag}.{}", shape.len() * 1000 + n % 1000);
            shapes.push((name.clone(), shape.clone()));
            tensors.push((
                name,
                TensorSource {
                    dtype,
                    shape,
                    values: Box::new(move || Ok(values)),
                },
            ));
        }
    }
    let path = dir.join("model.safetensors");
    write_safetensors(&path, tensors, None).unwrap();
    let ckpt = Checkpoint::open_files(&[path]).unwrap();
    for (name, shape) in shapes {
        for transpose in [false, shape.len() == 2] {
            let want: Vec<u16> = ckpt
                .read_f32(&name, &shape, transpose, 128)
                .unwrap()
                .into_iter()
                .map(|v| burn::tensor::bf16::from_f32(v).to_bits())
                .collect();
            let got: Vec<u16> = ckpt
                .read_bf16(&name, &shape, transpose)
                .unwrap()
                .into_iter()
                .map(|v| v.to_bits())
                .collect();
            assert_eq!(got, want, "{name} transpose {transpose}");
        }
    }
    let e = ckpt.read_bf16("bf16.1007", &[8], false).unwrap_err();
    assert!(e.to_string().contains("bf16.1007"), "{e}");
    // `share_bf16` (what `--weights bf16` uses on a BF16 file): the same bits, held as the
    // mapped file's bytes (no copy), alive after the checkpoint is dropped; F16 and F32 tensors
    // are not shared; a wrong shape is an error naming the tensor.
    let shared = ckpt.share_bf16("bf16.2965", &[515, 1031]).unwrap().unwrap();
    assert!(matches!(
        shared.bytes.property(),
        burn::tensor::AllocationProperty::File
    ));
    assert!(ckpt.share_bf16("f16.2965", &[515, 1031]).unwrap().is_none());
    assert!(ckpt.share_bf16("f32.2965", &[515, 1031]).unwrap().is_none());
    let e = ckpt.share_bf16("bf16.2965", &[1031, 515]).unwrap_err();
    assert!(e.to_string().contains("bf16.2965"), "{e}");
    let want: Vec<u16> = ckpt
        .read_bf16("bf16.2965", &[515, 1031], false)
        .unwrap()
        .into_iter()
        .map(|v| v.to_bits())
        .collect();
    drop(ckpt);
    let got: Vec<u16> = shared
        .to_vec::<burn::tensor::bf16>()
        .unwrap()
        .into_iter()
        .map(|v| v.to_bits())
        .collect();
    assert_eq!(got, want);
}
