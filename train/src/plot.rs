//! The PNG at the end of a run (`DIR/training.png`): train and validation loss, MTP loss, and
//! the per-layer expert-load imbalance, drawn with `plotters`.
//!
//! Text needs a TrueType font; none is embedded (to keep the binary free of font files), so
//! common system fonts are tried. Without one, the same curves are drawn without labels.

use std::path::Path;

use plotters::prelude::*;

use crate::error::TrainError;
use crate::metrics::LogRecord;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a system font as "sans-serif" once; false if none was found.
pub(crate) fn font() -> bool {
    static FOUND: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FOUND.get_or_init(|| {
        FONT_PATHS.iter().any(|p| {
            std::fs::read(p).ok().is_some_and(|bytes| {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
            })
        })
    })
}

pub(crate) fn err(path: &Path) -> impl Fn(String) -> TrainError + '_ {
    move |e| TrainError::io("draw", path, e)
}

/// One curve: legend label, colour, points.
pub(crate) type Series = (String, RGBAColor, Vec<(f64, f64)>);

/// One chart: `series` over steps `0..max_step` and `y`, with title, axes and legend when a
/// font is available (`text`).
pub(crate) fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    max_step: f64,
    y: std::ops::Range<f64>,
    series: Vec<Series>,
    text: bool,
) -> Result<(), String> {
    let mut b = ChartBuilder::on(area);
    b.margin(15);
    if text {
        b.caption(title, ("sans-serif", 20))
            .x_label_area_size(35)
            .y_label_area_size(45);
    }
    let mut chart = b
        .build_cartesian_2d(0f64..max_step, y)
        .map_err(|x| x.to_string())?;
    if text {
        chart
            .configure_mesh()
            .x_desc("step")
            .draw()
            .map_err(|x| x.to_string())?;
    }
    for (name, color, pts) in series {
        if pts.is_empty() {
            continue;
        }
        let s = chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|x| x.to_string())?;
        if text {
            s.label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|x| x.to_string())?;
    }
    Ok(())
}

/// Draws the loss and imbalance curves of `records` into `path`.
///
/// # Errors
/// [`TrainError::Io`] (action `draw`) when `plotters` fails to draw or write the PNG.
pub fn draw(records: &[LogRecord], path: &Path) -> Result<(), TrainError> {
    let text = font();
    let e = err(path);
    let root = BitMapBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let (left, right) = root.split_horizontally(600);
    let max_step = records.iter().map(|r| r.step).max().unwrap_or(1).max(1) as f64;
    let step = |r: &LogRecord| r.step as f64;

    // Losses.
    let losses: Vec<Series> = vec![
        (
            "train CE".into(),
            BLUE.to_rgba(),
            records.iter().map(|r| (step(r), r.ce_loss)).collect(),
        ),
        (
            "MTP CE".into(),
            GREEN.to_rgba(),
            records
                .iter()
                .filter_map(|r| r.mtp_loss.map(|m| (step(r), m)))
                .collect(),
        ),
        (
            "val CE".into(),
            RED.to_rgba(),
            records
                .iter()
                .filter_map(|r| r.val_loss.map(|m| (step(r), m)))
                .collect(),
        ),
    ];
    let ymax = loss_top(&losses);
    panel(
        &left,
        "loss (nats/token)",
        max_step,
        0.0..ymax,
        losses,
        text,
    )
    .map_err(&e)?;

    // Imbalance per MoE layer.
    let layers = records
        .last()
        .map(|r| r.moe_layers.clone())
        .unwrap_or_default();
    let imax = records
        .iter()
        .flat_map(|r| r.imbalance.iter().copied())
        .fold(1.0f64, f64::max)
        * 1.05;
    let imbalance: Vec<Series> = layers
        .iter()
        .enumerate()
        .map(|(i, layer)| {
            let pts = records
                .iter()
                .filter_map(|r| r.imbalance.get(i).map(|v| (step(r), *v)))
                .collect();
            (format!("layer {layer}"), Palette99::pick(i).to_rgba(), pts)
        })
        .collect();
    panel(
        &right,
        "expert load: max / mean",
        max_step,
        0.9..imax,
        imbalance,
        text,
    )
    .map_err(&e)?;
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(())
}

/// Draws several runs (`(label, records)`, the first the reference) into one PNG at `path`:
/// training and validation cross-entropy of each, and each later run's training CE relative to
/// the first's at the same steps (percent), e.g. f32 / bf16 / FP8 runs of the same seed.
///
/// # Errors
/// [`TrainError::Invalid`] for fewer than one run or a run without records; [`TrainError::Io`]
/// (action `draw`) when `plotters` fails to draw or write the PNG.
pub fn compare_runs(runs: &[(String, Vec<LogRecord>)], path: &Path) -> Result<(), TrainError> {
    if runs.is_empty() || runs.iter().any(|(_, r)| r.is_empty()) {
        return Err(TrainError::Invalid(
            "every run to compare needs a non-empty metrics.jsonl".into(),
        ));
    }
    let text = font();
    let e = err(path);
    let root = BitMapBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let (left, right) = root.split_horizontally(600);
    let max_step = runs
        .iter()
        .flat_map(|(_, r)| r.iter().map(|x| x.step))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let mut losses: Vec<Series> = Vec::new();
    for (i, (label, recs)) in runs.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        losses.push((
            format!("{label} train CE"),
            color,
            recs.iter().map(|r| (r.step as f64, r.ce_loss)).collect(),
        ));
        losses.push((
            format!("{label} val CE"),
            color.mix(0.5),
            recs.iter()
                .filter_map(|r| r.val_loss.map(|v| (r.step as f64, v)))
                .collect(),
        ));
    }
    let ymax = loss_top(&losses);
    panel(
        &left,
        "loss (nats/token)",
        max_step,
        0.0..ymax,
        losses,
        text,
    )
    .map_err(&e)?;
    let (base_label, base) = &runs[0];
    let rel: Vec<Series> = runs[1..]
        .iter()
        .enumerate()
        .map(|(i, (label, recs))| {
            let pts = recs
                .iter()
                .filter_map(|r| {
                    let b = base.iter().find(|x| x.step == r.step)?;
                    Some((r.step as f64, 100.0 * (r.ce_loss - b.ce_loss) / b.ce_loss))
                })
                .collect();
            (
                format!("{label} vs {base_label}"),
                Palette99::pick(i + 1).to_rgba(),
                pts,
            )
        })
        .collect();
    let span = rel
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1.abs()))
        .filter(|v| v.is_finite())
        .fold(0.05f64, f64::max)
        * 1.1;
    panel(
        &right,
        &format!("train CE relative to {base_label} (%)"),
        max_step,
        -span..span,
        rel,
        text,
    )
    .map_err(&e)?;
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(())
}

/// The top of a loss panel: 5% above the largest finite value of its series (at least 1e-3).
pub(crate) fn loss_top(series: &[Series]) -> f64 {
    series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.05
}
