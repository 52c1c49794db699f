//! Draw detections and segments onto an image for a visual check: translucent mask fills, box
//! outlines and labels.
//!
//! Follows the look of the big_vision PaliGemma demo (`big-vision/paligemma` Hugging Face space):
//! one colour per label from the demo's palette, masks blended at half opacity, the label on a
//! filled tab above its box. Labels use a built-in 5x7 ASCII bitmap font (glyphs drawn for this
//! crate) so that no font file or text-rendering dependency is needed; other characters show as `?`.

use image::{Rgb, RgbImage};

use crate::detect::{BoundingBox, Detection};
use crate::segment::Segment;

/// Why [`annotate`] cannot draw the objects onto an image.
#[derive(Debug, thiserror::Error)]
pub enum AnnotateError {
    /// A segment's mask is not the size of the image it is drawn onto.
    #[error(
        "mask of {label:?} is {mask_width}x{mask_height} but the image is {width}x{height}; build masks for the image being annotated"
    )]
    MaskSize {
        /// The segment's label.
        label: String,
        /// The mask's width in pixels.
        mask_width: u32,
        /// The mask's height in pixels.
        mask_height: u32,
        /// The image's width in pixels.
        width: u32,
        /// The image's height in pixels.
        height: u32,
    },
}

/// The demo's five colours first, then three more so that eight labels stay distinct.
const PALETTE: [[u8; 3]; 8] = [
    [0x42, 0x85, 0xF4],
    [0xDB, 0x44, 0x37],
    [0xF4, 0xB4, 0x00],
    [0x0F, 0x9D, 0x58],
    [0xE4, 0x8E, 0xF1],
    [0x00, 0xAC, 0xC1],
    [0xFF, 0x70, 0x43],
    [0x9E, 0x9D, 0x24],
];

/// Weight of the label colour over the image inside a mask.
const MASK_OPACITY: f32 = 0.5;

/// Copy of `image` with masks, then boxes, then labels drawn (labels last so no outline crosses
/// text). Objects with the same label share a colour.
pub fn annotate(image: &RgbImage, detections: &[Detection], segments: &[Segment]) -> Result<RgbImage, AnnotateError> {
    let (width, height) = image.dimensions();
    let mut out = image.clone();
    let mut labels: Vec<String> = Vec::new();
    let mut colour_of = |label: &str| {
        let index = labels.iter().position(|l| l == label).unwrap_or_else(|| {
            labels.push(label.to_string());
            labels.len() - 1
        });
        Rgb(PALETTE[index % PALETTE.len()])
    };

    for segment in segments {
        let mask = &segment.mask;
        if mask.width() != width || mask.height() != height {
            return Err(AnnotateError::MaskSize {
                label: segment.label.clone(),
                mask_width: mask.width(),
                mask_height: mask.height(),
                width,
                height,
            });
        }
        let colour = colour_of(&segment.label);
        for (pixel, &on) in out.pixels_mut().zip(mask.data()) {
            if on {
                *pixel = blend(*pixel, colour, MASK_OPACITY);
            }
        }
    }

    let objects: Vec<(&str, BoundingBox)> = detections
        .iter()
        .map(|d| (d.label.as_str(), d.bbox))
        .chain(segments.iter().map(|s| (s.label.as_str(), s.bbox)))
        .collect();
    // Strokes and text grow with the image so they stay visible on large photos.
    let scale = (width.min(height) / 320).max(1) as i64;
    let tabs: Vec<_> = objects
        .iter()
        .map(|&(label, bbox)| {
            let colour = colour_of(label);
            let rect = PixelRect::covering(&bbox, width, height);
            draw_outline(&mut out, rect, scale, colour);
            (label, rect, colour)
        })
        .collect();
    for (label, rect, colour) in tabs {
        draw_label(&mut out, label, rect, scale, colour);
    }
    Ok(out)
}

/// Pixel rectangle with exclusive right and bottom edges, possibly reaching outside the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PixelRect {
    x0: i64,
    y0: i64,
    x1: i64,
    y1: i64,
}

impl PixelRect {
    /// The whole pixels a box touches in a `width` x `height` image, edges beyond the image
    /// moved to just outside it so later arithmetic cannot overflow (`as` maps NaN to 0).
    fn covering(b: &BoundingBox, width: u32, height: u32) -> Self {
        let (w, h) = (i64::from(width) + 1, i64::from(height) + 1);
        Self {
            x0: (b.x_min.floor() as i64).clamp(-1, w),
            y0: (b.y_min.floor() as i64).clamp(-1, h),
            x1: (b.x_max.ceil() as i64).clamp(-1, w),
            y1: (b.y_max.ceil() as i64).clamp(-1, h),
        }
    }
}

fn blend(under: Rgb<u8>, over: Rgb<u8>, opacity: f32) -> Rgb<u8> {
    let mix = |u: u8, o: u8| (f32::from(u) * (1.0 - opacity) + f32::from(o) * opacity).round() as u8;
    Rgb([mix(under[0], over[0]), mix(under[1], over[1]), mix(under[2], over[2])])
}

/// Fills `rect` clipped to the image.
fn fill(image: &mut RgbImage, rect: PixelRect, colour: Rgb<u8>) {
    let (width, height) = (i64::from(image.width()), i64::from(image.height()));
    for y in rect.y0.max(0)..rect.y1.min(height) {
        for x in rect.x0.max(0)..rect.x1.min(width) {
            // Clipped to the image above, so both fit in u32.
            image.put_pixel(x as u32, y as u32, colour);
        }
    }
}

/// A frame of `thickness` pixels on the inside of `rect`.
fn draw_outline(image: &mut RgbImage, rect: PixelRect, thickness: i64, colour: Rgb<u8>) {
    let PixelRect { x0, y0, x1, y1 } = rect;
    let t = thickness.min((x1 - x0 + 1) / 2).min((y1 - y0 + 1) / 2).max(1);
    fill(image, PixelRect { x0, y0, x1, y1: y0 + t }, colour);
    fill(image, PixelRect { x0, y0: y1 - t, x1, y1 }, colour);
    fill(image, PixelRect { x0, y0, x1: x0 + t, y1 }, colour);
    fill(image, PixelRect { x0: x1 - t, y0, x1, y1 }, colour);
}

/// The label on a filled tab above the box, or just inside its top when there is no room above.
fn draw_label(image: &mut RgbImage, label: &str, rect: PixelRect, scale: i64, colour: Rgb<u8>) {
    if label.is_empty() {
        return;
    }
    let chars = label.chars().count() as i64;
    let (tab_width, tab_height) = ((GLYPH_ADVANCE * chars + 1) * scale, (GLYPH_HEIGHT + 2) * scale);
    let top = if rect.y0 >= tab_height {
        rect.y0 - tab_height
    } else {
        rect.y0.max(0)
    };
    let left = rect.x0.min(i64::from(image.width()) - tab_width).max(0);
    fill(
        image,
        PixelRect {
            x0: left,
            y0: top,
            x1: left + tab_width,
            y1: top + tab_height,
        },
        colour,
    );
    // Dark text on light tabs, light on dark (Rec. 601 luma).
    let luma = 0.299 * f32::from(colour[0]) + 0.587 * f32::from(colour[1]) + 0.114 * f32::from(colour[2]);
    let ink = if luma > 140.0 { Rgb([0, 0, 0]) } else { Rgb([255, 255, 255]) };
    for (i, c) in label.chars().enumerate() {
        let x = left + (1 + GLYPH_ADVANCE * i as i64) * scale;
        draw_glyph(image, glyph(c), x, top + scale, scale, ink);
    }
}

fn draw_glyph(image: &mut RgbImage, rows: &[u8; 7], x: i64, y: i64, scale: i64, ink: Rgb<u8>) {
    for (row, bits) in rows.iter().enumerate() {
        for col in 0..GLYPH_WIDTH {
            if bits >> (GLYPH_WIDTH - 1 - col) & 1 == 1 {
                let (px, py) = (x + col * scale, y + row as i64 * scale);
                fill(
                    image,
                    PixelRect {
                        x0: px,
                        y0: py,
                        x1: px + scale,
                        y1: py + scale,
                    },
                    ink,
                );
            }
        }
    }
}

const GLYPH_WIDTH: i64 = 5;
const GLYPH_HEIGHT: i64 = 7;
/// Glyph width plus one column of spacing.
const GLYPH_ADVANCE: i64 = GLYPH_WIDTH + 1;

/// The glyph of printable ASCII `c`, or of `?` for anything else.
fn glyph(c: char) -> &'static [u8; 7] {
    let index = match c {
        ' '..='~' => c as usize - ' ' as usize,
        _ => '?' as usize - ' ' as usize,
    };
    &FONT[index]
}

/// 5x7 glyphs for ' ' (0x20) to '~' (0x7E): seven rows top to bottom, bit 4 the leftmost column.
const FONT: [[u8; 7]; 95] = [
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // space
    [0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x04], // !
    [0x0A, 0x0A, 0x0A, 0x00, 0x00, 0x00, 0x00], // "
    [0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A], // #
    [0x04, 0x0F, 0x14, 0x0E, 0x05, 0x1E, 0x04], // $
    [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03], // %
    [0x0C, 0x12, 0x14, 0x08, 0x15, 0x12, 0x0D], // &
    [0x04, 0x04, 0x04, 0x00, 0x00, 0x00, 0x00], // '
    [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02], // (
    [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08], // )
    [0x00, 0x04, 0x15, 0x0E, 0x15, 0x04, 0x00], // *
    [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00], // +
    [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08], // ,
    [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00], // -
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C], // .
    [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00], // /
    [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E], // 0
    [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E], // 1
    [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F], // 2
    [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E], // 3
    [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02], // 4
    [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E], // 5
    [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E], // 6
    [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08], // 7
    [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E], // 8
    [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C], // 9
    [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00], // :
    [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x04, 0x08], // ;
    [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02], // <
    [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00], // =
    [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08], // >
    [0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04], // ?
    [0x0E, 0x11, 0x01, 0x0D, 0x15, 0x15, 0x0E], // @
    [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11], // A
    [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E], // B
    [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E], // C
    [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C], // D
    [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F], // E
    [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10], // F
    [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F], // G
    [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11], // H
    [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E], // I
    [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C], // J
    [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11], // K
    [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F], // L
    [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11], // M
    [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11], // N
    [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E], // O
    [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10], // P
    [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D], // Q
    [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11], // R
    [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E], // S
    [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04], // T
    [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E], // U
    [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04], // V
    [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A], // W
    [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11], // X
    [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04], // Y
    [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F], // Z
    [0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E], // [
    [0x00, 0x10, 0x08, 0x04, 0x02, 0x01, 0x00], // \
    [0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E], // ]
    [0x04, 0x0A, 0x11, 0x00, 0x00, 0x00, 0x00], // ^
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F], // _
    [0x08, 0x04, 0x02, 0x00, 0x00, 0x00, 0x00], // `
    [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F], // a
    [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E], // b
    [0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E], // c
    [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F], // d
    [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E], // e
    [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08], // f
    [0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E], // g
    [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11], // h
    [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E], // i
    [0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0C], // j
    [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12], // k
    [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E], // l
    [0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11], // m
    [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11], // n
    [0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E], // o
    [0x00, 0x00, 0x1E, 0x11, 0x1E, 0x10, 0x10], // p
    [0x00, 0x00, 0x0D, 0x13, 0x0F, 0x01, 0x01], // q
    [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10], // r
    [0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E], // s
    [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06], // t
    [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D], // u
    [0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04], // v
    [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A], // w
    [0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11], // x
    [0x00, 0x00, 0x11, 0x11, 0x0F, 0x01, 0x0E], // y
    [0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F], // z
    [0x02, 0x04, 0x04, 0x08, 0x04, 0x04, 0x02], // {
    [0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04], // |
    [0x08, 0x04, 0x04, 0x02, 0x04, 0x04, 0x08], // }
    [0x00, 0x00, 0x08, 0x15, 0x02, 0x00, 0x00], // ~
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::BinaryMask;

    const GREY: Rgb<u8> = Rgb([128, 128, 128]);

    fn detection(label: &str, x_min: f32, y_min: f32, x_max: f32, y_max: f32) -> Detection {
        Detection {
            label: label.into(),
            bbox: BoundingBox {
                x_min,
                y_min,
                x_max,
                y_max,
            },
        }
    }

    #[test]
    fn font_covers_printable_ascii_in_five_columns() {
        assert!(FONT.iter().flatten().all(|&row| row < 1 << GLYPH_WIDTH));
        assert!(FONT[0].iter().all(|&row| row == 0), "space is blank");
        assert!(FONT[1..].iter().all(|g| g.iter().any(|&row| row != 0)), "every other glyph has ink");
        assert_eq!(glyph('é'), glyph('?'));
    }

    #[test]
    fn box_outline_is_drawn_in_the_label_colour_and_the_rest_is_untouched() {
        let image = RgbImage::from_pixel(100, 80, GREY);
        let out = annotate(&image, &[detection("cat", 20.0, 30.0, 60.0, 70.0)], &[]).unwrap();
        let colour = Rgb(PALETTE[0]);
        assert_eq!(*out.get_pixel(20, 50), colour, "left edge");
        assert_eq!(*out.get_pixel(59, 50), colour, "right edge");
        assert_eq!(*out.get_pixel(40, 69), colour, "bottom edge");
        assert_eq!(*out.get_pixel(40, 50), GREY, "inside");
        assert_eq!(*out.get_pixel(90, 5), GREY, "far away");
    }

    #[test]
    fn label_tab_sits_above_the_box_with_text_in_it() {
        let image = RgbImage::from_pixel(100, 80, GREY);
        let out = annotate(&image, &[detection("cat", 20.0, 30.0, 60.0, 70.0)], &[]).unwrap();
        let tab_height = (GLYPH_HEIGHT + 2) as u32;
        let tab: Vec<Rgb<u8>> = (30 - tab_height..30)
            .flat_map(|y| (20..20 + 19).map(move |x| (x, y)))
            .map(|(x, y)| *out.get_pixel(x, y))
            .collect();
        assert!(tab.contains(&Rgb(PALETTE[0])), "tab background");
        assert!(tab.contains(&Rgb([255, 255, 255])), "text on the dark blue tab is white");
        assert_eq!(*out.get_pixel(20, 30 - tab_height - 1), GREY, "nothing above the tab");
    }

    #[test]
    fn masks_are_blended_and_labels_share_colours() {
        let image = RgbImage::from_pixel(40, 40, GREY);
        let mut data = vec![false; 40 * 40];
        data[20 * 40 + 20] = true;
        let mask = BinaryMask::from_raw(40, 40, data).unwrap();
        let segment = |label: &str| Segment {
            label: label.into(),
            bbox: BoundingBox {
                x_min: 15.0,
                y_min: 15.0,
                x_max: 25.0,
                y_max: 25.0,
            },
            mask: mask.clone(),
        };
        let out = annotate(&image, &[], &[segment("dog")]).unwrap();
        assert_eq!(*out.get_pixel(20, 20), blend(GREY, Rgb(PALETTE[0]), MASK_OPACITY));
        assert_eq!(*out.get_pixel(20, 21), GREY);

        let dog = detection("dog", 30.0, 30.0, 36.0, 36.0);
        let two = annotate(&image, &[dog], &[segment("cat"), segment("dog")]).unwrap();
        // "cat" is seen first and takes colour 0; both "dog"s take colour 1.
        assert_eq!(*two.get_pixel(30, 33), Rgb(PALETTE[1]));
        assert_eq!(*two.get_pixel(15, 20), Rgb(PALETTE[1]), "the dog segment's outline drawn last");
    }

    #[test]
    fn mask_of_another_size_is_rejected() {
        let image = RgbImage::from_pixel(10, 10, GREY);
        let segment = Segment {
            label: "cat".into(),
            bbox: BoundingBox {
                x_min: 0.0,
                y_min: 0.0,
                x_max: 1.0,
                y_max: 1.0,
            },
            mask: BinaryMask::new(9, 10).unwrap(),
        };
        assert!(matches!(
            annotate(&image, &[], &[segment]),
            Err(AnnotateError::MaskSize { mask_width: 9, .. })
        ));
    }

    #[test]
    fn boxes_outside_or_degenerate_do_not_panic() {
        let image = RgbImage::from_pixel(7, 5, GREY);
        let odd = [
            detection("off", -50.0, -50.0, -10.0, -10.0),
            detection("huge", -1e30, -1e30, 1e30, 1e30),
            detection("nan", f32::NAN, f32::NAN, f32::NAN, f32::NAN),
            detection("a very long label that does not fit ÿ", 1.0, 1.0, 2.0, 2.0),
            detection("", 3.0, 3.0, 3.0, 3.0),
        ];
        let out = annotate(&image, &odd, &[]).unwrap();
        assert_eq!(out.dimensions(), (7, 5));
        annotate(&RgbImage::new(0, 0), &odd, &[]).unwrap();
    }
}
