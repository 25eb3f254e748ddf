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
fn font() -> bool {
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

fn err(path: &Path) -> impl Fn(String) -> TrainError + '_ {
    move |e| TrainError::io("draw", path, e)
}

/// Draws the loss and imbalance curves of `records` into `path`.
pub fn draw(records: &[LogRecord], path: &Path) -> Result<(), TrainError> {
    let text = font();
    let e = err(path);
    let root = BitMapBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let (left, right) = root.split_horizontally(600);
    let max_step = records.iter().map(|r| r.step).max().unwrap_or(1).max(1) as f64;

    // Losses.
    type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);
    let series: Vec<Series> = vec![
        (
            "train CE",
            BLUE,
            records.iter().map(|r| (r.step as f64, r.ce_loss)).collect(),
        ),
        (
            "MTP CE",
            GREEN,
            records
                .iter()
                .filter_map(|r| r.mtp_loss.map(|m| (r.step as f64, m)))
                .collect(),
        ),
        (
            "val CE",
            RED,
            records
                .iter()
                .filter_map(|r| r.val_loss.map(|m| (r.step as f64, m)))
                .collect(),
        ),
    ];
    let ymax = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.05;
    let mut b = ChartBuilder::on(&left);
    b.margin(15);
    if text {
        b.caption("loss (nats/token)", ("sans-serif", 20))
            .x_label_area_size(35)
            .y_label_area_size(45);
    }
    let mut chart = b
        .build_cartesian_2d(0f64..max_step, 0f64..ymax)
        .map_err(|x| e(x.to_string()))?;
    if text {
        chart
            .configure_mesh()
            .x_desc("step")
            .draw()
            .map_err(|x| e(x.to_string()))?;
    }
    for (name, color, pts) in series {
        if pts.is_empty() {
            continue;
        }
        let s = chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|x| e(x.to_string()))?;
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
            .map_err(|x| e(x.to_string()))?;
    }

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
    let mut b = ChartBuilder::on(&right);
    b.margin(15);
    if text {
        b.caption("expert load: max / mean", ("sans-serif", 20))
            .x_label_area_size(35)
            .y_label_area_size(45);
    }
    let mut chart = b
        .build_cartesian_2d(0f64..max_step, 0.9f64..imax)
        .map_err(|x| e(x.to_string()))?;
    if text {
        chart
            .configure_mesh()
            .x_desc("step")
            .draw()
            .map_err(|x| e(x.to_string()))?;
    }
    for (i, layer) in layers.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = records
            .iter()
            .filter_map(|r| r.imbalance.get(i).map(|v| (r.step as f64, *v)))
            .collect();
        let s = chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|x| e(x.to_string()))?;
        if text {
            s.label(format!("layer {layer}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|x| e(x.to_string()))?;
    }
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(())
}
