//! Bicubic resizing exactly as Pillow does it (`Image.resize(..., BICUBIC)`, libImaging/Resample.c),
//! which is what CLIP's image processor uses: a = -0.5 cubic kernel widened by the scale when
//! shrinking, coefficients normalised then fixed to 22-bit integers, a horizontal pass into an
//! 8-bit intermediate (rounded and clipped), then a vertical pass. Matching it bit for bit keeps
//! our pixels equal to the reference stack's.

use image::RgbImage;

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output position: (first input index, taps), with fixed-point coefficients.
fn coefficients(in_size: usize, out_size: usize) -> (usize, Vec<(usize, Vec<i32>)>) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let ss = 1.0 / filterscale;
    let mut out = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut k: Vec<f64> = (0..n).map(|x| bicubic((x as f64 + xmin as f64 - center + 0.5) * ss)).collect();
        let ww: f64 = k.iter().sum();
        if ww != 0.0 {
            k.iter_mut().for_each(|w| *w /= ww);
        }
        let fixed = k
            .iter()
            .map(|&w| {
                let v = w * (1u32 << PRECISION_BITS) as f64;
                (if v < 0.0 { -0.5 + v } else { 0.5 + v }) as i32
            })
            .collect();
        out.push((xmin, fixed));
    }
    (ksize, out)
}

#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an RGB image to (w, h) as Pillow's BICUBIC does.
pub fn resize_bicubic(src: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (sw, sh) = (src.width() as usize, src.height() as usize);
    let (w, h) = (w as usize, h as usize);
    let (_, horiz) = coefficients(sw, w);
    let (_, vert) = coefficients(sh, h);
    let need_h = w != sw;
    let need_v = h != sh;
    let data = src.as_raw();
    let round = 1i32 << (PRECISION_BITS - 1);
    // Horizontal pass over the rows the vertical pass will read.
    let (y_first, y_last) = if need_v { (vert[0].0, vert.last().map_or(0, |(s, k)| s + k.len())) } else { (0, sh) };
    let (tmp, tw, y0) = if need_h {
        let rows = y_last - y_first;
        let mut tmp = vec![0u8; rows * w * 3];
        for y in 0..rows {
            let row = &data[(y + y_first) * sw * 3..(y + y_first + 1) * sw * 3];
            for (xx, (xmin, k)) in horiz.iter().enumerate() {
                for c in 0..3 {
                    let mut ss = round;
                    for (x, &kv) in k.iter().enumerate() {
                        ss += row[(xmin + x) * 3 + c] as i32 * kv;
                    }
                    tmp[(y * w + xx) * 3 + c] = clip8(ss);
                }
            }
        }
        (tmp, w, y_first)
    } else {
        (data.clone(), sw, 0)
    };
    if !need_v {
        return RgbImage::from_raw(tw as u32, (tmp.len() / (tw * 3)) as u32, tmp).expect("sized buffer");
    }
    let mut out = vec![0u8; w * h * 3];
    for (yy, (ymin, k)) in vert.iter().enumerate() {
        for x in 0..w {
            for c in 0..3 {
                let mut ss = round;
                for (y, &kv) in k.iter().enumerate() {
                    ss += tmp[((ymin + y - y0) * tw + x) * 3 + c] as i32 * kv;
                }
                out[(yy * w + x) * 3 + c] = clip8(ss);
            }
        }
    }
    RgbImage::from_raw(w as u32, h as u32, out).expect("sized buffer")
}
