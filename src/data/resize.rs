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

/// Per output position `first..first + count` of a resize from `in_size` to `out_size`: (first
/// input index, taps), with fixed-point coefficients. Each position's taps depend on it alone, so
/// a window of the output costs only its own size.
fn coefficients(in_size: usize, out_size: usize, first: usize, count: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ss = 1.0 / filterscale;
    let mut out = Vec::with_capacity(count);
    for xx in first..first + count {
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
    out
}

#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an RGB image to (w, h) as Pillow's BICUBIC does.
pub fn resize_bicubic(src: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (w, h) = (w as usize, h as usize);
    resize_bicubic_window(src, (w, h), (0, 0, w, h))
}

/// The window (x0, y0, w, h) of `src` resized to `full` = (width, height): pixel for pixel the
/// window of the whole resize, computing only the window's pixels and the rows it reads. The
/// window lies inside `full`.
pub fn resize_bicubic_window(
    src: &RgbImage,
    full: (usize, usize),
    (x0, y0, w, h): (usize, usize, usize, usize),
) -> RgbImage {
    let (sw, sh) = (src.width() as usize, src.height() as usize);
    // Pillow skips a pass whose size does not change; so do we, for identical rounding.
    let need_h = full.0 != sw;
    let need_v = full.1 != sh;
    let data = src.as_raw();
    let round = 1i32 << (PRECISION_BITS - 1);
    let vert = if need_v { coefficients(sh, full.1, y0, h) } else { vec![] };
    let (y_first, y_last) = match (vert.first(), vert.last()) {
        (Some((first, _)), Some((last, k))) => (*first, last + k.len()),
        _ => (y0, y0 + h),
    };
    let rows = y_last - y_first;
    // tmp: the horizontal pass (or the window's columns) over the rows the vertical pass reads, [rows, w, 3].
    let tmp = if need_h {
        let horiz = coefficients(sw, full.0, x0, w);
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
        tmp
    } else {
        (y_first..y_last).flat_map(|y| &data[(y * sw + x0) * 3..(y * sw + x0 + w) * 3]).copied().collect()
    };
    if !need_v {
        return RgbImage::from_raw(w as u32, rows as u32, tmp).expect("sized buffer");
    }
    let mut out = vec![0u8; w * h * 3];
    for (yy, (ymin, k)) in vert.iter().enumerate() {
        for x in 0..w {
            for c in 0..3 {
                let mut ss = round;
                for (y, &kv) in k.iter().enumerate() {
                    ss += tmp[((ymin + y - y_first) * w + x) * 3 + c] as i32 * kv;
                }
                out[(yy * w + x) * 3 + c] = clip8(ss);
            }
        }
    }
    RgbImage::from_raw(w as u32, h as u32, out).expect("sized buffer")
}
