//! Pillow's resampling (`src/libImaging/Resample.c`), bit for bit: BICUBIC on 8-bit RGB for
//! `pixel_values` (`SiglipImageProcessorPil`'s resize) and BILINEAR on "F" (f32) images for the
//! segmentation masks (big_vision's `Image.fromarray(mask).resize(..., BILINEAR)`). Both are two
//! separable passes in Pillow 13's pass order (`pil_resizes_vertically_first`) with the filter
//! widened by the scale on downscale (PIL's antialiasing); they differ in arithmetic: 22-bit fixed
//! point rounded to 8 bits per pass for RGB, f64 sums rounded to f32 per pass for "F".

use std::borrow::Cow;

use image::RgbImage;
use ndarray::{Array2, ArrayView2};

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
/// several input shapes (tests/preprocess.rs); the same rule for [`resize_bilinear`].
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

/// Pillow's BILINEAR resize of an "F" (f32) image: f32[h, w] -> f32[out_height, out_width].
///
/// Matches Pillow 13's `Image.fromarray(src).resize((out_width, out_height), Image.BILINEAR)` bit
/// for bit: same taps, f64 sums in the same order, f32 rounding after each pass, same pass order.
pub fn resize_bilinear(src: ArrayView2<f32>, out_width: usize, out_height: usize) -> Array2<f32> {
    let (in_height, in_width) = src.dim();
    // Pillow skips a pass whose size does not change; a unit-scale pass would be the identity anyway.
    let horizontal = |img: ArrayView2<f32>| {
        if out_width == in_width {
            return img.to_owned();
        }
        let taps = bilinear_taps(in_width, out_width);
        Array2::from_shape_fn((img.nrows(), out_width), |(y, x)| taps[x].apply(|i| img[[y, i]]))
    };
    let vertical = |img: ArrayView2<f32>| {
        if out_height == in_height {
            return img.to_owned();
        }
        let taps = bilinear_taps(in_height, out_height);
        Array2::from_shape_fn((out_height, img.ncols()), |(y, x)| taps[y].apply(|i| img[[i, x]]))
    };
    // The f32 intermediate makes the pass order visible in the last bit. Pillow 13 (PR #9549, "If
    // height is scaled down significantly more than width, resize vertically first") runs the
    // vertical pass first when the height loses more than twice as many pixels as the width; the
    // condition was pinned down by comparing both orders with Pillow 13.0.0 on every output size
    // up to 3x for inputs 64x64, 64x32, 32x64 and 50x90. Pillow 12 and older always go horizontal
    // first, which differs by at most one f32 ulp on a few pixels.
    if pil_resizes_vertically_first(in_width, in_height, out_width, out_height) {
        horizontal(vertical(src).view())
    } else {
        vertical(horizontal(src).view())
    }
}

/// The source samples one output pixel reads, and their normalised weights.
struct Taps {
    first: usize,
    weights: Vec<f64>,
}

impl Taps {
    fn apply(&self, sample: impl Fn(usize) -> f32) -> f32 {
        let sum = self
            .weights
            .iter()
            .enumerate()
            .fold(0.0f64, |sum, (i, &w)| sum + f64::from(sample(self.first + i)) * w);
        sum as f32
    }
}

/// Pillow's `precompute_coeffs` for the triangle filter (support 1) along one axis.
fn bilinear_taps(in_size: usize, out_size: usize) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    // Downscaling widens the filter to cover every source pixel: Pillow's antialiasing.
    let filter_scale = scale.max(1.0);
    let support = filter_scale;
    let inverse = 1.0 / filter_scale;
    (0..out_size)
        .map(|out| {
            let center = (out as f64 + 0.5) * scale;
            // C's (int) cast truncates toward zero; so does `as`.
            let first = ((center - support + 0.5) as i64).max(0);
            let end = ((center + support + 0.5) as i64).min(in_size as i64);
            let mut weights: Vec<f64> = (first..end).map(|i| triangle((i as f64 - center + 0.5) * inverse)).collect();
            let total = weights.iter().fold(0.0f64, |sum, &w| sum + w);
            if total != 0.0 {
                weights.iter_mut().for_each(|w| *w /= total);
            }
            Taps {
                first: first as usize,
                weights,
            }
        })
        .collect()
}

fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
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
    fn bicubic_to_same_size_is_identity() {
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
    fn bilinear_to_same_size_is_identity() {
        let src = Array2::from_shape_fn((5, 7), |(y, x)| (y * 7 + x) as f32 - 17.5);
        assert_eq!(resize_bilinear(src.view(), 7, 5), src);
    }

    #[test]
    fn bilinear_preserves_constant_images() {
        // Normalised weights sum to one, so a constant survives up- and downscaling.
        let src = Array2::from_elem((64, 64), 0.25f32);
        for (w, h) in [(1, 1), (3, 200), (129, 17), (64, 65)] {
            let out = resize_bilinear(src.view(), w, h);
            assert_eq!(out.dim(), (h, w));
            assert!(out.iter().all(|&v| (v - 0.25).abs() < 1e-6), "{w}x{h}");
        }
    }
}
