//! Parse PaliGemma detection and segmentation output into labelled boxes in original-image pixels.
//!
//! Ports two references:
//! - the grammar of the big_vision PaliGemma demo parser (`_SEGMENT_DETECT_RE` in the
//!   `big-vision/paligemma` Hugging Face space): per object four `<locNNNN>` tokens, optionally
//!   (after optional whitespace) sixteen `<segNNN>` tokens, then a label free of `;`, `<` and `>`;
//!   objects separated by `" ; "`;
//! - the validity rules of google-research/big_vision
//!   `big_vision/evaluators/proj/paligemma/transfers/segmentation.py`: bins in `0..=1023`, codes in
//!   `0..=127`, exactly 16 codes, `y_max > y_min` and `x_max > x_min`.
//!
//! The input is the decoded text of the generated tokens only (not the prompt), decoded with special
//! tokens skipped: transformers' `PaliGemmaProcessor` registers `<locNNNN>` and `<segNNN>` with
//! `add_tokens` (not as special tokens), so they survive as literal text while `<eos>` and `<pad>`
//! do not. Parsing text rather than ids keeps this
//! module free of tokenizer ids and matches how both references parse.
//!
//! Bin convention: a bin `b` means `v = b / 1023` of the side, then times the original width or
//! height. big_vision, which produced the training targets, encodes `round(v * 1023)`
//! (`pp/proj/paligemma/segmentation.py`) and its evaluator decodes `b / 1023`, so bin 1023 is the far
//! edge. The Hugging Face demo divides by 1024 instead, which shifts far edges inwards by up to one
//! part in 1024. Bins count over the square `S x S` model input, which is the original image
//! resized non-uniformly, so x scales with the original width and y with the original height.
//!
//! Malformed objects are dropped and counted, never fatal: a model can emit anything.

use serde::Serialize;

/// Number of `<locNNNN>` bins per image side.
pub const LOC_BINS: u16 = 1024;
/// Number of `<segNNN>` codebook entries of the mask VQ-VAE.
pub const SEG_CODES: u8 = 128;
/// Number of `<segNNN>` tokens per segmentation object (a 4x4 grid of codes).
pub const SEG_TOKENS: usize = 16;

/// Why one object's text was rejected; `parse_detections` and `parse_segmentation` count these as
/// `malformed`, `parse_detection` and `parse_segment_tokens` return them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    /// The object does not start with `<loc`, but holds one further on.
    #[error("object {text:?} has text before its <loc> tokens; each object must start with 4 <locNNNN> tokens")]
    TextBeforeBox {
        /// The object's text, trimmed.
        text: String,
    },
    /// The object does not start with exactly 4 `<locNNNN>` tokens.
    #[error("object {text:?} has {found} <locNNNN> tokens; expected 4 (y_min, x_min, y_max, x_max)")]
    LocCount {
        /// The object's text, trimmed.
        text: String,
        /// The `<locNNNN>` tokens at its start (0 when it has none).
        found: usize,
    },
    /// A `<locNNNN>` bin is over 1023.
    #[error("object {text:?} has bin {found} in a <loc> token; bins run from 0 to {max}", max = LOC_BINS - 1)]
    LocOutOfRange {
        /// The object's text, trimmed.
        text: String,
        /// The first bin out of range.
        found: u32,
    },
    /// The `<segNNN>` tokens after the box are not as many as the task takes.
    #[error("object {text:?} has {found} <segNNN> tokens; expected {expected}")]
    SegCount {
        /// The object's text, trimmed.
        text: String,
        /// 16 for `segment`, 0 for `detect`.
        expected: usize,
        /// The `<segNNN>` tokens after the box.
        found: usize,
    },
    /// A `<segNNN>` code is over 127.
    #[error("object {text:?} has code {found} in a <seg> token; codes run from 0 to {max}", max = SEG_CODES - 1)]
    SegOutOfRange {
        /// The object's text, trimmed.
        text: String,
        /// The first code out of range.
        found: u32,
    },
    /// The box's max bin does not exceed its min bin on one axis or both.
    #[error("object {text:?} has an empty box: y_min {y_min} y_max {y_max}, x_min {x_min} x_max {x_max}; max must exceed min")]
    EmptyBox {
        /// The object's text, trimmed.
        text: String,
        /// The first `<loc>` bin.
        y_min: u16,
        /// The second `<loc>` bin.
        x_min: u16,
        /// The third `<loc>` bin.
        y_max: u16,
        /// The fourth `<loc>` bin.
        x_max: u16,
    },
    /// The label holds `<` or `>`: a token of another kind or digit count after the box's tokens.
    #[error("object {text:?} has a stray token or bracket in its label {label:?}")]
    StrayToken {
        /// The object's text, trimmed.
        text: String,
        /// The text after the box's (and codes') tokens, trimmed.
        label: String,
    },
}

/// The four `<loc>` bins of one object, in the order the model emits them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoxBins {
    /// Top edge, in 1023ths of the height (`0..=1023`).
    pub y_min: u16,
    /// Left edge, in 1023ths of the width.
    pub x_min: u16,
    /// Bottom edge, in 1023ths of the height; above `y_min`.
    pub y_max: u16,
    /// Right edge, in 1023ths of the width; above `x_min`.
    pub x_max: u16,
}

impl BoxBins {
    /// The box in pixels of an original image of `width` x `height` (bin / 1023 times the side).
    pub fn to_pixels(&self, width: u32, height: u32) -> BoundingBox {
        let scale = |bin: u16, side: u32| (bin_fraction(bin) * f64::from(side)) as f32;
        BoundingBox {
            x_min: scale(self.x_min, width),
            y_min: scale(self.y_min, height),
            x_max: scale(self.x_max, width),
            y_max: scale(self.y_max, height),
        }
    }
}

/// `bin / 1023` in f64, the exact value big_vision's numpy code computes before scaling.
pub fn bin_fraction(bin: u16) -> f64 {
    f64::from(bin) / f64::from(LOC_BINS - 1)
}

/// An axis-aligned box in original-image pixels; serialises as `[x_min, y_min, x_max, y_max]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(into = "[f32; 4]")]
pub struct BoundingBox {
    /// Left edge, in pixels from the image's left side.
    pub x_min: f32,
    /// Top edge, in pixels from the image's top.
    pub y_min: f32,
    /// Right edge, in pixels from the image's left side.
    pub x_max: f32,
    /// Bottom edge, in pixels from the image's top.
    pub y_max: f32,
}

impl From<BoundingBox> for [f32; 4] {
    fn from(b: BoundingBox) -> Self {
        [b.x_min, b.y_min, b.x_max, b.y_max]
    }
}

/// One detected object; serialises as `{"label": ..., "box": [x_min, y_min, x_max, y_max]}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detection {
    /// The text after the object's tokens, trimmed, as the model wrote it (`cat`); may be empty.
    pub label: String,
    /// The box in original-image pixels; `box` in JSON.
    #[serde(rename = "box")]
    pub bbox: BoundingBox,
}

/// One segmentation object before its codes are decoded into a mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentTokens {
    /// The text after the object's tokens, trimmed.
    pub label: String,
    /// The object's box, as its four `<loc>` tokens hold it.
    pub bins: BoxBins,
    /// The 4x4 grid of VQ-VAE codes in row-major order, each in `0..SEG_CODES`.
    pub codes: [u8; SEG_TOKENS],
}

/// The well-formed objects of one generated text and how many were dropped.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Parsed<T> {
    /// The well-formed objects, in the order of the text.
    pub objects: Vec<T>,
    /// Objects dropped for an [`ObjectError`].
    pub malformed: usize,
}

/// One object split into its tokens, before the task decides whether seg codes belong.
struct RawObject {
    label: String,
    bins: BoxBins,
    codes: Vec<u8>,
}

/// Parses `detect` output: objects of 4 `<loc>` tokens and a label, boxes in pixels of the original
/// `width` x `height` image.
pub fn parse_detections(text: &str, width: u32, height: u32) -> Parsed<Detection> {
    collect(text, |object| parse_detection(object, width, height))
}

/// Parses `segment` output: objects of 4 `<loc>` tokens, 16 `<seg>` tokens and a label.
pub fn parse_segmentation(text: &str) -> Parsed<SegmentTokens> {
    collect(text, parse_segment_tokens)
}

/// One object of `detect` output (the text between two `;`), or why it is malformed.
pub fn parse_detection(object: &str, width: u32, height: u32) -> Result<Detection, ObjectError> {
    let raw = parse_object(object.trim(), 0)?;
    Ok(Detection {
        label: raw.label,
        bbox: raw.bins.to_pixels(width, height),
    })
}

/// One object of `segment` output (the text between two `;`), or why it is malformed.
pub fn parse_segment_tokens(object: &str) -> Result<SegmentTokens, ObjectError> {
    let raw = parse_object(object.trim(), SEG_TOKENS)?;
    // parse_object already checked the count; the error path only keeps this panic-free.
    let codes = <[u8; SEG_TOKENS]>::try_from(raw.codes.as_slice()).map_err(|_| ObjectError::SegCount {
        text: object.trim().to_string(),
        expected: SEG_TOKENS,
        found: raw.codes.len(),
    })?;
    Ok(SegmentTokens {
        label: raw.label,
        bins: raw.bins,
        codes,
    })
}

fn collect<T>(text: &str, mut parse: impl FnMut(&str) -> Result<T, ObjectError>) -> Parsed<T> {
    let mut parsed = Parsed {
        objects: Vec::new(),
        malformed: 0,
    };
    // Blank output means "nothing found", not a malformed object.
    if text.trim().is_empty() {
        return parsed;
    }
    // Labels cannot contain ';' (the reference grammar excludes it), so splitting on it is exact.
    for object in text.split(';') {
        match parse(object) {
            Ok(value) => parsed.objects.push(value),
            Err(_) => parsed.malformed += 1,
        }
    }
    parsed
}

/// Splits one object (already trimmed, no `;`) into bins, `seg_count` codes and its label.
fn parse_object(text: &str, seg_count: usize) -> Result<RawObject, ObjectError> {
    let owned = || text.to_string();
    if !text.starts_with("<loc") {
        return Err(if text.contains("<loc") {
            ObjectError::TextBeforeBox { text: owned() }
        } else {
            ObjectError::LocCount { text: owned(), found: 0 }
        });
    }
    let (locs, rest) = take_tokens(text, "<loc", 4);
    if locs.len() != 4 {
        return Err(ObjectError::LocCount {
            text: owned(),
            found: locs.len(),
        });
    }
    if let Some(&found) = locs.iter().find(|&&bin| bin >= u32::from(LOC_BINS)) {
        return Err(ObjectError::LocOutOfRange { text: owned(), found });
    }
    // The reference grammar allows whitespace between the box and the mask codes.
    let (codes, rest) = take_tokens(rest.trim_start(), "<seg", 3);
    if codes.len() != seg_count {
        return Err(ObjectError::SegCount {
            text: owned(),
            expected: seg_count,
            found: codes.len(),
        });
    }
    if let Some(&found) = codes.iter().find(|&&code| code >= u32::from(SEG_CODES)) {
        return Err(ObjectError::SegOutOfRange { text: owned(), found });
    }
    let label = rest.trim();
    if label.contains(['<', '>']) {
        return Err(ObjectError::StrayToken {
            text: owned(),
            label: label.to_string(),
        });
    }
    // Range checks above make these conversions lossless.
    let bin = |i: usize| locs[i] as u16;
    let bins = BoxBins {
        y_min: bin(0),
        x_min: bin(1),
        y_max: bin(2),
        x_max: bin(3),
    };
    if bins.y_max <= bins.y_min || bins.x_max <= bins.x_min {
        let BoxBins {
            y_min,
            x_min,
            y_max,
            x_max,
        } = bins;
        return Err(ObjectError::EmptyBox {
            text: owned(),
            y_min,
            x_min,
            y_max,
            x_max,
        });
    }
    Ok(RawObject {
        label: label.to_string(),
        bins,
        codes: codes.iter().map(|&c| c as u8).collect(),
    })
}

/// Takes consecutive `{prefix}DDD…>` tokens with exactly `digits` digits from the start of `text`;
/// returns their numbers and the rest. A token with another digit count ends the run and stays in
/// the rest, where it is reported as stray.
fn take_tokens<'a>(mut text: &'a str, prefix: &str, digits: usize) -> (Vec<u32>, &'a str) {
    let mut values = Vec::new();
    while let Some(after) = text.strip_prefix(prefix) {
        let Some(number) = after.get(..digits).filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else {
            break;
        };
        let Some(next) = after[digits..].strip_prefix('>') else {
            break;
        };
        // At most 4 ASCII digits: always fits in u32.
        values.push(number.bytes().fold(0u32, |acc, b| acc * 10 + u32::from(b - b'0')));
        text = next;
    }
    (values, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locs(bins: [u16; 4]) -> String {
        bins.iter().map(|b| format!("<loc{b:04}>")).collect()
    }

    fn segs(codes: &[u8]) -> String {
        codes.iter().map(|c| format!("<seg{c:03}>")).collect()
    }

    #[test]
    fn loc_tokens_parse_to_box_in_pixels_with_y_first() {
        // 1023 is the far edge; x scales with width, y with height.
        let parsed = parse_detections(&format!("{} cat", locs([0, 341, 1023, 682])), 640, 480);
        assert_eq!(parsed.malformed, 0);
        let d = &parsed.objects[0];
        assert_eq!(d.label, "cat");
        assert_eq!(d.bbox.y_min, 0.0);
        assert_eq!(d.bbox.y_max, 480.0);
        assert_eq!(d.bbox.x_min, (341.0 / 1023.0 * 640.0) as f32);
        assert_eq!(d.bbox.x_max, (682.0 / 1023.0 * 640.0) as f32);
    }

    #[test]
    fn objects_separated_by_semicolons_keep_labels_with_spaces() {
        let text = format!(
            "{} red car ; {} traffic light ; {} cat",
            locs([1, 2, 3, 4]),
            locs([5, 6, 7, 8]),
            locs([10, 20, 30, 40])
        );
        let parsed = parse_detections(&text, 100, 100);
        assert_eq!(parsed.malformed, 0);
        let labels: Vec<_> = parsed.objects.iter().map(|d| d.label.as_str()).collect();
        assert_eq!(labels, ["red car", "traffic light", "cat"]);
    }

    #[test]
    fn blank_output_has_no_objects_and_nothing_malformed() {
        for text in ["", "  \n"] {
            assert_eq!(
                parse_detections(text, 10, 10),
                Parsed {
                    objects: vec![],
                    malformed: 0
                }
            );
        }
    }

    #[test]
    fn malformed_objects_are_dropped_and_counted() {
        let good = format!("{} dog", locs([10, 10, 20, 20]));
        let bad = [
            format!("{} too few", &locs([1, 2, 3, 4])[..18]),
            format!("{}{} too many", locs([1, 2, 3, 4]), locs([5, 5, 5, 5])),
            format!("{} flat in y", locs([20, 10, 20, 30])),
            format!("{} inverted x", locs([10, 30, 20, 10])),
            format!("a {} text first", locs([1, 2, 3, 4])),
            format!("{} <unused5> stray", locs([1, 2, 3, 4])),
            "<loc0001><loc0002><loc003><loc0004> three digits".to_string(),
            "<loc0001><loc0002><loc1024><loc0004> out of range".to_string(),
            "no box at all".to_string(),
            String::new(),
        ];
        let text = std::iter::once(good.clone())
            .chain(bad.iter().cloned())
            .chain([good])
            .collect::<Vec<_>>()
            .join(" ; ");
        let parsed = parse_detections(&text, 100, 100);
        assert_eq!(parsed.objects.len(), 2);
        assert_eq!(parsed.malformed, bad.len());
    }

    #[test]
    fn rejection_reasons_carry_the_evidence() {
        let err = |t: &str, n| parse_object(t, n).err();
        assert!(matches!(
            err("<loc0001><loc0002><loc1500><loc0004> x", 0),
            Some(ObjectError::LocOutOfRange { found: 1500, .. })
        ));
        assert!(matches!(
            err("<loc0001><loc0002> x", 0),
            Some(ObjectError::LocCount { found: 2, .. })
        ));
        let seven = format!("{}{} x", locs([1, 2, 3, 4]), segs(&[1; 7]));
        assert!(matches!(
            err(&seven, 16),
            Some(ObjectError::SegCount {
                expected: 16,
                found: 7,
                ..
            })
        ));
        assert!(matches!(
            err(&format!("{} x", locs([9, 2, 3, 4])), 0),
            Some(ObjectError::EmptyBox { y_min: 9, y_max: 3, .. })
        ));
    }

    #[test]
    fn segmentation_objects_carry_bins_and_sixteen_codes() {
        let codes: Vec<u8> = (0..16).map(|i| i * 8 + 7).collect();
        let text = format!(
            "{}{} left cat ; {} {} right cat",
            locs([100, 200, 300, 400]),
            segs(&codes),
            locs([1, 2, 3, 4]),
            segs(&[0; 16])
        );
        let parsed = parse_segmentation(&text);
        assert_eq!(parsed.malformed, 0);
        let first = &parsed.objects[0];
        assert_eq!(first.label, "left cat");
        assert_eq!(
            first.bins,
            BoxBins {
                y_min: 100,
                x_min: 200,
                y_max: 300,
                x_max: 400
            }
        );
        assert_eq!(first.codes.to_vec(), codes);
        assert_eq!(parsed.objects[1].label, "right cat");
    }

    #[test]
    fn segmentation_rejects_out_of_range_or_missing_codes() {
        let mut codes = [5u8; 16];
        codes[3] = 128;
        let bad = [
            format!("{}{} out of range", locs([1, 2, 3, 4]), segs(&codes)),
            format!("{}{} fifteen", locs([1, 2, 3, 4]), segs(&[5; 15])),
            format!("{}{} seventeen", locs([1, 2, 3, 4]), segs(&[5; 17])),
            format!("{} none", locs([1, 2, 3, 4])),
        ];
        let parsed = parse_segmentation(&bad.join(" ; "));
        assert_eq!((parsed.objects.len(), parsed.malformed), (0, 4));
        assert!(matches!(
            parse_object(&bad[0], SEG_TOKENS),
            Err(ObjectError::SegOutOfRange { found: 128, .. })
        ));
    }

    #[test]
    fn detection_rejects_objects_with_mask_codes() {
        let text = format!("{}{} cat", locs([1, 2, 3, 4]), segs(&[0; 16]));
        assert_eq!(parse_detections(&text, 10, 10).malformed, 1);
    }

    #[test]
    fn detection_serialises_as_label_and_xyxy_box() {
        let d = Detection {
            label: "cat".into(),
            bbox: BoundingBox {
                x_min: 1.5,
                y_min: 2.0,
                x_max: 3.0,
                y_max: 4.0,
            },
        };
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, r#"{"label":"cat","box":[1.5,2.0,3.0,4.0]}"#);
    }
}
