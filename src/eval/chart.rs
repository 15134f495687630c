//! `accuracy.png`: the official breakdown as bars, the way a results table is usually looked at.

use crate::eval::Column;
use anyhow::Result;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

pub fn accuracy_by_category(cols: &[Column], split: &str, path: &Path) -> Result<()> {
    crate::train::plot::register_font();
    let (w, h) = (900u32, 450u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("plot: {e}");
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("ScienceQA {split} accuracy"), ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((0usize..cols.len()).into_segmented(), 0f64..105f64)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(cols.len())
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                    cols.get(*i).map_or(String::new(), |c| c.name.into())
                }
                SegmentValue::Last => String::new(),
            })
            .y_desc("accuracy (%)")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| err(&e))?;
        let blue = RGBColor(60, 110, 200);
        chart
            .draw_series(cols.iter().enumerate().map(|(i, c)| {
                let acc = c.accuracy.unwrap_or(0.0);
                let x0 = SegmentValue::Exact(i);
                let x1 = SegmentValue::Exact(i + 1);
                let mut bar = Rectangle::new([(x0, 0.0), (x1, acc)], blue.filled());
                bar.set_margin(0, 0, 8, 8);
                bar
            }))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(cols.iter().enumerate().map(|(i, c)| {
                let label = c.accuracy.map_or("-".into(), |a| format!("{a:.1} ({}/{})", c.correct, c.count));
                let style = TextStyle::from(("sans-serif", 12).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
                Text::new(label, (SegmentValue::CenterOf(i), c.accuracy.unwrap_or(0.0) + 1.0), style)
            }))
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    crate::train::plot::save_png(buf, (w, h), path)
}
