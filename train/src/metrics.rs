//! Feedback while training: the JSONL log (`DIR/metrics.jsonl`, one object per logged step) and
//! the progress bar (tokens/s and ETA).

use std::io::Write;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::error::TrainError;

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LogRecord {
    pub step: usize,
    /// Whole objective (CE + λ·MTP + balance), mean over the steps since the last record.
    pub loss: f64,
    /// Next-token cross-entropy (nats), same window.
    pub ce_loss: f64,
    pub mtp_loss: Option<f64>,
    pub balance_loss: Option<f64>,
    pub val_loss: Option<f64>,
    pub val_bits_per_byte: Option<f64>,
    pub lr: f64,
    /// Global gradient norm before clipping (last step of the window).
    pub grad_norm: f64,
    /// Max load ÷ mean load of each MoE layer over the window, in `moe_layers` order.
    pub imbalance: Vec<f64>,
    pub moe_layers: Vec<usize>,
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    /// Distributed runs, last step of the window: bytes each rank sent to / received from
    /// other ranks (all collectives).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm_sent_bytes: Option<Vec<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm_recv_bytes: Option<Vec<u64>>,
    /// Expert parallelism: bytes each rank's forward expert exchanges sent, and their analytic
    /// volume (rows leaving the rank × hidden × 4, dispatch + combine); the backward repeats
    /// the rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ep_sent_bytes: Option<Vec<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ep_analytic_bytes: Option<Vec<u64>>,
    /// Expert parallelism: mean number of ranks each token reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ep_ranks_per_token: Option<f64>,
    /// `precision = fp8`, over the window: values quantized in the Linear GEMMs (forward and
    /// backward operands), non-zero values flushed to zero, values e4m3 cannot hold
    /// (non-finite), and the share of tiles and blocks whose scale was clipped (amax < 1e-4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fp8_values: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fp8_underflow: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fp8_overflow: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fp8_clipped_tile_share: Option<f64>,
}

/// Appends records to `metrics.jsonl`.
pub struct MetricsLog {
    /// `DIR/metrics.jsonl`.
    pub path: PathBuf,
}

impl MetricsLog {
    /// Opens `dir/metrics.jsonl`; when resuming at `keep_until`, drops records of later steps
    /// (they belong to work after the checkpoint, which is redone). A new run truncates it.
    ///
    /// # Errors
    /// [`TrainError::Io`] when the file cannot be read or written (e.g. `dir` does not exist).
    pub fn open(dir: &Path, keep_until: Option<usize>) -> Result<Self, TrainError> {
        let path = dir.join("metrics.jsonl");
        match keep_until {
            Some(step) if path.exists() => {
                let kept: Vec<String> = read(&path)?
                    .into_iter()
                    .filter(|r| r.step <= step)
                    .map(|r| serde_json::to_string(&r).expect("record serialises"))
                    .collect();
                let mut text = kept.join("\n");
                if !text.is_empty() {
                    text.push('\n');
                }
                // Through a temporary file: a kill while writing leaves the old log whole.
                let tmp = dir.join(".metrics.jsonl.tmp");
                std::fs::write(&tmp, text).map_err(|e| TrainError::io("write", &tmp, e))?;
                std::fs::rename(&tmp, &path).map_err(|e| TrainError::io("write", &path, e))?;
            }
            Some(_) => {}
            None => {
                std::fs::write(&path, "").map_err(|e| TrainError::io("write", &path, e))?;
            }
        }
        Ok(Self { path })
    }

    /// Appends `r` as one JSON line (the file is created if missing).
    ///
    /// # Errors
    /// [`TrainError::Io`] when the file cannot be opened or written.
    pub fn append(&self, r: &LogRecord) -> Result<(), TrainError> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.path)
            .map_err(|e| TrainError::io("open", &self.path, e))?;
        writeln!(
            f,
            "{}",
            serde_json::to_string(r).expect("record serialises")
        )
        .map_err(|e| TrainError::io("write", &self.path, e))
    }
}

/// All records of a metrics file (lines that do not parse are skipped).
///
/// # Errors
/// [`TrainError::Io`] when the file cannot be read.
pub fn read(path: &Path) -> Result<Vec<LogRecord>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io("read", path, e))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// The progress bar: steps, tokens/s, loss, ETA. Hidden when disabled or not on a terminal.
pub fn progress_bar(done: usize, total: usize, enabled: bool) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(
        Some(total as u64),
        if enabled {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}  ETA {eta_precise}",
        )
        .expect("template"),
    );
    pb.set_position(done as u64);
    pb
}
