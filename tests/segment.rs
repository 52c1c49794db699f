//! Parity of `paligemma::segment` with big_vision's mask post-processing run in Python
//! (`tests/data/segment_reference.py`: numpy + PIL, as `segmentation.py` does it).

use std::path::Path;
use std::process::Command;

mod common;

use common::python;
use ndarray::Array3;
use paligemma::detect::BoxBins;
use paligemma::resample::resize_bilinear;
use paligemma::segment::{paste_mask, pixel_box, MASK_SIDE};

/// SplitMix64: deterministic cases without a dev-dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Case {
    bins: BoxBins,
    width: u32,
    height: u32,
}

/// Odd image sizes, boxes that up- and downscale the 64x64 mask, full and one-pixel-thin boxes.
fn cases(rng: &mut Rng) -> Vec<Case> {
    let sizes = [(451, 300), (37, 23), (1001, 777), (14, 25), (641, 427), (3, 5), (97, 1203)];
    let mut cases = Vec::new();
    for &(width, height) in &sizes {
        let full = BoxBins {
            y_min: 0,
            x_min: 0,
            y_max: 1023,
            x_max: 1023,
        };
        cases.push(Case { bins: full, width, height });
        for _ in 0..4 {
            let pair = |rng: &mut Rng| {
                let a = rng.below(1023) as u16;
                let b = a + 1 + rng.below(u64::from(1023 - a)) as u16;
                (a, b)
            };
            let ((y_min, y_max), (x_min, x_max)) = (pair(rng), pair(rng));
            cases.push(Case {
                bins: BoxBins {
                    y_min,
                    x_min,
                    y_max,
                    x_max,
                },
                width,
                height,
            });
        }
    }
    cases
}

/// Half the masks uniform noise in [-1, 1] (every pixel near the threshold somewhere), half smooth
/// blobs like the decoder's output.
fn masks(rng: &mut Rng, count: usize) -> Array3<f32> {
    let mut masks = Array3::zeros((count, MASK_SIDE, MASK_SIDE));
    for (k, mut mask) in masks.outer_iter_mut().enumerate() {
        let (fx, fy, phase) = (rng.unit() * 0.3, rng.unit() * 0.3, rng.unit() * 6.0);
        for ((y, x), v) in mask.indexed_iter_mut() {
            let noise = rng.unit() * 2.0 - 1.0;
            *v = if k % 2 == 0 {
                noise as f32
            } else {
                ((x as f64 * fx + phase).sin() * (y as f64 * fy).cos() + 0.1 * noise) as f32
            };
        }
    }
    masks
}

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn masks_match_big_vision_pil_post_processing_pixel_for_pixel() {
    let mut rng = Rng(20240514);
    let cases = cases(&mut rng);
    let masks = masks(&mut rng, cases.len());

    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("segment_parity_{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let spec: Vec<_> = cases
        .iter()
        .map(|c| {
            let b = c.bins;
            serde_json::json!({"bins": [b.y_min, b.x_min, b.y_max, b.x_max], "width": c.width, "height": c.height})
        })
        .collect();
    std::fs::write(work.join("cases.json"), serde_json::to_string(&spec).unwrap()).unwrap();
    // Plain resizes on both sides of Pillow 13's pass-order switch, up- and downscaling.
    let sizes: Vec<[usize; 2]> = vec![
        [1, 1],
        [3, 200],
        [228, 3],
        [17, 9],
        [65, 63],
        [63, 65],
        [100, 60],
        [451, 300],
        [2, 64],
        [64, 2],
        [33, 1],
        [32, 1],
        [34, 2],
        [33, 2],
        [64, 63],
        [200, 65],
        [1000, 7],
    ];
    std::fs::write(work.join("sizes.json"), serde_json::to_string(&sizes).unwrap()).unwrap();
    let raw: Vec<u8> = masks.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(work.join("masks.f32"), raw).unwrap();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/segment_reference.py");
    let python = python();
    let output = Command::new(&python)
        .arg(&script)
        .arg(&work)
        .output()
        .unwrap_or_else(|e| panic!("could not run {}: {e}; run the project's set-up script", python.display()));
    assert!(
        output.status.success(),
        "reference failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let boxes: Vec<Option<[u32; 4]>> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(boxes.len(), cases.len());

    let (mut compared, mut floats, mut exact, mut pixels, mut differing) = (0, 0usize, 0usize, 0usize, 0usize);
    let mut max_float_diff = 0.0f32;
    for (k, (case, expected_box)) in cases.iter().zip(&boxes).enumerate() {
        let mask64 = masks.index_axis(ndarray::Axis(0), k);
        let pixel = pixel_box(&case.bins, case.width, case.height);
        assert_eq!(pixel.map(|(a, b, c, d)| [a, b, c, d]), *expected_box, "case {k}: pixel box");
        let ours = paste_mask(mask64, &case.bins, case.width, case.height).unwrap();
        let Some([x_min, y_min, x_max, y_max]) = *expected_box else {
            assert!(ours.is_none(), "case {k}: big_vision drops this box");
            continue;
        };
        compared += 1;

        let resized = resize_bilinear(mask64, (x_max - x_min) as usize, (y_max - y_min) as usize);
        let reference = read_f32(&work.join(format!("resized_{k}.f32")));
        assert_eq!(resized.len(), reference.len(), "case {k}: resized size");
        for (&a, &b) in resized.iter().zip(&reference) {
            max_float_diff = max_float_diff.max((a - b).abs());
            exact += usize::from(a.to_bits() == b.to_bits());
        }
        floats += reference.len();

        let ours = ours.unwrap_or_else(|| panic!("case {k}: Rust dropped a box big_vision keeps"));
        let reference = std::fs::read(work.join(format!("mask_{k}.u8"))).unwrap();
        assert_eq!(ours.data().len(), reference.len(), "case {k}: mask size");
        differing += ours.data().iter().zip(&reference).filter(|(&a, &b)| a != (b == 1)).count();
        pixels += reference.len();
    }
    for (i, &[w, h]) in sizes.iter().enumerate() {
        let ours = resize_bilinear(masks.index_axis(ndarray::Axis(0), i % cases.len()), w, h);
        let reference = read_f32(&work.join(format!("plain_{i}.f32")));
        assert_eq!(ours.len(), reference.len(), "resize to {w}x{h}: size");
        for (&a, &b) in ours.iter().zip(&reference) {
            max_float_diff = max_float_diff.max((a - b).abs());
            exact += usize::from(a.to_bits() == b.to_bits());
        }
        floats += reference.len();
    }
    std::fs::remove_dir_all(&work).ok();

    println!(
        "{compared} of {} boxes compared, plus {} plain resizes; resize: {exact}/{floats} floats bit-identical, max |diff| {max_float_diff:e}; \
         masks: {differing} of {pixels} pixels differ",
        cases.len(),
        sizes.len()
    );
    assert!(compared >= cases.len() / 2, "too few non-empty boxes to be a test");
    assert!(max_float_diff <= 1e-5, "resize differs from PIL by {max_float_diff}");
    // Pillow 13 (pinned in export/requirements.txt) is matched bit for bit, pass order included.
    assert_eq!(
        exact, floats,
        "resize is not bit-identical to PIL: is the reference Python's Pillow 13?"
    );
    assert_eq!(differing, 0, "{differing} mask pixels differ from big_vision");
}
