//! A picture generator for training a text-to-image model offline: one
//! coloured shape (circle, square or triangle) at one of five places on a
//! plain background, captioned in English or Chinese from a handful of
//! templates ("a red circle on the left, black background", "黑色背景上左边的
//! 红色圆形"). Every attribute a caption names can be read back from the
//! picture, which is what `bench/image_eval.py` measures generated images
//! against.

use rand::Rng;

/// The shape colours: English, Chinese, sRGB.
pub const COLOURS: [(&str, &str, [u8; 3]); 5] = [
    ("red", "红色", [220, 40, 40]),
    ("green", "绿色", [40, 170, 60]),
    ("blue", "蓝色", [40, 80, 220]),
    ("yellow", "黄色", [240, 210, 40]),
    ("purple", "紫色", [150, 60, 190]),
];

/// The background colours.
pub const BACKGROUNDS: [(&str, &str, [u8; 3]); 3] = [
    ("black", "黑色", [20, 20, 20]),
    ("white", "白色", [240, 240, 240]),
    ("gray", "灰色", [128, 128, 128]),
];

/// Caption templates per language.
pub const TEMPLATES: usize = 3;

pub const SHAPES: [(&str, &str); 3] = [
    ("circle", "圆形"),
    ("square", "正方形"),
    ("triangle", "三角形"),
];

/// Places: name, English phrase, Chinese, centre as a fraction of the side.
pub const POSITIONS: [(&str, &str, &str, (f32, f32)); 5] = [
    ("left", "on the left", "左边", (0.27, 0.5)),
    ("right", "on the right", "右边", (0.73, 0.5)),
    ("top", "at the top", "上面", (0.5, 0.27)),
    ("bottom", "at the bottom", "下面", (0.5, 0.73)),
    ("center", "in the center", "中间", (0.5, 0.5)),
];

/// One picture's content (indices into the tables above).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Scene {
    pub colour: usize,
    pub shape: usize,
    pub position: usize,
    pub background: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    En,
    Zh,
}

/// A drawn scene: its size and placement jitter.
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    /// Half the shape's extent, as a fraction of the side.
    pub radius: f32,
    pub dx: f32,
    pub dy: f32,
}

impl Scene {
    pub fn random(rng: &mut impl Rng) -> Self {
        Self {
            colour: rng.random_range(0..COLOURS.len()),
            shape: rng.random_range(0..SHAPES.len()),
            position: rng.random_range(0..POSITIONS.len()),
            background: rng.random_range(0..BACKGROUNDS.len()),
        }
    }

    /// Every scene, in a fixed order.
    pub fn all() -> Vec<Self> {
        let mut out = Vec::new();
        for colour in 0..COLOURS.len() {
            for shape in 0..SHAPES.len() {
                for position in 0..POSITIONS.len() {
                    for background in 0..BACKGROUNDS.len() {
                        out.push(Self {
                            colour,
                            shape,
                            position,
                            background,
                        });
                    }
                }
            }
        }
        out
    }

    /// A caption in `lang`, from one of its templates.
    pub fn caption(&self, lang: Lang, rng: &mut impl Rng) -> String {
        self.template(lang, rng.random_range(0..TEMPLATES))
    }

    /// The caption template `k` (of [`TEMPLATES`]) in `lang` writes.
    pub fn template(&self, lang: Lang, k: usize) -> String {
        let (c_en, c_zh, _) = COLOURS[self.colour];
        let (b_en, b_zh, _) = BACKGROUNDS[self.background];
        let (s_en, s_zh) = SHAPES[self.shape];
        let (_, p_en, p_zh, _) = POSITIONS[self.position];
        match (lang, k) {
            (Lang::En, 0) => format!("a {c_en} {s_en} {p_en}, {b_en} background"),
            (Lang::En, 1) => format!("a {c_en} {s_en} {p_en} on a {b_en} background"),
            (Lang::En, _) => format!("{b_en} background with a {c_en} {s_en} {p_en}"),
            (Lang::Zh, 0) => format!("{b_zh}背景上{p_zh}的{c_zh}{s_zh}"),
            (Lang::Zh, 1) => format!("{p_zh}有一个{c_zh}{s_zh}，背景是{b_zh}"),
            (Lang::Zh, _) => format!("一个{c_zh}{s_zh}在{p_zh}，{b_zh}背景"),
        }
    }

    pub fn random_placement(rng: &mut impl Rng) -> Placement {
        Placement {
            radius: rng.random_range(0.19..0.24),
            dx: rng.random_range(-0.04..0.04),
            dy: rng.random_range(-0.04..0.04),
        }
    }

    /// The picture, `side × side` RGB in [-1, 1], channels first (the
    /// layout a UNet takes). Edges are anti-aliased by 4×4 supersampling.
    pub fn render(&self, side: usize, at: Placement) -> Vec<f32> {
        let (_, _, _, (px, py)) = POSITIONS[self.position];
        let (cx, cy, r) = (px + at.dx, py + at.dy, at.radius);
        let fg = COLOURS[self.colour].2;
        let bg = BACKGROUNDS[self.background].2;
        let inside = |x: f32, y: f32| -> bool {
            let (dx, dy) = (x - cx, y - cy);
            match self.shape {
                0 => dx * dx + dy * dy <= r * r,
                // As wide as the circle of the same radius, so its corners
                // stand out of that circle's outline.
                1 => dx.abs() <= r && dy.abs() <= r,
                _ => {
                    // Apex up, base below the centre.
                    let (top, base) = (cy - r, cy + 0.75 * r);
                    y >= top && y <= base && dx.abs() <= (y - top) / (base - top) * 1.05 * r
                }
            }
        };
        const SS: usize = 4;
        let mut out = vec![0f32; 3 * side * side];
        let plane = side * side;
        for j in 0..side {
            for i in 0..side {
                let mut hits = 0;
                for sj in 0..SS {
                    for si in 0..SS {
                        let x = (i as f32 + (si as f32 + 0.5) / SS as f32) / side as f32;
                        let y = (j as f32 + (sj as f32 + 0.5) / SS as f32) / side as f32;
                        hits += usize::from(inside(x, y));
                    }
                }
                let a = hits as f32 / (SS * SS) as f32;
                for ch in 0..3 {
                    let v = a * fg[ch] as f32 + (1.0 - a) * bg[ch] as f32;
                    out[ch * plane + j * side + i] = v / 127.5 - 1.0;
                }
            }
        }
        out
    }
}

/// Channels-first [-1, 1] pixels as 8-bit RGB, row by row.
pub fn to_rgb8(chw: &[f32], side: usize) -> Vec<u8> {
    let plane = side * side;
    let mut rgb = Vec::with_capacity(3 * plane);
    for p in 0..plane {
        for ch in 0..3 {
            let v = chw.get(ch * plane + p).copied().unwrap_or(0.0);
            rgb.push(((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8);
        }
    }
    rgb
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn shapes_land_where_their_captions_say() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let side = 32;
        for s in Scene::all() {
            let img = s.render(side, Scene::random_placement(&mut rng));
            let bg = BACKGROUNDS[s.background].2;
            // The centroid of pixels that differ from the background.
            let (mut sx, mut sy, mut n) = (0.0, 0.0, 0.0);
            for j in 0..side {
                for i in 0..side {
                    let d: f32 = (0..3)
                        .map(|c| {
                            (img[c * side * side + j * side + i] - (bg[c] as f32 / 127.5 - 1.0))
                                .abs()
                        })
                        .sum();
                    if d > 0.3 {
                        sx += i as f32;
                        sy += j as f32;
                        n += 1.0;
                    }
                }
            }
            assert!(n > 20.0, "{s:?}: {n} shape pixels");
            let (cx, cy) = (sx / n / side as f32, sy / n / side as f32);
            let (_, _, _, (px, py)) = POSITIONS[s.position];
            assert!(
                (cx - px).abs() < 0.1 && (cy - py).abs() < 0.12,
                "{s:?} at {cx},{cy}"
            );
        }
    }

    #[test]
    fn captions_name_every_attribute_in_both_languages() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        for s in Scene::all() {
            for _ in 0..3 {
                let en = s.caption(Lang::En, &mut rng);
                assert!(en.contains(COLOURS[s.colour].0) && en.contains(SHAPES[s.shape].0));
                assert!(
                    en.contains(POSITIONS[s.position].1)
                        && en.contains(BACKGROUNDS[s.background].0)
                );
                let zh = s.caption(Lang::Zh, &mut rng);
                assert!(zh.contains(COLOURS[s.colour].1) && zh.contains(SHAPES[s.shape].1));
                assert!(
                    zh.contains(POSITIONS[s.position].2)
                        && zh.contains(BACKGROUNDS[s.background].1)
                );
            }
        }
    }
}
