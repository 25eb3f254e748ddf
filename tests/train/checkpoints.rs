//! Checkpoints: bit-identical resume, atomic writes, loading in the inference engine.

use burn::module::AutodiffModule;
use dsv3_backends::Cpu;
use dsv3_model::{DeepseekV3, ForwardOptions};
use dsv3_train::checkpoint;
use dsv3_train::data::Dataset;
use dsv3_train::TrainConfig;

use crate::common::*;

use super::*;

pub(crate) fn assert_same_params(a: &DeepseekV3<AD>, b: &DeepseekV3<AD>) {
    let (pa, pb) = (params(a), params(b));
    assert_eq!(pa.len(), pb.len());
    for ((na, va), (nb, vb)) in pa.iter().zip(&pb) {
        assert_eq!(na, nb);
        let same = va.iter().zip(vb).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{na} differs");
    }
}

#[test]
fn resume_is_bit_identical_to_an_uninterrupted_run() {
    let cfg = TrainConfig {
        grad_accum: 2,
        ..tiny_cfg()
    };
    let mut a = trainer(cfg.clone(), 6);
    for _ in 0..4 {
        a.train_step().unwrap();
    }
    let mut b = trainer(cfg.clone(), 6);
    for _ in 0..2 {
        b.train_step().unwrap();
    }
    let out = scratch("resume");
    let dir = checkpoint::save(&b, &out, "test-docs", 0.0).unwrap();
    assert_eq!(dir, out.join("step-2"));
    drop(b);
    let data = Dataset::pack(&docs(6), cfg.seq_len, cfg.val_every).unwrap();
    let mut c = checkpoint::load::<AD>(&dir, data, None, &device(), None).unwrap();
    assert_eq!(c.step, 2);
    for _ in 0..2 {
        c.train_step().unwrap();
    }
    assert_same_params(&a.model, &c.model);
    // A run on other data refuses the checkpoint.
    let other = Dataset::pack(&docs(7), cfg.seq_len, cfg.val_every).unwrap();
    let e = checkpoint::load::<AD>(&dir, other, None, &device(), None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("different data"), "{e}");
}

#[test]
fn parallel_micro_batches_equal_sequential_accumulation() {
    let cfg = TrainConfig {
        grad_accum: 3,
        ..tiny_cfg()
    };
    let mut one = trainer(
        TrainConfig {
            workers: 1,
            ..cfg.clone()
        },
        6,
    );
    let mut two = trainer(TrainConfig { workers: 2, ..cfg }, 6);
    for _ in 0..2 {
        let (a, b) = (one.train_step().unwrap(), two.train_step().unwrap());
        assert_eq!(a.loss.to_bits(), b.loss.to_bits());
        assert_eq!(a.loads, b.loads);
    }
    assert_same_params(&one.model, &two.model);
}

#[test]
fn interrupted_writes_leave_the_previous_checkpoint_loadable() {
    let cfg = TrainConfig {
        keep_checkpoints: 2,
        ..tiny_cfg()
    };
    let mut t = trainer(cfg.clone(), 6);
    t.train_step().unwrap();
    t.train_step().unwrap();
    let out = scratch("crash");
    let good = checkpoint::save(&t, &out, "test-docs", 0.0).unwrap();
    let want = params(&t.model);
    // A kill while writing step 4: its temporary directory holds a torn safetensors file.
    let tmp = out.join(".step-4.tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let full = std::fs::read(good.join("model.safetensors")).unwrap();
    std::fs::write(tmp.join("model.safetensors"), &full[..full.len() / 2]).unwrap();
    std::fs::copy(good.join("config.json"), tmp.join("config.json")).unwrap();
    // A step dir without train_state.json (not complete) and one with torn weights (as a
    // non-atomic writer would leave): both must be passed over.
    let partial = out.join("step-6");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::copy(good.join("config.json"), partial.join("config.json")).unwrap();
    let torn = out.join("step-5");
    std::fs::create_dir_all(&torn).unwrap();
    for f in ["config.json", "optimizer.mpk", "train_state.json"] {
        std::fs::copy(good.join(f), torn.join(f)).unwrap();
    }
    std::fs::write(torn.join("model.safetensors"), &full[..100]).unwrap();

    let data = Dataset::pack(&docs(6), cfg.seq_len, cfg.val_every).unwrap();
    let (r, dir, _, warnings) =
        checkpoint::resume::<AD>(&out, &data, None, &device(), None).unwrap();
    assert_eq!(dir, good);
    assert_eq!(r.step, 2);
    assert!(
        warnings.len() == 1 && warnings[0].contains("step-5"),
        "{warnings:?}"
    );
    let got = params(&r.model);
    assert_eq!(got, want);
    // The previous checkpoint also loads as a model, as `dsv3 score` would.
    dsv3_model::load::<Cpu>(&good, &device(), &Default::default()).unwrap();
    // The next save replaces the stale temporary directory.
    std::fs::remove_dir_all(&torn).unwrap();
    let mut r = r;
    r.train_step().unwrap();
    r.train_step().unwrap();
    checkpoint::save(&r, &out, "test-docs", 0.0).unwrap();
    assert!(!tmp.exists());
    assert!(out.join("step-4/train_state.json").is_file());
}

/// A run resumed behind an unusable newer checkpoint (here a torn `step-5`, skipped with a
/// warning) keeps its own checkpoints: pruning counts only those up to the step just saved, so
/// with `keep_checkpoints = 1` the save at step 3 removes step 2, not step 3 (counting step 5
/// would have removed both and left only the torn one). `--steps` below the checkpoint's step
/// is refused.
#[test]
fn pruning_passes_over_unusable_newer_checkpoints() {
    let cfg = TrainConfig {
        keep_checkpoints: 1,
        ..tiny_cfg()
    };
    let mut t = trainer(cfg.clone(), 6);
    t.train_step().unwrap();
    t.train_step().unwrap();
    let out = scratch("prune-torn");
    let good = checkpoint::save(&t, &out, "test-docs", 0.0).unwrap();
    let torn = out.join("step-5");
    std::fs::create_dir_all(&torn).unwrap();
    for f in ["config.json", "optimizer.mpk", "train_state.json"] {
        std::fs::copy(good.join(f), torn.join(f)).unwrap();
    }
    std::fs::write(torn.join("model.safetensors"), b"torn").unwrap();

    let data = Dataset::pack(&docs(6), cfg.seq_len, cfg.val_every).unwrap();
    let Err(e) = checkpoint::resume::<AD>(&out, &data, Some(1), &device(), None) else {
        panic!("--steps 1 below the checkpoint's step 2 must be refused");
    };
    assert!(e.to_string().contains("--steps 1 is below the step"), "{e}");
    let (mut r, dir, _, warnings) =
        checkpoint::resume::<AD>(&out, &data, None, &device(), None).unwrap();
    assert_eq!((dir, r.step), (good.clone(), 2));
    assert!(
        warnings.iter().any(|w| w.contains("step-5")),
        "{warnings:?}"
    );
    r.train_step().unwrap();
    let third = checkpoint::save(&r, &out, "test-docs", 0.0).unwrap();
    let steps: Vec<usize> = checkpoint::complete(&out).iter().map(|c| c.0).collect();
    assert_eq!(
        steps,
        [3, 5],
        "step 2 pruned, step 3 kept, the torn step 5 left alone"
    );
    let (again, dir, _, _) = checkpoint::resume::<AD>(&out, &data, None, &device(), None).unwrap();
    assert_eq!((dir, again.step), (third, 3));
}

#[test]
fn checkpoint_loads_in_score_with_the_same_logits() {
    let mut t = trainer(tiny_cfg(), 6);
    for _ in 0..3 {
        t.train_step().unwrap();
    }
    let out = scratch("score-ckpt");
    let dir = checkpoint::save(&t, &out, "test-docs", 0.0).unwrap();
    let ids: Vec<u32> = t.data.window(t.data.val[0])[..12].to_vec();
    let m = t.model.valid();
    let want = to_vec(
        m.forward(
            m.tokens_tensor(&ids).unwrap(),
            0,
            None,
            &ForwardOptions::default(),
        )
        .logits,
    );
    let o = out.join("logits.safetensors");
    let ids_s: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let s = dsv3(&[
        "score",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        &ids_s.join(","),
        "--out",
        o.to_str().unwrap(),
        "--strict",
    ])
    .unwrap();
    assert!(s.contains("perplexity"), "{s}");
    let got = Golden::read(&o);
    let (shape, logits) = got.f("logits");
    assert_eq!(shape, &vec![12, 258]);
    let exact = logits.iter().zip(&want).all(|(a, b)| *a == *b as f64);
    assert!(exact, "logits differ by {}", max_abs_diff(&want, logits));
    // The trained (non-zero) router bias is in the checkpoint.
    let st = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    let bias = st
        .tensor("model.layers.1.mlp.gate.e_score_correction_bias")
        .unwrap();
    assert_eq!(bias.dtype(), safetensors::Dtype::F32);
    assert!(bias.data().iter().any(|&b| b != 0));
}

#[test]
fn tokenizer_json_loads_in_the_inference_engine() {
    let dir = scratch("tokenizer");
    dsv3_train::ByteTokenizer.save(&dir).unwrap();
    let tok = dsv3_infer::Tokenizer::from_dir(&dir).unwrap().unwrap();
    let text = "fn main() {\n    println!(\"héllo — λ=0.3\");\n}\t ☃";
    let ids = tok.encode(text).unwrap();
    let bytes: Vec<u32> = text.bytes().map(u32::from).collect();
    assert_eq!(ids, bytes);
    assert_eq!(tok.decode(&ids, true).unwrap(), text);
    assert_eq!(tok.encode_prompt("a").unwrap(), vec![256, 97]);
    assert_eq!(tok.bos_id(), Some(256));
    assert_eq!(tok.eos_id(), Some(257));
    assert_eq!(tok.vocab_size(), 258);
}
