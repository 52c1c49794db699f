//! Decoding an image file as transformers 5.23 `image_utils.load_image` does: PIL's `Image.open`
//! (format from the content), the decompression-bomb guard, `convert("RGB")` with Pillow 13's rules
//! per source mode, then `ImageOps.exif_transpose` (orientation from EXIF, else XMP).

use std::io::Cursor;
use std::path::Path;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

use super::jpeg::decode_jpeg;
use super::pil_mode::PilSource;
use super::{ImageLimits, LoadedImage, PreprocessError};
use crate::input::read_regular_file;

/// Loads an image file the way `transformers.image_utils.load_image` does (format from the
/// content, never the extension).
pub fn load_image(path: &Path, limits: &ImageLimits) -> Result<LoadedImage, PreprocessError> {
    let bytes = read_regular_file(path, "image file", limits.max_bytes)?;
    decode_named(&bytes, &path.display().to_string(), limits)
}

/// Decodes an encoded image held in memory (e.g. an HTTP upload), like [`load_image`].
pub fn decode_image(bytes: &[u8], limits: &ImageLimits) -> Result<LoadedImage, PreprocessError> {
    decode_named(bytes, "from the request", limits)
}

fn decode_named(bytes: &[u8], image: &str, limits: &ImageLimits) -> Result<LoadedImage, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty { image: image.to_owned() });
    }
    // 1. Format from the magic bytes, like PIL's `Image.open`.
    let format = image::guess_format(bytes).map_err(|_| PreprocessError::UnrecognizedFormat { image: image.to_owned() })?;
    let decoded = match format {
        ImageFormat::Jpeg => decode_jpeg(bytes, image, limits)?,
        _ => decode_with_image_crate(bytes, format, image, limits)?,
    };
    // 5. `exif_transpose` (the pixel-wise conversion to RGB commutes with it).
    let mut upright = DynamicImage::ImageRgb8(decoded.rgb);
    upright.apply_orientation(decoded.orientation);
    Ok(LoadedImage {
        rgb: upright.into_rgb8(),
        transparent_color: decoded.transparent_color,
    })
}
/// An image after PIL's `convert("RGB")`, before `exif_transpose`.
pub(super) struct Decoded {
    /// [height, width, 3] as stored in the file.
    pub(super) rgb: RgbImage,
    pub(super) orientation: Orientation,
    pub(super) transparent_color: Option<[u8; 3]>,
}

/// Step 2 of decoding: PIL's decompression-bomb guard, from the header before any pixel.
pub(super) fn check_pixel_limit(image: &str, width: u32, height: u32, limits: &ImageLimits) -> Result<(), PreprocessError> {
    let pixels = u64::from(width.max(1)) * u64::from(height.max(1));
    if pixels > limits.max_pixels {
        return Err(PreprocessError::TooManyPixels {
            image: image.to_owned(),
            width,
            height,
            pixels,
            limit: limits.max_pixels,
        });
    }
    Ok(())
}

/// Every format but JPEG: the `image` crate's decoders, which match PIL's pixels on them.
fn decode_with_image_crate(bytes: &[u8], format: ImageFormat, image: &str, limits: &ImageLimits) -> Result<Decoded, PreprocessError> {
    let name = || image.to_owned();
    let decode_error = |e: image::ImageError| match e {
        image::ImageError::Unsupported(u) => PreprocessError::UnsupportedFeature {
            image: name(),
            format,
            detail: u.to_string(),
        },
        other => PreprocessError::Corrupt {
            image: name(),
            format,
            detail: other.to_string(),
        },
    };
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    // The pixel limit below replaces the crate's allocation cap, which is stricter than PIL's.
    reader.no_limits();
    let mut decoder = reader.into_decoder().map_err(decode_error)?;

    // 2. Decompression-bomb guard from the header, before the pixels are decoded.
    let (width, height) = decoder.dimensions();
    check_pixel_limit(image, width, height, limits)?;
    if width == 0 || height == 0 {
        return Err(PreprocessError::Corrupt {
            image: name(),
            format,
            detail: format!("header declares {width}x{height} pixels"),
        });
    }

    // 3. Orientation from EXIF, else from XMP, as PIL's `Image.getexif` does.
    let exif = decoder.exif_metadata().map_err(decode_error)?;
    let orientation = match exif.as_deref().and_then(Orientation::from_exif_chunk) {
        Some(o) => o,
        None => match decoder.xmp_metadata().map_err(decode_error)?.as_deref().and_then(xmp_orientation) {
            Some(o) => o,
            // TIFF keeps its orientation in a tag of its own, not in an EXIF chunk.
            None => decoder.orientation().map_err(decode_error)?,
        },
    };

    // 4. Pixels, then PIL's `convert("RGB")` for the mode PIL would have opened.
    let decoded = DynamicImage::from_decoder(decoder).map_err(decode_error)?;
    let pil = PilSource::scan(format, bytes);
    let rgb = pil.convert_rgb(decoded).ok_or_else(|| PreprocessError::UnsupportedFeature {
        image: name(),
        format,
        detail: "floating-point pixels, which PIL does not open as RGB".to_owned(),
    })?;
    Ok(Decoded {
        rgb,
        orientation,
        transparent_color: pil.transparent_color(),
    })
}

/// PIL's XMP fallback in `Image.getexif`: the first match of `tiff:Orientation(="|>)([0-9])`.
pub(super) fn xmp_orientation(xmp: &[u8]) -> Option<Orientation> {
    const TAG: &[u8] = b"tiff:Orientation";
    (0..xmp.len())
        .filter(|&i| xmp[i..].starts_with(TAG))
        .find_map(|i| {
            let digit = match &xmp[i + TAG.len()..] {
                [b'>', d, ..] | [b'=', b'"', d, ..] => *d,
                _ => return None,
            };
            digit.is_ascii_digit().then_some(digit - b'0')
        })
        .and_then(Orientation::from_exif)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xmp_orientation_reads_attribute_and_element_forms() {
        assert_eq!(xmp_orientation(br#"<x tiff:Orientation="6"/>"#), Some(Orientation::Rotate90));
        assert_eq!(
            xmp_orientation(b"<tiff:Orientation>3</tiff:Orientation>"),
            Some(Orientation::Rotate180)
        );
        assert_eq!(xmp_orientation(b"<x/>"), None);
    }
}
