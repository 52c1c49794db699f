//! Image loading and SigLIP preprocessing, matching transformers + PIL pixel for pixel where noted.
//!
//! Ports, in pipeline order:
//! - transformers 5.23 `image_utils.load_image`: `PIL.ImageOps.exif_transpose`, then
//!   `Image.convert("RGB")` (Pillow 13 semantics per source mode, see `pil_mode`);
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
//!
//! Modules, one job each: [`decode`]-ing the file as `Image.open` + `convert("RGB")` +
//! `exif_transpose` (JPEG in `jpeg`, the mode and transparency PIL would see in `pil_mode`), and
//! the [`processor`]'s resize and normalisation. The Pillow resampling ports live in
//! [`crate::resample`].

use std::path::PathBuf;

use crate::input::InputError;
use image::{ImageFormat, RgbImage};

pub mod decode;
mod jpeg;
mod pil_mode;
pub mod processor;

pub use crate::resample::resize_bicubic_pil;
pub use decode::{decode_image, load_image};
pub use processor::{pixel_values, ImageProcessorConfig};

/// Formats this module decodes, as named in error messages (the `image` features in Cargo.toml).
const SUPPORTED_FORMATS: &str = "PNG, JPEG, GIF, WebP, BMP, TIFF";

/// Errors from loading an image or its preprocessor config.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// Missing, not a regular file, over [`ImageLimits::max_bytes`], unreadable.
    #[error(transparent)]
    File(#[from] InputError),
    /// The image has no bytes.
    #[error("image {image} is empty (0 bytes): re-download or re-export it")]
    Empty {
        /// The image as named in messages: its path, or "from the request".
        image: String,
    },
    /// The first bytes match no supported format's magic number (PIL's `Image.open` test).
    #[error(
        "image {image} is not in a supported format: its first bytes match none of \
         {SUPPORTED_FORMATS}; convert it to PNG or JPEG"
    )]
    UnrecognizedFormat {
        /// The image as named in messages: its path, or "from the request".
        image: String,
    },
    /// The decoder lacks a feature the file uses (12-bit JPEG, an odd component count, float
    /// pixels PIL does not open as RGB, ...).
    #[error("image {image} uses a {format:?} feature this decoder lacks ({detail}); convert it to PNG or baseline JPEG")]
    UnsupportedFeature {
        /// The image as named in messages: its path, or "from the request".
        image: String,
        /// The format its first bytes name.
        format: ImageFormat,
        /// The decoder's message.
        detail: String,
    },
    /// The decoder failed on the data: truncated, corrupt, or a header of 0 pixels.
    #[error("image {image} is truncated or corrupt ({format:?}: {detail}); re-download or re-export it")]
    Corrupt {
        /// The image as named in messages: its path, or "from the request".
        image: String,
        /// The format its first bytes name.
        format: ImageFormat,
        /// The decoder's message.
        detail: String,
    },
    /// The header declares more than [`ImageLimits::max_pixels`]; no pixel was decoded.
    #[error(
        "image {image} is {width}x{height} = {pixels} pixels, over the limit of {limit} pixels \
         (a decompression-bomb guard, PIL's default); downscale it or raise ImageLimits::max_pixels"
    )]
    TooManyPixels {
        /// The image as named in messages: its path, or "from the request".
        image: String,
        /// Width the header declares, in pixels.
        width: u32,
        /// Height the header declares, in pixels.
        height: u32,
        /// Pixels the header declares (each side counted as at least 1, like PIL).
        pixels: u64,
        /// [`ImageLimits::max_pixels`].
        limit: u64,
    },
    /// `preprocessor_config.json` cannot be read, is not of the expected shape, turns off a step
    /// PaliGemma always takes, or has a zero size or std.
    #[error("preprocessor config {path} is invalid: {reason}")]
    InvalidConfig {
        /// The config's path.
        path: PathBuf,
        /// What is wrong, and the fix.
        reason: String,
    },
    /// `preprocessor_config.json`'s `resample` is not 3 (PIL BICUBIC), the only filter ported.
    #[error(
        "preprocessor config {path} sets \"resample\": {found}, but only 3 (PIL BICUBIC, what \
         SigLIP uses) is implemented; set \"resample\": 3"
    )]
    UnsupportedResample {
        /// The config's path.
        path: PathBuf,
        /// The config's `resample`.
        found: u32,
    },
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
