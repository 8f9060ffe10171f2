//! Pictures given to image-to-image and inpainting: PNG bytes in, RGB and
//! the alpha channel out, resized to the size drawn at; a mask from a mask
//! picture or from the picture's own transparency.

use crate::pipeline::Image;
use crate::ImageError;

/// The most bytes a picture (or mask) file may have.
pub const MAX_PICTURE_BYTES: usize = 16 << 20;
/// The most pixels a picture may have before it is resized.
pub const MAX_PICTURE_PIXELS: u64 = 4096 * 4096;

/// A decoded picture: 8-bit RGB and, when the file has one, its alpha.
#[derive(Clone, Debug)]
pub struct Picture {
    pub rgb: Image,
    /// One value per pixel in [0, 1].
    pub alpha: Option<Vec<f32>>,
}

fn bad(msg: impl Into<String>) -> ImageError {
    ImageError::Request(msg.into())
}

impl Picture {
    /// A PNG file's pixels (any colour type and depth; 16-bit samples keep
    /// their high byte).
    pub fn from_png(bytes: &[u8]) -> Result<Self, ImageError> {
        if bytes.len() > MAX_PICTURE_BYTES {
            return Err(bad(format!(
                "the picture is larger than {} MB",
                MAX_PICTURE_BYTES >> 20
            )));
        }
        let mut dec = png::Decoder::new(std::io::Cursor::new(bytes));
        dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
        let mut reader = dec
            .read_info()
            .map_err(|e| bad(format!("not a PNG picture: {e}")))?;
        let (w, h) = (reader.info().width, reader.info().height);
        if w == 0 || h == 0 || u64::from(w) * u64::from(h) > MAX_PICTURE_PIXELS {
            return Err(bad(format!("a {w}×{h} picture (at most 4096×4096)")));
        }
        let mut buf = vec![0; reader.output_buffer_size()];
        let frame = reader
            .next_frame(&mut buf)
            .map_err(|e| bad(format!("not a PNG picture: {e}")))?;
        let data = &buf[..frame.buffer_size()];
        let n = (w * h) as usize;
        let (mut rgb, mut alpha) = (Vec::with_capacity(n * 3), None::<Vec<f32>>);
        let mut push_alpha = |a: u8| alpha.get_or_insert_with(Vec::new).push(a as f32 / 255.0);
        match frame.color_type {
            png::ColorType::Rgb => rgb.extend_from_slice(data),
            png::ColorType::Rgba => {
                for px in data.chunks_exact(4) {
                    rgb.extend_from_slice(&px[..3]);
                    push_alpha(px[3]);
                }
            }
            png::ColorType::Grayscale => {
                for &g in data {
                    rgb.extend_from_slice(&[g, g, g]);
                }
            }
            png::ColorType::GrayscaleAlpha => {
                for px in data.chunks_exact(2) {
                    rgb.extend_from_slice(&[px[0], px[0], px[0]]);
                    push_alpha(px[1]);
                }
            }
            png::ColorType::Indexed => {
                return Err(bad("an indexed PNG the decoder did not expand"));
            }
        }
        if rgb.len() != n * 3 {
            return Err(bad("a PNG whose pixels are cut short"));
        }
        Ok(Self {
            rgb: Image {
                width: w as usize,
                height: h as usize,
                rgb,
            },
            alpha,
        })
    }

    /// Where to paint, one value per pixel (1: paint): as OpenAI's edits
    /// read a mask, its fully transparent pixels (alpha 0); a mask without
    /// alpha is read as diffusers reads one, white where to paint.
    pub fn as_mask(&self) -> Vec<f32> {
        match &self.alpha {
            Some(a) => a
                .iter()
                .map(|&v| if v < 0.5 / 255.0 { 1.0 } else { 0.0 })
                .collect(),
            None => self
                .rgb
                .rgb
                .chunks(3)
                .map(|p| {
                    let l = (p[0] as u32 * 299 + p[1] as u32 * 587 + p[2] as u32 * 114) / 1000;
                    if l >= 128 {
                        1.0
                    } else {
                        0.0
                    }
                })
                .collect(),
        }
    }

    /// The picture's own transparency as a mask, when it has transparent
    /// pixels (OpenAI's edits without a mask).
    pub fn transparency(&self) -> Option<Vec<f32>> {
        let a = self.alpha.as_ref()?;
        a.iter().any(|&v| v < 0.5 / 255.0).then(|| self.as_mask())
    }
}

/// What an edit starts from: the picture, where to paint (one value per
/// pixel of the picture, 1: paint) and how far to noise it.
#[derive(Clone, Debug)]
pub struct Start {
    pub picture: Picture,
    pub mask: Option<Vec<f32>>,
    pub strength: f32,
}

impl Start {
    /// `picture` with `mask` (a decoded mask picture, resized to the
    /// picture's size) or else the picture's own transparency; `strength`
    /// defaults to 1 when painting and 0.8 for the whole picture.
    pub fn new(
        picture: Picture,
        mask: Option<&Picture>,
        strength: Option<f32>,
    ) -> Result<Self, ImageError> {
        let (w, h) = (picture.rgb.width, picture.rgb.height);
        let mask = match mask {
            Some(m) => Some(resize_mask(&m.as_mask(), m.rgb.width, m.rgb.height, w, h)),
            None => picture.transparency(),
        };
        let strength = strength.unwrap_or(if mask.is_some() { 1.0 } else { 0.8 });
        if !(strength > 0.0 && strength <= 1.0) {
            return Err(bad(format!("strength {strength}: above 0, at most 1")));
        }
        Ok(Self {
            picture,
            mask,
            strength,
        })
    }

    /// The size to draw at when none is asked for: about the picture's.
    pub fn size(&self, multiple: usize) -> (usize, usize) {
        fit(
            self.picture.rgb.width,
            self.picture.rgb.height,
            multiple,
            crate::pipeline::MAX_PIXELS,
        )
    }

    /// The request's starting point at `w × h`.
    pub fn init(&self, w: usize, h: usize) -> crate::pipeline::Init {
        let (w0, h0) = (self.picture.rgb.width, self.picture.rgb.height);
        crate::pipeline::Init {
            image: resize(&self.picture.rgb, w, h),
            mask: self.mask.as_ref().map(|m| resize_mask(m, w0, h0, w, h)),
            strength: self.strength,
        }
    }
}

/// `img` at `w × h`, bilinear (pixel centres aligned).
pub fn resize(img: &Image, w: usize, h: usize) -> Image {
    if (img.width, img.height) == (w, h) {
        return img.clone();
    }
    let at = |x: usize, y: usize, c: usize| img.rgb[(y * img.width + x) * 3 + c] as f32;
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        let fy = ((y as f32 + 0.5) * img.height as f32 / h as f32 - 0.5)
            .clamp(0.0, (img.height - 1) as f32);
        let (y0, ty) = (fy.floor() as usize, fy - fy.floor());
        let y1 = (y0 + 1).min(img.height - 1);
        for x in 0..w {
            let fx = ((x as f32 + 0.5) * img.width as f32 / w as f32 - 0.5)
                .clamp(0.0, (img.width - 1) as f32);
            let (x0, tx) = (fx.floor() as usize, fx - fx.floor());
            let x1 = (x0 + 1).min(img.width - 1);
            for c in 0..3 {
                let top = at(x0, y0, c) * (1.0 - tx) + at(x1, y0, c) * tx;
                let bottom = at(x0, y1, c) * (1.0 - tx) + at(x1, y1, c) * tx;
                rgb.push((top * (1.0 - ty) + bottom * ty).round().clamp(0.0, 255.0) as u8);
            }
        }
    }
    Image {
        width: w,
        height: h,
        rgb,
    }
}

/// A mask (`w0` wide) at `w × h`, nearest pixel.
pub fn resize_mask(mask: &[f32], w0: usize, h0: usize, w: usize, h: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(w * h);
    for y in 0..h {
        let sy = (y * h0 / h).min(h0 - 1);
        for x in 0..w {
            out.push(mask[sy * w0 + (x * w0 / w).min(w0 - 1)]);
        }
    }
    out
}

/// The size to draw a `w × h` picture at: each side rounded to the
/// nearest multiple of `m` (at least `m`), scaled down to at most
/// `max_pixels` keeping its shape.
pub fn fit(w: usize, h: usize, m: usize, max_pixels: usize) -> (usize, usize) {
    let scale = ((max_pixels as f64) / (w * h) as f64).sqrt().min(1.0);
    let side = |v: usize| (v as f64 * scale / m as f64).round().max(1.0) as usize * m;
    let (mut a, mut b) = (side(w), side(h));
    while a * b > max_pixels && (a > m || b > m) {
        if a >= b {
            a -= m;
        } else {
            b -= m;
        }
    }
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32, color: png::ColorType, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, w, h);
            enc.set_color(color);
            enc.set_depth(png::BitDepth::Eight);
            let mut wr = enc.write_header().unwrap();
            wr.write_image_data(data).unwrap();
        }
        out
    }

    #[test]
    fn pictures_and_masks_decode() {
        let rgba = png(
            2,
            1,
            png::ColorType::Rgba,
            &[10, 20, 30, 255, 40, 50, 60, 0],
        );
        let p = Picture::from_png(&rgba).unwrap();
        assert_eq!(p.rgb.rgb, vec![10, 20, 30, 40, 50, 60]);
        assert_eq!(p.as_mask(), vec![0.0, 1.0], "transparent: paint");
        assert_eq!(p.transparency(), Some(vec![0.0, 1.0]));
        let gray = Picture::from_png(&png(2, 1, png::ColorType::Grayscale, &[0, 255])).unwrap();
        assert_eq!(gray.rgb.rgb, vec![0, 0, 0, 255, 255, 255]);
        assert_eq!(gray.as_mask(), vec![0.0, 1.0], "white: paint");
        assert_eq!(gray.transparency(), None);
        let opaque = Picture::from_png(&png(1, 1, png::ColorType::Rgba, &[1, 2, 3, 255])).unwrap();
        assert_eq!(opaque.transparency(), None, "no transparent pixel");
    }

    #[test]
    fn bad_pictures_are_refused_clearly() {
        for bytes in [&b""[..], b"GIF89a", &b"\x89PNG\r\n\x1a\n\0\0"[..]] {
            let e = Picture::from_png(bytes).unwrap_err().to_string();
            assert!(e.contains("not a PNG"), "{e}");
        }
        let mut cut = png(4, 4, png::ColorType::Rgb, &[7; 48]);
        cut.truncate(cut.len() - 20);
        assert!(Picture::from_png(&cut).is_err());
        let big = vec![0u8; MAX_PICTURE_BYTES + 1];
        assert!(Picture::from_png(&big)
            .unwrap_err()
            .to_string()
            .contains("larger"));
    }

    #[test]
    fn resizing_and_fitting() {
        let img = Image {
            width: 2,
            height: 2,
            rgb: vec![0, 0, 0, 255, 255, 255, 0, 0, 0, 255, 255, 255],
        };
        let big = resize(&img, 4, 4);
        assert_eq!((big.width, big.height, big.rgb.len()), (4, 4, 48));
        assert_eq!(&big.rgb[..3], &[0, 0, 0]);
        assert_eq!(&big.rgb[9..12], &[255, 255, 255]);
        assert_eq!(resize(&img, 2, 2), img);
        assert_eq!(
            resize_mask(&[0.0, 1.0], 2, 1, 4, 2),
            vec![0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
        );
        assert_eq!(fit(500, 330, 64, 1 << 20), (512, 320));
        assert_eq!(fit(4000, 3000, 64, 1 << 20), (1152, 896));
        assert_eq!(fit(10, 10, 8, 1 << 20), (8, 8));
    }
}
