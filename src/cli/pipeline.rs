//! `dsv3 pipeline-sim`: generate a pipeline schedule (1F1B, ZB1P, DualPipe, DualPipeV), run
//! it in the event-driven simulator with per-action costs, and print the bubble, makespan and
//! peak activations per rank against the report's Table 2 (optionally as JSON, the timeline as
//! a PNG, and every rank's action list).

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use dsv3_train::pipeline::{self, report_activations, Costs, Schedule, ScheduleKind};

use super::CliError;

/// A schedule by name, for clap (an unknown name is a usage error).
pub(crate) fn schedule_kind(name: &str) -> Result<ScheduleKind, String> {
    ScheduleKind::parse(name).map_err(|e| e.to_string())
}

fn costs(text: &str) -> Result<Costs, String> {
    Costs::parse(text).map_err(|e| e.to_string())
}

#[derive(Args, Debug)]
pub struct PipelineSimArgs {
    /// Schedule: 1f1b, zb1p, dualpipe or dualpipev.
    #[arg(long, value_parser = schedule_kind)]
    pub schedule: ScheduleKind,
    /// Pipeline ranks (PP); DualPipeV cuts the layers into 2·PP stages on them.
    #[arg(long, default_value_t = 8)]
    pub pp: usize,
    /// Micro-batches per step (DualPipe: even and ≥ 2·PP; DualPipeV: ≥ 2·PP).
    #[arg(long, default_value_t = 20)]
    pub micro_batches: usize,
    /// Costs as F,B,W or F,B,W,FB or F,B,W,FB,COMM, in any one time unit: forward, full backward (input + weight),
    /// weight gradient, overlapped F&B (default F+B) and transfer latency (default 0).
    #[arg(long, default_value = "1,2,1,3,0", value_parser = costs)]
    pub costs: Costs,
    /// Draw the timeline (ranks as rows, as the report's Figure 5) into this PNG.
    #[arg(long)]
    pub png: Option<PathBuf>,
    /// Width of the PNG in pixels.
    #[arg(long, default_value_t = 1600, requires = "png")]
    pub width: u32,
    /// Print one JSON object (bubble, makespan, activations per rank, the report's values).
    #[arg(long)]
    pub json: bool,
    /// Also print every rank's action list (compute and transfers), in text mode.
    #[arg(long)]
    pub actions: bool,
}

/// The report's Table 2 bubble expression for `kind`.
fn formula(kind: ScheduleKind) -> &'static str {
    match kind {
        ScheduleKind::OneFOneB => "(PP-1)(F+B)",
        ScheduleKind::ZeroBubble => "(PP-1)(F+B-2W)",
        ScheduleKind::DualPipe => "(PP/2-1)(F&B+B-3W)",
        ScheduleKind::DualPipeV => "(PP-1)(F&B+B-3W) with PP ranks (Table 2's PP/2 devices)",
    }
}

/// Most (rank, micro-batch) pairs `pipeline-sim` takes: the schedule's actions, and the
/// simulation's time and memory, grow with PP × micro-batches (~1 GB and seconds at 1000 × 1000).
const MAX_PAIRS: usize = 1 << 20;

/// `dsv3 pipeline-sim`.
pub fn pipeline_sim(a: &PipelineSimArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let usage = |e: pipeline::PipelineError| CliError::Usage(e.to_string());
    if a.pp
        .checked_mul(a.micro_batches)
        .is_none_or(|p| p > MAX_PAIRS)
    {
        return Err(CliError::Usage(format!(
            "--pp {} × --micro-batches {} is above the {MAX_PAIRS} this simulator takes (its \
             time and memory grow with the product)",
            a.pp, a.micro_batches
        )));
    }
    let schedule = Schedule::new(a.schedule, a.pp, a.micro_batches).map_err(usage)?;
    let report = pipeline::simulate(&schedule, &a.costs).map_err(usage)?;
    if let Some(path) = &a.png {
        pipeline::timeline::draw(&schedule, &a.costs, &report, path, a.width).map_err(|e| {
            CliError::Write {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?;
    }
    let table_bubble = a.costs.report_bubble(a.schedule, a.pp);
    let table_acts = report_activations(a.schedule, a.pp);
    // Table 2's expressions are for a full pipeline: at least PP micro-batches in flight
    // (DualPipe's own minimum, 2·PP, is enforced by the schedule).
    let table_applies = a.micro_batches >= a.pp;
    let w = |e: std::io::Error| super::write_err(std::path::Path::new("stdout"), e);
    if a.json {
        let c = &a.costs;
        let v = serde_json::json!({
            "schedule": a.schedule.name(),
            "pp": a.pp,
            "stages": schedule.stages,
            "micro_batches": a.micro_batches,
            "costs": {"F": c.forward, "B": c.backward, "W": c.weight, "FB": c.forward_backward, "COMM": c.comm},
            "makespan": report.makespan,
            "bubble": report.bubble(),
            "bubble_per_rank": report.bubble_per_rank,
            "busy_per_rank": report.busy_per_rank,
            "activations": report.activations,
            "peak_activations": report.peak_activations(),
            "report_bubble": table_bubble,
            "report_bubble_formula": formula(a.schedule),
            "report_activations": table_acts,
            "report_applies": table_applies,
        });
        writeln!(out, "{v}").map_err(w)?;
        return Ok(());
    }
    writeln!(
        out,
        "{}: PP={} ({} stages), {} micro-batches; costs {}",
        a.schedule, a.pp, schedule.stages, a.micro_batches, a.costs
    )
    .map_err(w)?;
    writeln!(
        out,
        "makespan {}  bubble {} (Table 2: {} = {})  peak activations {} (Table 2: {})",
        report.makespan,
        report.bubble(),
        formula(a.schedule),
        table_bubble,
        report.peak_activations(),
        table_acts
    )
    .map_err(w)?;
    if !table_applies {
        writeln!(
            out,
            "note: Table 2's expressions assume at least PP = {} micro-batches; with {} they \
             do not apply",
            a.pp, a.micro_batches
        )
        .map_err(w)?;
    }
    writeln!(out, "rank  bubble  busy  activations").map_err(w)?;
    for r in 0..a.pp {
        writeln!(
            out,
            "{r:>4}  {:>6}  {:>4}  {:>11}",
            report.bubble_per_rank[r], report.busy_per_rank[r], report.activations[r]
        )
        .map_err(w)?;
    }
    if a.actions {
        for (r, list) in schedule.actions.iter().enumerate() {
            let items: Vec<String> = list.iter().map(ToString::to_string).collect();
            writeln!(out, "rank {r}: {}", items.join(", ")).map_err(w)?;
        }
    }
    if let Some(path) = &a.png {
        writeln!(out, "timeline: {}", path.display()).map_err(w)?;
    }
    Ok(())
}
