//! Backend selection from the command line: one-line errors, `dsv3 compare`.

use crate::common::*;

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
