//! `SiglipImageProcessorPil` (transformers 5.23 `models/siglip/image_processing_pil_siglip.py`):
//! the processor config, then `convert_to_rgb`, PIL BICUBIC resize straight to HxW,
//! `x * rescale_factor` in f64 cast to f32, `(x - mean) / std` in f32.

use std::borrow::Cow;
use std::fs;
use std::path::{Path, PathBuf};

use ndarray::Array3;
use serde::Deserialize;

use super::{LoadedImage, PreprocessError};
use crate::resample::resize_bicubic_pil;

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
    /// The image processor config of a model directory where transformers 5 reads it:
    /// `processor_config.json`'s `image_processor` object when it has one (it wins over
    /// `preprocessor_config.json` in `PaliGemmaProcessor.from_pretrained`), else
    /// `preprocessor_config.json`. The parsed config, the file it came from, and its raw JSON
    /// (for keys such as `image_seq_length`).
    pub fn from_model_dir(dir: &Path) -> Result<(Self, PathBuf, serde_json::Value), PreprocessError> {
        let invalid = |path: &Path, reason: String| PreprocessError::InvalidConfig {
            path: path.to_owned(),
            reason,
        };
        let processor = dir.join("processor_config.json");
        let nested = match fs::read_to_string(&processor) {
            Ok(text) => {
                let json: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| invalid(&processor, format!("not valid JSON ({e})")))?;
                json.get("image_processor").filter(|v| v.is_object()).cloned()
            }
            Err(_) => None,
        };
        let (path, json) = match nested {
            Some(json) => (processor, json),
            None => {
                let path = dir.join("preprocessor_config.json");
                let text = fs::read_to_string(&path).map_err(|e| invalid(&path, format!("cannot read it ({e})")))?;
                let json = serde_json::from_str(&text).map_err(|e| invalid(&path, format!("not valid JSON ({e})")))?;
                (path, json)
            }
        };
        let config = Self::from_value(&json, &path)?;
        Ok((config, path, json))
    }

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
        Self::validate(serde_json::from_str(text).map_err(|e| shape_error(e, path))?, path)
    }

    /// [`Self::from_json`] for JSON already parsed, such as `processor_config.json`'s
    /// `image_processor` object.
    fn from_value(json: &serde_json::Value, path: &Path) -> Result<Self, PreprocessError> {
        Self::validate(RawProcessorConfig::deserialize(json).map_err(|e| shape_error(e, path))?, path)
    }

    fn validate(raw: RawProcessorConfig, path: &Path) -> Result<Self, PreprocessError> {
        let invalid = |reason: String| PreprocessError::InvalidConfig {
            path: path.to_owned(),
            reason,
        };
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

fn shape_error(e: serde_json::Error, path: &Path) -> PreprocessError {
    PreprocessError::InvalidConfig {
        path: path.to_owned(),
        reason: format!("{e}; expected \"size\": {{\"height\", \"width\"}}, 3-element \"image_mean\" and \"image_std\""),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use image::RgbImage;

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
