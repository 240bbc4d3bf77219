//! PNG plots of a run: the loss curve and the confusion matrices, drawn with `plotters`'
//! bitmap backend (no system libraries).
//!
//! Text needs a TrueType font, read at run time from `$LLMCHAIN_FONT` or a few usual places
//! (DejaVu / Liberation Sans); without one the plots are drawn without any text rather than
//! failing, and [`font_found`] says so.

use std::{path::Path, sync::OnceLock};

use plotters::prelude::*;

use crate::{Error, Result, eval::EvalReport};

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
];

/// Registers a font for plot text once; whether one was found.
pub fn font_found() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        let from_env = std::env::var_os("LLMCHAIN_FONT").map(std::path::PathBuf::from);
        let candidates = from_env.into_iter().chain(FONT_PATHS.iter().map(std::path::PathBuf::from));
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                // plotters keeps fonts for the life of the process; leak once.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        tracing::warn!("no TrueType font found (set LLMCHAIN_FONT); plots are drawn without text");
        false
    })
}

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("plotting: {e}"))
}

/// Draws the per-step loss (and its 20-step moving average) to `path`.
pub fn loss_curve(path: &Path, losses: &[f32], title: &str) -> Result<()> {
    let text = font_found();
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let max = losses.iter().copied().fold(0.0f32, f32::max).max(1e-3) * 1.05;
    let steps = losses.len().max(2) as f32;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(15);
    if text {
        builder.caption(title, ("sans-serif", 22)).x_label_area_size(40).y_label_area_size(55);
    }
    let mut chart = builder.build_cartesian_2d(0f32..steps, 0f32..max).map_err(plot_err)?;
    if text {
        chart.configure_mesh().x_desc("step").y_desc("loss").draw().map_err(plot_err)?;
    }
    chart
        .draw_series(LineSeries::new(losses.iter().enumerate().map(|(i, &l)| (i as f32, l)), BLUE.mix(0.35)))
        .map_err(plot_err)?;
    let window = 20usize;
    let smooth = losses.iter().enumerate().map(|(i, _)| {
        let from = i.saturating_sub(window - 1);
        let part = &losses[from..=i];
        (i as f32, part.iter().sum::<f32>() / part.len() as f32)
    });
    chart.draw_series(LineSeries::new(smooth, RED.stroke_width(2))).map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Draws confusion matrices side by side (e.g. before and after) to `path`: cell shade is the
/// share of the true label's examples, with the count written in it.
pub fn confusion(path: &Path, panels: &[(&str, &EvalReport)]) -> Result<()> {
    let text = font_found();
    let width = 420 * panels.len().max(1) as u32;
    let root = BitMapBackend::new(path, (width, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (area, (title, report)) in areas.iter().zip(panels) {
        let k = report.labels.len();
        let mut builder = ChartBuilder::on(area);
        builder.margin(15);
        if text {
            builder
                .caption(format!("{title}: {:.1}%", 100.0 * report.accuracy), ("sans-serif", 20))
                .x_label_area_size(35)
                .y_label_area_size(75);
        }
        let mut chart = builder.build_cartesian_2d(0f64..k as f64, 0f64..k as f64).map_err(plot_err)?;
        if text {
            let labels = report.labels.clone();
            let rows = report.labels.clone();
            chart
                .configure_mesh()
                .disable_mesh()
                .x_labels(2 * k + 1)
                .y_labels(2 * k + 1)
                .x_desc("decided")
                .y_desc("true")
                // Ticks every half cell; only the cell centres get a name.
                .x_label_formatter(&|x| {
                    centre(*x, k).and_then(|i| labels.get(i).cloned()).unwrap_or_default()
                })
                .y_label_formatter(&|y| {
                    centre(*y, k).and_then(|i| rows.get(k - 1 - i).cloned()).unwrap_or_default()
                })
                .draw()
                .map_err(plot_err)?;
        }
        for (t, row) in report.confusion.iter().enumerate() {
            let total: u64 = row.iter().sum::<u64>().max(1);
            for (d, &count) in row.iter().enumerate() {
                let share = count as f64 / total as f64;
                let shade = (255.0 * (1.0 - share)) as u8;
                let (x, y) = (d as f64, (k - 1 - t) as f64);
                let color = RGBColor(shade, shade, 255);
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x, y), (x + 1.0, y + 1.0)],
                        color.filled(),
                    )))
                    .map_err(plot_err)?;
                if text {
                    let ink = if share > 0.5 { WHITE } else { BLACK };
                    chart
                        .draw_series(std::iter::once(Text::new(
                            count.to_string(),
                            (x + 0.4, y + 0.6),
                            ("sans-serif", 16).into_font().color(&ink),
                        )))
                        .map_err(plot_err)?;
                }
            }
        }
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// The cell whose centre is at coordinate `v`, if `v` is one (mesh ticks fall on halves).
fn centre(v: f64, k: usize) -> Option<usize> {
    let i = (v - 0.5).round();
    ((v - 0.5 - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < k).then_some(i as usize)
}
