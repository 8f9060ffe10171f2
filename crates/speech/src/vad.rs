//! Voice-activity detection by energy: 30 ms frames whose loudness stands
//! well above the recording's noise floor are speech; short gaps are
//! bridged, and regions get a margin on both sides, so that only long
//! silences are skipped. Quiet recordings with no frame loud enough in
//! absolute terms hold no speech at all.

/// Frames louder than the floor by this many decibels are speech.
const ABOVE_FLOOR_DB: f32 = 12.0;
/// Below this (dBFS) a frame is silence whatever the floor.
const ABSOLUTE_DB: f32 = -50.0;
/// Gaps shorter than this stay inside a region.
const BRIDGE_S: f32 = 2.0;
/// Seconds kept before and after each region.
const MARGIN_S: f32 = 0.4;

/// Sample ranges `(start, end)` that hold speech, in order.
pub fn speech(samples: &[f32], rate: u32) -> Vec<(usize, usize)> {
    let frame = (rate as usize * 30 / 1000).max(1);
    let db: Vec<f32> = samples
        .chunks(frame)
        .map(|c| {
            let e = c.iter().map(|v| v * v).sum::<f32>() / c.len() as f32;
            10.0 * e.max(1e-12).log10()
        })
        .collect();
    if db.is_empty() {
        return Vec::new();
    }
    // The noise floor: the 10th percentile of frame loudness.
    let mut sorted = db.clone();
    sorted.sort_by(f32::total_cmp);
    let floor = sorted[sorted.len() / 10];
    let threshold = (floor + ABOVE_FLOOR_DB).max(ABSOLUTE_DB);
    let to_frames = |s: f32| (s * 1000.0 / 30.0).ceil() as usize;
    let (bridge, margin) = (to_frames(BRIDGE_S), to_frames(MARGIN_S));
    let mut regions: Vec<(usize, usize)> = Vec::new();
    for (i, v) in db.iter().enumerate() {
        if *v < threshold {
            continue;
        }
        match regions.last_mut() {
            Some((_, end)) if i <= *end + bridge => *end = i + 1,
            _ => regions.push((i, i + 1)),
        }
    }
    let n = db.len();
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (a, b) in regions {
        let (a, b) = (a.saturating_sub(margin), (b + margin).min(n));
        match out.last_mut() {
            Some((_, end)) if a <= *end => *end = b,
            _ => out.push((a, b)),
        }
    }
    out.into_iter()
        .map(|(a, b)| (a * frame, (b * frame).min(samples.len())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_skipped_and_speech_like_bursts_are_kept() {
        let rate = 16_000;
        let mut x = vec![0f32; rate as usize * 20];
        // Faint noise everywhere, a loud burst at 5–7 s and at 15–16 s.
        let mut s = 1u32;
        for v in x.iter_mut() {
            s = s.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            *v = ((s >> 16) as f32 / 65_536.0 - 0.5) * 0.002;
        }
        for (a, b) in [(5.0, 7.0), (15.0, 16.0)] {
            let (a, b) = ((a * 16_000.0) as usize, (b * 16_000.0) as usize);
            for (i, v) in x.iter_mut().enumerate().take(b).skip(a) {
                *v += 0.3 * (i as f32 * 0.05).sin();
            }
        }
        let r = speech(&x, rate);
        assert_eq!(r.len(), 2, "{r:?}");
        let secs = |v: usize| v as f32 / 16_000.0;
        assert!(
            (secs(r[0].0) - 4.6).abs() < 0.1 && (secs(r[0].1) - 7.4).abs() < 0.1,
            "{r:?}"
        );
        assert!((secs(r[1].0) - 14.6).abs() < 0.1, "{r:?}");
        // Pure silence and faint noise hold no speech.
        assert!(speech(&vec![0.0; 32_000], rate).is_empty());
        assert!(speech(&x[..4 * 16_000], rate).is_empty());
    }
}
