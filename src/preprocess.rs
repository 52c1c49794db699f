//! Image loading and SigLIP preprocessing, matching transformers + PIL pixel for pixel where noted.
//!
//! Ports, in pipeline order:
//! - transformers 5.23 `image_utils.load_image`: `PIL.ImageOps.exif_transpose`, then
//!   `Image.convert("RGB")` (Pillow 13 semantics per source mode, see [`pil_rgb`]);
//! - transformers 5.23 `image_transforms.convert_to_rgb`, which the processor runs again on the
//!   RGB image when `do_convert_rgb` is true: a transparency colour that Pillow carried through
//!   `convert` becomes white (PaliGemma's configs say `"do_convert_rgb": null`, which skips it);
//! - `SiglipImageProcessorPil` (transformers 5.23 `models/siglip/image_processing_pil_siglip.py`,
//!   the backend `AutoImageProcessor`/`PaliGemmaProcessor` pick when torchvision is absent):
//!   resize straight to HxW with PIL BICUBIC (Pillow `src/libImaging/Resample.c`, 8-bit
//!   fixed-point, two passes), `x * rescale_factor` in f64 cast to f32, `(x - mean) / std` in f32.
//!
//! Pixels come from the `image` crate, except JPEG: PNG, GIF, BMP and WebP decode to the same
//! values as PIL on the tested files. JPEG goes through libjpeg-turbo's decoder (MozJPEG's
//! vendored copy, `mozjpeg` crate) with Pillow's settings (`src/libImaging/JpegDecode.c`), then
//! Pillow's "CMYK;I" unpacking and `cmyk2rgb`: the same bytes as Pillow 13's bundled
//! libjpeg-turbo 3 on every tested JPEG (baseline and progressive, 4:2:0, 4:2:2, 4:4:4, grey,
//! Adobe CMYK and YCCK, restart markers).

use std::borrow::Cow;
use std::cell::Cell;
use std::fs;
use std::io::{self, BufRead, Cursor};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use crate::input::{read_regular_file, InputError};
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage, RgbaImage};
use mozjpeg::decompress::MarkerData;
use mozjpeg::{ColorSpace, Decompress, Marker};
use ndarray::Array3;
use serde::Deserialize;

/// Formats this module decodes, as named in error messages (the `image` features in Cargo.toml).
const SUPPORTED_FORMATS: &str = "PNG, JPEG, GIF, WebP, BMP, TIFF";

/// Errors from loading an image or its preprocessor config.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// Missing, not a regular file, over [`ImageLimits::max_bytes`], unreadable.
    #[error(transparent)]
    File(#[from] InputError),
    #[error("image {image} is empty (0 bytes): re-download or re-export it")]
    Empty { image: String },
    #[error(
        "image {image} is not in a supported format: its first bytes match none of \
         {SUPPORTED_FORMATS}; convert it to PNG or JPEG"
    )]
    UnrecognizedFormat { image: String },
    #[error("image {image} uses a {format:?} feature this decoder lacks ({detail}); convert it to PNG or baseline JPEG")]
    UnsupportedFeature {
        image: String,
        format: ImageFormat,
        detail: String,
    },
    #[error("image {image} is truncated or corrupt ({format:?}: {detail}); re-download or re-export it")]
    Corrupt {
        image: String,
        format: ImageFormat,
        detail: String,
    },
    #[error(
        "image {image} is {width}x{height} = {pixels} pixels, over the limit of {limit} pixels \
         (a decompression-bomb guard, PIL's default); downscale it or raise ImageLimits::max_pixels"
    )]
    TooManyPixels {
        image: String,
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
    #[error("preprocessor config {path} is invalid: {reason}")]
    InvalidConfig { path: PathBuf, reason: String },
    #[error(
        "preprocessor config {path} sets \"resample\": {found}, but only 3 (PIL BICUBIC, what \
         SigLIP uses) is implemented; set \"resample\": 3"
    )]
    UnsupportedResample { path: PathBuf, found: u32 },
}

/// Decoding limits, checked from the header before any pixel is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest accepted width x height (each side counted as at least 1, like PIL).
    pub max_pixels: u64,
    /// Largest image file read from a path, in bytes.
    pub max_bytes: u64,
}

impl Default for ImageLimits {
    /// PIL's `2 * Image.MAX_IMAGE_PIXELS`, where `Image.open` raises `DecompressionBombError`.
    fn default() -> Self {
        Self {
            max_pixels: 2 * (1024 * 1024 * 1024 / 4 / 3),
            // A 16-bit RGBA TIFF of max_pixels is far larger, but no camera or scanner file is.
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// An image as `transformers.image_utils.load_image` returns it: upright (EXIF orientation
/// applied) and 8-bit RGB.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedImage {
    /// Pixels [height, width, 3]; its dimensions are the "original size" that boxes and masks
    /// map back to.
    pub rgb: RgbImage,
    /// PIL's `info["transparency"]` that survives `convert("RGB")` (PNG tRNS on palette, grey or
    /// RGB images; GIF transparency index): pixels of this colour turn white when the processor
    /// has `do_convert_rgb`.
    pub transparent_color: Option<[u8; 3]>,
}

/// The keys of a Hugging Face `preprocessor_config.json` that `SiglipImageProcessor` reads.
///
/// Absent keys take `SiglipImageProcessorPil`'s class defaults, as transformers does.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    /// `size.height`: rows of `pixel_values`.
    pub height: u32,
    /// `size.width`: columns of `pixel_values`.
    pub width: u32,
    /// `image_mean`, one per RGB channel; used as f32 like numpy's `np.array(mean, float32)`.
    pub image_mean: [f64; 3],
    /// `image_std`, one per RGB channel; used as f32.
    pub image_std: [f64; 3],
    /// `rescale_factor`; kept in f64 because transformers multiplies in float64.
    pub rescale_factor: f64,
    /// `do_convert_rgb`: absent means the class default (true), `null` means false.
    pub do_convert_rgb: bool,
}

#[derive(Deserialize)]
struct RawProcessorConfig {
    #[serde(default = "default_size")]
    size: RawSize,
    #[serde(default = "default_half")]
    image_mean: [f64; 3],
    #[serde(default = "default_half")]
    image_std: [f64; 3],
    #[serde(default = "default_rescale_factor")]
    rescale_factor: f64,
    #[serde(default = "default_resample")]
    resample: u32,
    do_resize: Option<bool>,
    do_rescale: Option<bool>,
    do_normalize: Option<bool>,
    #[serde(default = "default_convert_rgb")]
    do_convert_rgb: Option<bool>,
}

#[derive(Deserialize)]
struct RawSize {
    height: u32,
    width: u32,
}

fn default_size() -> RawSize {
    RawSize { height: 224, width: 224 }
}

/// transformers' `IMAGENET_STANDARD_MEAN` and `IMAGENET_STANDARD_STD`.
fn default_half() -> [f64; 3] {
    [0.5; 3]
}

fn default_rescale_factor() -> f64 {
    1.0 / 255.0
}

fn default_convert_rgb() -> Option<bool> {
    Some(true)
}

/// `PILImageResampling.BICUBIC`.
fn default_resample() -> u32 {
    3
}

impl ImageProcessorConfig {
    /// Reads and validates a `preprocessor_config.json`.
    pub fn from_file(path: &Path) -> Result<Self, PreprocessError> {
        let text = fs::read_to_string(path).map_err(|e| PreprocessError::InvalidConfig {
            path: path.to_owned(),
            reason: format!("cannot read it ({e})"),
        })?;
        Self::from_json(&text, path)
    }

    /// Parses and validates the JSON text of a `preprocessor_config.json`; `path` names it in
    /// errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self, PreprocessError> {
        let invalid = |reason: String| PreprocessError::InvalidConfig {
            path: path.to_owned(),
            reason,
        };
        let raw: RawProcessorConfig = serde_json::from_str(text).map_err(|e| {
            invalid(format!(
                "{e}; expected \"size\": {{\"height\", \"width\"}}, 3-element \"image_mean\" and \"image_std\""
            ))
        })?;
        if raw.resample != default_resample() {
            return Err(PreprocessError::UnsupportedResample {
                path: path.to_owned(),
                found: raw.resample,
            });
        }
        for (key, value) in [
            ("do_resize", raw.do_resize),
            ("do_rescale", raw.do_rescale),
            ("do_normalize", raw.do_normalize),
        ] {
            if value == Some(false) {
                return Err(invalid(format!(
                    "\"{key}\": false is not supported (PaliGemma always sets it); remove the key"
                )));
            }
        }
        if raw.size.height == 0 || raw.size.width == 0 {
            return Err(invalid(format!(
                "size {}x{} has a zero side; use the checkpoint's image size, e.g. 224",
                raw.size.width, raw.size.height
            )));
        }
        if raw.image_std.contains(&0.0) {
            return Err(invalid(format!(
                "\"image_std\" {:?} contains 0, which would divide by zero",
                raw.image_std
            )));
        }
        Ok(Self {
            height: raw.size.height,
            width: raw.size.width,
            image_mean: raw.image_mean,
            image_std: raw.image_std,
            rescale_factor: raw.rescale_factor,
            do_convert_rgb: raw.do_convert_rgb == Some(true),
        })
    }
}

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
struct Decoded {
    /// [height, width, 3] as stored in the file.
    rgb: RgbImage,
    orientation: Orientation,
    transparent_color: Option<[u8; 3]>,
}

/// Step 2 of decoding: PIL's decompression-bomb guard, from the header before any pixel.
fn check_pixel_limit(image: &str, width: u32, height: u32, limits: &ImageLimits) -> Result<(), PreprocessError> {
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
    let rgb = match (&pil, decoded) {
        (PilSource::Gif(gif), DynamicImage::ImageRgba8(canvas)) => gif.first_frame_rgb(&canvas),
        (_, decoded) => pil_rgb(decoded, pil.gray16()).ok_or_else(|| PreprocessError::UnsupportedFeature {
            image: name(),
            format,
            detail: "floating-point pixels, which PIL does not open as RGB".to_owned(),
        })?,
    };
    Ok(Decoded {
        rgb,
        orientation,
        transparent_color: pil.transparent_color(),
    })
}

/// JPEG through libjpeg-turbo's decoder (MozJPEG's copy) set up as Pillow's `JpegDecode.c`
/// sets up its bundled libjpeg-turbo: library defaults (ISLOW integer IDCT, fancy upsampling,
/// colour space guessed from the JFIF/Adobe markers), output L, RGB or CMYK by the component
/// count as `JpegImagePlugin.SOF` picks the mode. libjpeg reports fatal errors by unwinding
/// (the `mozjpeg` crate's error handler); they are caught here and become errors.
fn decode_jpeg(bytes: &[u8], image: &str, limits: &ImageLimits) -> Result<Decoded, PreprocessError> {
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

/// PIL's XMP fallback in `Image.getexif`: the first match of `tiff:Orientation(="|>)([0-9])`.
fn xmp_orientation(xmp: &[u8]) -> Option<Orientation> {
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

/// What PIL's open would know beyond the pixels: the source mode and `info["transparency"]`.
enum PilSource {
    Png(PngHeader),
    Gif(GifFirstFrame),
    Other,
}

impl PilSource {
    fn scan(format: ImageFormat, bytes: &[u8]) -> Self {
        let scanned = match format {
            ImageFormat::Png => PngHeader::scan(bytes).map(Self::Png),
            ImageFormat::Gif => GifFirstFrame::scan(bytes).map(Self::Gif),
            _ => None,
        };
        scanned.unwrap_or(Self::Other)
    }

    /// True when a 16-bit grey+alpha buffer is really PIL's "I;16" (16-bit grey PNG whose tRNS
    /// the decoder expanded to alpha), which PIL saturates rather than shifts.
    fn gray16(&self) -> bool {
        matches!(self, Self::Png(h) if h.color_type == 0 && h.bit_depth == 16)
    }

    /// The RGB colour PIL leaves in `info["transparency"]` after `convert("RGB")`.
    fn transparent_color(&self) -> Option<[u8; 3]> {
        match self {
            Self::Png(h) => h.transparent_color(),
            Self::Gif(g) => g.transparent.map(|i| g.palette_color(i)),
            Self::Other => None,
        }
    }
}

/// The PNG chunks before the first IDAT that decide PIL's mode and transparency.
struct PngHeader {
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

/// The GIF blocks before the first image that decide PIL's first frame.
struct GifFirstFrame {
    /// left, top, width, height of the first frame on the logical screen.
    frame: (u32, u32, u32, u32),
    /// The local colour table if present, else the global one; RGB triplets.
    palette: Vec<u8>,
    transparent: Option<u8>,
}

impl GifFirstFrame {
    fn scan(bytes: &[u8]) -> Option<Self> {
        let u16_at = |i: usize| -> Option<u32> { Some(u32::from(u16::from_le_bytes(bytes.get(i..i + 2)?.try_into().ok()?))) };
        let table_len = |packed: u8| 3usize << ((packed & 7) + 1);
        let packed = *bytes.get(10)?;
        let mut pos = 13;
        let mut palette = Vec::new();
        if packed & 0x80 != 0 {
            palette = bytes.get(pos..pos + table_len(packed))?.to_vec();
            pos += table_len(packed);
        }
        let mut transparent = None;
        loop {
            match *bytes.get(pos)? {
                0x21 => {
                    let label = *bytes.get(pos + 1)?;
                    pos += 2;
                    if label == 0xf9 && *bytes.get(pos)? >= 4 {
                        let flags = *bytes.get(pos + 1)?;
                        transparent = (flags & 1 != 0).then_some(*bytes.get(pos + 4)?);
                    }
                    // Skip the data sub-blocks up to the zero-length terminator.
                    loop {
                        let n = usize::from(*bytes.get(pos)?);
                        pos += 1 + n;
                        if n == 0 {
                            break;
                        }
                    }
                }
                0x2c => {
                    let frame = (u16_at(pos + 1)?, u16_at(pos + 3)?, u16_at(pos + 5)?, u16_at(pos + 7)?);
                    let packed = *bytes.get(pos + 9)?;
                    if packed & 0x80 != 0 {
                        let start = pos + 10;
                        palette = bytes.get(start..start + table_len(packed))?.to_vec();
                    }
                    return Some(Self {
                        frame,
                        palette,
                        transparent,
                    });
                }
                _ => return None,
            }
        }
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

/// `pixel_values` for one image, as `SiglipImageProcessorPil` computes them: [3, height, width]
/// (CHW, RGB), values `(x * rescale_factor - mean) / std`.
pub fn pixel_values(image: &LoadedImage, cfg: &ImageProcessorConfig) -> Array3<f32> {
    // 1. `convert_to_rgb`: alpha-compositing a 0/255 alpha onto white whitens the key colour.
    let rgb = match image.transparent_color.filter(|_| cfg.do_convert_rgb) {
        Some(key) => {
            let mut rgb = image.rgb.clone();
            rgb.pixels_mut().filter(|p| p.0 == key).for_each(|p| p.0 = [255; 3]);
            Cow::Owned(rgb)
        }
        None => Cow::Borrowed(&image.rgb),
    };
    // 2. Resize.
    let resized = resize_bicubic_pil(&rgb, cfg.width, cfg.height);
    // 3. Rescale and normalise. transformers: `image.astype(float64) * scale`, `.astype(float32)`,
    // then
    // `(image - mean) / std` with float32 mean and std; a 256-entry table per channel is exact.
    let table: [[f32; 256]; 3] = std::array::from_fn(|c| {
        let mean = cfg.image_mean[c] as f32;
        let std = cfg.image_std[c] as f32;
        std::array::from_fn(|v| ((v as f64 * cfg.rescale_factor) as f32 - mean) / std)
    });
    let shape = (3, cfg.height as usize, cfg.width as usize);
    Array3::from_shape_fn(shape, |(c, y, x)| table[c][usize::from(resized.get_pixel(x as u32, y as u32).0[c])])
}

/// Pillow's `Image.resize((width, height), Image.BICUBIC)` on an RGB image, bit for bit
/// (`src/libImaging/Resample.c`: 8-bit fixed point with 22 fractional bits, two separable passes
/// each rounded to 8 bits, the filter widened by the scale on downscale for antialiasing).
pub fn resize_bicubic_pil(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = img.dimensions();
    let src = Rgb8 {
        width: in_w,
        height: in_h,
        data: Cow::Borrowed(img.as_raw()),
    };
    // The intermediate is rounded to 8 bits, so the pass order shows up as differences of a few
    // levels: portrait downscales (9x640 -> 224x224) were 13 levels off with horizontal first.
    let out = if pil_resizes_vertically_first(in_w as usize, in_h as usize, width as usize, height as usize) {
        src.resize_vertical(height).resize_horizontal(width)
    } else {
        src.resize_horizontal(width).resize_vertical(height)
    };
    RgbImage::from_raw(width, height, out.data.into_owned()).unwrap_or_default()
}

/// Pillow 13's pass order in `ImagingResampleInner` (PR #9549, "If height is scaled down
/// significantly more than width, resize vertically first"): vertical first when the height
/// loses pixels and more than twice as many as the width; horizontal first otherwise (always,
/// in Pillow 12 and older). Compared with Pillow 13.0.0 over every output size up to 3x of
/// several input shapes (tests/preprocess.rs); the same rule as `segment::resize_bilinear`.
pub(crate) fn pil_resizes_vertically_first(in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> bool {
    let height_loss = in_h as i64 - out_h as i64;
    let width_loss = in_w as i64 - out_w as i64;
    height_loss > 0 && height_loss > 2 * width_loss
}

/// An 8-bit RGB image between passes: `data` is [height, width, 3].
struct Rgb8<'a> {
    width: u32,
    height: u32,
    data: Cow<'a, [u8]>,
}

impl<'a> Rgb8<'a> {
    /// Pillow's `ImagingResampleHorizontal_8bpc`: [h, w, 3] -> [h, out_w, 3]. Pillow skips a
    /// pass whose size does not change (its taps would be the identity anyway).
    fn resize_horizontal(self, out_w: u32) -> Rgb8<'a> {
        if out_w == self.width {
            return self;
        }
        let taps = PilTaps::bicubic(self.width, out_w);
        let row = out_w as usize * 3;
        let mut out = vec![0u8; self.height as usize * row];
        for (y, out_row) in out.chunks_exact_mut(row.max(1)).enumerate() {
            for (xx, px) in out_row.chunks_exact_mut(3).enumerate() {
                let (first, k) = taps.taps(xx);
                let start = (y * self.width as usize + first) * 3;
                px.copy_from_slice(&convolve(&self.data, start, 3, k));
            }
        }
        Rgb8 {
            width: out_w,
            height: self.height,
            data: Cow::Owned(out),
        }
    }

    /// Pillow's `ImagingResampleVertical_8bpc`: [h, w, 3] -> [out_h, w, 3].
    fn resize_vertical(self, out_h: u32) -> Rgb8<'a> {
        if out_h == self.height {
            return self;
        }
        let taps = PilTaps::bicubic(self.height, out_h);
        let row = self.width as usize * 3;
        let mut out = vec![0u8; out_h as usize * row];
        for (yy, out_row) in out.chunks_exact_mut(row.max(1)).enumerate() {
            let (first, k) = taps.taps(yy);
            for (x, px) in out_row.chunks_exact_mut(3).enumerate() {
                px.copy_from_slice(&convolve(&self.data, first * row + x * 3, row, k));
            }
        }
        Rgb8 {
            width: self.width,
            height: out_h,
            data: Cow::Owned(out),
        }
    }
}

/// One output pixel: the taps `k` over the RGB pixels at `start`, `start + step`, ... (bytes),
/// summed in Pillow's fixed point and rounded to 8 bits.
fn convolve(src: &[u8], start: usize, step: usize, k: &[i32]) -> [u8; 3] {
    let mut acc = [ROUNDING_HALF; 3];
    for (i, &w) in k.iter().enumerate() {
        let at = start + i * step;
        for (c, sum) in acc.iter_mut().enumerate() {
            *sum += i64::from(src[at + c]) * i64::from(w);
        }
    }
    acc.map(clip8)
}

/// Pillow's `PRECISION_BITS` (32 - 8 - 2).
const PRECISION_BITS: u32 = 22;
/// Pillow starts each sum at one half, so the final shift rounds to nearest.
const ROUNDING_HALF: i64 = 1 << (PRECISION_BITS - 1);

/// Pillow's `clip8`: shift out the fraction, clamp to 0..=255.
fn clip8(acc: i64) -> u8 {
    u8::try_from((acc >> PRECISION_BITS).clamp(0, 255)).unwrap_or(u8::MAX)
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for one axis.
struct PilTaps {
    /// Per output index: first input index and number of taps.
    bounds: Vec<(usize, usize)>,
    /// Fixed-point weights, `ksize` per output index (only the first `count` used).
    weights: Vec<i32>,
    ksize: usize,
}

impl PilTaps {
    fn bicubic(in_size: u32, out_size: u32) -> Self {
        const SUPPORT: f64 = 2.0;
        // Pillow passes the box as C floats: (double)(in1 - in0) with in0 = 0.
        let scale = f64::from(in_size as f32) / f64::from(out_size);
        let filterscale = scale.max(1.0);
        let support = SUPPORT * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let ss = 1.0 / filterscale;
        let mut bounds = Vec::with_capacity(out_size as usize);
        let mut weights = vec![0i32; out_size as usize * ksize];
        let mut k = vec![0f64; ksize];
        for (xx, out) in weights.chunks_exact_mut(ksize).enumerate() {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) cast truncates toward zero, as `as` does.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size));
            let count = usize::try_from(xmax - xmin).unwrap_or(0).min(ksize);
            let mut ww = 0.0;
            for (x, kx) in k.iter_mut().enumerate().take(count) {
                let w = bicubic_filter(((x as i64 + xmin) as f64 - center + 0.5) * ss);
                *kx = w;
                ww += w;
            }
            for (kx, o) in k.iter().zip(out.iter_mut()).take(count) {
                let v = if ww != 0.0 { kx / ww } else { *kx };
                let fixed = v * f64::from(1u32 << PRECISION_BITS);
                *o = if v < 0.0 { (-0.5 + fixed) as i32 } else { (0.5 + fixed) as i32 };
            }
            bounds.push((usize::try_from(xmin).unwrap_or(0), count));
        }
        Self { bounds, weights, ksize }
    }

    fn taps(&self, out_index: usize) -> (usize, &[i32]) {
        let (first, count) = self.bounds[out_index];
        let start = out_index * self.ksize;
        (first, &self.weights[start..start + count])
    }
}

/// Pillow's `bicubic_filter` (Keys cubic, a = -0.5), operation order kept for identical doubles.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 7 % 256) as u8, (y * 13 % 256) as u8, ((x + y) % 256) as u8])
        })
    }

    #[test]
    fn resize_to_same_size_is_identity() {
        let img = gradient(17, 9);
        assert_eq!(resize_bicubic_pil(&img, 17, 9), img);
    }

    #[test]
    fn resize_keeps_a_flat_image_flat() {
        // Taps sum to 1 in fixed point up to rounding, so a constant colour survives any scale.
        let img = RgbImage::from_pixel(37, 5, image::Rgb([200, 3, 128]));
        for (w, h) in [(224, 224), (3, 2), (1, 1), (448, 7)] {
            let out = resize_bicubic_pil(&img, w, h);
            assert!(out.pixels().all(|p| p.0 == [200, 3, 128]), "{w}x{h}");
        }
    }

    #[test]
    fn resize_of_an_empty_image_does_not_panic() {
        let out = resize_bicubic_pil(&RgbImage::new(0, 0), 4, 4);
        assert_eq!(out.dimensions(), (4, 4));
    }

    #[test]
    fn bicubic_taps_widen_on_downscale_and_stay_in_bounds() {
        let down = PilTaps::bicubic(1000, 10);
        assert_eq!(down.ksize, 2 * 200 + 1);
        for xx in 0..10 {
            let (first, k) = down.taps(xx);
            assert!(first + k.len() <= 1000);
            let sum: i64 = k.iter().map(|&w| i64::from(w)).sum();
            assert!((sum - (1 << PRECISION_BITS)).abs() <= k.len() as i64, "taps of {xx} sum to {sum}");
        }
        let up = PilTaps::bicubic(3, 224);
        assert_eq!(up.ksize, 5);
    }

    #[test]
    fn simple_palette_transparency_follows_pillow_regex() {
        assert_eq!(simple_palette_index(b"\xff\xff\x00\xff"), Some(2));
        assert_eq!(simple_palette_index(b"\x00"), Some(0));
        assert_eq!(simple_palette_index(b"\xff\x00\n"), Some(1));
        assert_eq!(simple_palette_index(b"\xff\x00\x80"), None);
        assert_eq!(simple_palette_index(b"\x00\x00"), None);
        assert_eq!(simple_palette_index(b"\xff\xff"), None);
    }

    #[test]
    fn xmp_orientation_reads_attribute_and_element_forms() {
        assert_eq!(xmp_orientation(br#"<x tiff:Orientation="6"/>"#), Some(Orientation::Rotate90));
        assert_eq!(
            xmp_orientation(b"<tiff:Orientation>3</tiff:Orientation>"),
            Some(Orientation::Rotate180)
        );
        assert_eq!(xmp_orientation(b"<x/>"), None);
    }

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

    #[test]
    fn config_rejects_non_bicubic_resample() {
        let err = ImageProcessorConfig::from_json(r#"{"resample": 2}"#, Path::new("p.json"));
        assert!(matches!(err, Err(PreprocessError::UnsupportedResample { found: 2, .. })));
    }

    #[test]
    fn config_defaults_match_siglip_class_defaults() {
        let cfg = ImageProcessorConfig::from_json("{}", Path::new("p.json")).unwrap();
        assert_eq!((cfg.height, cfg.width), (224, 224));
        assert_eq!(cfg.image_mean, [0.5; 3]);
        assert_eq!(cfg.rescale_factor, 1.0 / 255.0);
        assert!(cfg.do_convert_rgb);
    }

    #[test]
    fn null_do_convert_rgb_keeps_the_transparency_colour() {
        let path = Path::new("p.json");
        let null = ImageProcessorConfig::from_json(r#"{"do_convert_rgb": null, "size": {"height": 1, "width": 1}}"#, path).unwrap();
        let set = ImageProcessorConfig {
            do_convert_rgb: true,
            ..null.clone()
        };
        let image = LoadedImage {
            rgb: RgbImage::from_pixel(1, 1, image::Rgb([0; 3])),
            transparent_color: Some([0; 3]),
        };
        assert_eq!(pixel_values(&image, &null)[[0, 0, 0]], -1.0);
        assert_eq!(pixel_values(&image, &set)[[0, 0, 0]], 1.0);
    }

    #[test]
    fn pixel_values_span_minus_one_to_one() {
        let cfg = ImageProcessorConfig::from_json(r#"{"size": {"height": 2, "width": 3}}"#, Path::new("p.json")).unwrap();
        let flat = |v: u8| LoadedImage {
            rgb: RgbImage::from_pixel(5, 5, image::Rgb([v; 3])),
            transparent_color: None,
        };
        let black = pixel_values(&flat(0), &cfg);
        let white = pixel_values(&flat(255), &cfg);
        assert_eq!(black.shape(), &[3, 2, 3]);
        assert!(black.iter().all(|&v| v == -1.0));
        assert!(white.iter().all(|&v| v == 1.0));
    }
}
