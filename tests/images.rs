//! Image preprocessing against transformers' CLIPImageProcessor (Pillow bicubic), for LLaVA's pad
//! mode and the processor's own resize + centre crop: every pixel identical.
#![allow(clippy::excessive_precision)] // the reference processor's own constants, digit for digit

mod common;

use common::Fixture;
use gemmaclip::data::image::{Aspect, ImageProcessor};

const MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
const STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

#[test]
fn pixels_equal_clip_image_processor() {
    let f = Fixture::load("images.safetensors");
    for case in ["diagram", "noise_tall", "gray_wide", "tiny_rgba"] {
        let png = f.get(&format!("{case}.png")).to_vec1::<u8>().unwrap();
        for (aspect, kind) in [(Aspect::Pad, "pad"), (Aspect::Crop, "crop")] {
            let p = ImageProcessor { size: 336, mean: MEAN, std: STD, aspect };
            let ours = p.process_bytes(&png).unwrap();
            let want = f.get(&format!("{case}.{kind}")).flatten_all().unwrap().to_vec1::<u8>().unwrap();
            assert_eq!(ours.len(), want.len());
            let n = 336 * 336;
            let mut worst = 0f32;
            let mut wrong = 0;
            for (i, (&x, &u)) in ours.iter().zip(&want).enumerate() {
                let c = i / n;
                let reference = (u as f32 / 255.0 - MEAN[c]) / STD[c];
                worst = worst.max((x - reference).abs());
                if ((x * STD[c] + MEAN[c]) * 255.0).round() as u8 != u {
                    wrong += 1;
                }
            }
            println!(
                "{case} {kind}: {wrong} of {} values differ from CLIPImageProcessor, max |diff| {worst:.2e}",
                ours.len()
            );
            assert_eq!(wrong, 0, "{case} {kind}");
            assert!(worst < 1e-5, "{case} {kind}: {worst}");
        }
    }
}
