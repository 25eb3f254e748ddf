//! Distributed runs under `mpirun` (feature `mpi`): the communicator and expert-parallel
//! self-checks, expert-parallel scoring against the single-process forward, expert- plus
//! ZeRO-1 data-parallel training against the single-process loss curve (and its resume), and
//! every pipeline schedule's step against the sequential step.
//!
//! Every run here is the real `dsv3` binary started by OpenMPI's `mpirun` (needs the Debian
//! packages `openmpi-bin libopenmpi-dev`; a missing `mpirun` fails the test saying so). The
//! single-process references are the same binary started directly, with the same environment, so
//! that only the distribution differs. MPI jobs are run one at a time (they oversubscribe the
//! cores already) and killed after [`TIMEOUT`].
//!
//! Tolerances:
//! - logits of an expert-parallel forward: max |Δ| ≤ 1e-5 against the single-process forward.
//!   The arithmetic is the same f32 arithmetic; only the order in which the routed experts'
//!   outputs are summed may change, which moves logits of magnitude ~10 by a few ulps (~1e-6);
//! - routing dumps: the same layers and the exact same expert ids for every token; the routing
//!   weights are floats computed from hidden states that went through earlier (re-ordered) expert
//!   sums, so they are held to the logits' 1e-5;
//! - training losses: relative 1e-4 per logged step. f32 gradients summed across ranks in a
//!   different order differ by ~1e-7 relative per step; over a few Adam steps that grows but
//!   stays far below 1e-4, while a wrong shard, a missing all-reduce or a mis-scaled gradient
//!   moves the loss by 1e-3 or more.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;

/// Wall-clock limit of one launched job; past it the job is terminated and the test fails.
const TIMEOUT: Duration = Duration::from_secs(300);

/// Max |Δ| of expert-parallel logits (and routing weights) against the single-process run.
const EP_LOGIT_TOL: f64 = 1e-5;

/// Relative tolerance on each logged training loss.
const LOSS_RTOL: f64 = 1e-4;

/// Serialises the MPI jobs of concurrently running tests.
static MPI_JOBS: Mutex<()> = Mutex::new(());

fn dsv3_bin() -> &'static str {
    env!("CARGO_BIN_EXE_dsv3")
}

/// `prog` from `PATH`, if there.
fn on_path(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// The environment of every launched job: OpenMPI may run as root (containers, CI), may place
/// more ranks than cores, avoids the single-copy mechanism (CMA) that containers forbid, and each
/// rank computes on one thread (ranks share the few cores).
fn job_env(cmd: &mut Command) -> &mut Command {
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("RAYON_NUM_THREADS", "1")
}

/// Runs `cmd` to completion or [`TIMEOUT`]: `Ok(stdout)` when it exits 0, else
/// `Err(stderr + stdout)` with the exit status.
fn launch(mut cmd: Command) -> Result<String, String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    // Drain both pipes while waiting (a full pipe would block the job).
    let drain = |mut r: Box<dyn Read + Send>| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b = buf.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            while let Ok(n) = r.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                b.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        buf
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for the job") {
            break Some(s);
        }
        if start.elapsed() > TIMEOUT {
            // SIGTERM first: mpirun forwards it to its ranks; then SIGKILL.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let grace = Instant::now();
            while grace.elapsed() < Duration::from_secs(10) {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Give the readers a moment to see the pipes close (ranks may outlive a killed mpirun).
    std::thread::sleep(Duration::from_millis(100));
    let text = |b: &Arc<Mutex<Vec<u8>>>| String::from_utf8_lossy(&b.lock().unwrap()).into_owned();
    let (stdout, stderr) = (text(&out), text(&err));
    match status {
        Some(s) if s.success() => Ok(stdout),
        Some(s) => Err(format!("{what} exited with {s}\n{stderr}{stdout}")),
        None => panic!(
            "{what} did not finish within {} s\nstderr:\n{stderr}\nstdout:\n{stdout}",
            TIMEOUT.as_secs()
        ),
    }
}

/// `mpirun -n N --oversubscribe dsv3 ARGS`: `Ok(stdout)` on exit 0, else `Err(stderr + stdout)`.
/// Panics when `mpirun` is not installed.
fn mpirun(n: usize, args: &[&str]) -> Result<String, String> {
    let mpirun = on_path("mpirun").unwrap_or_else(|| {
        panic!("mpirun not found: install openmpi-bin libopenmpi-dev (see .ci/run)")
    });
    let mut cmd = Command::new(mpirun);
    cmd.args(["-n", &n.to_string(), "--oversubscribe", dsv3_bin()])
        .args(args);
    job_env(&mut cmd);
    let _one_at_a_time = MPI_JOBS.lock().unwrap_or_else(|e| e.into_inner());
    launch(cmd)
}

/// The same binary as one plain process, in the environment of the MPI jobs.
fn plain(args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new(dsv3_bin());
    cmd.args(args);
    job_env(&mut cmd);
    launch(cmd)
}

/// The arguments of `dsv3 train` of the tiny pipeline config into `out`: micro-batches of
/// 2 × 32 tokens, `accum` of them per step, warm-up 2, a log line per step, no evaluation or
/// samples, a checkpoint every `every` steps, `steps` in all, then `extra`.
fn pipeline_args<'a>(
    cfg: &'a Path,
    out: &'a Path,
    accum: &'a str,
    every: &'a str,
    steps: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut a = vec![
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--grad-accum",
        accum,
        "--warmup",
        "2",
        "--log-every",
        "1",
        "--eval-every",
        "1000",
        "--checkpoint-every",
        every,
        "--samples",
        "0",
        "--steps",
        steps,
        "--out",
        out.to_str().unwrap(),
    ];
    a.extend_from_slice(extra);
    a
}

/// [`pipeline_args`] run as one plain process (`n` = 1) or under `mpirun -n n`. Its stdout;
/// panics with the output when it fails.
fn pipeline_train(
    n: usize,
    cfg: &Path,
    out: &Path,
    accum: &str,
    every: &str,
    steps: &str,
    extra: &[&str],
) -> String {
    let a = pipeline_args(cfg, out, accum, every, steps, extra);
    let r = if n == 1 { plain(&a) } else { mpirun(n, &a) };
    r.unwrap_or_else(|e| panic!("{a:?} failed:\n{e}"))
}

fn dist_check(n: usize) {
    let out = mpirun(n, &["dist-check"]).unwrap_or_else(|e| panic!("dist-check failed:\n{e}"));
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines.len() >= 3,
        "expected at least 3 checks from {n} ranks, got:\n{out}"
    );
    for l in &lines {
        assert!(l.starts_with("ok "), "not an ok line: {l:?}\n{out}");
    }
}

#[test]
fn dist_check_2_ranks() {
    dist_check(2);
}

#[test]
fn dist_check_4_ranks() {
    dist_check(4);
}

/// `dist-check --pipeline` on `n` ranks: one training step of every schedule (DualPipe only
/// with an even `n`) against the sequential step: the CE of every micro-batch bit-identical, the
/// objective within 1e-6 relative (each stage's balance loss summed separately), and the
/// gradients summed over the pipeline ranks within DualPipe's cosine difference
/// `1 − 2⟨x,y⟩/(|x|²+|y|²)` < 1e-12 per tensor (f32 gradients: each micro-batch's contribution is
/// the same arithmetic, only their sum's order changes; measured ≤ 6e-14).
fn pipeline_check(n: usize) {
    let out = if n == 1 {
        plain(&["dist-check", "--pipeline"])
    } else {
        mpirun(n, &["dist-check", "--pipeline"])
    }
    .unwrap_or_else(|e| panic!("dist-check --pipeline on {n} failed:\n{e}"));
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    let kinds: &[&str] = if n.is_multiple_of(2) {
        &["1f1b", "zb1p", "dualpipe", "dualpipev"]
    } else {
        &["1f1b", "zb1p", "dualpipev"]
    };
    assert_eq!(lines.len(), kinds.len(), "{out}");
    for (l, kind) in lines.iter().zip(kinds) {
        assert!(
            l.starts_with(&format!("ok pipeline {kind} on {n} ranks")),
            "{l}\n{out}"
        );
        assert!(l.contains("CE bit-identical"), "{l}");
        let cos: f64 = l
            .split("cosine difference ≤ ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|x| x.parse().ok())
            .unwrap_or_else(|| panic!("no cosine difference in {l}"));
        assert!(cos < 1e-12, "{l}");
    }
}

#[test]
fn dist_pipeline_schedules_match_sequential_1_2_4_ranks() {
    for n in [1, 2, 4] {
        pipeline_check(n);
    }
}

/// The fixture's golden token ids, comma-separated.
fn golden_tokens(dir: &Path) -> String {
    let g = Golden::read(&dir.join("golden.safetensors"));
    g.ids()
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Compares two routing dumps: same structure, same strings/bools/integers (layer indices, expert
/// ids), floats (routing weights) within `tol`.
fn assert_json_close(got: &serde_json::Value, want: &serde_json::Value, at: &str, tol: f64) {
    use serde_json::Value as V;
    match (got, want) {
        (V::Array(a), V::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{at}: array lengths differ");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_json_close(x, y, &format!("{at}[{i}]"), tol);
            }
        }
        (V::Object(a), V::Object(b)) => {
            let (ka, kb): (Vec<_>, Vec<_>) = (a.keys().collect(), b.keys().collect());
            assert_eq!(ka, kb, "{at}: keys differ");
            for (k, x) in a {
                assert_json_close(x, &b[k], &format!("{at}.{k}"), tol);
            }
        }
        (V::Number(x), V::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!((x - y).abs() <= tol, "{at}: {x} vs {y}");
        }
        _ => assert_eq!(got, want, "{at}"),
    }
}

/// Scores `fixture` with `--mtp --out --routing` single-process and under `mpirun -n N --ep N`
/// for N = 2, 4; the written logits (and MTP logits) and routing dumps must agree.
fn score_ep_equals_single(fixture_dir: &Path, name: &str) {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir.join("config.json")).unwrap())
            .unwrap();
    let experts = cfg["n_routed_experts"].as_u64().unwrap();
    assert!(
        experts >= 4 && experts.is_multiple_of(4),
        "{name}: {experts} routed experts cannot be split over 4 ranks"
    );
    let model = fixture_dir.to_str().unwrap();
    let tokens = golden_tokens(fixture_dir);
    let dir = scratch(&format!("dist-score-{name}"));
    let run = |ep: usize| -> (String, PathBuf, PathBuf) {
        let (o, r) = (
            dir.join(format!("logits-ep{ep}.safetensors")),
            dir.join(format!("routing-ep{ep}.json")),
        );
        let stdout = {
            let ep_s = ep.to_string();
            let mut args = vec![
                "score",
                "--model",
                model,
                "--tokens",
                &tokens,
                "--mtp",
                "--out",
                o.to_str().unwrap(),
                "--routing",
                r.to_str().unwrap(),
            ];
            if ep == 1 {
                plain(&args)
            } else {
                args.extend(["--ep", &ep_s]);
                mpirun(ep, &args)
            }
        }
        .unwrap_or_else(|e| panic!("{name} score --ep {ep} failed:\n{e}"));
        (stdout, o, r)
    };
    let (ref_out, ref_logits, ref_routing) = run(1);
    let want = Golden::read(&ref_logits);
    let want_routing: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ref_routing).unwrap()).unwrap();
    assert!(
        want.f.contains_key("logits") && want.f.contains_key("mtp_logits"),
        "{name}: single-process --out lacks logits or mtp_logits"
    );
    let report_lines = ref_out.matches("perplexity").count();
    assert!(report_lines >= 1, "{ref_out}");
    for ep in [2, 4] {
        let (out, logits, routing) = run(ep);
        // Rank 0 prints the report once; the other ranks are silent.
        assert_eq!(
            out.matches("perplexity").count(),
            report_lines,
            "{name} --ep {ep}: the report is not printed exactly once:\n{out}"
        );
        let got = Golden::read(&logits);
        let mut names: Vec<_> = got.f.keys().collect();
        let mut want_names: Vec<_> = want.f.keys().collect();
        names.sort();
        want_names.sort();
        assert_eq!(names, want_names, "{name} --ep {ep}: tensors in --out");
        for (t, (shape, w)) in &want.f {
            let (s, g) = got.f(t);
            assert_eq!(s, shape, "{name} --ep {ep}: {t} shape");
            let d = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(
                d <= EP_LOGIT_TOL,
                "{name} --ep {ep}: {t} max |Δ| = {d:.3e} > {EP_LOGIT_TOL:e}"
            );
        }
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&routing).unwrap()).unwrap();
        assert_json_close(
            &r,
            &want_routing,
            &format!("{name} --ep {ep} routing"),
            EP_LOGIT_TOL,
        );
    }
}

/// Expert-parallel scoring over 2 and 4 ranks equals the single-process forward on a tiny
/// fixture (12 experts, two MoE layers, MTP) and a scaled DeepSeek-V3 release (24 FP8 experts in
/// 8 groups with group-limited routing, MTP).
#[test]
fn score_ep2_and_ep4_equal_ep1() {
    score_ep_equals_single(&fixture("tiny-qlora"), "tiny-qlora");
    score_ep_equals_single(&fixture("released/deepseek-v3"), "deepseek-v3");
}

/// `--ep` must equal the MPI world size: a non-zero exit and a one-line error naming both
/// numbers. Every rank finds the mismatch on its own, so each may print the line (identical).
#[test]
fn score_ep_must_match_world() {
    let dir = fixture("tiny-qlora");
    let e = mpirun(
        2,
        &[
            "score",
            "--model",
            dir.to_str().unwrap(),
            "--tokens",
            "1,2,3",
            "--ep",
            "4",
        ],
    )
    .expect_err("--ep 4 on 2 ranks must fail");
    // Every rank detects it; rank 0 alone reports it (the others exit quietly). mpirun adds its
    // own banner, so judge the lines naming both numbers: exactly one.
    assert!(e.contains("error:"), "no error line:\n{e}");
    assert!(!e.contains("panicked"), "a rank panicked:\n{e}");
    // (mpirun's banner also names processes, with job ids full of digits: only lines of ours.)
    let names_sizes = |l: &str| {
        let l = l.to_lowercase();
        l.contains("--ep 4") && l.contains("2 process")
    };
    let errors: Vec<&str> = e
        .lines()
        .filter(|l| names_sizes(l))
        .map(|l| l.trim_start_matches("error:").trim())
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "expected one error line naming --ep 4 and the world size 2 (from rank 0 only):\n{e}"
    );
}

/// `(step, loss)` of each record of `DIR/metrics.jsonl`, and the records themselves.
fn losses(run_dir: &Path) -> (Vec<(u64, f64)>, Vec<serde_json::Value>) {
    let p = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let recs: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let pairs = recs
        .iter()
        .map(|r| (r["step"].as_u64().unwrap(), r["loss"].as_f64().unwrap()))
        .collect();
    (pairs, recs)
}

fn assert_losses_close(got: &[(u64, f64)], want: &[(u64, f64)], what: &str) {
    let steps = |v: &[(u64, f64)]| v.iter().map(|p| p.0).collect::<Vec<_>>();
    assert_eq!(steps(got), steps(want), "{what}: logged steps");
    for (&(step, g), &(_, w)) in got.iter().zip(want) {
        let rel = (g - w).abs() / w.abs().max(f64::MIN_POSITIVE);
        assert!(
            rel <= LOSS_RTOL,
            "{what}: step {step} loss {g} vs single-process {w} (relative {rel:.2e} > {LOSS_RTOL:e})"
        );
    }
}

/// Expert-parallel records carry the communication counters: per rank, bytes sent and received
/// (non-zero), the forward expert exchanges' measured bytes against their analytic volume
/// (rows leaving the rank × hidden × 4, dispatch + combine; the measured bytes add the counts
/// and one 4-byte expert id per row: at hidden 72 under 1% more), and the ranks each token
/// reached (1 to `topk_group` = 2 when the tiny preset's 4 expert groups lie on 2 ranks).
fn assert_comm_fields(recs: &[serde_json::Value], world: usize, what: &str) {
    let per_rank = |r: &serde_json::Value, key: &str| -> Vec<u64> {
        let v: Vec<u64> = r[key]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: {key} missing in {r}"))
            .iter()
            .map(|x| x.as_u64().expect("bytes"))
            .collect();
        assert_eq!(
            v.len(),
            world,
            "{what}: {key} has one entry per rank in {r}"
        );
        v
    };
    for r in recs {
        for key in ["comm_sent_bytes", "comm_recv_bytes"] {
            assert!(
                per_rank(r, key).iter().all(|&b| b > 0),
                "{what}: {key} in {r}"
            );
        }
        let measured = per_rank(r, "ep_sent_bytes");
        let analytic = per_rank(r, "ep_analytic_bytes");
        for (m, a) in measured.iter().zip(&analytic) {
            assert!(
                *a > 0 && *m >= *a && (*m as f64) <= *a as f64 * 1.02 + 4096.0,
                "{what}: measured {m} vs analytic {a} bytes in {r}"
            );
        }
        let ranks = r["ep_ranks_per_token"].as_f64().expect("ranks per token");
        assert!(
            (1.0..=2.0).contains(&ranks),
            "{what}: {ranks} ranks per token"
        );
    }
}

/// The tensor names, dtypes and shapes of a checkpoint's weights: `model.safetensors`, or the
/// shards `model-0000i-of-0000n.safetensors` of the sharded Hugging Face layout (a distributed
/// run may write either; both load the same way).
fn checkpoint_layout(dir: &Path) -> Vec<(String, String, Vec<usize>)> {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut v = Vec::new();
    let mut files = 0;
    for e in entries {
        let p = e.unwrap().path();
        let n = p.file_name().unwrap().to_string_lossy().into_owned();
        if !(n.starts_with("model") && n.ends_with(".safetensors")) {
            continue;
        }
        files += 1;
        let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        v.extend(
            st.tensors()
                .into_iter()
                .map(|(n, t)| (n, format!("{:?}", t.dtype()), t.shape().to_vec())),
        );
    }
    assert!(files > 0, "no model*.safetensors in {}", dir.display());
    v.sort();
    let names = v.len();
    v.dedup_by(|a, b| a.0 == b.0);
    assert_eq!(names, v.len(), "{}: a tensor in two shards", dir.display());
    v
}

/// The flags every training run here shares: the tiny preset, 4 sequences of 32 tokens per
/// (global) micro-batch, a record per step, no validation within the run, no samples.
const TRAIN: &[&str] = &[
    "train",
    "--preset",
    "tiny",
    "--batch-size",
    "4",
    "--seq-len",
    "32",
    "--log-every",
    "1",
    "--eval-every",
    "1000",
    "--checkpoint-every",
    "2",
    "--samples",
    "0",
];

fn train_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    TRAIN.iter().copied().chain(extra.iter().copied()).collect()
}

/// Trains `steps` steps in one process (`DIR/single`) and as `ranks` processes with `dist_flags`
/// (`DIR/dist`), both with the same flags otherwise; checks that each run logged every step, that
/// the distributed losses follow the single-process ones (relative 1e-4 per step), that its
/// records carry the communication counters, and that its checkpoints hold the single-process
/// run's tensors (sharded). Returns both run directories and the distributed run's stdout.
fn train_both(
    name: &str,
    steps: usize,
    ranks: usize,
    dist_flags: &[&str],
) -> (PathBuf, PathBuf, String) {
    let dir = scratch(name);
    let (single, dist) = (dir.join("single"), dir.join("dist"));
    let steps_s = steps.to_string();
    plain(&train_args(&[
        "--steps",
        &steps_s,
        "--out",
        single.to_str().unwrap(),
    ]))
    .unwrap_or_else(|e| panic!("single-process train failed:\n{e}"));
    let mut args = train_args(&["--steps", &steps_s, "--out", dist.to_str().unwrap()]);
    args.extend(dist_flags);
    let what = dist_flags.join(" ");
    let out = mpirun(ranks, &args).unwrap_or_else(|e| panic!("train {what} failed:\n{e}"));
    let (want, _) = losses(&single);
    assert_eq!(want.len(), steps, "one record per step: {want:?}");
    let (got, recs) = losses(&dist);
    assert_losses_close(&got, &want, &what);
    assert_comm_fields(&recs, ranks, &what);
    let layout = checkpoint_layout(&single.join("final"));
    let saved = (2..=steps).step_by(2).map(|s| format!("step-{s}"));
    for d in saved.chain(["final".to_string()]) {
        assert_eq!(
            checkpoint_layout(&dist.join(&d)),
            layout,
            "{what} {d}: checkpoint tensors differ from the single-process run's"
        );
    }
    (single, dist, out)
}

/// `mpirun -n 2 dsv3 train --ep 2` (two groups of 8 experts, no data parallelism) follows the
/// single-process loss curve of the same flags (relative 1e-4 per step) and writes the same
/// tensors (as shards); rank 0 alone prints.
#[test]
fn train_ep2_matches_single_process() {
    let (_, _, out) = train_both("dist-train-ep2", 4, 2, &["--ep", "2"]);
    assert_eq!(
        out.matches("trained steps").count(),
        1,
        "rank 0 alone reports:\n{out}"
    );
}

/// `mpirun -n 4 dsv3 train --ep 2 --dp 2` follows the single-process 6-step loss curve; then,
/// with its last checkpoint removed, `--resume --steps 6` continues from step 4 and its steps 5
/// and 6 again match the uninterrupted single-process run (the learning-rate schedule depends on
/// the total steps, so the interrupted run is a 6-step run too).
#[test]
fn train_ep2_dp2_matches_and_resumes() {
    let dist_flags = ["--ep", "2", "--dp", "2"];
    let (single, dist, _) = train_both("dist-train-ep2dp2", 6, 4, &dist_flags);
    let (want, _) = losses(&single);
    let layout = checkpoint_layout(&single.join("final"));
    let d = dist.to_str().unwrap();

    // Interrupt after step 4: without step-6 (and final/) the newest checkpoint is step-4.
    std::fs::remove_dir_all(dist.join("step-6")).unwrap();
    std::fs::remove_dir_all(dist.join("final")).unwrap();
    let mut args = vec![
        "train",
        "--resume",
        "--steps",
        "6",
        "--log-every",
        "1",
        "--eval-every",
        "1000",
        "--checkpoint-every",
        "2",
        "--samples",
        "0",
        "--out",
        d,
    ];
    args.extend(dist_flags);
    let out = mpirun(4, &args).unwrap_or_else(|e| panic!("--resume under mpirun failed:\n{e}"));
    assert!(
        out.contains("resumed from") && out.contains("step-4"),
        "not resumed from step-4:\n{out}"
    );
    assert_eq!(
        out.matches("resumed from").count(),
        1,
        "rank 0 alone reports:\n{out}"
    );
    let (got, _) = losses(&dist);
    assert_losses_close(&got, &want, "--ep 2 --dp 2 resumed at step 4");
    for c in ["step-6", "final"] {
        assert_eq!(checkpoint_layout(&dist.join(c)), layout, "resumed {c}");
    }
}

/// `mpirun -n N dsv3 generate --ep N` decodes the tokens the single-process run decodes, greedy
/// and sampled (same seed), with MTP speculative decoding too; rank 0 alone prints them.
#[test]
fn generate_ep_equals_single_process() {
    let dir = fixture("tiny-qlora");
    let m = dir.to_str().unwrap();
    let ids = |out: &str| -> String {
        let mut lines = out
            .lines()
            .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()));
        let first = lines
            .next()
            .unwrap_or_else(|| panic!("no token line in:\n{out}"));
        assert!(
            lines.next().is_none(),
            "rank 0 alone prints the tokens:\n{out}"
        );
        first.trim().to_string()
    };
    for extra in [
        &["--max-new-tokens", "10"][..],
        &[
            "--max-new-tokens",
            "10",
            "--temperature",
            "0.8",
            "--seed",
            "3",
        ][..],
        &["--max-new-tokens", "10", "--speculative", "mtp"][..],
    ] {
        let mut args = vec!["generate", "--model", m, "--tokens", "1,2,3"];
        args.extend(extra);
        let want = ids(&plain(&args).unwrap_or_else(|e| panic!("plain generate: {e}")));
        for n in [2usize, 4] {
            let ep = n.to_string();
            let mut a = args.clone();
            a.extend(["--ep", ep.as_str()]);
            let out = mpirun(n, &a).unwrap_or_else(|e| panic!("generate --ep {n}: {e}"));
            assert_eq!(ids(&out), want, "generate --ep {n} {extra:?}");
            assert!(out.contains("peak RSS per rank"), "{out}");
        }
    }
}

/// An error every rank meets (a bad token id, a global batch that does not split, a layout that
/// does not fit the world, a missing checkpoint to resume) is one line from rank 0 and a
/// non-zero exit: the ranks agree before any of them exits, so mpirun stops none of them before
/// rank 0 has printed, and the others stay silent.
#[test]
fn errors_every_rank_meets_are_printed_once() {
    let m = fixture("tiny-qlora");
    let m = m.to_str().unwrap();
    let dir = scratch("dist-errors");
    let out = dir.join("run");
    let out = out.to_str().unwrap();
    let cases: [(usize, Vec<&str>, &str); 4] = [
        (
            2,
            vec!["score", "--model", m, "--tokens", "1,2,999", "--ep", "2"],
            "token id 999",
        ),
        (
            2,
            vec![
                "train",
                "--preset",
                "tiny",
                "--ep",
                "2",
                "--batch-size",
                "3",
                "--out",
                out,
            ],
            "divisible by the 2 processes",
        ),
        (
            2,
            vec![
                "train", "--preset", "tiny", "--ep", "2", "--dp", "2", "--out", out,
            ],
            "does not fit the 2 process(es)",
        ),
        (
            2,
            vec![
                "train", "--preset", "tiny", "--ep", "2", "--resume", "--out", out,
            ],
            "no complete checkpoint",
        ),
    ];
    for (n, args, want) in cases {
        let e = mpirun(n, &args).expect_err("must fail");
        let ours: Vec<&str> = e.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(ours.len(), 1, "{args:?}: one error line expected:\n{e}");
        assert!(
            ours[0].starts_with("error: ") && ours[0].contains(want),
            "{args:?}: {:?} should name {want:?}",
            ours[0]
        );
        assert!(!e.contains("panicked"), "{args:?}:\n{e}");
    }
}

/// A tiny model config without MTP modules (a pipeline runs none yet) and with 4 decoder
/// layers (1 dense, 3 MoE), written from `dsv3 init --preset tiny` into `dir/cfg.json`.
fn pipeline_config(dir: &Path) -> PathBuf {
    let init = dir.join("init");
    plain(&["init", "--preset", "tiny", "--out", init.to_str().unwrap()])
        .unwrap_or_else(|e| panic!("init: {e}"));
    let text = std::fs::read_to_string(init.join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["num_nextn_predict_layers"] = 0.into();
    cfg["num_hidden_layers"] = 4.into();
    let path = dir.join("cfg.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    path
}

/// `dsv3 train --pp P --dp D --schedule S` under `mpirun -n P·D` follows the single-process
/// loss curve (relative 1e-4 per logged step, as for EP/DP; measured: equal to 6 decimals) for
/// every schedule at PP = 2 and 4 and for two data-parallel pipelines of 2, writes its
/// checkpoints (the model, and every rank's ZeRO-1 optimiser shard), and `--resume` continues it as a resumed single-process run continues (3 steps,
/// then resumed to 6).
#[test]
fn dist_train_pp_matches_single_process_and_resumes() {
    let dir = scratch("dist-pp");
    let cfg = pipeline_config(&dir);
    let run = |n: usize, out: &Path, steps: &str, extra: &[&str]| {
        pipeline_train(n, &cfg, out, "8", "3", steps, extra)
    };
    let single = dir.join("single");
    run(1, &single, "3", &[]);
    run(1, &single, "6", &["--resume"]);
    let (want, _) = losses(&single);
    assert_eq!(want.len(), 6);
    // (processes, pipeline ranks, schedule): PP = 2 and 4, and 2 data-parallel pipelines of 2.
    for (n, pp, schedule) in [
        (2, 2, "1f1b"),
        (2, 2, "dualpipe"),
        (4, 4, "zb1p"),
        (4, 4, "dualpipev"),
        (4, 2, "dualpipe"),
    ] {
        let out = dir.join(format!("n{n}-pp{pp}-{schedule}"));
        let (pp_s, dp_s) = (pp.to_string(), (n / pp).to_string());
        let flags = ["--pp", &pp_s, "--dp", &dp_s, "--schedule", schedule];
        run(n, &out, "3", &flags);
        let mut resume = flags.to_vec();
        resume.push("--resume");
        let s = run(n, &out, "6", &resume);
        assert!(s.contains("trained steps 3..6"), "{s}");
        let (got, _) = losses(&out);
        assert_losses_close(
            &got,
            &want,
            &format!("train --pp {n} --schedule {schedule}"),
        );
        for d in ["step-3", "step-6", "final"] {
            assert_eq!(
                checkpoint_layout(&out.join(d)),
                checkpoint_layout(&single.join("final")),
                "{schedule} {d}: checkpoint tensors differ from the single-process run's"
            );
        }
        // ZeRO-1 over the ranks: each wrote its own optimiser shard.
        for r in 0..n {
            let shard = out.join("step-6").join(format!("optimizer-rank{r}.mpk"));
            assert!(shard.is_file(), "{schedule}: {}", shard.display());
        }
    }
    // Layouts that cannot work are one-line errors.
    let e = mpirun(3, &["train", "--pp", "2", "--dp", "2", "--steps", "1"]).unwrap_err();
    assert!(
        e.contains("--pp 2 × --dp 2 needs 4 processes, mpirun started 3"),
        "{e}"
    );
    let e = mpirun(2, &["train", "--pp", "2", "--ep", "2", "--steps", "1"]).unwrap_err();
    assert!(
        e.contains("--ep 2 must divide --dp 1: with --pp the expert-parallel groups lie inside"),
        "{e}"
    );
    let odd = dir.join("odd");
    let a = pipeline_args(
        &cfg,
        &odd,
        "3",
        "3",
        "1",
        &["--pp", "2", "--schedule", "dualpipe"],
    );
    let e = mpirun(2, &a).unwrap_err();
    assert!(
        e.contains("dualpipe needs an even number of micro-batches"),
        "{e}"
    );
    let mtp_out = dir.join("mtp");
    let e = mpirun(
        2,
        &[
            "train",
            "--preset",
            "tiny",
            "--pp",
            "2",
            "--steps",
            "1",
            "--out",
            mtp_out.to_str().unwrap(),
        ],
    )
    .unwrap_err();
    assert!(e.contains("does not run MTP modules yet"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `dsv3 train --pp 2 --dp 2 --ep 2 --schedule S` under `mpirun -n 4` (two pipelines of two
/// stages; each stage's two replicas form one expert-parallel group, so a MoE layer exchanges
/// tokens between the ranks running its stage) follows the single-process loss curve for every
/// schedule (1F1B; ZB1P and DualPipe with their B-input/W split; DualPipeV with four stages), 2
/// steps and then resumed to 4 as the single-process run is, and writes
/// checkpoints with the single-process run's tensors (sharded by expert).
///
/// Every rank of an EP group runs the same list of actions, and a backward recomputes its
/// stage and back-propagates at once, so the exchanges of the forward and the backward of
/// `all_to_all_rows` pair up in order; were they to pair wrongly the run would stop with a
/// row for an expert held elsewhere, hang to the timeout, or move the loss by far more than
/// the tolerance. Tolerance: relative 1e-4 per step as for the other distributed runs (f32
/// gradients summed over four ranks in another order, and the experts' rows combined in
/// another order, differ by ~1e-7 relative per step).
#[test]
fn dist_train_pp_ep_matches_single_process_and_resumes() {
    let dir = scratch("dist-pp-ep");
    let cfg = pipeline_config(&dir);
    let run = |n: usize, out: &Path, steps: &str, extra: &[&str]| {
        pipeline_train(n, &cfg, out, "4", "2", steps, extra)
    };
    let single = dir.join("single");
    run(1, &single, "2", &[]);
    run(1, &single, "4", &["--resume"]);
    let (want, _) = losses(&single);
    assert_eq!(want.len(), 4);
    let layout = checkpoint_layout(&single.join("final"));
    // Two stages × two replicas, experts split over each stage's pair.
    let layout_flags = |schedule| {
        vec![
            "--pp",
            "2",
            "--dp",
            "2",
            "--ep",
            "2",
            "--schedule",
            schedule,
        ]
    };
    for schedule in ["1f1b", "zb1p", "dualpipe", "dualpipev"] {
        let out = dir.join(format!("pp2-ep2-{schedule}"));
        let flags = layout_flags(schedule);
        let s = run(4, &out, "2", &flags);
        assert!(s.contains("peak RSS per rank"), "{s}");
        let mut resume = flags.to_vec();
        resume.push("--resume");
        let s = run(4, &out, "4", &resume);
        assert!(s.contains("trained steps 2..4"), "{s}");
        let (got, _) = losses(&out);
        assert_losses_close(
            &got,
            &want,
            &format!("train --pp 2 --dp 2 --ep 2 --schedule {schedule}"),
        );
        for d in ["step-2", "step-4", "final"] {
            assert_eq!(
                checkpoint_layout(&out.join(d)),
                layout,
                "{schedule} {d}: checkpoint tensors differ from the single-process run's"
            );
        }
    }
    // Another schedule places the stages (and so the optimiser shards) otherwise: refused.
    let run_dir = dir.join("pp2-ep2-1f1b");
    let mut extra = layout_flags("dualpipev");
    extra.push("--resume");
    let a = pipeline_args(&cfg, &run_dir, "4", "2", "6", &extra);
    let e = mpirun(4, &a).unwrap_err();
    assert!(
        e.contains("--schedule 1f1b; resume it with the same layout"),
        "{e}"
    );
    // The pipeline run's model loads in one process.
    let final_dir = dir.join("pp2-ep2-1f1b").join("final");
    plain(&[
        "score",
        "--model",
        final_dir.to_str().unwrap(),
        "--tokens",
        "1,2,3",
    ])
    .unwrap_or_else(|e| panic!("score of the pipeline run's model failed:\n{e}"));
    std::fs::remove_dir_all(&dir).unwrap();
}
