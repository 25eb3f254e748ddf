//! Saving and loading: bit-exact round trip, and every malformed checkpoint gives a clear error.

use std::io::{Seek, SeekFrom, Write};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;
use dsv3_model::{
    load, save, DeepseekV3, DeepseekV3Config, ForwardOptions, LoadError, LoadOptions, ModelError,
    SaveDtype,
};

use crate::common::*;

struct Collect(Vec<Vec<u32>>);
impl ModuleVisitor<B> for Collect {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        self.0
            .push(to_vec(p.val()).iter().map(|v| v.to_bits()).collect());
    }
}

fn bits(m: &DeepseekV3<B>) -> Vec<Vec<u32>> {
    let mut c = Collect(Vec::new());
    m.visit(&mut c);
    c.0
}

#[test]
fn save_then_load_is_bit_exact() {
    for name in ["tiny-qlora", "tiny-fp8"] {
        let (m, _) = load::<B>(&fixture(name), &device(), &LoadOptions::default()).unwrap();
        let dir = scratch("save");
        save(&m, &dir, SaveDtype::F32).unwrap();
        let (m2, report) = load::<B>(
            &dir,
            &device(),
            &LoadOptions {
                strict: true,
                skip_mtp: false,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(report.unexpected.is_empty());
        assert_eq!(m2.model.mtp.len(), m.model.mtp.len());
        let (a, b) = (bits(&m), bits(&m2));
        assert_eq!(a.len(), b.len());
        assert!(a == b, "{name}: parameters changed in the round trip");
        let ids = [3u32, 1, 4, 1, 5, 9, 2, 6];
        let run = |m: &DeepseekV3<B>| {
            to_vec(
                m.forward(
                    m.tokens_tensor(&ids).unwrap(),
                    0,
                    None,
                    &ForwardOptions::default(),
                )
                .logits,
            )
        };
        assert_eq!(run(&m), run(&m2));
        // The saved config is the model's config, minus the quantization (weights are now f32).
        let cfg = DeepseekV3Config::from_file(&dir.join("config.json")).unwrap();
        assert!(cfg.quantization_config.is_none());
        assert_eq!(cfg.hidden_size, m.config.hidden_size);
        std::fs::remove_dir_all(dir).ok();
    }
}

#[test]
fn random_init_save_load_bf16() {
    let cfg = DeepseekV3Config::tiny();
    let m = DeepseekV3::<B>::init(&cfg, &device()).unwrap();
    let dir = scratch("bf16");
    save(&m, &dir, SaveDtype::BF16).unwrap();
    let (m2, _) = load::<B>(&dir, &device(), &LoadOptions::default()).unwrap();
    // bf16 keeps 8 significant bits: every value within 2^-8 relative.
    for (a, b) in bits(&m).iter().zip(bits(&m2)) {
        for (x, y) in a.iter().zip(b) {
            let (x, y) = (f32::from_bits(*x), f32::from_bits(y));
            assert!((x - y).abs() <= x.abs() / 256.0, "{x} vs {y}");
        }
    }
    std::fs::remove_dir_all(dir).ok();
}

fn load_err(dir: &std::path::Path) -> String {
    match load::<B>(
        dir,
        &device(),
        &LoadOptions {
            strict: true,
            skip_mtp: false,
            ..Default::default()
        },
    ) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => {
            let s = e.to_string();
            assert!(!s.contains('\n'), "one line: {s}");
            s
        }
    }
}

#[test]
fn missing_directory_and_files() {
    let e = load_err(std::path::Path::new("/nonexistent/model"));
    assert!(e.contains("/nonexistent/model"), "{e}");
    let dir = copy_fixture("tiny-qlora");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains(&dir.display().to_string()), "{e}");
    let dir = copy_fixture("tiny-qlora");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert!(load_err(&dir).contains("config.json"));
}

#[test]
fn invalid_config_is_reported() {
    let dir = copy_fixture("tiny-qlora");
    let p = dir.join("config.json");
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    j["topk_group"] = serde_json::json!(99);
    std::fs::write(&p, j.to_string()).unwrap();
    assert!(load_err(&dir).contains("topk_group"));
    std::fs::write(&p, "{ not json").unwrap();
    assert!(load_err(&dir).contains("config.json"));
}

/// A `config.json` that leaves size fields out means HF's defaults (the 671B sizes): a load that
/// then fails on a tensor's shape names the fields left out, and one that succeeds warns.
#[test]
fn unset_size_fields_are_named() {
    let dir = copy_fixture("tiny-qlora");
    let p = dir.join("config.json");
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let mut j = original.clone();
    j.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&p, j.to_string()).unwrap();
    assert_eq!(
        DeepseekV3Config::from_file_unset(&p).unwrap().1,
        ["hidden_size"]
    );
    let e = load::<B>(&dir, &device(), &LoadOptions::default()).unwrap_err();
    assert!(matches!(e, ModelError::UnsetSizes { .. }), "{e:?}");
    let s = e.to_string();
    assert!(
        s.contains("7168") && s.contains("config.json does not set hidden_size"),
        "{s}"
    );
    // Routing's k sizes no tensor: the checkpoint loads, with a warning naming the field.
    let mut j = original;
    j.as_object_mut().unwrap().remove("num_experts_per_tok");
    j["topk_group"] = serde_json::json!(4); // 8 experts (HF's default k) need all 4 groups here
    std::fs::write(&p, j.to_string()).unwrap();
    let (m, report) = load::<B>(&dir, &device(), &LoadOptions::default()).unwrap();
    assert_eq!(m.config.num_experts_per_tok, 8);
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("does not set num_experts_per_tok")),
        "{:?}",
        report.warnings
    );
    // Every fixture sets them all.
    let (_, unset) =
        DeepseekV3Config::from_file_unset(&fixture("tiny-qlora").join("config.json")).unwrap();
    assert!(unset.is_empty());
}

/// Rewrites the checkpoint with one tensor dropped, renamed or reshaped, or with an extra one.
fn rewrite(name: &str, edit: impl FnOnce(&mut Vec<RawTensor>)) -> std::path::PathBuf {
    let dir = copy_fixture(name);
    rewrite_safetensors(&dir.join("model.safetensors"), edit);
    dir
}

#[test]
fn missing_tensor_is_named() {
    let dir = rewrite("tiny-qlora", |t| {
        t.retain(|x| x.0 != "model.layers.1.self_attn.kv_b_proj.weight")
    });
    let e = load_err(&dir);
    assert!(
        e.contains("model.layers.1.self_attn.kv_b_proj.weight"),
        "{e}"
    );
}

#[test]
fn unexpected_tensor_reported_or_strict_error() {
    let dir = rewrite("tiny-qlora", |t| {
        t.push((
            "model.layers.0.extra.weight".into(),
            safetensors::Dtype::F32,
            vec![2],
            vec![0; 8],
        ))
    });
    let (_, report) = load::<B>(&dir, &device(), &LoadOptions::default()).unwrap();
    assert_eq!(
        report.unexpected,
        vec!["model.layers.0.extra.weight".to_string()]
    );
    assert!(load_err(&dir).contains("model.layers.0.extra.weight"));
}

#[test]
fn wrong_shape_is_named() {
    let dir = rewrite("tiny-qlora", |t| {
        let x = t.iter_mut().find(|x| x.0 == "model.norm.weight").unwrap();
        x.2 = vec![x.2[0] - 1];
        x.3.truncate(x.3.len() - 4);
    });
    let e = load_err(&dir);
    assert!(e.contains("model.norm.weight"), "{e}");
}

#[test]
fn unsupported_dtype_is_named() {
    let dir = rewrite("tiny-qlora", |t| {
        let x = t.iter_mut().find(|x| x.0 == "model.norm.weight").unwrap();
        x.1 = safetensors::Dtype::I32;
    });
    let e = load_err(&dir);
    assert!(e.contains("model.norm.weight") && e.contains("I32"), "{e}");
}

#[test]
fn truncated_file_is_reported() {
    let dir = copy_fixture("tiny-qlora");
    let p = dir.join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn lying_header_is_reported() {
    let dir = copy_fixture("tiny-qlora");
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let mut j: serde_json::Value = serde_json::from_str(&header).unwrap();
    // Claim the final norm is twice as long as its shape says.
    let offs = j["model.norm.weight"]["data_offsets"].clone();
    let (a, b) = (offs[0].as_u64().unwrap(), offs[1].as_u64().unwrap());
    j["model.norm.weight"]["data_offsets"] = serde_json::json!([a, a + 2 * (b - a)]);
    let mut h = j.to_string();
    while h.len() < n {
        h.push(' ');
    }
    assert_eq!(h.len(), n, "edited header must keep its length");
    let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.seek(SeekFrom::Start(8)).unwrap();
    f.write_all(h.as_bytes()).unwrap();
    drop(f);
    let e = load_err(&dir);
    assert!(e.contains("model.norm.weight"), "{e}");
    // A header length beyond the file.
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&p, bytes).unwrap();
    assert!(load_err(&dir).contains("model.safetensors"));
}

#[test]
fn model_error_variants_are_typed() {
    let e = load::<B>(
        std::path::Path::new("/nonexistent"),
        &device(),
        &LoadOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(e, ModelError::Load(LoadError::NotADirectory { .. })),
        "{e:?}"
    );
    assert!(e.to_string().ends_with("no such model directory"), "{e}");
    // A file where the directory should be.
    let file = fixture("tiny-qlora").join("config.json");
    let e = load::<B>(&file, &device(), &LoadOptions::default()).unwrap_err();
    assert!(
        e.to_string().contains("config.json: not a directory"),
        "{e}"
    );
    // A directory without a checkpoint.
    let dir = copy_fixture("tiny-qlora");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let e = load::<B>(&dir, &device(), &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(e, ModelError::Load(LoadError::NoCheckpoint { .. })),
        "{e:?}"
    );
}

/// Inputs a forward cannot take: an MTP depth the model lacks and too few tokens for MTP are
/// typed errors; positions past `MAX_POSITION` (which the CLI refuses with `check_positions`)
/// panic with a message naming the check, at the edge and where `offset + T` would overflow.
#[test]
fn mtp_depth_and_positions_out_of_range() {
    let (model, _) = load::<B>(&fixture("tiny-qlora"), &device(), &LoadOptions::default()).unwrap();
    let n = model.model.mtp.len();
    assert!(n >= 1, "tiny-qlora has an MTP module");
    let opts = ForwardOptions::default();
    let tokens = model.tokens_tensor(&[1, 2, 3]).unwrap();
    let out = model.forward(tokens.clone(), 0, None, &opts);
    let h = out.hidden.clone().narrow(1, 0, 2);
    let next = tokens.clone().narrow(1, 1, 2);
    assert!(model
        .forward_mtp(n - 1, h.clone(), next.clone(), 0, None, &opts)
        .is_ok());
    let e = model.forward_mtp(n, h, next, 0, None, &opts).unwrap_err();
    assert!(matches!(e, ModelError::NoMtp(_)), "{e:?}");
    assert!(
        e.to_string()
            .contains(&format!("MTP module {n} asked for, the model has {n}")),
        "{e}"
    );
    let one = model.tokens_tensor(&[1]).unwrap();
    let out1 = model.forward(one.clone(), 0, None, &opts);
    let e = model.mtp_logits(one, &out1, 0, &opts).unwrap_err();
    assert!(e.to_string().contains("needs at least 2"), "{e}");

    let max = dsv3_model::MAX_POSITION;
    // The last three positions below the limit are fine...
    let last = model.forward(tokens.clone(), max - 3, None, &opts);
    assert_eq!(last.logits.dims(), [1, 3, model.config.vocab_size]);
    // ...one more is not, nor an offset whose sum overflows.
    for offset in [max - 2, usize::MAX - 1] {
        let t = tokens.clone();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model.forward(t, offset, None, &opts)
        }));
        let msg = r
            .err()
            .and_then(|p| p.downcast::<String>().ok())
            .unwrap_or_else(|| panic!("offset {offset}: forward should panic with a message"));
        assert!(
            msg.contains("out of the supported range") && msg.contains("check_positions"),
            "{msg}"
        );
    }
    assert!(matches!(
        dsv3_model::check_positions(max - 2, 3),
        Err(ModelError::PositionOutOfRange { last, .. }) if last == max
    ));
}
