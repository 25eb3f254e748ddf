//! `dsv3 train` end to end: metrics, checkpoints, plot, resume, one-line errors.

use crate::common::*;

use crate::train::*;

#[test]
fn cli_train_tiny_writes_metrics_checkpoints_plot_and_resumes() {
    let out = scratch("cli-train");
    let run_dir = out.join("run");
    let s = dsv3(&[
        "train",
        "--preset",
        "tiny",
        "--steps",
        "6",
        "--checkpoint-every",
        "3",
        "--log-every",
        "2",
        "--eval-every",
        "3",
        "--out",
        run_dir.to_str().unwrap(),
        "--samples",
        "1",
        "--sample-tokens",
        "6",
    ])
    .unwrap();
    assert!(s.contains("bits/byte"), "{s}");
    assert!(s.contains("(temperature 0.7, top-p 0.9, seed 0)"), "{s}");
    assert!(s.contains("(greedy, MTP drafts accepted: "), "{s}");
    for d in ["step-3", "step-6", "final"] {
        assert!(run_dir.join(d).join("model.safetensors").is_file(), "{d}");
        assert!(run_dir.join(d).join("tokenizer.json").is_file(), "{d}");
    }
    assert!(run_dir.join("training.png").is_file());
    let recs = dsv3_train::metrics::read(&run_dir.join("metrics.jsonl")).unwrap();
    let steps: Vec<usize> = recs.iter().map(|r| r.step).collect();
    assert_eq!(steps, vec![2, 4, 6]);
    let line = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    for key in [
        "step",
        "loss",
        "mtp_loss",
        "lr",
        "imbalance",
        "grad_norm",
        "val_loss",
    ] {
        assert!(first.get(key).is_some(), "{key} missing in {first}");
    }
    assert_eq!(first["imbalance"].as_array().unwrap().len(), 3);
    assert!(recs[2].val_bits_per_byte.unwrap() > 0.0);
    // The final model scores.
    let s = dsv3(&[
        "score",
        "--model",
        run_dir.join("final").to_str().unwrap(),
        "--tokens",
        "256,97,98",
    ])
    .unwrap();
    assert!(s.contains("perplexity"), "{s}");
    // A second fresh run into the same directory is refused; --resume continues to 8.
    let e = dsv3(&[
        "train",
        "--preset",
        "tiny",
        "--out",
        run_dir.to_str().unwrap(),
    ])
    .unwrap_err();
    assert!(
        e.contains("already holds a saved run") && e.contains("--resume"),
        "{e}"
    );
    let s = dsv3(&[
        "train",
        "--resume",
        "--steps",
        "8",
        "--checkpoint-every",
        "0",
        "--log-every",
        "2",
        "--out",
        run_dir.to_str().unwrap(),
        "--samples",
        "0",
    ])
    .unwrap();
    assert!(s.contains("resumed from") && s.contains("step-6"), "{s}");
    assert!(s.contains("trained steps 6..8"), "{s}");
    let steps: Vec<usize> = dsv3_train::metrics::read(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|r| r.step)
        .collect();
    assert_eq!(steps, vec![2, 4, 6, 8]);
    assert!(run_dir.join("step-8/train_state.json").is_file());

    // A newest checkpoint whose train_state.json is unreadable is passed over with a warning:
    // the run resumes from the one before it.
    std::fs::write(run_dir.join("step-8/train_state.json"), "{ not json").unwrap();
    let s = dsv3(&[
        "train",
        "--resume",
        "--steps",
        "10",
        "--checkpoint-every",
        "0",
        "--out",
        run_dir.to_str().unwrap(),
        "--samples",
        "0",
    ])
    .unwrap();
    assert!(s.contains("resumed from") && s.contains("step-6"), "{s}");
    assert!(
        s.contains("warning:") && s.contains("step-8") && s.contains("train_state.json"),
        "{s}"
    );
    assert_eq!(s.matches("warning:").count(), 1, "{s}");
    // Without --log-every the resumed run logs every 2 steps as the checkpoint says: 8 and 10
    // (the preset's default, 10, would log 10 alone).
    let steps: Vec<usize> = dsv3_train::metrics::read(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|r| r.step)
        .collect();
    assert_eq!(steps, vec![2, 4, 6, 8, 10]);
    // --steps below the checkpoint's step is refused, and the checkpoint is left as it was.
    let state = std::fs::read(run_dir.join("step-6/train_state.json")).unwrap();
    let e = dsv3(&[
        "train",
        "--resume",
        "--steps",
        "3",
        "--out",
        run_dir.to_str().unwrap(),
    ])
    .unwrap_err();
    assert!(e.contains("--steps 3 is below the step"), "{e}");
    assert_eq!(
        std::fs::read(run_dir.join("step-6/train_state.json")).unwrap(),
        state
    );
}

/// `--backend wgpu` trains the same model as Flex: the same seed and data give the same losses
/// and gradient norms to f32 accumulation error (wgpu sums in another order; over three steps
/// of the `tiny` preset the losses measured equal and the gradient norms within 2e-8 relative,
/// so 1e-4 is a generous bound that a wrong kernel, mask or optimizer step would still break).
#[cfg(feature = "wgpu")]
#[test]
fn cli_train_on_wgpu_matches_flex() {
    let out = scratch("cli-train-wgpu");
    let run = |backend: &str| {
        let dir = out.join(backend);
        let s = dsv3(&[
            "train",
            "--preset",
            "tiny",
            "--steps",
            "2",
            "--log-every",
            "1",
            "--eval-every",
            "2",
            "--samples",
            "0",
            "--backend",
            backend,
            "--out",
            dir.to_str().unwrap(),
        ])
        .unwrap();
        assert!(s.contains("validation: loss"), "{s}");
        dsv3_train::metrics::read(&dir.join("metrics.jsonl")).unwrap()
    };
    let (cpu, gpu) = (run("flex"), run("wgpu"));
    assert_eq!(cpu.len(), 2);
    assert_eq!(gpu.len(), 2);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * a.abs().max(1.0);
    for (c, g) in cpu.iter().zip(&gpu) {
        for (what, a, b) in [("loss", c.loss, g.loss), ("|g|", c.grad_norm, g.grad_norm)] {
            assert!(close(a, b), "step {}: {what} {a} vs {b}", c.step);
        }
    }
    let (vc, vg) = (cpu[1].val_loss.unwrap(), gpu[1].val_loss.unwrap());
    assert!(close(vc, vg), "validation {vc} vs {vg}");
}

#[test]
fn cli_train_bad_inputs_give_one_line_errors() {
    let dir = scratch("cli-bad");
    let out = dir.join("run");
    let o = out.to_str().unwrap();
    let check = |args: &[&str], want: &str| {
        let mut all = vec!["train", "--preset", "tiny", "--samples", "0"];
        all.extend_from_slice(args);
        let e = dsv3(&all).unwrap_err();
        assert!(e.contains(want), "{args:?}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "{args:?}: not one line: {e}");
    };
    let missing = dir.join("nope.txt");
    check(
        &["--data", missing.to_str().unwrap(), "--out", o],
        "does not exist",
    );
    check(&["--workers", "0", "--out", o], "workers");
    // A schedule means nothing without a pipeline: refused rather than ignored.
    check(&["--schedule", "dualpipe", "--out", o], "--pp");
    let empty = dir.join("empty.txt");
    write(&empty, "");
    check(
        &["--data", empty.to_str().unwrap(), "--out", o],
        "no text found",
    );
    let empty_dir = dir.join("empty-dir");
    std::fs::create_dir_all(&empty_dir).unwrap();
    check(
        &["--data", empty_dir.to_str().unwrap(), "--out", o],
        "no text found",
    );
    let small = dir.join("small.txt");
    write(&small, "too short for a window");
    check(
        &["--data", small.to_str().unwrap(), "--out", o],
        "corpus too small",
    );
    let jsonl = dir.join("bad.jsonl");
    write(&jsonl, "{\"text\": \"ok\"}\n{\"txt\": 1}\n");
    check(
        &["--data", jsonl.to_str().unwrap(), "--out", o],
        "bad.jsonl:2: no \"text\" field",
    );
    let cfg = dir.join("config.json");
    let mut c = tiny_model();
    c.n_group = 3;
    write(&cfg, &c.to_json());
    let e = dsv3(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        o,
        "--samples",
        "0",
    ])
    .unwrap_err();
    assert!(e.contains("not divisible by n_group"), "{e}");
    check(&["--resume", "--out", o], "no complete checkpoint");
    check(&["--lr", "nan", "--out", o], "lr = NaN");
    check(&["--backend", "cuda", "--out", o], "not available");
    let e = dsv3(&["train", "--preset", "huge", "--out", o]).unwrap_err();
    assert!(e.contains("unknown training preset"), "{e}");
    // Checked before training, not after it.
    let e = dsv3(&[
        "train",
        "--preset",
        "tiny",
        "--sample-temperature=-1",
        "--out",
        o,
    ])
    .unwrap_err();
    assert!(
        e.contains("--sample-temperature: invalid option temperature = -1"),
        "{e}"
    );
    assert!(!out.join("final").exists(), "no run happened");
    // A directory holding a final model and no step checkpoint (an `rl` run's layout) is not
    // overwritten by a new run.
    let held = dir.join("held");
    std::fs::create_dir_all(held.join("final")).unwrap();
    write(&held.join("final/model.safetensors"), "weights");
    check(
        &["--out", held.to_str().unwrap()],
        "already holds a saved run (checkpoints or final/)",
    );
    assert_eq!(
        std::fs::read_to_string(held.join("final/model.safetensors")).unwrap(),
        "weights"
    );
}
