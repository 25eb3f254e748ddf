//! The simulated run as a PNG, laid out like the report's Figure 5 (DualPipe for 8 ranks and
//! 20 micro-batches): one row per rank, time to the right, one box per compute action.
//!
//! Colours: each micro-batch has its own hue; a forward is light, a backward (full or input)
//! dark, a weight gradient white with a border of the hue; an F&B box is split, forward above, backward below. The
//! micro-batch number is written in each box when a system font is found (see `plot`).

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::schedule::{Action, Schedule};
use super::sim::{Costs, SimReport};
use super::PipelineError;

const ROW: i32 = 34;
const GAP: i32 = 6;
const LEFT: i32 = 70;
const TOP: i32 = 40;
const BOTTOM: i32 = 36;

/// The hue of micro-batch `mb`: the golden-ratio sequence, so neighbours differ.
fn hue(mb: usize) -> f64 {
    (mb as f64 * 0.618_033_988_749_895).fract()
}

/// How a box is drawn.
#[derive(Clone, Copy)]
enum Look {
    /// Light fill of the micro-batch's hue.
    Forward,
    /// Dark fill, white number.
    Backward,
    /// White fill, thick border of the micro-batch's hue.
    Weight,
}

fn colour(mb: usize, look: Look) -> HSLColor {
    match look {
        Look::Forward => HSLColor(hue(mb), 0.75, 0.8),
        Look::Backward => HSLColor(hue(mb), 0.7, 0.33),
        Look::Weight => HSLColor(hue(mb), 0.8, 0.45),
    }
}

/// Draws `report`'s timeline of `schedule` into `path` (`width` pixels wide, rows of 34 px).
///
/// # Errors
/// [`PipelineError::Draw`] when `plotters` cannot draw or write the PNG.
pub fn draw(
    schedule: &Schedule,
    costs: &Costs,
    report: &SimReport,
    path: &Path,
    width: u32,
) -> Result<(), PipelineError> {
    let e = |x: String| PipelineError::Draw {
        path: path.to_path_buf(),
        reason: x,
    };
    let text = crate::plot::font();
    let height = (TOP + BOTTOM + schedule.ranks as i32 * (ROW + GAP)) as u32;
    let root = BitMapBackend::new(path, (width.max(200), height)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let span = report.makespan.max(f64::MIN_POSITIVE);
    let plot_w = f64::from(width.max(200) as i32 - LEFT - 10);
    let x = |t: f64| LEFT + (t / span * plot_w).round() as i32;
    let font = ("sans-serif", 13).into_font();
    let centred = font
        .clone()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Center));

    let mut boxes: Vec<(i32, i32, i32, i32, usize, Look)> = Vec::new();
    for row in &report.timeline {
        for s in row {
            let y0 = TOP + s.rank as i32 * (ROW + GAP);
            let (x0, x1) = (x(s.start), x(s.end).max(x(s.start) + 1));
            let mid = y0 + ROW / 2;
            match s.action {
                Action::Forward(c) => {
                    boxes.push((x0, y0, x1, y0 + ROW, c.micro_batch, Look::Forward))
                }
                Action::Backward(c) | Action::BackwardInput(c) => {
                    boxes.push((x0, y0, x1, y0 + ROW, c.micro_batch, Look::Backward))
                }
                Action::Weight(c) => {
                    boxes.push((x0, y0, x1, y0 + ROW, c.micro_batch, Look::Weight))
                }
                Action::ForwardBackward { forward, backward } => {
                    boxes.push((x0, y0, x1, mid, forward.micro_batch, Look::Forward));
                    boxes.push((x0, mid, x1, y0 + ROW, backward.micro_batch, Look::Backward));
                }
                _ => {}
            }
        }
    }
    for &(x0, y0, x1, y1, mb, look) in &boxes {
        let c = colour(mb, look);
        let (fill, border): (RGBAColor, ShapeStyle) = match look {
            Look::Weight => (WHITE.to_rgba(), c.stroke_width(3)),
            _ => (c.to_rgba(), BLACK.stroke_width(1)),
        };
        root.draw(&Rectangle::new([(x0, y0), (x1, y1)], fill.filled()))
            .map_err(|x| e(x.to_string()))?;
        let inset = i32::from(matches!(look, Look::Weight));
        root.draw(&Rectangle::new(
            [(x0 + inset, y0 + inset), (x1 - inset, y1 - inset)],
            border,
        ))
        .map_err(|x| e(x.to_string()))?;
        if text && x1 - x0 >= 14 {
            let style = if matches!(look, Look::Backward) {
                centred.clone().color(&WHITE)
            } else {
                centred.clone()
            };
            root.draw(&Text::new(
                mb.to_string(),
                ((x0 + x1) / 2, (y0 + y1) / 2),
                style,
            ))
            .map_err(|x| e(x.to_string()))?;
        }
    }
    if text {
        let left = font
            .clone()
            .color(&BLACK)
            .pos(Pos::new(HPos::Left, VPos::Center));
        for r in 0..schedule.ranks {
            let y = TOP + r as i32 * (ROW + GAP) + ROW / 2;
            root.draw(&Text::new(format!("rank {r}"), (8, y), left.clone()))
                .map_err(|x| e(x.to_string()))?;
        }
        let title = format!(
            "{}: PP={} ({} stages), {} micro-batches; {}; makespan {}, bubble {}, peak activations {}",
            schedule.kind,
            schedule.ranks,
            schedule.stages,
            schedule.micro_batches,
            costs,
            report.makespan,
            report.bubble(),
            report.peak_activations()
        );
        root.draw(&Text::new(
            title,
            (8, TOP / 2),
            ("sans-serif", 16)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Left, VPos::Center)),
        ))
        .map_err(|x| e(x.to_string()))?;
        let legend = "colour: micro-batch (its number inside)   light: forward F   dark: backward B (full, or input only)   white with coloured border: weight gradient W   split box: F&B (forward above, backward below)";
        root.draw(&Text::new(legend, (8, height as i32 - BOTTOM / 2), left))
            .map_err(|x| e(x.to_string()))?;
    }
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(())
}
