//! `dsv3 pipeline-sim` end to end: the JSON summary, the text table, the timeline PNG and
//! one-line errors.

use crate::common::*;

#[test]
fn cli_pipeline_sim_json_text_png_and_errors() {
    // The report's setting: PP = 8, 20 micro-batches, F = 1, B = 2, W = 1, F&B = 3.
    let s = dsv3(&[
        "pipeline-sim",
        "--schedule",
        "dualpipe",
        "--pp",
        "8",
        "--micro-batches",
        "20",
        "--json",
    ])
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(s.trim()).unwrap();
    assert_eq!(v["bubble"].as_f64(), Some(6.0), "{v}");
    assert_eq!(v["report_bubble"].as_f64(), Some(6.0), "{v}");
    assert_eq!(v["makespan"].as_f64(), Some(66.0), "{v}");
    let acts: Vec<u64> = v["activations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_u64().unwrap())
        .collect();
    assert_eq!(acts, vec![9; 8]);
    assert_eq!(s.trim().lines().count(), 1, "one JSON object");
    assert_eq!(v["report_applies"].as_bool(), Some(true), "{v}");
    // Fewer micro-batches than ranks: the run's bubble (5) is not Table 2's (3), and the
    // output says the table does not apply.
    let args = [
        "pipeline-sim",
        "--schedule",
        "zb1p",
        "--pp",
        "4",
        "--micro-batches",
        "2",
    ];
    let v: serde_json::Value =
        serde_json::from_str(dsv3(&[&args[..], &["--json"]].concat()).unwrap().trim()).unwrap();
    assert_eq!(v["report_applies"].as_bool(), Some(false), "{v}");
    assert_ne!(v["bubble"], v["report_bubble"], "{v}");
    let s = dsv3(&args).unwrap();
    assert!(
        s.contains("assume at least PP = 4 micro-batches; with 2 they do not apply"),
        "{s}"
    );

    // 1F1B with explicit costs (F=2, B=4, W=1, F&B=6, comm 0): (PP-1)(F+B) = 18 at PP=4.
    let s = dsv3(&[
        "pipeline-sim",
        "--schedule",
        "1f1b",
        "--pp",
        "4",
        "--micro-batches",
        "8",
        "--costs",
        "2,4,1,6,0",
        "--json",
    ])
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(s.trim()).unwrap();
    assert_eq!(v["bubble"].as_f64(), Some(18.0), "{v}");
    assert_eq!(v["makespan"].as_f64(), Some(8.0 * 6.0 + 18.0), "{v}");
    assert_eq!(v["activations"][0].as_u64(), Some(4), "{v}");

    // Text mode with the PNG and the action lists.
    let dir = scratch("pipeline-sim");
    let png = dir.join("zb1p.png");
    let s = dsv3(&[
        "pipeline-sim",
        "--schedule",
        "zb1p",
        "--pp",
        "4",
        "--micro-batches",
        "8",
        "--png",
        png.to_str().unwrap(),
        "--actions",
    ])
    .unwrap();
    assert!(s.contains("bubble 3 (Table 2: (PP-1)(F+B-2W) = 3)"), "{s}");
    assert!(
        s.contains("rank 3: recv F s2/mb0 from 2, F s3/mb0, Bi s3/mb0"),
        "{s}"
    );
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[1..4], b"PNG");
    assert!(bytes.len() > 2000);
    std::fs::remove_dir_all(&dir).unwrap();

    // Errors are one line and name the precondition.
    let e = dsv3(&["pipeline-sim", "--schedule", "dualpipe", "--pp", "3"]).unwrap_err();
    assert!(e.contains("even number of pipeline ranks"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    let e = dsv3(&[
        "pipeline-sim",
        "--schedule",
        "dualpipev",
        "--pp",
        "8",
        "--micro-batches",
        "10",
    ])
    .unwrap_err();
    assert!(
        e.contains("at least 2·PP = 16 micro-batches (got 10)"),
        "{e}"
    );
    // Time and memory grow with PP × micro-batches: refused above 2^20 pairs, before any work.
    let e = dsv3(&[
        "pipeline-sim",
        "--schedule",
        "1f1b",
        "--pp",
        "100000",
        "--micro-batches",
        "100000",
    ])
    .unwrap_err();
    assert!(e.contains("above the 1048576 this simulator takes"), "{e}");
    let e = dsv3(&["pipeline-sim", "--schedule", "gpipe"]).unwrap_err();
    assert!(e.contains("unknown pipeline schedule"), "{e}");
    let e = dsv3(&["pipeline-sim", "--schedule", "1f1b", "--costs=1,2,1,3,-1"]).unwrap_err();
    assert!(
        e.contains("invalid pipeline costs: each must be finite and ≥ 0, got F=1 B=2 W=1"),
        "{e}"
    );
    let e = dsv3(&["pipeline-sim", "--schedule", "1f1b", "--costs", "1,2"]).unwrap_err();
    assert!(e.contains("F,B,W"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
}
