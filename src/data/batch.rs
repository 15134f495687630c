//! Collating encoded rows into a padded batch for the model.

use crate::data::prompt::Encoded;
use crate::model::vlm::Supervised;
use crate::train::step::Batch;
use anyhow::Result;
use candle_core::{Device, Tensor};

/// Right-pads rows to the longest with `pad_id` (label -100, not attended) and stacks the images
/// ([3, S, S] each, in row order, rows without an image give none).
pub fn collate(
    rows: &[Encoded],
    images: &[Option<Vec<f32>>],
    image_size: usize,
    pad_id: u32,
    dev: &Device,
) -> Result<Batch> {
    let l = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
    let mut ids = vec![];
    let mut valid = vec![];
    let mut labels = vec![];
    for r in rows {
        let n = r.ids.len();
        let mut row = r.ids.clone();
        row.resize(l, pad_id);
        let mut lab = r.labels.clone();
        lab.resize(l, -100);
        ids.push(row);
        labels.push(lab);
        valid.push((0..l).map(|t| t < n).collect());
    }
    let px: Vec<&Vec<f32>> = images.iter().flatten().collect();
    let pixels = if px.is_empty() {
        None
    } else {
        let flat: Vec<f32> = px.iter().flat_map(|v| v.iter().copied()).collect();
        Some(Tensor::from_vec(flat, (px.len(), 3, image_size, image_size), dev)?)
    };
    Ok(Batch { supervised: Supervised::from_labels(&labels), ids, valid, pixels })
}
