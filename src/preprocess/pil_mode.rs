//! What PIL knows of an image beyond its pixels, and Pillow's `convert("RGB")` from it: the mode
//! PIL opens each decoded layout as (16-bit grey is "I;16"), PNG's tRNS and GIF's transparency
//! index as `info["transparency"]`, and GIF's first frame on its logical screen.

use image::{DynamicImage, ImageFormat, RgbImage, RgbaImage};

/// What PIL's open would know beyond the pixels: the source mode and `info["transparency"]`.
pub(super) enum PilSource {
    Png(PngHeader),
    Gif(GifFirstFrame),
    Other,
}

impl PilSource {
    pub(super) fn scan(format: ImageFormat, bytes: &[u8]) -> Self {
        let scanned = match format {
            ImageFormat::Png => PngHeader::scan(bytes).map(Self::Png),
            ImageFormat::Gif => GifFirstFrame::scan(bytes).map(Self::Gif),
            _ => None,
        };
        scanned.unwrap_or(Self::Other)
    }

    /// Pillow's `convert("RGB")` of the decoded pixels: a GIF's first frame on its screen, else
    /// [`pil_rgb`] for the mode PIL opens the layout as; `None` for float pixels.
    pub(super) fn convert_rgb(&self, decoded: DynamicImage) -> Option<RgbImage> {
        match (self, decoded) {
            (Self::Gif(gif), DynamicImage::ImageRgba8(canvas)) => Some(gif.first_frame_rgb(&canvas)),
            (_, decoded) => pil_rgb(decoded, self.gray16()),
        }
    }

    /// True when a 16-bit grey+alpha buffer is really PIL's "I;16" (16-bit grey PNG whose tRNS
    /// the decoder expanded to alpha), which PIL saturates rather than shifts.
    fn gray16(&self) -> bool {
        matches!(self, Self::Png(h) if h.color_type == 0 && h.bit_depth == 16)
    }

    /// The RGB colour PIL leaves in `info["transparency"]` after `convert("RGB")`.
    pub(super) fn transparent_color(&self) -> Option<[u8; 3]> {
        match self {
            Self::Png(h) => h.transparent_color(),
            Self::Gif(g) => g.transparent.map(|i| g.palette_color(i)),
            Self::Other => None,
        }
    }
}

/// The PNG chunks before the first IDAT that decide PIL's mode and transparency.
///
/// Read by hand, not through the `png` crate: png 0.18 keeps only the low byte of a grey or RGB
/// tRNS sample in images under 16 bits (`parse_trns`), while Pillow compares the whole 16-bit
/// sample, so a sample above 255 must never match.
pub(super) struct PngHeader {
    color_type: u8,
    bit_depth: u8,
    palette: Vec<u8>,
    trns: Option<Vec<u8>>,
}

impl PngHeader {
    fn scan(bytes: &[u8]) -> Option<Self> {
        let mut rest = bytes.get(8..)?;
        let mut header: Option<Self> = None;
        while rest.len() >= 12 {
            let len = usize::try_from(u32::from_be_bytes(rest[..4].try_into().ok()?)).ok()?;
            let kind = &rest[4..8];
            let data = rest.get(8..8usize.checked_add(len)?)?;
            match kind {
                b"IHDR" if data.len() >= 10 => {
                    header = Some(Self {
                        bit_depth: data[8],
                        color_type: data[9],
                        palette: Vec::new(),
                        trns: None,
                    })
                }
                b"PLTE" => header.as_mut()?.palette = data.to_vec(),
                b"tRNS" => header.as_mut()?.trns = Some(data.to_vec()),
                b"IDAT" | b"IEND" => break,
                _ => {}
            }
            rest = rest.get(len.checked_add(12)?..)?;
        }
        header
    }

    /// Pillow's `PngImagePlugin.chunk_tRNS` followed by `convert("RGB")`.
    fn transparent_color(&self) -> Option<[u8; 3]> {
        let trns = self.trns.as_deref()?;
        // tRNS samples are 16-bit; one above 255 can never equal an 8-bit pixel.
        let sample = |i: usize| -> Option<u8> {
            let v = u16::from_be_bytes(trns.get(i..i + 2)?.try_into().ok()?);
            u8::try_from(v).ok()
        };
        match self.color_type {
            // "P": only a tRNS with exactly one 0 among 255s becomes an index; any other
            // alpha table is bytes, which `convert("RGB")` drops.
            3 => {
                let index = simple_palette_index(trns)?;
                let rgb = self.palette.get(3 * index..3 * index + 3)?;
                Some([rgb[0], rgb[1], rgb[2]])
            }
            // "L" (8-bit and below): PIL compares the 8-bit values with the raw sample.
            0 if self.bit_depth <= 8 => sample(0).map(|g| [g; 3]),
            // "RGB", 8 or 16 bits: PIL compares its 8-bit pixels with the raw samples, so only a
            // colour with every sample below 256 can match.
            2 => Some([sample(0)?, sample(2)?, sample(4)?]),
            _ => None,
        }
    }
}

/// Pillow's `_simple_palette` regex `^\xff*\x00\xff*$`; Python's `$` also matches before a final
/// b"\n", so one trailing 0x0a byte is tolerated.
fn simple_palette_index(trns: &[u8]) -> Option<usize> {
    let simple = |s: &[u8]| s.iter().filter(|&&b| b == 0).count() == 1 && s.iter().all(|&b| b == 0 || b == 0xff);
    let body = if simple(trns) {
        trns
    } else {
        trns.strip_suffix(b"\n").filter(|s| simple(s))?
    };
    body.iter().position(|&b| b == 0)
}

/// What decides PIL's first frame of a GIF.
pub(super) struct GifFirstFrame {
    /// left, top, width, height of the first frame on the logical screen.
    frame: (u32, u32, u32, u32),
    /// The local colour table if present, else the global one; RGB triplets.
    palette: Vec<u8>,
    transparent: Option<u8>,
}

impl GifFirstFrame {
    /// The screen's and the first frame's descriptors through the `gif` crate (the decoder the
    /// `image` crate uses), without decoding any pixel: the graphic control extension before the
    /// frame gives its transparency index, as in Pillow's `GifImagePlugin`.
    fn scan(bytes: &[u8]) -> Option<Self> {
        let mut options = gif::DecodeOptions::new();
        options.set_color_output(gif::ColorOutput::Indexed);
        options.skip_frame_decoding(true);
        let mut decoder = options.read_info(bytes).ok()?;
        let global = decoder.global_palette().map(<[u8]>::to_vec);
        let frame = decoder.next_frame_info().ok()??;
        Some(Self {
            frame: (frame.left.into(), frame.top.into(), frame.width.into(), frame.height.into()),
            palette: frame.palette.clone().or(global).unwrap_or_default(),
            transparent: frame.transparent,
        })
    }

    fn palette_color(&self, index: u8) -> [u8; 3] {
        let i = 3 * usize::from(index);
        match self.palette.get(i..i + 3) {
            Some(c) => [c[0], c[1], c[2]],
            None => [0; 3],
        }
    }

    /// PIL's first frame in RGB: the frame's palette colours, and outside the frame the
    /// transparency index if any, else index 0 (the `image` crate leaves black there).
    fn first_frame_rgb(&self, canvas: &RgbaImage) -> RgbImage {
        let fill = self.palette_color(self.transparent.unwrap_or(0));
        let (left, top, w, h) = self.frame;
        let inside = |x: u32, y: u32| x >= left && y >= top && x - left < w && y - top < h;
        RgbImage::from_fn(canvas.width(), canvas.height(), |x, y| {
            if inside(x, y) {
                let p = canvas.get_pixel(x, y).0;
                image::Rgb([p[0], p[1], p[2]])
            } else {
                image::Rgb(fill)
            }
        })
    }
}

/// Pillow's `convert("RGB")` from the mode PIL opens each decoded layout as. Alpha is dropped,
/// never composited. 16-bit RGB(A) and grey+alpha keep the high byte (PIL's `;16B` raw modes);
/// 16-bit grey is PIL's "I;16", which saturates at 255. `None` for float pixels.
fn pil_rgb(img: DynamicImage, gray16: bool) -> Option<RgbImage> {
    let (w, h) = (img.width(), img.height());
    let gray = |v: u8| image::Rgb([v; 3]);
    let saturate = |v: u16| u8::try_from(v).unwrap_or(u8::MAX);
    let high = |v: u16| v.to_be_bytes()[0];
    Some(match img {
        DynamicImage::ImageRgb8(i) => i,
        DynamicImage::ImageRgba8(i) => RgbImage::from_fn(w, h, |x, y| {
            let p = i.get_pixel(x, y).0;
            image::Rgb([p[0], p[1], p[2]])
        }),
        DynamicImage::ImageLuma8(i) => RgbImage::from_fn(w, h, |x, y| gray(i.get_pixel(x, y).0[0])),
        DynamicImage::ImageLumaA8(i) => RgbImage::from_fn(w, h, |x, y| gray(i.get_pixel(x, y).0[0])),
        DynamicImage::ImageLuma16(i) => RgbImage::from_fn(w, h, |x, y| gray(saturate(i.get_pixel(x, y).0[0]))),
        DynamicImage::ImageLumaA16(i) => RgbImage::from_fn(w, h, |x, y| {
            let v = i.get_pixel(x, y).0[0];
            gray(if gray16 { saturate(v) } else { high(v) })
        }),
        DynamicImage::ImageRgb16(i) => RgbImage::from_fn(w, h, |x, y| image::Rgb(i.get_pixel(x, y).0.map(high))),
        DynamicImage::ImageRgba16(i) => RgbImage::from_fn(w, h, |x, y| {
            let p = i.get_pixel(x, y).0;
            image::Rgb([high(p[0]), high(p[1]), high(p[2])])
        }),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_palette_transparency_follows_pillow_regex() {
        assert_eq!(simple_palette_index(b"\xff\xff\x00\xff"), Some(2));
        assert_eq!(simple_palette_index(b"\x00"), Some(0));
        assert_eq!(simple_palette_index(b"\xff\x00\n"), Some(1));
        assert_eq!(simple_palette_index(b"\xff\x00\x80"), None);
        assert_eq!(simple_palette_index(b"\x00\x00"), None);
        assert_eq!(simple_palette_index(b"\xff\xff"), None);
    }
}
