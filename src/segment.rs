//! Turn decoded PaliGemma segmentation masks into binary masks at the original image size.
//!
//! Ports the mask post-processing of google-research/big_vision
//! `big_vision/evaluators/proj/paligemma/transfers/segmentation.py` (`Evaluator.run`):
//! 1. box `v = bin / 1023` (f64), pixels `y_min = int(v * h)`, `x_min = int(v * w)`, likewise the
//!    max corner (truncation, not rounding); a box that becomes empty after truncation is invalid;
//! 2. `PIL.Image.fromarray(mask64)` ("F" mode, f32) `.resize([x_max - x_min, y_max - y_min],
//!    BILINEAR)`: Pillow's `src/libImaging/Resample.c`, ported in [`crate::resample`] (separable two-pass
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

use ndarray::{Array2, ArrayView2, ArrayView3};
use serde::Serialize;

use crate::detect::{bin_fraction, BoundingBox, BoxBins, Parsed, SegmentTokens, SEG_TOKENS};
pub use crate::mask::{BinaryMask, MaskError, Rle};
use crate::resample::resize_bilinear;

/// Side of the square mask the VQ-VAE decoder emits per object.
pub const MASK_SIDE: usize = 64;

/// Errors from turning decoded masks into [`Segment`]s.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// The seg decoder's output is not f32[K, 64, 64] for the K objects it was given.
    #[error("seg decoder returned masks of shape {found:?} for {objects} objects; expected [{objects}, {MASK_SIDE}, {MASK_SIDE}]: check seg_decoder.onnx's output")]
    MaskShape {
        /// K, the objects whose codes were decoded.
        objects: usize,
        /// The output's shape.
        found: Vec<usize>,
    },
    /// A full-size mask cannot be built for the image's size.
    #[error(transparent)]
    Mask(#[from] MaskError),
}

/// One segmented object; serialises as `{"label", "box": [x_min, y_min, x_max, y_max], "mask": RLE}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Segment {
    /// The text after the object's tokens, trimmed, as the model wrote it.
    pub label: String,
    /// The box in original-image pixels (`bin / 1023` times the side, not truncated); `box` in JSON.
    #[serde(rename = "box")]
    pub bbox: BoundingBox,
    /// The mask at the original image's size: the decoded 64x64 mask resized into the box (Pillow
    /// BILINEAR), thresholded at 0; COCO RLE in JSON.
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
        let (x, y) = (x_min + dx as u32, y_min + dy as u32);
        mask.set(x, y, value > 0.0);
    }
    Ok(Some(mask))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;
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
            mask: BinaryMask::from_raw(2, 1, vec![true, false]).unwrap(),
        };
        let json = serde_json::to_string(&segment).unwrap();
        assert_eq!(
            json,
            r#"{"label":"cat","box":[0.0,0.0,2.0,1.0],"mask":{"size":[1,2],"counts":[0,1,1]}}"#
        );
    }
}
