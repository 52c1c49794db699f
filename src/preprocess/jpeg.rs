//! JPEG through libjpeg-turbo's decoder (MozJPEG's vendored copy, `mozjpeg` crate) with Pillow's
//! settings (`src/libImaging/JpegDecode.c`), then Pillow's "CMYK;I" unpacking and `cmyk2rgb`: the
//! same bytes as Pillow 13's bundled libjpeg-turbo 3 on every tested JPEG (baseline and
//! progressive, 4:2:0, 4:2:2, 4:4:4, grey, Adobe CMYK and YCCK, restart markers).

use std::cell::Cell;
use std::io::{self, BufRead};
use std::panic::{self, AssertUnwindSafe};

use image::metadata::Orientation;
use image::{ImageFormat, RgbImage};
use mozjpeg::decompress::MarkerData;
use mozjpeg::{ColorSpace, Decompress, Marker};

use super::decode::{check_pixel_limit, xmp_orientation, Decoded};
use super::{ImageLimits, PreprocessError};

/// JPEG through libjpeg-turbo's decoder (MozJPEG's copy) set up as Pillow's `JpegDecode.c`
/// sets up its bundled libjpeg-turbo: library defaults (ISLOW integer IDCT, fancy upsampling,
/// colour space guessed from the JFIF/Adobe markers), output L, RGB or CMYK by the component
/// count as `JpegImagePlugin.SOF` picks the mode. libjpeg reports fatal errors by unwinding
/// (the `mozjpeg` crate's error handler); they are caught here and become errors.
pub(super) fn decode_jpeg(bytes: &[u8], image: &str, limits: &ImageLimits) -> Result<Decoded, PreprocessError> {
    let ran_out = Cell::new(false);
    let source = EndWatch {
        rest: bytes,
        ran_out: &ran_out,
    };
    let corrupt = |detail: String| PreprocessError::Corrupt {
        image: image.to_owned(),
        format: ImageFormat::Jpeg,
        detail: if ran_out.get() {
            format!("the data ends before the image does; {detail}")
        } else {
            detail
        },
    };
    let unwound = panic::catch_unwind(AssertUnwindSafe(|| decode_jpeg_unwinding(source, &ran_out, image, limits)));
    match unwound {
        Ok(Ok(decoded)) => Ok(decoded),
        Ok(Err(JpegFailure::Io(e))) => Err(corrupt(e.to_string())),
        Ok(Err(JpegFailure::Preprocess(e))) => Err(e),
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("libjpeg failed without a message");
            // The features a libjpeg-turbo build may lack, or PIL refuses (12-bit samples).
            if ["not implemented", "Unsupported JPEG", "not compiled"]
                .iter()
                .any(|m| message.contains(m))
            {
                Err(PreprocessError::UnsupportedFeature {
                    image: image.to_owned(),
                    format: ImageFormat::Jpeg,
                    detail: message.to_owned(),
                })
            } else {
                Err(corrupt(message.to_owned()))
            }
        }
    }
}

enum JpegFailure {
    Io(io::Error),
    Preprocess(PreprocessError),
}

impl From<io::Error> for JpegFailure {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// The body of [`decode_jpeg`]; libjpeg's fatal errors unwind out of it.
fn decode_jpeg_unwinding(source: EndWatch<'_>, ran_out: &Cell<bool>, image: &str, limits: &ImageLimits) -> Result<Decoded, JpegFailure> {
    let fail = |e: PreprocessError| JpegFailure::Preprocess(e);
    let decompress = Decompress::builder().with_markers(&[Marker::APP(1)]).from_reader(source)?;
    let (width, height) = (decompress.width(), decompress.height());
    let to_u32 = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    check_pixel_limit(image, to_u32(width), to_u32(height), limits).map_err(fail)?;
    let orientation = jpeg_orientation(decompress.markers());
    let components = decompress.components().len();
    let mut started = match components {
        1 => decompress.grayscale()?,
        3 => decompress.rgb()?,
        // Pillow's raw mode "CMYK;I": libjpeg's CMYK (YCCK converted), inverted by PIL.
        4 => decompress.to_colorspace(ColorSpace::JCS_CMYK)?,
        n => {
            return Err(fail(PreprocessError::UnsupportedFeature {
                image: image.to_owned(),
                format: ImageFormat::Jpeg,
                detail: format!("{n} colour components; PIL opens only 1 (L), 3 (RGB) and 4 (CMYK)"),
            }))
        }
    };
    // [height, width, components]
    let samples: Vec<u8> = started.read_scanlines()?;
    // PIL's decoder suspends at the end of the data: "truncated" unless every row is out.
    if ran_out.get() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "libjpeg would fill the missing rows with grey").into());
    }
    // PIL then reads the markers up to EOI (`jpeg_finish_decompress`), where a fatal error (e.g.
    // a second SOI) still fails the load, but running out of data does not.
    started.finish()?;
    let rgb: Vec<u8> = match components {
        1 => samples.iter().flat_map(|&v| [v; 3]).collect(),
        3 => samples,
        _ => samples
            .chunks_exact(4)
            .flat_map(|cmyk| pil_inverted_cmyk_to_rgb([cmyk[0], cmyk[1], cmyk[2], cmyk[3]]))
            .collect(),
    };
    let rgb = RgbImage::from_raw(to_u32(width), to_u32(height), rgb).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("libjpeg returned fewer samples than {width}x{height}x{components}"),
        )
    })?;
    Ok(Decoded {
        rgb,
        orientation,
        transparent_color: None,
    })
}

/// The bytes libjpeg reads, noting when it asks for more than there are (libjpeg then fakes an
/// end-of-image marker and only warns).
struct EndWatch<'a> {
    rest: &'a [u8],
    ran_out: &'a Cell<bool>,
}

impl io::Read for EndWatch<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = buf.len().min(available.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl io::BufRead for EndWatch<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.rest.is_empty() {
            self.ran_out.set(true);
        }
        Ok(self.rest)
    }

    fn consume(&mut self, amount: usize) {
        self.rest = self.rest.get(amount..).unwrap_or_default();
    }
}

/// Orientation from a JPEG's APP1 segments as `JpegImagePlugin.APP` and `Image.getexif` read
/// them: the "Exif" segments concatenated (first in full, later ones after their 6-byte
/// prefix), else `tiff:Orientation` in the last XMP segment.
fn jpeg_orientation<'a>(app1: impl Iterator<Item = MarkerData<'a>>) -> Orientation {
    const EXIF: &[u8] = b"Exif\0\0";
    const XMP: &[u8] = b"http://ns.adobe.com/xap/1.0/\0";
    let mut exif: Vec<u8> = Vec::new();
    let mut xmp: Option<&[u8]> = None;
    for segment in app1 {
        if let Some(body) = segment.data.strip_prefix(EXIF) {
            exif.extend_from_slice(body);
        } else if let Some(body) = segment.data.strip_prefix(XMP) {
            xmp = Some(body);
        }
    }
    Orientation::from_exif_chunk(&exif)
        .or_else(|| xmp.and_then(xmp_orientation))
        .unwrap_or(Orientation::NoTransforms)
}

/// Pillow's unpacker for "CMYK;I" (every sample inverted) followed by `Convert.c` `cmyk2rgb`:
/// `nk - nk * c / 255` per channel with `nk = 255 - k`, the division rounded as `MULDIV255`.
fn pil_inverted_cmyk_to_rgb(raw: [u8; 4]) -> [u8; 3] {
    let [c, m, y, k] = raw.map(|v| 255 - u32::from(v));
    let nk = 255 - k;
    let muldiv255 = |a: u32, b: u32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    // nk - muldiv255(x, nk) is in 0..=255 for every x, nk in 0..=255: CLIP8 never clips.
    [c, m, y].map(|x| u8::try_from(nk - muldiv255(x, nk)).unwrap_or(u8::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little-endian TIFF header with one IFD0 entry: Orientation (0x0112, SHORT) = `value`.
    fn exif_with_orientation(value: u8) -> Vec<u8> {
        let mut tiff = b"Exif\0\0II*\0\x08\0\0\0\x01\0\x12\x01\x03\0\x01\0\0\0".to_vec();
        tiff.extend_from_slice(&[value, 0, 0, 0, 0, 0, 0, 0]);
        tiff
    }

    fn app1(data: &[u8]) -> MarkerData<'_> {
        MarkerData {
            marker: Marker::APP(1),
            data,
        }
    }

    #[test]
    fn jpeg_orientation_prefers_exif_then_the_last_xmp_segment() {
        let exif = exif_with_orientation(6);
        let xmp3 = b"http://ns.adobe.com/xap/1.0/\0<x tiff:Orientation=\"3\"/>";
        let xmp8 = b"http://ns.adobe.com/xap/1.0/\0<x tiff:Orientation=\"8\"/>";
        let both = [app1(xmp3), app1(&exif)];
        assert_eq!(jpeg_orientation(both.into_iter()), Orientation::Rotate90);
        let xmps = [app1(xmp3), app1(xmp8)];
        assert_eq!(jpeg_orientation(xmps.into_iter()), Orientation::Rotate270);
        assert_eq!(jpeg_orientation(std::iter::empty()), Orientation::NoTransforms);
    }

    #[test]
    fn inverted_cmyk_keeps_paper_white_and_full_black_ink_black() {
        // Adobe CMYK stores 255 - ink: no ink is 255 everywhere, full black ink is K = 0.
        assert_eq!(pil_inverted_cmyk_to_rgb([255, 255, 255, 255]), [255; 3]);
        assert_eq!(pil_inverted_cmyk_to_rgb([255, 255, 255, 0]), [0; 3]);
        assert_eq!(pil_inverted_cmyk_to_rgb([0, 255, 255, 255]), [0, 255, 255]);
    }

    #[test]
    fn end_watch_notes_a_read_past_the_end() {
        let ran_out = Cell::new(false);
        let mut source = EndWatch {
            rest: b"abc",
            ran_out: &ran_out,
        };
        let mut buf = [0u8; 2];
        assert_eq!(io::Read::read(&mut source, &mut buf).unwrap(), 2);
        assert_eq!(source.fill_buf().unwrap(), b"c");
        source.consume(1);
        assert!(!ran_out.get());
        assert!(source.fill_buf().unwrap().is_empty());
        assert!(ran_out.get());
    }
}
