//! Image preprocessing for CLIP: decode any PNG/JPEG (RGBA, grey, palette, 16-bit: all to RGB),
//! pad to a square with the CLIP mean colour (LLaVA-1.5's `expand2square`, the default) or resize
//! the short side and centre-crop (CLIPImageProcessor), Pillow-exact bicubic resize, rescale 1/255, normalize.

use crate::data::resize::resize_bicubic;
use anyhow::{Context, Result};
use image::{DynamicImage, GenericImageView, Rgb, RgbImage};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Aspect {
    /// Pad to a square with the mean colour, then resize (LLaVA-1.5 "pad").
    Pad,
    /// Resize the short side, centre-crop (CLIP's own processor).
    Crop,
}

#[derive(Debug, Clone)]
pub struct ImageProcessor {
    pub size: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub aspect: Aspect,
}

const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Checks that the bytes are an image we can decode (format and dimensions only).
pub fn probe(bytes: &[u8]) -> Result<(u32, u32)> {
    let r = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format()?;
    if r.format().is_none() {
        anyhow::bail!("unknown image format");
    }
    Ok(r.into_dimensions()?)
}

impl ImageProcessor {
    /// Settings from a CLIP directory's `preprocessor_config.json` (crop_size, image_mean,
    /// image_std), falling back to the vision config's image size and CLIP's mean and std.
    pub fn from_dir(dir: &Path, image_size: usize, aspect: Aspect) -> Result<Self> {
        let mut p = Self { size: image_size, mean: CLIP_MEAN, std: CLIP_STD, aspect };
        let path = dir.join("preprocessor_config.json");
        if path.is_file() {
            let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
                .with_context(|| format!("{}: not valid JSON", path.display()))?;
            let triple = |k: &str| -> Option<[f32; 3]> {
                let a = v.get(k)?.as_array()?;
                Some([a.first()?.as_f64()? as f32, a.get(1)?.as_f64()? as f32, a.get(2)?.as_f64()? as f32])
            };
            if let Some(m) = triple("image_mean") {
                p.mean = m;
            }
            if let Some(s) = triple("image_std") {
                p.std = s;
            }
        }
        Ok(p)
    }

    /// Decoded RGB -> [3, size, size] f32 values (channel-major).
    pub fn process_image(&self, img: &DynamicImage) -> Vec<f32> {
        let rgb = img.to_rgb8();
        let s = self.size as u32;
        let resized = match self.aspect {
            Aspect::Pad => {
                let (w, h) = rgb.dimensions();
                let side = w.max(h);
                let bg = Rgb(self.mean.map(|m| (m * 255.0) as u8)); // int(x * 255), as LLaVA does
                let mut square = RgbImage::from_pixel(side, side, bg);
                image::imageops::overlay(&mut square, &rgb, ((side - w) / 2) as i64, ((side - h) / 2) as i64);
                resize_bicubic(&square, s, s)
            }
            Aspect::Crop => {
                let (w, h) = rgb.dimensions();
                let (nw, nh) = if w <= h {
                    (s, ((s as u64 * h as u64) / w as u64).max(s as u64) as u32)
                } else {
                    (((s as u64 * w as u64) / h as u64).max(s as u64) as u32, s)
                };
                let r = resize_bicubic(&rgb, nw, nh);
                image::imageops::crop_imm(&r, (nw - s) / 2, (nh - s) / 2, s, s).to_image()
            }
        };
        let n = (s * s) as usize;
        let mut out = vec![0f32; 3 * n];
        for (i, px) in resized.pixels().enumerate() {
            for c in 0..3 {
                out[c * n + i] = (px[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        out
    }

    pub fn process_bytes(&self, bytes: &[u8]) -> Result<Vec<f32>> {
        let img = image::load_from_memory(bytes).context("cannot decode the image")?;
        let (w, h) = img.dimensions();
        if w == 0 || h == 0 {
            anyhow::bail!("the image is empty ({w}x{h})");
        }
        Ok(self.process_image(&img))
    }

    pub fn process_file(&self, path: &Path) -> Result<Vec<f32>> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        self.process_bytes(&bytes).with_context(|| format!("{}", path.display()))
    }
}
