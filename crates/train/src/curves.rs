//! Loss curves: `loss.csv` (step, training loss, validation loss, learning
//! rate) written as training goes, and `loss.png` drawn from it.

use crate::{io_err, TrainError};
use std::io::Write;
use std::path::Path;

pub struct LossLog {
    file: std::fs::File,
    path: std::path::PathBuf,
}

impl LossLog {
    /// Open the log, keeping the rows of steps up to `resume_from` (a
    /// resumed run rewrites what came after its checkpoint).
    pub fn open(path: &Path, resume_from: usize) -> Result<Self, TrainError> {
        let mut keep = String::from("step,loss,val_loss,lr\n");
        if resume_from > 0 {
            if let Ok(old) = std::fs::read_to_string(path) {
                for line in old.lines().skip(1) {
                    let step: usize = line
                        .split(',')
                        .next()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(usize::MAX);
                    if step <= resume_from {
                        keep.push_str(line);
                        keep.push('\n');
                    }
                }
            }
        }
        std::fs::write(path, keep).map_err(io_err(path))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(io_err(path))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn record(
        &mut self,
        step: usize,
        loss: f32,
        val: Option<f32>,
        lr: f64,
    ) -> Result<(), TrainError> {
        let v = val.map(|v| format!("{v:.5}")).unwrap_or_default();
        writeln!(self.file, "{step},{loss:.5},{v},{lr:.3e}").map_err(io_err(&self.path))
    }
}

/// Rows of a loss CSV: (step, loss, validation loss).
pub fn read(path: &Path) -> Result<Vec<(f64, f64, Option<f64>)>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            Some((
                f.first()?.parse().ok()?,
                f.get(1)?.parse().ok()?,
                f.get(2).and_then(|v| v.parse().ok()),
            ))
        })
        .collect())
}

/// Digits 0–9 in a 3×5 pixel font (rows of 3 bits, top first).
const DIGITS: [[u8; 5]; 10] = [
    [7, 5, 5, 5, 7],
    [2, 6, 2, 2, 7],
    [7, 1, 7, 4, 7],
    [7, 1, 7, 1, 7],
    [5, 5, 7, 1, 1],
    [7, 4, 7, 1, 7],
    [7, 4, 7, 5, 7],
    [7, 1, 1, 1, 1],
    [7, 5, 7, 5, 7],
    [7, 5, 7, 1, 7],
];

/// Width in pixels of `n` written by [`draw_number`] at `scale`.
fn number_width(n: usize, scale: usize) -> usize {
    n.to_string().len() * 4 * scale
}

/// Write `n` with its top-left corner at (x, y).
fn draw_number(
    put: &mut impl FnMut(usize, usize, [u8; 3]),
    n: usize,
    x: usize,
    y: usize,
    scale: usize,
) {
    for (i, ch) in n.to_string().bytes().enumerate() {
        let glyph = DIGITS[(ch - b'0') as usize];
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..3 {
                if bits >> (2 - col) & 1 == 1 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            put(
                                x + (i * 4 + col) * scale + dx,
                                y + row * scale + dy,
                                [0, 0, 0],
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Draw the curves of `csv` into a PNG: training loss in blue, validation
/// loss in orange, on axes from zero to the largest loss, labelled with the
/// loss (a grid line per whole nat) and the step.
pub fn plot(csv: &Path, png_path: &Path) -> Result<(), TrainError> {
    let rows = read(csv)?;
    let (w, h) = (640usize, 400usize);
    let (ml, mr, mt, mb) = (44usize, 12usize, 10usize, 30usize);
    let mut px = vec![255u8; w * h * 3];
    let mut put = |x: usize, y: usize, c: [u8; 3]| {
        if x < w && y < h {
            px[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&c);
        }
    };
    for x in ml..w - mr {
        put(x, h - mb, [0, 0, 0]);
    }
    for y in mt..=h - mb {
        put(ml, y, [0, 0, 0]);
    }
    let max_step = rows.iter().map(|r| r.0).fold(1.0, f64::max);
    let max_loss = rows
        .iter()
        .flat_map(|r| [r.1, r.2.unwrap_or(0.0)])
        .filter(|v| v.is_finite())
        .fold(1e-9, f64::max);
    let to_px = |s: f64, l: f64| {
        let x = ml as f64 + s / max_step * (w - ml - mr) as f64;
        let y = (h - mb) as f64 - l / max_loss * (h - mb - mt) as f64;
        (x, y)
    };
    // Horizontal grid line at every whole nat (every few when there are
    // many), labelled on the left.
    let every = (max_loss as usize / 10).max(1);
    for k in (0..=(max_loss as usize).min(40)).step_by(every) {
        let (_, y) = to_px(0.0, k as f64);
        if k > 0 {
            for x in (ml..w - mr).step_by(4) {
                put(x, y as usize, [200, 200, 200]);
            }
        }
        let lw = number_width(k, 2);
        draw_number(
            &mut put,
            k,
            ml.saturating_sub(lw + 4),
            (y as usize).saturating_sub(5),
            2,
        );
    }
    // Steps: 0, the middle and the last, under the axis.
    let last = max_step.round() as usize;
    for s in [0, last / 2, last] {
        let (x, _) = to_px(s as f64, 0.0);
        let lw = number_width(s, 2);
        let x = (x as usize).saturating_sub(lw / 2).min(w - lw - 1);
        draw_number(&mut put, s, x, h - mb + 6, 2);
    }
    let mut line = |pts: &[(f64, f64)], c: [u8; 3]| {
        for p in pts.windows(2) {
            let (a, b) = (to_px(p[0].0, p[0].1), to_px(p[1].0, p[1].1));
            let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()) as usize).max(1);
            for i in 0..=n {
                let t = i as f64 / n as f64;
                let (x, y) = (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
                put(x as usize, y as usize, c);
                put(x as usize, y as usize + 1, c);
            }
        }
    };
    let train: Vec<(f64, f64)> = rows
        .iter()
        .filter(|r| r.1.is_finite())
        .map(|r| (r.0, r.1))
        .collect();
    let val: Vec<(f64, f64)> = rows.iter().filter_map(|r| r.2.map(|v| (r.0, v))).collect();
    line(&train, [31, 119, 180]);
    line(&val, [255, 127, 14]);
    let f = std::fs::File::create(png_path).map_err(io_err(png_path))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(f), w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut wr = enc.write_header().map_err(|e| TrainError::Io {
        path: png_path.display().to_string(),
        source: std::io::Error::other(e),
    })?;
    wr.write_image_data(&px).map_err(|e| TrainError::Io {
        path: png_path.display().to_string(),
        source: std::io::Error::other(e),
    })?;
    Ok(())
}
