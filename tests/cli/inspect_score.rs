//! The `dsv3` commands, run as a user would (through clap), and their error lines.

use crate::common::*;

#[test]
fn inspect_preset_671b() {
    let s = dsv3(&["inspect", "--preset", "671b"]).unwrap();
    assert!(s.contains("61 layers (3 dense, 58 MoE)"), "{s}");
    assert!(s.contains("256 routed experts"), "{s}");
    let j: serde_json::Value =
        serde_json::from_str(&dsv3(&["inspect", "--preset", "671b", "--json"]).unwrap()).unwrap();
    let total = j["params_total"].as_u64().unwrap() as f64;
    assert!(
        (total / 1e9 - 684.5).abs() < 1.5,
        "671B + 14B MTP, got {total}"
    );
}

#[test]
fn inspect_fixture_dir() {
    let dir = fixture("tiny-fp8");
    let s = dsv3(&["inspect", "--model", dir.to_str().unwrap()]).unwrap();
    assert!(s.contains("F8_E4M3"), "{s}");
    assert!(s.contains("present"), "{s}");
}

/// `inspect --load` loads on the chosen backend with the chosen weight form and reports it;
/// `--weights` without `--load` is a usage error.
#[test]
fn inspect_load_reports_the_weight_form() {
    let dir = fixture("tiny-direct");
    let d = dir.to_str().unwrap();
    for w in ["f32", "bf16"] {
        let s = dsv3(&["inspect", "--model", d, "--load", "--weights", w]).unwrap();
        let line = s.lines().last().unwrap();
        assert!(line.starts_with("loaded "), "{line}");
        assert!(line.contains(&format!("Linear weights as {w}")), "{line}");
    }
    let e = dsv3(&["inspect", "--model", d, "--weights", "bf16"]).unwrap_err();
    assert!(e.contains("--load") && !e.contains('\n'), "{e}");
    // --load needs a checkpoint; a preset or a lone config has none.
    let e = dsv3(&["inspect", "--preset", "tiny", "--load"]).unwrap_err();
    assert!(e.contains("--model") && !e.contains('\n'), "{e}");
    // Without a source, every way to give one is named.
    let e = dsv3(&["inspect"]).unwrap_err();
    assert!(
        e.contains("--model") && e.contains("--config") && e.contains("--preset"),
        "{e}"
    );
}

#[test]
fn score_writes_logits_mtp_and_routing() {
    let dir = fixture("tiny-qlora");
    let g = Golden::read(&dir.join("golden.safetensors"));
    let ids: Vec<String> = g.ids().iter().map(|i| i.to_string()).collect();
    let out = scratch("score");
    let (o, r) = (out.join("o.safetensors"), out.join("r.json"));
    let s = dsv3(&[
        "score",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        &ids.join(","),
        "--mtp",
        "--out",
        o.to_str().unwrap(),
        "--routing",
        r.to_str().unwrap(),
    ])
    .unwrap();
    assert!(s.contains("perplexity"), "{s}");
    let written = Golden::read(&o);
    assert!(
        max_abs_diff(
            &written
                .f("logits")
                .1
                .iter()
                .map(|&v| v as f32)
                .collect::<Vec<_>>(),
            &g.f("logits").1
        ) < LOGIT_TOL as f64
    );
    assert!(
        max_abs_diff(
            &written
                .f("mtp_logits")
                .1
                .iter()
                .map(|&v| v as f32)
                .collect::<Vec<_>>(),
            &g.f("mtp_logits").1
        ) < LOGIT_TOL as f64
    );
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&r).unwrap()).unwrap();
    let layers = j["layers"].as_array().unwrap();
    let cfg = dsv3_model::DeepseekV3Config::from_file(&dir.join("config.json")).unwrap();
    let n_moe = cfg.num_hidden_layers - cfg.first_k_dense_replace;
    assert_eq!(layers.len(), n_moe + 1);
    assert_eq!(layers.last().unwrap()["mtp"], serde_json::json!(true));
    assert_eq!(layers[0]["experts"].as_array().unwrap().len(), ids.len());
    // NLL of the printed table is the golden's log-softmax.
    let nll_line = s.lines().nth(2).unwrap();
    let nll: f64 = nll_line.split_whitespace().last().unwrap().parse().unwrap();
    let (shape, logits) = g.f("logits");
    let v = shape[1];
    let row = &logits[..v];
    let m = row.iter().cloned().fold(f64::MIN, f64::max);
    let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
    let want = lse - row[g.ids()[1] as usize];
    assert!((nll - want).abs() < 1e-4, "{nll} vs {want}");
    // With --mtp the MTP module's mean NLL (row i predicts token i+2) is printed too, from the
    // golden's float64 MTP logits.
    let line = s
        .lines()
        .find(|l| l.starts_with("MTP (token i+2): mean nll"))
        .unwrap_or_else(|| panic!("no MTP line in {s}"));
    let got: f64 = line
        .split_whitespace()
        .nth(5)
        .unwrap()
        .trim_end_matches(',')
        .parse()
        .unwrap();
    let (_, mtp) = g.f("mtp_logits");
    let ids = g.ids();
    let t = ids.len();
    let want: f64 = (2..t)
        .map(|i| {
            let row = &mtp[(i - 2) * v..(i - 1) * v];
            let m = row.iter().cloned().fold(f64::MIN, f64::max);
            m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln() - row[ids[i] as usize]
        })
        .sum::<f64>()
        / (t - 2) as f64;
    assert!((got - want).abs() < 1e-4, "MTP mean nll {got} vs {want}");
}

#[test]
fn score_offset_matches_golden() {
    let dir = fixture("tiny-qlora");
    let g = Golden::read(&dir.join("golden-offset.safetensors"));
    let ids: Vec<String> = g.ids().iter().map(|i| i.to_string()).collect();
    let o = scratch("offset").join("o.safetensors");
    let off = g.offset().to_string();
    dsv3(&[
        "score",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        &ids.join(","),
        "--offset",
        &off,
        "--out",
        o.to_str().unwrap(),
    ])
    .unwrap();
    let written = Golden::read(&o);
    let d = max_abs_diff(
        &written
            .f("logits")
            .1
            .iter()
            .map(|&v| v as f32)
            .collect::<Vec<_>>(),
        &g.f("logits").1,
    );
    assert!(d < LOGIT_TOL as f64, "{d}");
}

#[test]
fn score_bad_inputs_give_one_line() {
    let dir = fixture("tiny-qlora");
    let d = dir.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["score", "--model", d, "--tokens", "1,2,100000"],
            "out of range",
        ),
        (&["score", "--model", d, "--tokens", ""], "empty"),
        (
            &["score", "--model", d, "--tokens", "1,x"],
            "not a non-negative integer",
        ),
        (
            &["score", "--model", d, "--tokens", "1,99999999999"],
            "99999999999 is above the largest token id, 4294967295",
        ),
        (
            &["score", "--model", "/no/such/dir", "--tokens", "1,2"],
            "/no/such/dir: no such model directory",
        ),
        (
            &["score", "--model", d, "--tokens", "1,2", "--backend", "tpu"],
            "not available",
        ),
        (
            &["score", "--model", d, "--tokens", "1", "--mtp"],
            "at least 2 tokens",
        ),
        (&["inspect", "--preset", "huge"], "unknown preset"),
        (
            &[
                "score",
                "--model",
                d,
                "--tokens",
                "1,2",
                "--offset",
                "18446744073709551615",
            ],
            "supported range",
        ),
        (
            &[
                "score",
                "--model",
                d,
                "--tokens",
                "1,2",
                "--offset",
                "4294967295",
            ],
            // Positions 4294967295 and 4294967296: the second is the first out of range.
            "position 4294967296 is out of the supported range (positions must be below 4294967296)",
        ),
        (
            &[
                "score",
                "--model",
                d,
                "--tokens",
                "1,2",
                "--weights",
                "int4",
            ],
            "int4",
        ),
    ];
    let config = dir.join("config.json");
    let file_case: (&[&str], &str) = (
        &[
            "score",
            "--model",
            config.to_str().unwrap(),
            "--tokens",
            "1,2",
        ],
        "config.json: not a directory",
    );
    for (args, needle) in cases.iter().chain([&file_case]) {
        let e = dsv3(args).unwrap_err();
        assert!(
            e.contains(needle),
            "{args:?}: {e:?} should contain {needle:?}"
        );
        assert!(!e.trim_end().contains('\n'), "{args:?}: one line: {e:?}");
    }
    // A model without MTP asked for --mtp.
    let direct = fixture("tiny-direct");
    let cfg = dsv3_model::DeepseekV3Config::from_file(&direct.join("config.json")).unwrap();
    assert_eq!(
        cfg.num_nextn_predict_layers, 0,
        "tiny-direct is the fixture without MTP"
    );
    let e = dsv3(&[
        "score",
        "--model",
        direct.to_str().unwrap(),
        "--tokens",
        "1,2,3",
        "--mtp",
    ])
    .unwrap_err();
    assert!(e.contains("loaded without an MTP module"), "{e}");
}

/// `inspect --training`: training memory per GPU for f32 / bf16 / fp8 under the report's layout
/// (text and JSON), and a layout that does not fit is a usage error.
#[test]
fn inspect_training_memory() {
    let s = dsv3(&["inspect", "--preset", "671b", "--training"]).unwrap();
    assert!(
        s.contains("training memory per GPU (2048 GPUs: 16 pipeline stages x 64"),
        "{s}"
    );
    for p in ["f32 ", "bf16 ", "fp8 "] {
        assert!(s.lines().any(|l| l.trim_start().starts_with(p)), "{p}: {s}");
    }
    let j: serde_json::Value = serde_json::from_str(
        &dsv3(&["inspect", "--preset", "671b", "--training", "--json"]).unwrap(),
    )
    .unwrap();
    let rows = j["training_memory_per_gpu"]["rows"].as_array().unwrap();
    let w: Vec<u64> = rows
        .iter()
        .map(|r| r["weights"].as_u64().unwrap())
        .collect();
    assert_eq!(rows[2]["precision"], "fp8");
    assert!(w[2] < w[1] && w[1] < w[0], "{w:?}");
    let e = dsv3(&["inspect", "--preset", "671b", "--training", "--gpus", "100"]).unwrap_err();
    assert!(e.contains("do not split"), "{e}");
}

/// A load warning written to a closed stderr (`dsv3 … 2>&1 | head -0`) is dropped: the command
/// still ends as it would have (exit 0 here), not in a panic (exit 101).
#[test]
fn warnings_to_a_closed_stderr_do_not_panic() {
    use std::process::{Command, Stdio};
    let dir = fixture("tiny-qlora");
    let run = |close: bool| {
        let (mut reader, writer) = std::io::pipe().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dsv3"));
        cmd.args(["inspect", "--model", dir.to_str().unwrap(), "--load"])
            .args(["--weights", "fp8"])
            .stdout(Stdio::null())
            .stderr(writer);
        let mut text = String::new();
        if close {
            // No read end left before the child starts: its first write to stderr fails (EPIPE).
            drop(reader);
            return (cmd.status().unwrap().code(), text);
        }
        let mut child = cmd.spawn().expect("spawn dsv3");
        drop(cmd); // the parent's copy of the write end: the read below ends with the child
        std::io::Read::read_to_string(&mut reader, &mut text).unwrap();
        (child.wait().unwrap().code(), text)
    };
    let (code, text) = run(false);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("warning: FP8 weights were asked for"),
        "the case warns: {text}"
    );
    let (code, _) = run(true);
    assert_eq!(code, Some(0), "a closed stderr must not turn into a panic");
}
