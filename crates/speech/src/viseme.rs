//! What a talking face needs: mouth shapes (visemes) timed against the
//! synthesised audio, and an expression for what is being said.
//!
//! The phonemes are espeak-ng's own (its IPA transcription of the same
//! text, in the same voice); their timing comes from the audio: the
//! phonemes are laid over the frames where there is sound, vowels twice as
//! long as consonants, and the mouth rests in the pauses. espeak-ng's
//! command line does not report phoneme times, and its library would run
//! in-process; this keeps it a bounded child process.

use serde::Serialize;

/// A mouth shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mouth {
    /// Closed and relaxed: silence.
    Rest,
    /// Lips pressed together: m, b, p.
    Closed,
    /// Lower lip to the teeth: f, v.
    Lip,
    /// Wide open: a.
    Open,
    /// Half open: e, ə.
    Mid,
    /// Spread: i, j, ü.
    Spread,
    /// Rounded: o.
    Round,
    /// Pursed: u, w.
    Pursed,
    /// Teeth together, slightly open: s, t, k, n, l, ch…
    Teeth,
}

/// The mouth changes to `mouth` at `at_ms` milliseconds into the audio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Cue {
    pub at_ms: u32,
    pub mouth: Mouth,
}

/// The mouth shape of one IPA symbol (`None`: a mark that is not a sound:
/// stress, length, tone numbers, syllable dots).
fn mouth_of(c: char) -> Option<Mouth> {
    Some(match c {
        'm' | 'b' | 'p' | 'ɱ' => Mouth::Closed,
        'f' | 'v' => Mouth::Lip,
        'a' | 'ɑ' | 'æ' | 'ɐ' | 'ʌ' | 'ä' => Mouth::Open,
        'e' | 'ɛ' | 'ə' | 'ɜ' | 'ɚ' | 'ɝ' | 'ɤ' | 'ɘ' => Mouth::Mid,
        'i' | 'ɪ' | 'j' | 'y' | 'ʏ' | 'ɨ' | 'ɿ' | 'ʅ' => Mouth::Spread,
        'o' | 'ɔ' | 'ɒ' | 'ø' | 'œ' => Mouth::Round,
        'u' | 'ʊ' | 'w' | 'ɯ' | 'ʉ' | 'ɥ' => Mouth::Pursed,
        // Stress, length and aspiration marks are letters to Unicode.
        '\u{02B0}'..='\u{02FF}' => return None,
        c if c.is_alphabetic() => Mouth::Teeth,
        _ => return None,
    })
}

fn is_vowel(m: Mouth) -> bool {
    matches!(
        m,
        Mouth::Open | Mouth::Mid | Mouth::Spread | Mouth::Round | Mouth::Pursed
    )
}

/// The sounds of an IPA transcription, in order, one mouth each.
pub fn mouths(ipa: &str) -> Vec<Mouth> {
    ipa.chars().filter_map(mouth_of).collect()
}

/// Length of an analysis frame.
const FRAME_MS: u32 = 10;

/// Lay `sounds` over the audio (`samples` at `rate`): one cue per change
/// of mouth, starting at 0 and ending at rest.
pub fn align(sounds: &[Mouth], samples: &[f32], rate: u32) -> Vec<Cue> {
    let frame = (rate * FRAME_MS / 1000).max(1) as usize;
    let energy: Vec<f32> = samples
        .chunks(frame)
        .map(|c| (c.iter().map(|x| x * x).sum::<f32>() / c.len() as f32).sqrt())
        .collect();
    let peak = energy.iter().cloned().fold(0.0f32, f32::max);
    let mut cues = vec![Cue {
        at_ms: 0,
        mouth: Mouth::Rest,
    }];
    let mut push = |at_ms: u32, mouth: Mouth| {
        if cues.last().is_some_and(|c| c.mouth == mouth) {
            return;
        }
        if let Some(last) = cues.last_mut().filter(|c| c.at_ms == at_ms) {
            last.mouth = mouth;
        } else {
            cues.push(Cue { at_ms, mouth });
        }
    };
    if peak <= 1e-4 || sounds.is_empty() {
        return cues;
    }
    let voiced: Vec<bool> = energy.iter().map(|&e| e > 0.06 * peak).collect();
    let active = voiced.iter().filter(|&&v| v).count();
    let weight = |m: Mouth| if is_vowel(m) { 2.0f32 } else { 1.0 };
    let total: f32 = sounds.iter().map(|&m| weight(m)).sum();
    // Sound i covers the active frames in [ends[i-1], ends[i]).
    let mut ends = Vec::with_capacity(sounds.len());
    let mut acc = 0.0f32;
    for &m in sounds {
        acc += weight(m);
        ends.push(acc / total * active as f32);
    }
    let mut seen = 0usize;
    let mut sound = 0usize;
    for (f, &v) in voiced.iter().enumerate() {
        let at = f as u32 * FRAME_MS;
        if !v {
            push(at, Mouth::Rest);
            continue;
        }
        while sound + 1 < sounds.len() && (seen as f32) >= ends[sound] {
            sound += 1;
        }
        push(at, sounds[sound]);
        seen += 1;
    }
    push(energy.len() as u32 * FRAME_MS, Mouth::Rest);
    cues
}

/// A face to show while saying something.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Expression {
    Neutral,
    Smiling,
    Surprised,
    Sad,
}

const SAD: &[&str] = &[
    "抱歉",
    "对不起",
    "遗憾",
    "难过",
    "可惜",
    "不幸",
    "伤心",
    "sorry",
    "unfortunately",
    "regret",
    "sad",
    "apolog",
];
const SURPRISED: &[&str] = &[
    "哇",
    "竟然",
    "居然",
    "没想到",
    "真的吗",
    "惊人",
    "wow",
    "amazing",
    "incredible",
    "surprising",
    "really?",
];
const SMILING: &[&str] = &[
    "你好",
    "您好",
    "很高兴",
    "高兴",
    "开心",
    "欢迎",
    "太好",
    "哈哈",
    "谢谢",
    "不客气",
    "祝",
    "恭喜",
    "当然可以",
    "hello",
    "hi ",
    "glad",
    "happy",
    "welcome",
    "great",
    "thank",
    "congrat",
    "of course",
    "😊",
    "😄",
];

/// The expression for a sentence: sorrow and surprise before smiles,
/// neutral when nothing says otherwise.
pub fn expression(sentence: &str) -> Expression {
    let s = sentence.to_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| s.contains(w));
    if has(SAD) {
        Expression::Sad
    } else if has(SURPRISED) {
        Expression::Surprised
    } else if has(SMILING) {
        Expression::Smiling
    } else {
        Expression::Neutral
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipa_becomes_mouths() {
        // espeak-ng's "ni3 hao3" and "mama"; stress marks and tones are not sounds.
        assert_eq!(
            mouths("nˈiɜ χˈɑu2"),
            [
                Mouth::Teeth,
                Mouth::Spread,
                Mouth::Mid,
                Mouth::Teeth,
                Mouth::Open,
                Mouth::Pursed
            ]
        );
        assert_eq!(
            mouths("mˈɑːmə"),
            [Mouth::Closed, Mouth::Open, Mouth::Closed, Mouth::Mid]
        );
    }

    fn tone(ms: u32, rate: u32) -> Vec<f32> {
        (0..rate * ms / 1000)
            .map(|i| (i as f32 * 0.05).sin() * 0.5)
            .collect()
    }

    #[test]
    fn sounds_are_laid_over_the_voiced_frames() {
        let rate = 24_000;
        // 200 ms of sound, 100 ms of silence, 200 ms of sound.
        let mut audio = tone(200, rate);
        audio.extend(vec![0.0; (rate / 10) as usize]);
        audio.extend(tone(200, rate));
        let sounds = [Mouth::Closed, Mouth::Open, Mouth::Closed, Mouth::Open];
        let cues = align(&sounds, &audio, rate);
        assert_eq!(cues[0].at_ms, 0);
        assert_eq!(
            cues.last().map(|c| (c.at_ms, c.mouth)),
            Some((500, Mouth::Rest))
        );
        // In order, each sound once, the pause at rest.
        let shapes: Vec<Mouth> = cues.iter().map(|c| c.mouth).collect();
        assert_eq!(
            shapes,
            [
                Mouth::Closed,
                Mouth::Open,
                Mouth::Rest,
                Mouth::Closed,
                Mouth::Open,
                Mouth::Rest
            ]
        );
        let pause = cues[2];
        assert_eq!(pause.at_ms, 200);
        // Vowels last twice as long as consonants: 400 voiced ms / 6 units.
        let closed = cues[1].at_ms - cues[0].at_ms;
        assert!((60..=70).contains(&closed), "{cues:?}");
        assert!(cues.windows(2).all(|w| w[0].at_ms < w[1].at_ms));
    }

    #[test]
    fn silence_keeps_the_mouth_at_rest() {
        let cues = align(&[Mouth::Open], &vec![0.0; 24_000], 24_000);
        assert_eq!(cues.len(), 1);
        assert_eq!(cues[0].mouth, Mouth::Rest);
    }

    #[test]
    fn expressions_follow_the_words() {
        assert_eq!(expression("很抱歉，我不知道。"), Expression::Sad);
        assert_eq!(expression("哇，这真是太神奇了！"), Expression::Surprised);
        assert_eq!(expression("你好！很高兴见到你。"), Expression::Smiling);
        assert_eq!(expression("Glad to help."), Expression::Smiling);
        assert_eq!(expression("北京是中国的首都。"), Expression::Neutral);
        assert_eq!(expression("Sorry, but great question."), Expression::Sad);
    }
}
