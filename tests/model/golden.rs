//! The model against the float64 goldens: logits, MTP logits, routing, both attention forms.

use std::path::Path;

use dsv3_model::{load, AttentionMode, DeepseekV3, ForwardOptions, LoadOptions};

use crate::common::*;

fn load_fixture(name: &str) -> DeepseekV3<B> {
    let (model, report) = load::<B>(
        &fixture(name),
        &device(),
        &LoadOptions {
            strict: true,
            skip_mtp: false,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("loading {name}: {e}"));
    assert!(report.unexpected.is_empty());
    model
}

/// Checks one golden file: logits, MTP logits, routing (exact where the margin allows).
pub(crate) fn check_golden(model: &DeepseekV3<B>, golden: &Path, mode: AttentionMode) {
    check_golden_within(model, golden, mode, LOGIT_TOL as f64)
}

/// [`check_golden`] with logits (main and MTP) within `tol`.
pub(crate) fn check_golden_within(
    model: &DeepseekV3<B>,
    golden: &Path,
    mode: AttentionMode,
    tol: f64,
) {
    let g = Golden::read(golden);
    let ids = g.ids();
    let offset = g.offset();
    let opts = ForwardOptions {
        attention: mode,
        record_routing: true,
        ..Default::default()
    };
    let tokens = model.tokens_tensor(&ids).unwrap();
    let out = model.forward(tokens.clone(), offset, None, &opts);
    let (shape, want) = g.f("logits");
    assert_eq!(out.logits.dims().to_vec(), [&[1usize][..], shape].concat());
    let got = to_vec(out.logits.clone());
    let diff = max_abs_diff(&got, want);
    println!(
        "{}: {mode:?} max |Δlogits| = {diff:.2e} (max |logit| {:.2})",
        golden.display(),
        max_abs(want)
    );
    assert!(
        max_abs(want) > 1.0,
        "golden logits are too small to test anything"
    );
    assert!(
        diff < tol,
        "{}: logits differ by {diff:.3e} > {tol:e}",
        golden.display()
    );

    let (_, hidden) = g.f("final_hidden");
    let hd = max_abs_diff(&to_vec(out.hidden.clone()), hidden);
    assert!(hd < 1e-4, "final hidden differs by {hd:.3e}");

    let mut routing = out.routing.clone();
    if g.f.contains_key("mtp_logits") {
        let m = model.mtp_logits(tokens, &out, offset, &opts).unwrap();
        let d = max_abs_diff(&to_vec(m.logits), &g.f("mtp_logits").1);
        println!("  mtp max |Δlogits| = {d:.2e}");
        assert!(d < tol, "MTP logits differ by {d:.3e} > {tol:e}");
        routing.extend(m.routing);
    }

    // Routing: every MoE layer of the golden, in model order, MTP layers after the main ones.
    let mut layers: Vec<usize> =
        g.i.keys()
            .filter_map(|k| {
                k.strip_prefix("routing.")?
                    .strip_suffix(".experts")?
                    .parse()
                    .ok()
            })
            .collect();
    layers.sort();
    assert_eq!(
        layers,
        routing.iter().map(|r| r.layer).collect::<Vec<_>>(),
        "MoE layers reported differ from the golden's"
    );
    let (mut exact, mut near_ties) = (0, 0);
    for r in &routing {
        let (shape, experts) = g.i(&format!("routing.{}.experts", r.layer));
        let (_, weights) = g.f(&format!("routing.{}.weights", r.layer));
        let (_, margin) = g.f(&format!("routing.{}.margin", r.layer));
        let k = shape[1];
        assert_eq!(r.routing.experts.len(), shape[0]);
        for (tok, (got_e, got_w)) in r.routing.experts.iter().zip(&r.routing.weights).enumerate() {
            // Sort ours by expert id to compare with the golden's ascending order.
            let mut pairs: Vec<(u32, f32)> =
                got_e.iter().copied().zip(got_w.iter().copied()).collect();
            pairs.sort_by_key(|p| p.0);
            let want_e: Vec<u32> = experts[tok * k..(tok + 1) * k]
                .iter()
                .map(|&e| e as u32)
                .collect();
            let got_ids: Vec<u32> = pairs.iter().map(|p| p.0).collect();
            // A float32 computation can only be asked to agree where the golden's k-th and
            // (k+1)-th biased scores are further apart than f32 rounding (~1e-6).
            if margin[tok] < 1e-5 {
                near_ties += 1;
                continue;
            }
            assert_eq!(
                got_ids, want_e,
                "layer {} token {tok}: expert set differs (margin {:.2e})",
                r.layer, margin[tok]
            );
            for (j, p) in pairs.iter().enumerate() {
                let w = weights[tok * k + j];
                assert!(
                    (p.1 as f64 - w).abs() < 1e-5,
                    "layer {} token {tok}: weight {} vs {w}",
                    r.layer,
                    p.1
                );
            }
            exact += 1;
        }
    }
    println!("  routing: {exact} token-layers exact, {near_ties} near-ties skipped");
    assert!(
        exact > 0 && near_ties * 20 <= exact,
        "too many near ties to be a meaningful test"
    );
}

fn check_fixture(name: &str) {
    let model = load_fixture(name);
    for g in goldens(&fixture(name)) {
        check_golden(&model, &g, AttentionMode::Absorbed);
        check_golden(&model, &g, AttentionMode::Naive);
    }
}

#[test]
fn qlora_yarn_grouped_mtp_matches_golden() {
    check_fixture("tiny-qlora");
}

#[test]
fn direct_q_bf16_sharded_matches_golden() {
    check_fixture("tiny-direct");
}

#[test]
fn fp8_matches_dequantized_golden() {
    check_fixture("tiny-fp8");
}

/// The loaded FP8 weights are bit-identical to the float32 dequantization done by the generator.
#[test]
fn fp8_dequantization_is_bit_exact() {
    let dir = fixture("tiny-fp8");
    let ckpt = dsv3_model::checkpoint::Checkpoint::open(&dir).unwrap();
    let deq = Golden::read(&dir.join("dequant.safetensors"));
    let mut n = 0;
    let mut partial_edge = false;
    for (name, (shape, want)) in &deq.f {
        let info = ckpt
            .info(name)
            .unwrap_or_else(|| panic!("{name} not in checkpoint"));
        assert_eq!(
            format!("{:?}", info.dtype),
            "F8_E4M3",
            "{name} should be stored as FP8"
        );
        let got = ckpt.read_f32(name, shape, false, 128).unwrap();
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g.to_bits(), (w as f32).to_bits(), "{name}[{i}]: {g} vs {w}");
        }
        partial_edge |= shape.iter().any(|d| d % 128 != 0 && *d > 128);
        n += 1;
    }
    assert!(
        n > 5 && partial_edge,
        "fixture must cover several tensors with partial edge blocks"
    );
}

/// Naive and absorbed attention compute the same function (here on every fixture's layers).
#[test]
fn naive_and_absorbed_agree() {
    for name in ["tiny-qlora", "tiny-direct"] {
        let model = load_fixture(name);
        let g = Golden::read(&goldens(&fixture(name))[0]);
        let tokens = model.tokens_tensor(&g.ids()).unwrap();
        let run = |mode| {
            to_vec(
                model
                    .forward(
                        tokens.clone(),
                        g.offset(),
                        None,
                        &ForwardOptions {
                            attention: mode,
                            ..Default::default()
                        },
                    )
                    .logits,
            )
        };
        let (a, n) = (run(AttentionMode::Absorbed), run(AttentionMode::Naive));
        let d = a
            .iter()
            .zip(&n)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        println!("{name}: naive vs absorbed max |Δ| = {d:.2e}");
        assert!(d < 2e-5, "{name}: naive vs absorbed differ by {d}");
    }
}

/// A checkpoint's greedy continuation: full recompute each step equals the golden's tokens.
#[test]
fn greedy_tokens_match_golden() {
    let model = load_fixture("tiny-qlora");
    let g = Golden::read(&fixture("tiny-qlora").join("golden.safetensors"));
    let plen = g.i("greedy_prompt_len").1[0] as usize;
    let want: Vec<u32> = g.i("greedy_tokens").1.iter().map(|&v| v as u32).collect();
    let mut ids = g.ids()[..plen].to_vec();
    for _ in 0..want.len() {
        let out = model.forward(
            model.tokens_tensor(&ids).unwrap(),
            0,
            None,
            &ForwardOptions::default(),
        );
        let t = ids.len();
        let last = out.logits.narrow(1, t - 1, 1).flatten::<1>(0, 2);
        ids.push(last.argmax(0).into_scalar() as u32);
    }
    assert_eq!(&ids[plen..], &want[..]);
}
