//! Binary masks over the original image and their encodings: COCO's uncompressed RLE (the wire
//! form, as pycocotools writes it) and 8-bit PNG.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, Serializer};

/// Errors from building, encoding or writing a [`BinaryMask`].
#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    /// An RLE's counts do not add up to the pixels of its `size` ([`BinaryMask::from_rle`]).
    #[error("RLE of size [{height}, {width}] needs counts summing to {expected}, found {found}: the RLE is corrupt or for another image")]
    RleLength {
        /// The RLE's `size[0]`, in pixels.
        height: u32,
        /// The RLE's `size[1]`, in pixels.
        width: u32,
        /// `width * height`.
        expected: u64,
        /// The sum of its counts (`u64::MAX` when that overflows).
        found: u64,
    },
    /// Pixel data is not `width * height` long ([`BinaryMask::from_raw`]).
    #[error("mask of {width}x{height} needs {expected} pixels, got {found}: pass row-major data of width * height")]
    DataLength {
        /// The mask's width in pixels.
        width: u32,
        /// The mask's height in pixels.
        height: u32,
        /// `width * height`.
        expected: usize,
        /// The pixels passed.
        found: usize,
    },
    /// `width * height` pixels do not fit in this platform's `usize`, or in the PNG encoder's buffer.
    #[error("mask of {width}x{height} pixels is too large to store in memory on this platform")]
    MaskTooLarge {
        /// The mask's width in pixels.
        width: u32,
        /// The mask's height in pixels.
        height: u32,
    },
    /// The image crate failed to encode the mask as PNG.
    #[error("could not encode a {width}x{height} mask as PNG: {source}")]
    Png {
        /// The mask's width in pixels.
        width: u32,
        /// The mask's height in pixels.
        height: u32,
        /// The image crate's error.
        source: image::ImageError,
    },
    /// The PNG file cannot be written ([`BinaryMask::save_png`]).
    #[error("could not write mask PNG to {path}: {source}")]
    Write {
        /// The PNG's path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
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
    /// `[height, width]` in pixels, as pycocotools orders it.
    pub size: [u32; 2],
    /// Run lengths in pixels, background first; they add up to `height * width`.
    pub counts: Vec<u64>,
}

impl BinaryMask {
    /// An all-background mask.
    pub fn new(width: u32, height: u32) -> Result<Self, MaskError> {
        let len = pixel_count(width, height)?;
        Ok(Self {
            width,
            height,
            data: vec![false; len],
        })
    }

    /// A mask from row-major pixels, `width * height` of them.
    pub fn from_raw(width: u32, height: u32, data: Vec<bool>) -> Result<Self, MaskError> {
        let expected = pixel_count(width, height)?;
        if data.len() != expected {
            return Err(MaskError::DataLength {
                width,
                height,
                expected,
                found: data.len(),
            });
        }
        Ok(Self { width, height, data })
    }

    /// Width in pixels: the original image's, for a [`Segment`](crate::Segment)'s mask.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels: the original image's, for a [`Segment`](crate::Segment)'s mask.
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

    /// Sets pixel (`x`, `y`), which must lie inside the mask.
    pub(crate) fn set(&mut self, x: u32, y: u32, on: bool) {
        self.data[y as usize * self.width as usize + x as usize] = on;
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
    pub fn from_rle(rle: &Rle) -> Result<Self, MaskError> {
        let [height, width] = rle.size;
        let expected = u64::from(width) * u64::from(height);
        let found = rle.counts.iter().try_fold(0u64, |sum, &c| sum.checked_add(c)).unwrap_or(u64::MAX);
        if found != expected {
            return Err(MaskError::RleLength {
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
    pub fn to_png(&self) -> Result<Vec<u8>, MaskError> {
        let (width, height) = (self.width, self.height);
        let pixels = self.data.iter().map(|&on| if on { 255 } else { 0 }).collect();
        let gray = image::GrayImage::from_raw(width, height, pixels).ok_or(MaskError::MaskTooLarge { width, height })?;
        let mut png = std::io::Cursor::new(Vec::new());
        gray.write_to(&mut png, image::ImageFormat::Png)
            .map_err(|source| MaskError::Png { width, height, source })?;
        Ok(png.into_inner())
    }

    /// Writes [`BinaryMask::to_png`] to `path`.
    pub fn save_png(&self, path: &Path) -> Result<(), MaskError> {
        std::fs::write(path, self.to_png()?).map_err(|source| MaskError::Write {
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

fn pixel_count(width: u32, height: u32) -> Result<usize, MaskError> {
    (width as usize)
        .checked_mul(height as usize)
        .ok_or(MaskError::MaskTooLarge { width, height })
}

#[cfg(test)]
mod tests {
    use super::*;

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
            Err(MaskError::RleLength { expected: 4, found: 3, .. })
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
}
