//! Image preprocessing for CLIP: decode any PNG/JPEG (RGBA, grey, palette, 16-bit: all to RGB),
//! pad to a square with the CLIP mean colour (LLaVA-1.5's `expand2square`, the default) or resize
//! the short side and centre-crop (CLIPImageProcessor), Pillow-exact bicubic resize, rescale 1/255, normalize.
//! Every allocation is bounded by `MAX_IMAGE_PIXELS` before it is made: a few hundred bytes of PNG
//! can claim any size.

use crate::data::resize::{resize_bicubic, resize_bicubic_window};
use anyhow::{anyhow, bail, Context, Result};
use image::{DynamicImage, GenericImageView, ImageDecoder, ImageReader, Limits, Rgb, RgbImage};
use std::io::Cursor;
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

/// Pillow's `Image.MAX_IMAGE_PIXELS` (1024^3 / 4 / 3, about 89.5M: a 3-byte-per-pixel image of 256 MiB).
/// A bigger image is refused before it is decoded; a square canvas for padding is bounded the same way.
pub const MAX_IMAGE_PIXELS: u64 = 89_478_485;

/// The decoder's own allocation bound: 16-bit RGBA, 8 bytes a pixel, is the most a PNG or JPEG decodes to.
const MAX_DECODE_BYTES: u64 = MAX_IMAGE_PIXELS * 8;

fn check_pixels(w: u32, h: u32) -> Result<()> {
    if w == 0 || h == 0 {
        bail!("the image is empty ({w}x{h})");
    }
    let n = w as u64 * h as u64;
    if n > MAX_IMAGE_PIXELS {
        bail!(
            "the image is {w}x{h} = {n} pixels, more than the limit of {MAX_IMAGE_PIXELS} (Pillow's MAX_IMAGE_PIXELS)"
        );
    }
    Ok(())
}

/// The side of the square the pad mode draws the image on, refused before it is allocated: a
/// 100000x1 strip would need a 30 GB canvas.
fn padded_side(w: u32, h: u32) -> Result<u32> {
    let side = w.max(h);
    let n = side as u64 * side as u64;
    if n > MAX_IMAGE_PIXELS {
        bail!("padding the {w}x{h} image to a square needs {side}x{side} = {n} pixels, more than the limit of {MAX_IMAGE_PIXELS}");
    }
    Ok(side)
}

/// A decoder whose image has passed the size checks, read from the header alone, so a huge image
/// is refused before any pixel is decoded.
fn open(bytes: &[u8]) -> Result<impl ImageDecoder + '_> {
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format()?;
    if reader.format().is_none() {
        bail!("unknown image format (PNG and JPEG are read)");
    }
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(|e| anyhow!("cannot read the image header: {e}"))?;
    let (w, h) = decoder.dimensions();
    check_pixels(w, h)?;
    Ok(decoder)
}

/// The image crate's message already includes its source; a context chain would repeat it.
fn decode_error(e: image::ImageError) -> anyhow::Error {
    anyhow!("cannot decode the image: {e}")
}

/// Decodes PNG/JPEG bytes within the pixel limit.
pub fn decode(bytes: &[u8]) -> Result<DynamicImage> {
    DynamicImage::from_decoder(open(bytes)?).map_err(decode_error)
}

/// Everything `process_bytes` checks, for either aspect mode: the bytes decode completely (the
/// header alone says nothing of truncated data) and the image fits the limits. Bytes that pass
/// here are processed later without error, so a loader can skip a bad row instead of a training
/// step failing on it. The loader does not know the mode, so the pad mode's canvas bound applies
/// even where crop mode alone could take the image (a side over 9459 pixels).
pub fn validate(bytes: &[u8]) -> Result<()> {
    let decoder = open(bytes)?;
    let (w, h) = decoder.dimensions();
    padded_side(w, h)?;
    DynamicImage::from_decoder(decoder).map_err(decode_error)?;
    Ok(())
}

impl ImageProcessor {
    /// Settings from a CLIP directory's `preprocessor_config.json` (crop_size, image_mean,
    /// image_std), falling back to the vision config's image size and CLIP's mean and std.
    pub fn from_dir(dir: &Path, image_size: usize, aspect: Aspect) -> Result<Self> {
        let mut p = Self { size: image_size, mean: CLIP_MEAN, std: CLIP_STD, aspect };
        let path = dir.join("preprocessor_config.json");
        if !path.is_file() {
            // a hub download is only complete with this file; a hand-made directory may lack it
            eprintln!("warning: {} is missing; using CLIP's image mean and std", path.display());
            return Ok(p);
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        let triple = |k: &str| -> Result<Option<[f32; 3]>> {
            let Some(x) = v.get(k).filter(|x| !x.is_null()) else { return Ok(None) };
            let a: Option<Vec<f64>> = x.as_array().map(|a| a.iter().filter_map(|e| e.as_f64()).collect());
            match a {
                Some(a) if a.len() == 3 && x.as_array().is_some_and(|x| x.len() == 3) => {
                    Ok(Some([a[0] as f32, a[1] as f32, a[2] as f32]))
                }
                _ => anyhow::bail!("{}: {k} must be a list of three numbers, got {x}", path.display()),
            }
        };
        if let Some(m) = triple("image_mean")? {
            p.mean = m;
        }
        if let Some(s) = triple("image_std")? {
            if !s.iter().all(|x| x.is_finite() && *x > 0.0) {
                anyhow::bail!("{}: image_std must be positive, got {s:?}", path.display());
            }
            p.std = s;
        }
        Ok(p)
    }

    /// Decoded image -> [3, size, size] f32 values (channel-major). Refuses an empty image, one
    /// over `MAX_IMAGE_PIXELS`, and in pad mode one whose square canvas would be.
    pub fn process_image(&self, img: &DynamicImage) -> Result<Vec<f32>> {
        let (w, h) = img.dimensions();
        check_pixels(w, h)?;
        let s = self.size as u32;
        let resized = match self.aspect {
            Aspect::Pad => {
                let side = padded_side(w, h)?;
                let rgb = img.to_rgb8();
                let bg = Rgb(self.mean.map(|m| (m * 255.0) as u8)); // int(x * 255), as LLaVA does
                let mut square = RgbImage::from_pixel(side, side, bg);
                image::imageops::overlay(&mut square, &rgb, ((side - w) / 2) as i64, ((side - h) / 2) as i64);
                resize_bicubic(&square, s, s)
            }
            Aspect::Crop => {
                // The resize's long side is unbounded (s * 100000 for a 100000x1 strip), so only
                // the centre window is computed: the same pixels as resizing, then cropping.
                let (w, h, s) = (w as usize, h as usize, self.size);
                let (nw, nh) = if w <= h { (s, (s * h / w).max(s)) } else { ((s * w / h).max(s), s) };
                resize_bicubic_window(&img.to_rgb8(), (nw, nh), ((nw - s) / 2, (nh - s) / 2, s, s))
            }
        };
        let n = (s * s) as usize;
        let mut out = vec![0f32; 3 * n];
        for (i, px) in resized.pixels().enumerate() {
            for c in 0..3 {
                out[c * n + i] = (px[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        Ok(out)
    }

    pub fn process_bytes(&self, bytes: &[u8]) -> Result<Vec<f32>> {
        self.process_image(&decode(bytes)?)
    }

    pub fn process_file(&self, path: &Path) -> Result<Vec<f32>> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        self.process_bytes(&bytes).with_context(|| format!("{}", path.display()))
    }
}
