//! The loss curve as a PNG (`loss_curve.png`): the loss of every step, the learning rate on a
//! second axis.

use crate::train::metrics::Record;
use anyhow::{Context, Result};
use plotters::prelude::*;
use std::path::Path;

const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

pub(crate) fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // the embedded font is valid, so registration cannot fail
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

pub fn loss_curve(records: &[Record], path: &Path) -> Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    register_font();
    let (w, h) = (900u32, 500u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        // integer steps on the x axis: a short run's ticks read 1, 2, 3, not 0.5, 1.0, 1.5
        let max_step = records.iter().map(|r| r.step).max().unwrap_or(1).max(1) as i64;
        let finite: Vec<&Record> = records.iter().filter(|r| r.loss.is_finite()).collect();
        let (lo, hi) = finite.iter().fold((f64::MAX, f64::MIN), |(a, b), r| (a.min(r.loss), b.max(r.loss)));
        let (lo, hi) = if finite.is_empty() { (0.0, 1.0) } else { (lo, hi) };
        let pad = ((hi - lo) * 0.05).max(1e-3);
        let max_lr = records.iter().map(|r| r.lr).filter(|l| l.is_finite()).fold(0f64, f64::max).max(1e-12);
        let plot_err = |e: &dyn std::fmt::Display| anyhow::anyhow!("plot: {e}");
        let mut chart = ChartBuilder::on(&root)
            .caption("training loss", ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .right_y_label_area_size(70)
            .build_cartesian_2d(0i64..max_step + 1, (lo - pad).max(0.0)..hi + pad)
            .map_err(|e| plot_err(&e))?
            .set_secondary_coord(0i64..max_step + 1, 0f64..max_lr * 1.05);
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .x_labels((max_step as usize + 2).min(12))
            .y_desc("cross-entropy")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| plot_err(&e))?;
        chart
            .configure_secondary_axes()
            .y_desc("learning rate")
            .y_label_formatter(&|v| format!("{v:.1e}"))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| plot_err(&e))?;
        chart
            .draw_series(LineSeries::new(finite.iter().map(|r| (r.step as i64, r.loss)), BLUE.stroke_width(2)))
            .map_err(|e| plot_err(&e))?
            .label("loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        let orange = RGBColor(230, 120, 20);
        chart
            .draw_secondary_series(LineSeries::new(
                records.iter().filter(|r| r.lr.is_finite()).map(|r| (r.step as i64, r.lr)),
                orange.stroke_width(2),
            ))
            .map_err(|e| plot_err(&e))?
            .label("learning rate")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], orange.stroke_width(2)));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| plot_err(&e))?;
        root.present().map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    }
    save_png(buf, (w, h), path)
}

/// An RGB buffer drawn by plotters, written as a PNG through a temporary name.
pub(crate) fn save_png(buf: Vec<u8>, (w, h): (u32, u32), path: &Path) -> Result<()> {
    let img = image::RgbImage::from_raw(w, h, buf).context("plot buffer")?;
    let tmp = crate::safetensors_out::tmp_name(path);
    let written = img
        .save_with_format(&tmp, image::ImageFormat::Png)
        .with_context(|| format!("cannot write {}", tmp.display()))
        .and_then(|()| crate::safetensors_out::sync_file(&tmp));
    crate::safetensors_out::finish_atomic(&tmp, path, written)
}
