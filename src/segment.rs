//! Turn decoded PaliGemma segmentation masks into binary masks at the original image size.
//!
//! Ports the mask post-processing of google-research/big_vision
//! `big_vision/evaluators/proj/paligemma/transfers/segmentation.py` (`Evaluator.run`):
//! 1. box `v = bin / 1023` (f64), pixels `y_min = int(v * h)`, `x_min = int(v * w)`, likewise the
//!    max corner (truncation, not rounding); a box that becomes empty after truncation is invalid;
//! 2. `PIL.Image.fromarray(mask64)` ("F" mode, f32) `.resize([x_max - x_min, y_max - y_min],
//!    BILINEAR)`: ported below from Pillow's `src/libImaging/Resample.c` (separable two-pass
//!    convolution in Pillow 13's pass order, f64 accumulation, f32 intermediate and result, and the
//!    filter support widened by the scale when downscaling, which is PIL's antialiasing);
//! 3. threshold `> 0.0`: the VQ-VAE decoder emits about [-1, 1] because big_vision trains it on
//!    `2 * (mask - 0.5)` (`pp/proj/paligemma/segmentation.py`). The Hugging Face demo instead maps to
//!    [0, 1], quantises to uint8 and resizes that; a `> 0.5` there is the same threshold but the
//!    uint8 rounding moves a few edge pixels, so the evaluator's float path is the one ported;
//! 4. paste into a zero mask of the original size.
//!
//! The decoder itself (codes i64[K, 16] -> masks f32[K, 64, 64]) is the exported
//! `seg_decoder.onnx`; this module only prepares its input and post-processes its output.

use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayView2, ArrayView3};
use serde::{Deserialize, Serialize, Serializer};

use crate::detect::{bin_fraction, BoundingBox, BoxBins, Parsed, SegmentTokens, SEG_TOKENS};

/// Side of the square mask the VQ-VAE decoder emits per object.
pub const MASK_SIDE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("seg decoder returned masks of shape {found:?} for {objects} objects; expected [{objects}, {MASK_SIDE}, {MASK_SIDE}]: check seg_decoder.onnx's output")]
    MaskShape { objects: usize, found: Vec<usize> },
    #[error("RLE of size [{height}, {width}] needs counts summing to {expected}, found {found}: the RLE is corrupt or for another image")]
    RleLength {
        height: u32,
        width: u32,
        expected: u64,
        found: u64,
    },
    #[error("mask of {width}x{height} needs {expected} pixels, got {found}: pass row-major data of width * height")]
    DataLength {
        width: u32,
        height: u32,
        expected: usize,
        found: usize,
    },
    #[error("mask of {width}x{height} pixels is too large to store in memory on this platform")]
    MaskTooLarge { width: u32, height: u32 },
    #[error("could not encode a {width}x{height} mask as PNG: {source}")]
    Png {
        width: u32,
        height: u32,
        source: image::ImageError,
    },
    #[error("could not write mask PNG to {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// A binary mask over the original image, row-major. Fields are private so that the data length
/// always equals `width * height`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryMask {
    width: u32,
    height: u32,
    data: Vec<bool>,
}

/// COCO-style uncompressed run-length encoding, as pycocotools writes it: pixels in column-major
/// (Fortran) order, runs alternating background/foreground starting with background (a leading 0
/// when the first pixel is set). `size` is `[height, width]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rle {
    pub size: [u32; 2],
    pub counts: Vec<u64>,
}

impl BinaryMask {
    /// An all-background mask.
    pub fn new(width: u32, height: u32) -> Result<Self, SegmentError> {
        let len = pixel_count(width, height)?;
        Ok(Self {
            width,
            height,
            data: vec![false; len],
        })
    }

    /// A mask from row-major pixels, `width * height` of them.
    pub fn from_raw(width: u32, height: u32, data: Vec<bool>) -> Result<Self, SegmentError> {
        let expected = pixel_count(width, height)?;
        if data.len() != expected {
            return Err(SegmentError::DataLength {
                width,
                height,
                expected,
                found: data.len(),
            });
        }
        Ok(Self { width, height, data })
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// Row-major pixels, `width * height` of them.
    pub fn data(&self) -> &[bool] {
        &self.data
    }

    /// Number of foreground pixels.
    pub fn area(&self) -> usize {
        self.data.iter().filter(|&&on| on).count()
    }

    /// Whether pixel (`x`, `y`) is foreground; false outside the mask.
    pub fn get(&self, x: u32, y: u32) -> bool {
        x < self.width && y < self.height && self.data[y as usize * self.width as usize + x as usize]
    }

    /// Column-major RLE, as pycocotools' `encode(np.asfortranarray(mask))` before compression.
    pub fn to_rle(&self) -> Rle {
        let (w, h) = (self.width as usize, self.height as usize);
        let mut counts = Vec::new();
        let mut current = false;
        let mut run = 0u64;
        for x in 0..w {
            for y in 0..h {
                let on = self.data[y * w + x];
                if on != current {
                    counts.push(run);
                    current = on;
                    run = 0;
                }
                run += 1;
            }
        }
        counts.push(run);
        Rle {
            size: [self.height, self.width],
            counts,
        }
    }

    /// Inverse of [`BinaryMask::to_rle`].
    pub fn from_rle(rle: &Rle) -> Result<Self, SegmentError> {
        let [height, width] = rle.size;
        let expected = u64::from(width) * u64::from(height);
        let found = rle.counts.iter().try_fold(0u64, |sum, &c| sum.checked_add(c)).unwrap_or(u64::MAX);
        if found != expected {
            return Err(SegmentError::RleLength {
                height,
                width,
                expected,
                found,
            });
        }
        let mut mask = Self::new(width, height)?;
        let (w, h) = (width as usize, height as usize);
        let mut index = 0usize;
        for (i, &count) in rle.counts.iter().enumerate() {
            // The total was checked above, so each run fits.
            let end = index + count as usize;
            if i % 2 == 1 {
                for p in index..end {
                    mask.data[(p % h) * w + p / h] = true;
                }
            }
            index = end;
        }
        Ok(mask)
    }

    /// 8-bit grayscale PNG, foreground 255, background 0.
    pub fn to_png(&self) -> Result<Vec<u8>, SegmentError> {
        let (width, height) = (self.width, self.height);
        let pixels = self.data.iter().map(|&on| if on { 255 } else { 0 }).collect();
        let gray = image::GrayImage::from_raw(width, height, pixels).ok_or(SegmentError::MaskTooLarge { width, height })?;
        let mut png = std::io::Cursor::new(Vec::new());
        gray.write_to(&mut png, image::ImageFormat::Png)
            .map_err(|source| SegmentError::Png { width, height, source })?;
        Ok(png.into_inner())
    }

    /// Writes [`BinaryMask::to_png`] to `path`.
    pub fn save_png(&self, path: &Path) -> Result<(), SegmentError> {
        std::fs::write(path, self.to_png()?).map_err(|source| SegmentError::Write {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Serialises as its [`Rle`]: `{"size": [h, w], "counts": [...]}`.
impl Serialize for BinaryMask {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_rle().serialize(serializer)
    }
}

fn pixel_count(width: u32, height: u32) -> Result<usize, SegmentError> {
    (width as usize)
        .checked_mul(height as usize)
        .ok_or(SegmentError::MaskTooLarge { width, height })
}

/// One segmented object; serialises as `{"label", "box": [x_min, y_min, x_max, y_max], "mask": RLE}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Segment {
    pub label: String,
    #[serde(rename = "box")]
    pub bbox: BoundingBox,
    pub mask: BinaryMask,
}

/// The seg decoder's input: the codes of every object, i64[K, 16].
pub fn decoder_input(objects: &[SegmentTokens]) -> Array2<i64> {
    Array2::from_shape_fn((objects.len(), SEG_TOKENS), |(k, i)| i64::from(objects[k].codes[i]))
}

/// Pairs each object with its decoded mask (f32[K, 64, 64], the seg decoder's output) and builds
/// full-size masks for a `width` x `height` image. Objects whose box covers no whole pixel are
/// dropped and counted in `malformed`, as big_vision counts them invalid.
pub fn segments(objects: &[SegmentTokens], masks: ArrayView3<f32>, width: u32, height: u32) -> Result<Parsed<Segment>, SegmentError> {
    if masks.shape() != [objects.len(), MASK_SIDE, MASK_SIDE] {
        return Err(SegmentError::MaskShape {
            objects: objects.len(),
            found: masks.shape().to_vec(),
        });
    }
    let mut parsed = Parsed {
        objects: Vec::new(),
        malformed: 0,
    };
    for (object, mask64) in objects.iter().zip(masks.outer_iter()) {
        match paste_mask(mask64, &object.bins, width, height)? {
            Some(mask) => parsed.objects.push(Segment {
                label: object.label.clone(),
                bbox: object.bins.to_pixels(width, height),
                mask,
            }),
            None => parsed.malformed += 1,
        }
    }
    Ok(parsed)
}

/// Box corners in whole pixels as big_vision computes them: `int(bin / 1023 * side)`, as
/// `(x_min, y_min, x_max, y_max)`; `None` when truncation leaves no pixel.
pub fn pixel_box(bins: &BoxBins, width: u32, height: u32) -> Option<(u32, u32, u32, u32)> {
    // Float-to-int `as` truncates toward zero like Python's int(). Bins above 1023 (never parsed,
    // but `BoxBins` is public) are held to the image edge.
    let px = |bin: u16, side: u32| ((bin_fraction(bin) * f64::from(side)) as u32).min(side);
    let (x_min, y_min) = (px(bins.x_min, width), px(bins.y_min, height));
    let (x_max, y_max) = (px(bins.x_max, width), px(bins.y_max, height));
    (x_max > x_min && y_max > y_min).then_some((x_min, y_min, x_max, y_max))
}

/// One decoded mask (f32[64, 64], about [-1, 1]) resized into its box and thresholded at 0, pasted
/// into a `width` x `height` background; `None` when the box covers no whole pixel.
pub fn paste_mask(mask64: ArrayView2<f32>, bins: &BoxBins, width: u32, height: u32) -> Result<Option<BinaryMask>, SegmentError> {
    let Some((x_min, y_min, x_max, y_max)) = pixel_box(bins, width, height) else {
        return Ok(None);
    };
    let mut mask = BinaryMask::new(width, height)?;
    let inside = resize_bilinear(mask64, (x_max - x_min) as usize, (y_max - y_min) as usize);
    for ((dy, dx), &value) in inside.indexed_iter() {
        let (x, y) = (x_min as usize + dx, y_min as usize + dy);
        mask.data[y * width as usize + x] = value > 0.0;
    }
    Ok(Some(mask))
}

/// Pillow's BILINEAR resize of an "F" (f32) image: f32[h, w] -> f32[out_height, out_width].
///
/// Matches Pillow 13's `Image.fromarray(src).resize((out_width, out_height), Image.BILINEAR)` bit
/// for bit: same taps, f64 sums in the same order, f32 rounding after each pass, same pass order.
pub fn resize_bilinear(src: ArrayView2<f32>, out_width: usize, out_height: usize) -> Array2<f32> {
    let (in_height, in_width) = src.dim();
    // Pillow skips a pass whose size does not change; a unit-scale pass would be the identity anyway.
    let horizontal = |img: ArrayView2<f32>| {
        if out_width == in_width {
            return img.to_owned();
        }
        let taps = bilinear_taps(in_width, out_width);
        Array2::from_shape_fn((img.nrows(), out_width), |(y, x)| taps[x].apply(|i| img[[y, i]]))
    };
    let vertical = |img: ArrayView2<f32>| {
        if out_height == in_height {
            return img.to_owned();
        }
        let taps = bilinear_taps(in_height, out_height);
        Array2::from_shape_fn((out_height, img.ncols()), |(y, x)| taps[y].apply(|i| img[[i, x]]))
    };
    // The f32 intermediate makes the pass order visible in the last bit. Pillow 13 (PR #9549, "If
    // height is scaled down significantly more than width, resize vertically first") runs the
    // vertical pass first when the height loses more than twice as many pixels as the width; the
    // condition was pinned down by comparing both orders with Pillow 13.0.0 on every output size
    // up to 3x for inputs 64x64, 64x32, 32x64 and 50x90. Pillow 12 and older always go horizontal
    // first, which differs by at most one f32 ulp on a few pixels.
    if crate::preprocess::pil_resizes_vertically_first(in_width, in_height, out_width, out_height) {
        horizontal(vertical(src).view())
    } else {
        vertical(horizontal(src).view())
    }
}

/// The source samples one output pixel reads, and their normalised weights.
struct Taps {
    first: usize,
    weights: Vec<f64>,
}

impl Taps {
    fn apply(&self, sample: impl Fn(usize) -> f32) -> f32 {
        let sum = self
            .weights
            .iter()
            .enumerate()
            .fold(0.0f64, |sum, (i, &w)| sum + f64::from(sample(self.first + i)) * w);
        sum as f32
    }
}

/// Pillow's `precompute_coeffs` for the triangle filter (support 1) along one axis.
fn bilinear_taps(in_size: usize, out_size: usize) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    // Downscaling widens the filter to cover every source pixel: Pillow's antialiasing.
    let filter_scale = scale.max(1.0);
    let support = filter_scale;
    let inverse = 1.0 / filter_scale;
    (0..out_size)
        .map(|out| {
            let center = (out as f64 + 0.5) * scale;
            // C's (int) cast truncates toward zero; so does `as`.
            let first = ((center - support + 0.5) as i64).max(0);
            let end = ((center + support + 0.5) as i64).min(in_size as i64);
            let mut weights: Vec<f64> = (first..end).map(|i| triangle((i as f64 - center + 0.5) * inverse)).collect();
            let total = weights.iter().fold(0.0f64, |sum, &w| sum + w);
            if total != 0.0 {
                weights.iter_mut().for_each(|w| *w /= total);
            }
            Taps {
                first: first as usize,
                weights,
            }
        })
        .collect()
}

fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    fn mask_from_rows(rows: &[&str]) -> BinaryMask {
        let height = rows.len() as u32;
        let width = rows[0].len() as u32;
        let data = rows.iter().flat_map(|r| r.bytes().map(|b| b == b'#')).collect();
        BinaryMask::from_raw(width, height, data).unwrap()
    }

    #[test]
    fn rle_is_column_major_and_starts_with_background() {
        // Column-major walk: (0,0)=# (0,1)=. | (1,0)=# (1,1)=# | (2,0)=. (2,1)=.
        let mask = mask_from_rows(&["##.", ".#."]);
        let rle = mask.to_rle();
        assert_eq!(rle.size, [2, 3]);
        assert_eq!(rle.counts, [0, 1, 1, 2, 2]);
    }

    #[test]
    fn rle_round_trips_through_json() {
        let mask = mask_from_rows(&["..#..#.", "#####..", "......#", "#.#.#.#", "......."]);
        let json = serde_json::to_string(&mask).unwrap();
        let rle: Rle = serde_json::from_str(&json).unwrap();
        assert_eq!(BinaryMask::from_rle(&rle).unwrap(), mask);
        let empty = BinaryMask::new(4, 3).unwrap();
        assert_eq!(empty.to_rle().counts, [12]);
        assert_eq!(BinaryMask::from_rle(&empty.to_rle()).unwrap(), empty);
    }

    #[test]
    fn rle_with_wrong_total_is_rejected() {
        let rle = Rle {
            size: [2, 2],
            counts: vec![1, 2],
        };
        assert!(matches!(
            BinaryMask::from_rle(&rle),
            Err(SegmentError::RleLength { expected: 4, found: 3, .. })
        ));
        let overflow = Rle {
            size: [2, 2],
            counts: vec![u64::MAX, 5],
        };
        assert!(BinaryMask::from_rle(&overflow).is_err());
    }

    #[test]
    fn png_decodes_back_to_the_same_mask() {
        let mask = mask_from_rows(&["#..", ".#.", "..#", "##."]);
        let png = mask.to_png().unwrap();
        let decoded = image::load_from_memory_with_format(&png, image::ImageFormat::Png)
            .unwrap()
            .to_luma8();
        assert_eq!(decoded.dimensions(), (3, 4));
        let back: Vec<bool> = decoded.pixels().map(|p| p.0[0] == 255).collect();
        assert_eq!(back, mask.data);
        assert!(decoded.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
    }

    #[test]
    fn resize_to_same_size_is_identity() {
        let src = Array2::from_shape_fn((5, 7), |(y, x)| (y * 7 + x) as f32 - 17.5);
        assert_eq!(resize_bilinear(src.view(), 7, 5), src);
    }

    #[test]
    fn resize_preserves_constant_images() {
        // Normalised weights sum to one, so a constant survives up- and downscaling.
        let src = Array2::from_elem((64, 64), 0.25f32);
        for (w, h) in [(1, 1), (3, 200), (129, 17), (64, 65)] {
            let out = resize_bilinear(src.view(), w, h);
            assert_eq!(out.dim(), (h, w));
            assert!(out.iter().all(|&v| (v - 0.25).abs() < 1e-6), "{w}x{h}");
        }
    }

    #[test]
    fn box_is_truncated_to_pixels_like_big_vision() {
        let bins = BoxBins {
            y_min: 0,
            x_min: 512,
            y_max: 1023,
            x_max: 1000,
        };
        // 512/1023*101 = 50.55 -> 50; 1000/1023*101 = 98.73 -> 98; full height.
        assert_eq!(pixel_box(&bins, 101, 33), Some((50, 0, 98, 33)));
        // Distinct bins that truncate to the same pixel leave an empty box.
        let beyond = BoxBins {
            y_min: 0,
            x_min: 0,
            y_max: 2000,
            x_max: 5000,
        };
        assert_eq!(pixel_box(&beyond, 7, 5), Some((0, 0, 7, 5)));
        let thin = BoxBins {
            y_min: 1,
            x_min: 10,
            y_max: 2,
            x_max: 20,
        };
        assert_eq!(pixel_box(&thin, 100, 100), None);
    }

    #[test]
    fn mask_is_pasted_inside_its_box_only() {
        let bins = BoxBins {
            y_min: 256,
            x_min: 256,
            y_max: 768,
            x_max: 768,
        };
        let positive = Array2::from_elem((MASK_SIDE, MASK_SIDE), 0.5f32);
        let mask = paste_mask(positive.view(), &bins, 40, 20).unwrap().unwrap();
        let (x0, y0, x1, y1) = pixel_box(&bins, 40, 20).unwrap();
        assert_eq!(mask.area(), ((x1 - x0) * (y1 - y0)) as usize);
        assert!(mask.get(x0, y0) && mask.get(x1 - 1, y1 - 1));
        assert!(!mask.get(x0 - 1, y0) && !mask.get(x1, y1 - 1) && !mask.get(x0, y1));
    }

    #[test]
    fn segments_drop_vanishing_boxes_and_check_mask_shape() {
        let object = |y_max| SegmentTokens {
            label: "cat".into(),
            bins: BoxBins {
                y_min: 0,
                x_min: 0,
                y_max,
                x_max: 1023,
            },
            codes: [3; SEG_TOKENS],
        };
        let objects = [object(1023), object(1)];
        assert_eq!(decoder_input(&objects).dim(), (2, SEG_TOKENS));
        let masks = Array3::from_elem((2, MASK_SIDE, MASK_SIDE), 1.0f32);
        let parsed = segments(&objects, masks.view(), 30, 10).unwrap();
        assert_eq!((parsed.objects.len(), parsed.malformed), (1, 1));
        assert_eq!(parsed.objects[0].mask.area(), 300);
        let wrong = Array3::from_elem((1, MASK_SIDE, MASK_SIDE), 1.0f32);
        assert!(matches!(
            segments(&objects, wrong.view(), 30, 10),
            Err(SegmentError::MaskShape { objects: 2, .. })
        ));
    }

    #[test]
    fn segment_serialises_box_and_rle_mask() {
        let segment = Segment {
            label: "cat".into(),
            bbox: BoundingBox {
                x_min: 0.0,
                y_min: 0.0,
                x_max: 2.0,
                y_max: 1.0,
            },
            mask: mask_from_rows(&["#."]),
        };
        let json = serde_json::to_string(&segment).unwrap();
        assert_eq!(
            json,
            r#"{"label":"cat","box":[0.0,0.0,2.0,1.0],"mask":{"size":[1,2],"counts":[0,1,1]}}"#
        );
    }
}
