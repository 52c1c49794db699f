//! `paligemma::preprocess` against the Python reference: `transformers.image_utils.load_image`
//! and `SiglipImageProcessorPil` (PIL backend), run at test time by tests/preprocess_reference.py.
//!
//! Needs the project venv (`.venv/bin/python`, or `PALIGEMMA_PYTHON`); the test images are the
//! repository's (`tests/data/images`, or `PALIGEMMA_TEST_IMAGES`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::python;
use paligemma::input::InputError;
use paligemma::preprocess::{
    decode_image, load_image, pixel_values, resize_bicubic_pil, ImageLimits, ImageProcessorConfig, PreprocessError,
};

const SIZES: [u32; 2] = [224, 448];

fn shared_images() -> PathBuf {
    let repo_images = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/images");
    let dir = std::env::var_os("PALIGEMMA_TEST_IMAGES").map_or(repo_images, PathBuf::from);
    assert!(dir.is_dir(), "test images {} not found: set PALIGEMMA_TEST_IMAGES", dir.display());
    dir
}

/// A temporary directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("paligemma-preprocess-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the reference script's `mode` into a fresh scratch directory; the files it wrote and the
/// cases of its `MODE.json`.
fn reference_cases<T: serde::de::DeserializeOwned>(mode: &str) -> (Scratch, T) {
    let scratch = Scratch::new(mode);
    run_reference_script(&[mode.as_ref(), scratch.0.as_os_str()]);
    let text = std::fs::read_to_string(scratch.0.join(format!("{mode}.json"))).unwrap();
    (scratch, serde_json::from_str(&text).unwrap())
}

fn run_reference_script(args: &[&std::ffi::OsStr]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/preprocess_reference.py");
    let out = Command::new(python()).arg(script).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "tests/preprocess_reference.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes the generated edge-case images into `dir`.
fn generate(dir: &Path) {
    run_reference_script(&["generate".as_ref(), dir.as_os_str()]);
}

#[derive(serde::Deserialize)]
struct ManifestEntry {
    size: (u32, u32),
    /// PIL's `info["transparency"]` after load_image: an RGB triple, or absent.
    transparency: Option<serde_json::Value>,
}

/// The reference outputs for `images`: upright RGB after load_image, and pixel_values per size.
struct Reference {
    dir: PathBuf,
    do_convert_rgb: bool,
    manifest: HashMap<String, ManifestEntry>,
}

impl Reference {
    /// `do_convert_rgb`: false writes `"do_convert_rgb": null` as the released configs do.
    fn compute(out: &Path, do_convert_rgb: bool, images: &[PathBuf]) -> Self {
        let sizes = SIZES.map(|s| s.to_string()).join(",");
        let convert = if do_convert_rgb { "true" } else { "null" };
        let mut args: Vec<&std::ffi::OsStr> = vec!["reference".as_ref(), out.as_os_str(), sizes.as_ref(), convert.as_ref()];
        args.extend(images.iter().map(|p| p.as_os_str()));
        run_reference_script(&args);
        let manifest = std::fs::read_to_string(out.join("manifest.json")).unwrap();
        let manifest = serde_json::from_str(&manifest).unwrap();
        Self {
            dir: out.to_owned(),
            do_convert_rgb,
            manifest,
        }
    }

    fn rgb(&self, name: &str) -> image::RgbImage {
        let (w, h) = self.manifest[name].size;
        let raw = std::fs::read(self.dir.join(format!("{name}.rgb"))).unwrap();
        image::RgbImage::from_raw(w, h, raw).unwrap()
    }

    fn pixel_values(&self, name: &str, size: u32) -> Vec<f32> {
        let raw = std::fs::read(self.dir.join(format!("{name}.{size}.f32"))).unwrap();
        raw.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    }
}

fn config(size: u32, do_convert_rgb: bool) -> ImageProcessorConfig {
    // The keys of google/paligemma2-*-{224,448} preprocessor_config.json, as the script writes them.
    let convert = if do_convert_rgb { "true" } else { "null" };
    let json = format!(
        r#"{{"do_convert_rgb": {convert}, "do_normalize": true, "do_rescale": true, "do_resize": true,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "image_processor_type": "SiglipImageProcessor", "processor_class": "PaliGemmaProcessor",
            "resample": 3, "rescale_factor": 0.00392156862745098,
            "size": {{"height": {size}, "width": {size}}}}}"#
    );
    ImageProcessorConfig::from_json(&json, Path::new("preprocessor_config.json")).unwrap()
}

/// How far the Rust pipeline is from the reference on one image.
struct Difference {
    /// Largest |level| difference of the decoded upright RGB.
    max_level: u8,
    /// Fraction of RGB samples that differ.
    differing: f64,
    /// Largest |difference| of pixel_values over all sizes.
    max_pixel_value: f32,
}

fn measure(path: &Path, reference: &Reference) -> Difference {
    let name = path.file_name().unwrap().to_str().unwrap();
    let loaded = load_image(path, &ImageLimits::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let expected = reference.rgb(name);
    assert_eq!(loaded.rgb.dimensions(), expected.dimensions(), "{name}: upright size");
    let transparency = reference.manifest[name].transparency.clone();
    let ours = loaded.transparent_color.map(|c| serde_json::json!(c));
    assert_eq!(ours, transparency, "{name}: transparency colour");
    let diffs: Vec<u8> = loaded
        .rgb
        .as_raw()
        .iter()
        .zip(expected.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .collect();
    let max_level = diffs.iter().copied().max().unwrap_or(0);
    let differing = diffs.iter().filter(|&&d| d != 0).count() as f64 / diffs.len() as f64;
    let mut max_pixel_value = 0f32;
    for size in SIZES {
        let ours = pixel_values(&loaded, &config(size, reference.do_convert_rgb));
        assert_eq!(ours.shape(), &[3, size as usize, size as usize]);
        let theirs = reference.pixel_values(name, size);
        assert_eq!(ours.len(), theirs.len(), "{name}: pixel_values length at {size}");
        let max = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        eprintln!("{name:>28} S={size}: max |pixel_values diff| = {max:e}");
        max_pixel_value = max_pixel_value.max(max);
    }
    eprintln!(
        "{name:>28} decoded RGB: max level diff {max_level}, {:.4}% samples differ",
        100.0 * differing
    );
    Difference {
        max_level,
        differing,
        max_pixel_value,
    }
}

fn files_with_extensions(dir: &Path, extensions: &[&str], exclude: &[&str]) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().and_then(|e| e.to_str()).is_some_and(|e| extensions.contains(&e)))
        .filter(|p| !exclude.iter().any(|x| p.file_name().is_some_and(|n| n == *x)))
        .collect();
    files.sort();
    files
}

fn assert_bit_identical(images: &[PathBuf], reference: &Reference) {
    for path in images {
        let d = measure(path, reference);
        assert_eq!(
            d.max_level,
            0,
            "{}: decoded RGB differs from PIL on {:.3}% of samples",
            path.display(),
            100.0 * d.differing
        );
        assert_eq!(d.max_pixel_value, 0.0, "{}: pixel_values differ", path.display());
    }
}

#[test]
fn shared_png_and_gif_images_match_transformers_bit_for_bit() {
    let scratch = Scratch::new("shared");
    let images = files_with_extensions(&shared_images(), &["png", "gif"], &[]);
    assert!(images.len() >= 8, "expected the shared PNG and GIF images, found {images:?}");
    let reference = Reference::compute(&scratch.0, false, &images);
    assert_bit_identical(&images, &reference);
}

#[test]
fn generated_lossless_edge_cases_match_transformers_bit_for_bit() {
    // 1x1, 5000x20, 9x640, RGBA with varying alpha, LA, 16-bit grey/RGB/LA, 1- and 4-bit grey,
    // palettes with and without tRNS, grey and RGB with tRNS, GIF with transparency, PNG with
    // EXIF orientation 6, lossless and lossy WebP (image-webp matches libwebp here), BMP.
    let scratch = Scratch::new("lossless");
    let inputs = scratch.0.join("in");
    generate(&inputs);
    let images = files_with_extensions(&inputs, &["png", "gif", "bmp", "webp"], &["bomb.png", "tall_9x640.png"]);
    let reference = Reference::compute(&scratch.0.join("ref"), false, &images);
    assert_bit_identical(&images, &reference);
}

#[test]
fn portrait_downscale_matches_pillow_13_bit_for_bit() {
    // Pillow 13 resizes vertically first here; horizontal first was up to 13 levels off.
    let scratch = Scratch::new("portrait");
    let inputs = scratch.0.join("in");
    generate(&inputs);
    let images = vec![inputs.join("tall_9x640.png")];
    let reference = Reference::compute(&scratch.0.join("ref"), false, &images);
    assert_bit_identical(&images, &reference);
}

#[derive(serde::Deserialize)]
struct ResizeCase {
    name: String,
    size: (u32, u32),
    outputs: Vec<(u32, u32)>,
}

#[test]
fn bicubic_resize_matches_pillow_13_at_every_size_in_either_pass_order() {
    // Every output size up to 3x of 12x12, 8x16, 16x8 and 7x13 (4,419 sizes, 1,054 of them
    // resized vertically first by Pillow 13), plus 480x640 and 640x480 at 224, 448, 896 and odd
    // sizes. Forcing horizontal-first breaks 1,008 of them; `>=` at the switch breaks 20.
    let (scratch, cases): (Scratch, Vec<ResizeCase>) = reference_cases("resize");
    let mut mismatches = Vec::new();
    let mut sizes = 0;
    for case in &cases {
        let (w, h) = case.size;
        let raw = std::fs::read(scratch.0.join(format!("{}.rgb", case.name))).unwrap();
        let input = image::RgbImage::from_raw(w, h, raw).unwrap();
        let expected = std::fs::read(scratch.0.join(format!("{}.out.rgb", case.name))).unwrap();
        let mut at = 0;
        for &(out_w, out_h) in &case.outputs {
            let theirs = &expected[at..at + (out_w * out_h * 3) as usize];
            at += theirs.len();
            let ours = resize_bicubic_pil(&input, out_w, out_h);
            assert_eq!(ours.dimensions(), (out_w, out_h));
            let max_level = ours.as_raw().iter().zip(theirs).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
            if max_level != 0 {
                mismatches.push(format!("{w}x{h} -> {out_w}x{out_h}: {max_level} levels"));
            }
            sizes += 1;
        }
        assert_eq!(at, expected.len(), "{}: reference output length", case.name);
    }
    eprintln!("{sizes} resizes compared, {} differ", mismatches.len());
    assert!(
        mismatches.is_empty(),
        "{} of {sizes} resizes differ from Pillow, e.g. {:?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(10)]
    );
}

#[test]
fn transparency_colour_turns_white_when_do_convert_rgb_is_true() {
    let scratch = Scratch::new("convert");
    let inputs = scratch.0.join("in");
    generate(&inputs);
    let images: Vec<PathBuf> = [
        "palette_trns_index.png",
        "palette4_trns.png",
        "palette_trns_alpha.png",
        "gray_trns.png",
        "rgb_trns.png",
        "palette_trns.gif",
        "rgba_alpha.png",
    ]
    .iter()
    .map(|n| inputs.join(n))
    .collect();
    let reference = Reference::compute(&scratch.0.join("ref"), true, &images);
    assert_bit_identical(&images, &reference);
}

#[test]
fn jpeg_matches_pillow_libjpeg_turbo_bit_for_bit() {
    // Baseline 4:2:0 at quality 50, 90 (EXIF orientation 6) and 95, 4:2:2, 4:4:4, RGB stored
    // without YCbCr (Adobe transform 0), progressive 4:2:0, 4:4:4 and grey, restart intervals,
    // grey, Adobe CMYK and YCCK, mostly at 97x61 (no multiple of the MCU); and the real photo.
    // zune-jpeg (the `image` crate) was up to 4 levels off on 23% of the 4:2:0 samples.
    let scratch = Scratch::new("jpeg");
    let inputs = scratch.0.join("in");
    generate(&inputs);
    let mut images = files_with_extensions(&inputs, &["jpg"], &[]);
    assert!(images.len() >= 15, "expected the generated JPEG variants, found {images:?}");
    images.extend(files_with_extensions(&shared_images(), &["jpg", "jpeg"], &[]));
    let reference = Reference::compute(&scratch.0.join("ref"), false, &images);
    assert_bit_identical(&images, &reference);
}

#[derive(serde::Deserialize)]
struct DamagedCase {
    /// PIL's exception when `load_image` fails, else null.
    error: Option<String>,
    size: Option<(u32, u32)>,
}

#[test]
fn damaged_jpeg_fails_where_pillow_fails_and_loads_identically_where_it_loads() {
    // Baseline and progressive JPEGs cut before EOI, 10 bytes short, at half, inside the header;
    // with bytes after EOI; with corrupt entropy data. Where PIL raises, ours is an error (never
    // a panic or libjpeg's exit()); where PIL loads, the pixels are the same.
    let (scratch, cases): (Scratch, HashMap<String, DamagedCase>) = reference_cases("damaged");
    assert!(cases.len() >= 12, "expected the damaged variants: {:?}", cases.keys());
    let (mut failed, mut loaded) = (0, 0);
    for (name, case) in &cases {
        let path = scratch.0.join(format!("{name}.jpg"));
        let ours = load_image(&path, &ImageLimits::default());
        match (&case.error, ours) {
            (Some(pil), Ok(_)) => panic!("{name}: PIL raises {pil:?}, ours loads"),
            (Some(pil), Err(err)) => {
                eprintln!("{name:>28}: PIL {pil:?}; ours {err}");
                assert!(
                    matches!(
                        &err,
                        PreprocessError::Corrupt {
                            format: image::ImageFormat::Jpeg,
                            ..
                        }
                    ),
                    "{name}: {err:?}"
                );
                assert!(err.to_string().contains("truncated or corrupt"), "{name}: {err}");
                failed += 1;
            }
            (None, Err(err)) => panic!("{name}: PIL loads it, ours fails: {err}"),
            (None, Ok(img)) => {
                let (w, h) = case.size.unwrap();
                let raw = std::fs::read(scratch.0.join(format!("{name}.rgb"))).unwrap();
                assert_eq!(img.rgb.dimensions(), (w, h), "{name}: size");
                let max_level = img.rgb.as_raw().iter().zip(&raw).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
                eprintln!("{name:>28}: PIL loads; ours max level diff {max_level}");
                assert_eq!(max_level, 0, "{name}: decoded RGB differs from PIL");
                loaded += 1;
            }
        }
    }
    eprintln!("{failed} damaged JPEGs rejected as PIL rejects them, {loaded} loaded identically");
}

#[test]
fn truncated_jpeg_is_reported_as_corrupt() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/images/rocket.jpg");
    let bytes = std::fs::read(path).unwrap();
    let err = decode_image(&bytes[..bytes.len() / 2], &ImageLimits::default()).unwrap_err();
    assert!(
        matches!(
            err,
            PreprocessError::Corrupt {
                format: image::ImageFormat::Jpeg,
                ..
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("truncated or corrupt") && message.contains("data ends before the image does"),
        "{message}"
    );
}

#[test]
fn jpeg_over_the_pixel_limit_is_rejected_from_its_header() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/images/rocket.jpg");
    let small = ImageLimits {
        max_pixels: 100,
        ..ImageLimits::default()
    };
    let err = load_image(&path, &small).unwrap_err();
    assert!(
        matches!(
            err,
            PreprocessError::TooManyPixels {
                width: 640,
                height: 427,
                limit: 100,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn missing_file_is_reported_with_its_path() {
    let path = Path::new("/nonexistent/dir/cat.png");
    let err = load_image(path, &ImageLimits::default()).unwrap_err();
    assert!(
        matches!(&err, PreprocessError::File(InputError::NotFound { path: p, .. }) if p == path),
        "{err:?}"
    );
    assert!(err.to_string().contains("/nonexistent/dir/cat.png") && err.to_string().contains("does not exist"));
}

#[test]
fn zero_byte_file_is_reported_as_empty() {
    let scratch = Scratch::new("empty");
    let path = scratch.0.join("empty.png");
    std::fs::write(&path, b"").unwrap();
    let err = load_image(&path, &ImageLimits::default()).unwrap_err();
    assert!(matches!(err, PreprocessError::Empty { .. }), "{err:?}");
    assert!(err.to_string().contains("empty (0 bytes)"), "{err}");
}

#[test]
fn truncated_png_is_reported_as_corrupt() {
    let bytes = std::fs::read(shared_images().join("chelsea.png")).unwrap();
    let err = decode_image(&bytes[..bytes.len() / 2], &ImageLimits::default()).unwrap_err();
    assert!(
        matches!(
            err,
            PreprocessError::Corrupt {
                format: image::ImageFormat::Png,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("truncated or corrupt"), "{err}");
}

#[test]
fn text_file_named_png_is_reported_as_unrecognized_format() {
    let scratch = Scratch::new("text");
    let path = scratch.0.join("notes.png");
    std::fs::write(&path, "just some text, not an image\n").unwrap();
    let err = load_image(&path, &ImageLimits::default()).unwrap_err();
    assert!(matches!(err, PreprocessError::UnrecognizedFormat { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("notes.png") && message.contains("PNG, JPEG, GIF, WebP"),
        "{message}"
    );
}

#[test]
fn header_over_the_pixel_limit_is_rejected_before_decoding() {
    let scratch = Scratch::new("bomb");
    generate(&scratch.0);
    let path = scratch.0.join("bomb.png");
    let err = load_image(&path, &ImageLimits::default()).unwrap_err();
    assert!(
        matches!(
            err,
            PreprocessError::TooManyPixels {
                width: 100000,
                height: 100000,
                pixels: 10_000_000_000,
                limit: 178_956_970,
                ..
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains("10000000000") && message.contains("178956970"), "{message}");
    // A custom limit applies to ordinary images too.
    let small = ImageLimits {
        max_pixels: 100,
        ..ImageLimits::default()
    };
    let err = load_image(&shared_images().join("chelsea.png"), &small).unwrap_err();
    assert!(
        matches!(
            err,
            PreprocessError::TooManyPixels {
                pixels: 135300,
                limit: 100,
                ..
            }
        ),
        "{err:?}"
    );
}
