//! Training data: reading text, directories and JSONL; bits per byte.

use burn::module::AutodiffModule;
use burn::tensor::{ElementConversion, Tensor, TensorData};
use dsv3_backends::Cpu;
use dsv3_model::{AttentionMode, ForwardOptions};
use dsv3_train::data::Dataset;
use dsv3_train::loss;

use crate::common::*;

use super::*;

#[test]
fn data_reading_text_dirs_and_jsonl() {
    let dir = scratch("data");
    write(&dir.join("b/two.txt"), "second");
    write(&dir.join("a.txt"), "first");
    write(&dir.join(".hidden"), "ignored");
    write(
        &dir.join("c.jsonl"),
        "{\"text\": \"third\"}\n\n{\"text\": \"fourth\"}\n",
    );
    std::fs::write(dir.join("d.bin"), [0xffu8, 0xfe, 0x00]).unwrap();
    let (docs, report) = dsv3_train::data::read_documents(&dir).unwrap();
    let texts: Vec<&str> = docs.iter().map(|d| d.text.as_str()).collect();
    assert_eq!(texts, vec!["first", "second", "third", "fourth"]);
    assert_eq!(report.skipped, vec![dir.join("d.bin")]);
    let e = dsv3_train::data::read_documents(&dir.join("d.bin"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not UTF-8"), "{e}");
    // The embedded corpus packs into enough windows for the default run.
    let d = Dataset::pack(&dsv3_train::data::embedded_documents(), 128, 20).unwrap();
    assert!(
        d.train.len() > 1500 && d.val.len() > 80,
        "{} / {}",
        d.train.len(),
        d.val.len()
    );
    let total: usize = dsv3_train::data::embedded_documents()
        .iter()
        .map(|doc| doc.text.len())
        .sum();
    assert_eq!(d.bytes, total);
}

#[test]
fn validation_bits_per_byte_is_nll_over_bytes() {
    let t = trainer(tiny_cfg(), 6);
    let ev = t.evaluate();
    let m = t.model.valid();
    let (mut nll, mut bytes) = (0.0f64, 0usize);
    for &s in &t.data.val[..4] {
        let w = t.data.window(s);
        let out = m.forward(
            m.tokens_tensor(&w[..16]).unwrap(),
            0,
            None,
            &ForwardOptions {
                attention: AttentionMode::Naive,
                ..Default::default()
            },
        );
        let tgt = Tensor::<Cpu, 1, burn::tensor::Int>::from_data(
            TensorData::new(w[1..].iter().map(|&x| x as i64).collect::<Vec<_>>(), [16]),
            &device(),
        )
        .reshape([1, 16]);
        nll += loss::token_nll(out.logits, tgt)
            .sum()
            .into_scalar()
            .elem::<f64>();
        bytes += w[1..].iter().filter(|&&x| x < 256).count();
    }
    assert_eq!(ev.tokens, 64);
    assert!(
        (ev.loss - nll / 64.0).abs() < 1e-5,
        "{} vs {}",
        ev.loss,
        nll / 64.0
    );
    let bpb = nll / std::f64::consts::LN_2 / bytes as f64;
    assert!((ev.bits_per_byte - bpb).abs() < 1e-5);
}
