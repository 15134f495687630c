//! Loading ScienceQA parquet files (fixtures of tools/assets/make_bad_data.py): every codec reads,
//! a row that would fail later is skipped at load with a one-line reason, and an image's work is
//! bounded before anything is allocated.

mod common;

use gemmaclip::data::image::{validate, Aspect, ImageProcessor, MAX_IMAGE_PIXELS};
use gemmaclip::data::resize::{resize_bicubic, resize_bicubic_window};
use gemmaclip::data::scienceqa::read_split;
use image::{DynamicImage, RgbImage};

fn processor(aspect: Aspect) -> ImageProcessor {
    ImageProcessor {
        size: 56,
        mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
        std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
        aspect,
    }
}

fn bad_image(name: &str) -> Vec<u8> {
    std::fs::read(common::fixture_path(&format!("bad_data/images/{name}"))).unwrap()
}

#[test]
fn bad_rows_are_skipped_with_a_one_line_reason() {
    let s = read_split(&common::fixture_path("bad_data/bad_rows/train.parquet"), "train").unwrap();
    let expected = [
        ("train-2", "unusable image: cannot read the image header"),
        ("train-3", "answer index 5 is outside the 2 choices"),
        ("train-4", "0 choice(s)"),
        ("train-5", "1 choice(s)"),
        ("train-6", "unusable image: cannot decode the image"),
        ("train-7", "padding the 100000x1 image to a square needs 100000x100000 = 10000000000 pixels"),
        ("train-9", "its path \"images/missing.png\""),
        ("train-10", "choice 2 of 3 is null"),
        ("train-11", "27 choices; letters run out after Z"),
        ("train-12", "the question contains `<image_soft_token>`"),
        ("train-14", "the answer is null"),
    ];
    for s in &s.skipped {
        println!("skipped {}: {}", s.pid, s.reason);
        assert_eq!(s.reason.lines().count(), 1, "{}", s.reason);
    }
    let got: Vec<&str> = s.skipped.iter().map(|k| k.pid.as_str()).collect();
    assert_eq!(got, expected.iter().map(|e| e.0).collect::<Vec<_>>());
    for (k, (_, cause)) in s.skipped.iter().zip(expected) {
        assert!(k.reason.contains(cause), "{}: {:?} should say {cause:?}", k.pid, k.reason);
    }
    assert_eq!(s.images_lost, 4, "rows 2, 6, 7 and 9 had an image");

    let pids: Vec<&str> = s.problems.iter().map(|p| p.pid.as_str()).collect();
    assert_eq!(pids, ["train-0", "train-1", "train-8", "train-13"]);
    let red = std::fs::read(common::fixture_path("bad_data/bad_rows/images/red.png")).unwrap();
    assert_eq!(s.problems[2].image.as_ref(), Some(&red), "a path-only image is read from beside the parquet file");
    assert_eq!(s.problems[3].image, None, "an image struct with neither bytes nor path is a text-only row");
    // whatever passes load goes through preprocessing (the RGBA 7x3 and the 5x4 read from its path)
    for aspect in [Aspect::Pad, Aspect::Crop] {
        for p in s.problems.iter().filter(|p| p.image.is_some()) {
            let px = processor(aspect).process_bytes(p.image.as_ref().unwrap()).unwrap();
            assert_eq!(px.len(), 3 * 56 * 56);
        }
    }
}

#[test]
fn wide_strip_is_refused_in_pad_mode_before_the_canvas_is_allocated() {
    let png = bad_image("wide_100000x1.png");
    assert!(png.len() < 400, "a few hundred bytes");
    let err = format!("{:#}", processor(Aspect::Pad).process_bytes(&png).unwrap_err());
    println!("pad: {err}");
    assert!(err.contains("100000x1") && err.contains("100000x100000") && err.contains(&MAX_IMAGE_PIXELS.to_string()));
    assert!(validate(&png).is_err(), "load refuses it too, whatever the aspect mode");
    // crop mode computes only the centre window of its 18.8M-wide resize
    assert_eq!(processor(Aspect::Crop).process_bytes(&png).unwrap().len(), 3 * 56 * 56);
}

#[test]
fn too_many_pixels_are_refused_from_the_header_before_decoding() {
    // one scanline of pixel data: a decoder would fail on the missing rest, the check must fail first
    let png = bad_image("claims_10000x10000.png");
    for err in [processor(Aspect::Crop).process_bytes(&png).unwrap_err(), validate(&png).unwrap_err()] {
        let err = format!("{err:#}");
        assert!(err.contains("10000x10000 = 100000000 pixels"), "{err}");
        assert!(err.contains(&format!("limit of {MAX_IMAGE_PIXELS}")), "{err}");
    }
}

#[test]
fn truncated_png_fails_validation_although_its_header_reads() {
    let png = bad_image("truncated.png");
    assert_eq!(
        image::ImageReader::new(std::io::Cursor::new(&png)).with_guessed_format().unwrap().into_dimensions().unwrap(),
        (32, 32)
    );
    assert!(validate(&png).is_err());
    assert!(processor(Aspect::Pad).process_bytes(&png).is_err());
}

#[test]
fn empty_image_is_an_error_not_a_panic() {
    for aspect in [Aspect::Pad, Aspect::Crop] {
        let err = processor(aspect).process_image(&DynamicImage::new_rgb8(0, 5)).unwrap_err();
        assert!(err.to_string().contains("empty (0x5)"), "{err}");
    }
}

#[test]
fn every_parquet_codec_reads_the_same_rows() {
    let read = |codec: &str| {
        let s = read_split(&common::fixture_path(&format!("codecs/train-{codec}.parquet")), "train")
            .unwrap_or_else(|e| panic!("{codec}: {e:#}"));
        assert!(s.skipped.is_empty(), "{codec}: {:?}", s.skipped);
        s.problems
    };
    let plain = read("none");
    assert_eq!(plain.len(), 3);
    assert_eq!((plain[1].answer, plain[1].choices.len(), plain[1].hint.as_str()), (1, 3, "A hint."));
    assert!(plain[1].image.is_some());
    for codec in ["snappy", "zstd", "gzip", "lz4", "brotli"] {
        assert_eq!(read(codec), plain, "{codec}");
    }
}

#[test]
fn resize_window_equals_resize_then_crop() {
    let mut seed = 7u32;
    let mut noise = |w: u32, h: u32| {
        RgbImage::from_fn(w, h, |_, _| {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            image::Rgb([(seed >> 24) as u8, (seed >> 16) as u8, (seed >> 8) as u8])
        })
    };
    // up and down in each direction, one direction unchanged, windows at the edges and inside
    for (src, full, window) in [
        ((40, 9), (120, 30), (45, 0, 30, 30)),
        ((90, 200), (30, 66), (0, 18, 30, 30)),
        ((17, 50), (17, 60), (0, 5, 17, 17)),
        ((50, 17), (60, 17), (43, 0, 17, 17)),
        ((23, 23), (23, 23), (3, 4, 10, 9)),
    ] {
        let img = noise(src.0, src.1);
        let whole = resize_bicubic(&img, full.0, full.1);
        let want = image::imageops::crop_imm(&whole, window.0, window.1, window.2, window.3).to_image();
        let (f, w) = ((full.0 as usize, full.1 as usize), window);
        let got = resize_bicubic_window(&img, f, (w.0 as usize, w.1 as usize, w.2 as usize, w.3 as usize));
        assert_eq!(got, want, "{src:?} -> {full:?}, window {window:?}");
    }
}
