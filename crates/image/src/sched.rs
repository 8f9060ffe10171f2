//! Noise schedules and samplers. A diffusers `scheduler_config.json`
//! gives the training schedule (betas, prediction type, timestep spacing);
//! the sampler is the caller's choice: Euler (diffusers'
//! `EulerDiscreteScheduler`), Euler ancestral, DDIM (η = 0), or LCM
//! (diffusers' `LCMScheduler`, for latent consistency models: 1–8 steps).
//! One-step Turbo models are Euler with `trailing` spacing.

use crate::ImageError;
use rand::Rng;
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampler {
    Euler,
    EulerAncestral,
    Ddim,
    Lcm,
}

impl Sampler {
    pub const NAMES: [&'static str; 4] = ["euler", "euler_a", "ddim", "lcm"];

    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "euler" => Some(Self::Euler),
            "euler_a" | "euler_ancestral" => Some(Self::EulerAncestral),
            "ddim" => Some(Self::Ddim),
            "lcm" => Some(Self::Lcm),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

/// The training schedule.
#[derive(Clone, Debug)]
pub struct Schedule {
    alphas_cumprod: Vec<f32>,
    v_prediction: bool,
    pub spacing: Spacing,
    steps_offset: usize,
    set_alpha_to_one: bool,
    /// Clamp each step's estimate of the clean sample to ±this
    /// (diffusers' `clip_sample` and `clip_sample_range`; pixel models).
    clip_sample: Option<f32>,
    /// LCM: the distillation schedule's steps (`original_inference_steps`)
    /// and the boundary condition's timestep scale (`timestep_scaling`).
    lcm_origin_steps: usize,
    lcm_timestep_scaling: f32,
    /// The sampler the model was made for (`_class_name`: LCMScheduler
    /// means LCM; otherwise Euler).
    pub sampler: Sampler,
}

impl Default for Schedule {
    /// Stable Diffusion 1.x's: scaled-linear betas 0.00085 … 0.012 over
    /// 1,000 steps, ε-prediction, leading spacing with offset 1.
    fn default() -> Self {
        Self::new(0.00085, 0.012, true, 1000, false, Spacing::Leading, 1)
    }
}

impl Schedule {
    fn new(
        start: f32,
        end: f32,
        scaled: bool,
        n: usize,
        v_prediction: bool,
        spacing: Spacing,
        steps_offset: usize,
    ) -> Self {
        let mut ac = Vec::with_capacity(n);
        let mut prod = 1f32;
        for i in 0..n {
            let f = if n > 1 {
                i as f32 / (n - 1) as f32
            } else {
                0.0
            };
            let beta = if scaled {
                let b = start.sqrt() + f * (end.sqrt() - start.sqrt());
                b * b
            } else {
                start + f * (end - start)
            };
            prod *= 1.0 - beta;
            ac.push(prod);
        }
        Self {
            alphas_cumprod: ac,
            v_prediction,
            spacing,
            steps_offset,
            set_alpha_to_one: false,
            clip_sample: None,
            lcm_origin_steps: 50,
            lcm_timestep_scaling: 10.0,
            sampler: Sampler::Euler,
        }
    }

    /// From a diffusers `scheduler/` directory (`scheduler_config.json`).
    pub fn load(dir: &Path) -> Result<Self, ImageError> {
        let path = dir.join("scheduler_config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ImageError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let c: Value =
            serde_json::from_str(&text).map_err(|e| crate::bad(&path, format!("not JSON: {e}")))?;
        let f = |k: &str, d: f64| c.get(k).and_then(Value::as_f64).unwrap_or(d) as f32;
        let s = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or("");
        let n = c
            .get("num_train_timesteps")
            .and_then(Value::as_u64)
            .unwrap_or(1000) as usize;
        if !(2..=10_000).contains(&n) {
            return Err(crate::bad(&path, format!("{n} training timesteps")));
        }
        let scaled = match s("beta_schedule") {
            "" | "scaled_linear" => true,
            "linear" => false,
            other => {
                return Err(crate::bad(
                    &path,
                    format!("beta schedule {other:?} (scaled_linear or linear supported)"),
                ))
            }
        };
        let spacing = match s("timestep_spacing") {
            "trailing" => Spacing::Trailing,
            "linspace" => Spacing::Linspace,
            _ => Spacing::Leading,
        };
        let mut sch = Self::new(
            f("beta_start", 0.00085),
            f("beta_end", 0.012),
            scaled,
            n,
            s("prediction_type") == "v_prediction",
            spacing,
            c.get("steps_offset").and_then(Value::as_u64).unwrap_or(0) as usize,
        );
        sch.set_alpha_to_one = c
            .get("set_alpha_to_one")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if c.get("clip_sample").and_then(Value::as_bool) == Some(true) {
            sch.clip_sample = Some(f("clip_sample_range", 1.0).abs());
        }
        if s("_class_name") == "LCMScheduler" {
            sch.sampler = Sampler::Lcm;
            // diffusers' LCMScheduler ends at ᾱ = 1 unless told otherwise.
            sch.set_alpha_to_one = c
                .get("set_alpha_to_one")
                .and_then(Value::as_bool)
                .unwrap_or(true);
        }
        sch.lcm_origin_steps = (c
            .get("original_inference_steps")
            .and_then(Value::as_u64)
            .unwrap_or(50) as usize)
            .clamp(1, n);
        sch.lcm_timestep_scaling = f("timestep_scaling", 10.0);
        Ok(sch)
    }

    fn train_steps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// LCM's timesteps: `steps` of the distillation schedule's
    /// (every k-th training step, k = train steps ÷ original steps),
    /// evenly spaced by index, noisiest first.
    fn lcm_timesteps(&self, steps: usize) -> Vec<f32> {
        let orig = self.lcm_origin_steps;
        let k = self.train_steps() / orig;
        let origin: Vec<usize> = (1..=orig).rev().map(|i| i * k - 1).collect();
        let steps = steps.clamp(1, orig);
        (0..steps)
            .map(|i| origin[i * orig / steps] as f32)
            .collect()
    }

    /// The timesteps of a `steps`-step run, noisiest first.
    fn timesteps(&self, steps: usize) -> Vec<f32> {
        let n = self.train_steps();
        match self.spacing {
            Spacing::Leading => {
                let ratio = n / steps;
                (0..steps)
                    .rev()
                    .map(|i| (i * ratio + self.steps_offset).min(n - 1) as f32)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = n as f32 / steps as f32;
                (0..steps)
                    .map(|i| ((n as f32 - i as f32 * ratio).round() - 1.0).max(0.0))
                    .collect()
            }
            Spacing::Linspace => (0..steps)
                .rev()
                .map(|i| {
                    if steps > 1 {
                        i as f32 * (n - 1) as f32 / (steps - 1) as f32
                    } else {
                        (n - 1) as f32
                    }
                })
                .collect(),
        }
    }

    /// σ at a (possibly fractional) timestep, interpolated linearly.
    fn sigma(&self, t: f32) -> f32 {
        let s = |i: usize| {
            let a = self.alphas_cumprod[i];
            ((1.0 - a) / a).sqrt()
        };
        let lo = (t.floor() as usize).min(self.train_steps() - 1);
        let hi = (lo + 1).min(self.train_steps() - 1);
        let f = t - lo as f32;
        s(lo) * (1.0 - f) + s(hi) * f
    }

    /// A run of `steps` steps with `sampler`.
    pub fn plan(&self, sampler: Sampler, steps: usize) -> Plan {
        let steps = steps.clamp(1, self.train_steps());
        let timesteps = if sampler == Sampler::Lcm {
            self.lcm_timesteps(steps)
        } else {
            self.timesteps(steps)
        };
        let steps = timesteps.len();
        let mut sigmas: Vec<f32> = timesteps.iter().map(|&t| self.sigma(t)).collect();
        sigmas.push(0.0);
        Plan {
            sampler,
            timesteps,
            sigmas,
            schedule: self.clone(),
            steps,
        }
    }
}

/// One run's timesteps and the sampler's update rule.
pub struct Plan {
    sampler: Sampler,
    pub timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    schedule: Schedule,
    steps: usize,
}

/// The clean sample's and the noise's weights at ᾱ = `a`: √ᾱ and √(1 − ᾱ).
fn alpha_mix(a: f32) -> (f32, f32) {
    (a.sqrt(), (1.0 - a).sqrt())
}

/// A standard normal value (Box–Muller).
pub fn gauss(rng: &mut impl Rng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

impl Plan {
    /// What the initial standard-normal noise is multiplied by.
    pub fn init_noise_sigma(&self) -> f32 {
        match self.sampler {
            Sampler::Ddim | Sampler::Lcm => 1.0,
            _ => {
                let max = self.sigmas.iter().copied().fold(0f32, f32::max);
                if self.schedule.spacing == Spacing::Leading {
                    (max * max + 1.0).sqrt()
                } else {
                    max
                }
            }
        }
    }

    /// ᾱ of the level DDIM's step `i` goes to.
    fn ddim_alpha_after(&self, i: usize) -> f32 {
        let ac = &self.schedule.alphas_cumprod;
        let t = self.timesteps[i] as usize;
        let prev = t as isize - (self.schedule.train_steps() / self.steps) as isize;
        if prev >= 0 {
            ac[prev as usize]
        } else if self.schedule.set_alpha_to_one {
            1.0
        } else {
            ac[0]
        }
    }

    /// The step an image-to-image run of `strength` starts at: the last
    /// `strength` share of the steps run (diffusers' rule), at least one.
    pub fn start_for(&self, strength: f32) -> usize {
        let n = self.timesteps.len();
        let run = ((n as f32 * strength) as usize).clamp(1, n);
        n - run
    }

    /// A clean sample `x0` noised with `noise` to the level step `i` starts
    /// from (`i` = the number of steps: clean), in the sampler's own scale
    /// (diffusers' `add_noise`).
    pub fn noised(&self, i: usize, x0: &[f32], noise: &[f32]) -> Vec<f32> {
        let (a, b) = if i >= self.timesteps.len() {
            (1.0, 0.0)
        } else {
            match self.sampler {
                Sampler::Ddim | Sampler::Lcm => {
                    alpha_mix(self.schedule.alphas_cumprod[self.timesteps[i] as usize])
                }
                _ => (1.0, self.sigmas[i]),
            }
        };
        x0.iter().zip(noise).map(|(x, n)| a * x + b * n).collect()
    }

    /// [`Plan::noised`] at the level step `i` leaves the latents at.
    pub fn noised_after(&self, i: usize, x0: &[f32], noise: &[f32]) -> Vec<f32> {
        match self.sampler {
            // DDIM's step goes a fixed stride down, not to the next timestep.
            Sampler::Ddim if i + 1 < self.timesteps.len() => {
                let (a, b) = alpha_mix(self.ddim_alpha_after(i));
                x0.iter().zip(noise).map(|(x, n)| a * x + b * n).collect()
            }
            _ => self.noised(i + 1, x0, noise),
        }
    }

    /// What the latents are multiplied by before step `i`'s model call.
    pub fn input_scale(&self, i: usize) -> f32 {
        match self.sampler {
            Sampler::Ddim | Sampler::Lcm => 1.0,
            _ => 1.0 / (self.sigmas[i] * self.sigmas[i] + 1.0).sqrt(),
        }
    }

    /// The update after step `i`: `x` becomes the next, less noisy latents
    /// given the model's output `out` (ε or v).
    pub fn step(&self, i: usize, x: &mut [f32], out: &[f32], rng: &mut impl Rng) {
        let v_pred = self.schedule.v_prediction;
        match self.sampler {
            Sampler::Euler | Sampler::EulerAncestral => {
                let (s, s_next) = (self.sigmas[i], self.sigmas[i + 1]);
                let (s_down, s_up) = if self.sampler == Sampler::EulerAncestral && s > 0.0 {
                    let up = (s_next * s_next * (s * s - s_next * s_next) / (s * s))
                        .max(0.0)
                        .sqrt();
                    ((s_next * s_next - up * up).max(0.0).sqrt(), up)
                } else {
                    (s_next, 0.0)
                };
                let clip = self.schedule.clip_sample;
                for (xv, &o) in x.iter_mut().zip(out) {
                    let mut x0 = if v_pred {
                        o * (-s / (s * s + 1.0).sqrt()) + *xv / (s * s + 1.0)
                    } else {
                        *xv - s * o
                    };
                    if let Some(r) = clip {
                        x0 = x0.clamp(-r, r);
                    }
                    let d = (*xv - x0) / s;
                    *xv += d * (s_down - s);
                    if s_up > 0.0 {
                        *xv += gauss(rng) * s_up;
                    }
                }
            }
            Sampler::Ddim => {
                let a = self.schedule.alphas_cumprod[self.timesteps[i] as usize];
                let a_prev = self.ddim_alpha_after(i);
                let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
                let clip = self.schedule.clip_sample;
                for (xv, &o) in x.iter_mut().zip(out) {
                    let (mut x0, mut eps) = if v_pred {
                        (sa * *xv - sb * o, sa * o + sb * *xv)
                    } else {
                        ((*xv - sb * o) / sa, o)
                    };
                    if let Some(r) = clip {
                        // As diffusers' DDIM: the noise follows the clamped estimate.
                        x0 = x0.clamp(-r, r);
                        eps = (*xv - sa * x0) / sb;
                    }
                    *xv = a_prev.sqrt() * x0 + (1.0 - a_prev).sqrt() * eps;
                }
            }
            Sampler::Lcm => {
                // The consistency function: the clean estimate mixed with
                // the input by the boundary condition's scalings, then
                // noised afresh to the next timestep (not after the last).
                let ac = &self.schedule.alphas_cumprod;
                let t = self.timesteps[i];
                let a = ac[t as usize];
                let last = i + 1 == self.timesteps.len();
                let a_prev = if last {
                    a
                } else {
                    ac[self.timesteps[i + 1] as usize]
                };
                let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
                let st = t * self.schedule.lcm_timestep_scaling;
                let c_skip = 0.25 / (st * st + 0.25);
                let c_out = st / (st * st + 0.25).sqrt();
                let clip = self.schedule.clip_sample;
                for (xv, &o) in x.iter_mut().zip(out) {
                    let mut x0 = if v_pred {
                        sa * *xv - sb * o
                    } else {
                        (*xv - sb * o) / sa
                    };
                    if let Some(r) = clip {
                        x0 = x0.clamp(-r, r);
                    }
                    let denoised = c_out * x0 + c_skip * *xv;
                    *xv = if last {
                        denoised
                    } else {
                        a_prev.sqrt() * denoised + (1.0 - a_prev).sqrt() * gauss(rng)
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd_timesteps_match_diffusers() {
        let s = Schedule::default();
        // diffusers EulerDiscreteScheduler (SD 1.5 config), 4 steps.
        assert_eq!(
            s.plan(Sampler::Euler, 4).timesteps,
            vec![751.0, 501.0, 251.0, 1.0]
        );
        let mut t = s.clone();
        t.spacing = Spacing::Trailing;
        assert_eq!(t.plan(Sampler::Euler, 1).timesteps, vec![999.0]);
        assert_eq!(
            t.plan(Sampler::Euler, 4).timesteps,
            vec![999.0, 749.0, 499.0, 249.0]
        );
        // σ_max of SD's schedule is 14.61.
        assert!(
            (s.sigma(999.0) - 14.6146).abs() < 1e-2,
            "{}",
            s.sigma(999.0)
        );
    }

    #[test]
    fn euler_reaches_the_clean_sample_when_the_model_is_exact() {
        // With a model that returns the true noise, one Euler step to σ = 0
        // gives back the clean latents.
        let s = Schedule::default();
        let p = s.plan(Sampler::Euler, 1);
        let x0 = [0.5f32, -1.0, 2.0];
        let eps = [1.0f32, 0.3, -0.7];
        let sigma = p.sigmas[0];
        let mut x: Vec<f32> = x0.iter().zip(&eps).map(|(a, e)| a + sigma * e).collect();
        let mut rng = rand::rng();
        p.step(0, &mut x, &eps, &mut rng);
        for (a, b) in x.iter().zip(&x0) {
            assert!((a - b).abs() < 1e-4);
        }
    }
}
