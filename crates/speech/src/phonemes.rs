//! Phonemes in the notation Kokoro was trained on (misaki's): Mandarin
//! from tone-numbered pinyin — the pinyin-to-IPA tables of misaki (adapted
//! from the MIT-licensed `pinyin-to-ipa`), written again here — with tones
//! as arrows (→ ↗ ↓ ↘, none for the neutral tone), syllables of a word
//! run together and words apart; English from espeak-ng's IPA with
//! misaki's substitutions (diphthongs and affricates as single letters:
//! `eɪ` → `A`, `aɪ` → `I`, `tʃ` → `ʧ` …).

use crate::text::Spoken;

/// `pinyin-to-ipa`'s initials (strict: `y` and `w` are spelling, not
/// sounds).
const INITIALS: &[(&str, &str)] = &[
    ("zh", "ꭧ"),
    ("ch", "ꭧʰ"),
    ("sh", "ʂ"),
    ("b", "p"),
    ("c", "ʦʰ"),
    ("d", "t"),
    ("f", "f"),
    ("g", "k"),
    ("h", "x"),
    ("j", "ʨ"),
    ("k", "kʰ"),
    ("l", "l"),
    ("m", "m"),
    ("n", "n"),
    ("p", "pʰ"),
    ("q", "ʨʰ"),
    ("r", "ɻ"),
    ("s", "s"),
    ("t", "tʰ"),
    ("x", "ɕ"),
    ("z", "ʦ"),
];

/// Finals; `0` marks where the tone goes (after the syllable's vowel).
const FINALS: &[(&str, &str)] = &[
    ("a", "a0"),
    ("ai", "ai0"),
    ("an", "a0n"),
    ("ang", "a0ŋ"),
    ("ao", "au0"),
    ("e", "ɤ0"),
    ("ei", "ei0"),
    ("en", "ə0n"),
    ("eng", "ə0ŋ"),
    ("i", "i0"),
    ("ia", "ja0"),
    ("ian", "jɛ0n"),
    ("iang", "ja0ŋ"),
    ("iao", "jau0"),
    ("ie", "je0"),
    ("in", "i0n"),
    ("iou", "jou0"),
    ("ing", "i0ŋ"),
    ("iong", "jʊ0ŋ"),
    ("ong", "ʊ0ŋ"),
    ("ou", "ou0"),
    ("u", "u0"),
    ("uei", "wei0"),
    ("ua", "wa0"),
    ("uai", "wai0"),
    ("uan", "wa0n"),
    ("uen", "wə0n"),
    ("uang", "wa0ŋ"),
    ("ueng", "wə0ŋ"),
    ("uo", "wo0"),
    ("o", "wo0"),
    ("ü", "y0"),
    ("üe", "ɥe0"),
    ("üan", "ɥɛ0n"),
    ("ün", "y0n"),
];

/// Whole syllables that are not initial + final: interjections and
/// syllabic consonants.
const WHOLE: &[(&str, &str)] = &[
    ("io", "jɔ0"),
    ("ê", "ɛ0"),
    ("er", "ɚ0"),
    ("o", "ɔ0"),
    ("hm", "hm0"),
    ("hng", "hŋ0"),
    ("m", "m0"),
    ("n", "n0"),
    ("ng", "ŋ0"),
];

/// One tone-numbered pinyin syllable (`ni3`, `lü4`, `lv4`, `de5`, `ma`)
/// in Kokoro's notation; `None` for what is not a syllable.
pub fn syllable(py: &str) -> Option<String> {
    let py = py.trim().to_lowercase();
    let (body, tone) = match py.chars().last()? {
        d @ '1'..='5' => (&py[..py.len() - 1], d),
        _ => (py.as_str(), '5'),
    };
    let body = body.replace("u:", "ü").replace('v', "ü");
    let arrow = match tone {
        '1' => "→",
        '2' => "↗",
        '3' => "↓",
        '4' => "↘",
        _ => "",
    };
    let with_tone = |s: &str| s.replace('0', arrow);
    if let Some((_, ipa)) = WHOLE.iter().find(|(w, _)| *w == body) {
        return Some(with_tone(ipa));
    }
    let (initial, rest) = match INITIALS.iter().find(|(i, _)| body.starts_with(i)) {
        Some((i, ipa)) => (Some((*i, *ipa)), &body[i.len()..]),
        None => (None, body.as_str()),
    };
    let final_ = match (initial.map(|(i, _)| i), rest) {
        // y- and w- spell finals that begin with i, ü and u.
        (None, r) if r.starts_with("yu") => format!("ü{}", &r[2..]),
        (None, r) if r.starts_with("yi") => r[1..].to_string(),
        // 哟 yo: pinyin-to-ipa reads it as its final o (wo).
        (None, "yo") => "o".to_string(),
        (None, r) if r.starts_with('y') => format!("i{}", &r[1..]),
        (None, r) if r.starts_with("wu") => r[1..].to_string(),
        (None, r) if r.starts_with('w') => format!("u{}", &r[1..]),
        // After j, q, x the u written is ü.
        (Some("j" | "q" | "x"), r) if r.starts_with('u') => format!("ü{}", &r[1..]),
        // nüe and lüe, often written nue and lue.
        (Some("n" | "l"), "ue") => "üe".to_string(),
        (_, "iu") => "iou".to_string(),
        (_, "ui") => "uei".to_string(),
        (_, "un") => "uen".to_string(),
        (_, r) => r.to_string(),
    };
    let final_ipa = match (initial.map(|(i, _)| i), final_.as_str()) {
        // The "empty" vowel of zhi chi shi ri and zi ci si.
        (Some("zh" | "ch" | "sh" | "r" | "z" | "c" | "s"), "i") => "ɨ0",
        (_, f) => FINALS.iter().find(|(k, _)| *k == f).map(|(_, v)| *v)?,
    };
    Some(format!(
        "{}{}",
        initial.map(|(_, ipa)| ipa).unwrap_or(""),
        with_tone(final_ipa)
    ))
}

/// Chinese words and pauses ([`crate::text::pinyin_words`]) as Kokoro's
/// phonemes: the syllables of a word together, words apart, pauses as
/// their punctuation.
pub fn chinese(spoken: &[Spoken]) -> String {
    let mut out = String::new();
    for s in spoken {
        match s {
            Spoken::Word(w) => {
                if !out.is_empty() && !out.ends_with(' ') {
                    out.push(' ');
                }
                for py in w {
                    if let Some(ipa) = syllable(py) {
                        out.push_str(&ipa);
                    }
                }
            }
            Spoken::Pause(p) => {
                out.push(*p);
                out.push(' ');
            }
        }
    }
    out.trim_end().to_string()
}

/// misaki's substitutions for espeak-ng's IPA (with `^` as the tie).
const ESPEAK_TO_KOKORO: &[(&str, &str)] = &[
    ("a^ɪ", "I"),
    ("a^ʊ", "W"),
    ("d^z", "ʣ"),
    ("d^ʒ", "ʤ"),
    ("e^ɪ", "A"),
    ("o^ʊ", "O"),
    ("ə^ʊ", "Q"),
    ("s^s", "S"),
    ("t^s", "ʦ"),
    ("t^ʃ", "ʧ"),
    ("ɔ^ɪ", "Y"),
];

/// One clause of espeak-ng's IPA (`espeak-ng -q --ipa --tie=^`) in
/// Kokoro's notation.
pub fn english(espeak_ipa: &str) -> String {
    let mut s = espeak_ipa.split_whitespace().collect::<Vec<_>>().join(" ");
    for (from, to) in ESPEAK_TO_KOKORO {
        s = s.replace(from, to);
    }
    // espeak-ng before 1.52 writes the vowel of "more" as oː, later ones
    // (and Kokoro's training data) as ɔː.
    s.replace('o', "ɔ").replace(['^', '-'], "")
}

/// English text cut at punctuation: each clause (to give espeak-ng) with
/// the punctuation that follows it.
pub fn english_clauses(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut words = String::new();
    let mut marks = String::new();
    for c in text.chars() {
        if matches!(c, ',' | '.' | '!' | '?' | ';' | ':' | '…' | '(' | ')' | '"') {
            marks.push(c);
        } else {
            if !marks.is_empty() && !words.trim().is_empty() {
                out.push((words.trim().to_string(), std::mem::take(&mut marks)));
                words.clear();
            }
            marks.clear();
            words.push(c);
        }
    }
    if !words.trim().is_empty() {
        out.push((words.trim().to_string(), marks));
    }
    out
}

/// The mouth-shape reading of Kokoro's phonemes: its single-letter
/// diphthongs spelled out in IPA again, for [`crate::viseme::mouths`].
pub fn as_ipa(phonemes: &str) -> String {
    let mut s = String::with_capacity(phonemes.len());
    for c in phonemes.chars() {
        match c {
            'A' => s.push_str("eɪ"),
            'I' => s.push_str("aɪ"),
            'O' => s.push_str("oʊ"),
            'W' => s.push_str("aʊ"),
            'Y' => s.push_str("ɔɪ"),
            'Q' => s.push_str("əʊ"),
            'T' => s.push('ɾ'),
            'S' => s.push('s'),
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syllables_in_kokoro_notation() {
        for (py, ipa) in [
            ("ni3", "ni↓"),
            ("hao3", "xau↓"),
            ("jin1", "ʨi→n"),
            ("tian1", "tʰjɛ→n"),
            ("qu4", "ʨʰy↘"),
            ("lü3", "ly↓"),
            ("lv3", "ly↓"),
            ("nüe4", "nɥe↘"),
            ("nue4", "nɥe↘"),
            ("ri4", "ɻɨ↘"),
            ("zi5", "ʦɨ"),
            ("zhi1", "ꭧɨ→"),
            ("shi4", "ʂɨ↘"),
            ("er2", "ɚ↗"),
            ("yi1", "i→"),
            ("ying2", "i↗ŋ"),
            ("you3", "jou↓"),
            ("yuan2", "ɥɛ↗n"),
            ("yun4", "y↘n"),
            ("wu3", "u↓"),
            ("wei4", "wei↘"),
            ("wo3", "wo↓"),
            ("gui4", "kwei↘"),
            ("liu2", "ljou↗"),
            ("dun1", "twə→n"),
            ("jun1", "ʨy→n"),
            ("xue2", "ɕɥe↗"),
            ("bo2", "pwo↗"),
            ("de5", "tɤ"),
            ("ma", "ma"),
            ("ng2", "ŋ↗"),
            ("m2", "m↗"),
            ("yong3", "jʊ↓ŋ"),
        ] {
            assert_eq!(syllable(py).as_deref(), Some(ipa), "{py}");
        }
        assert_eq!(syllable("xyz1"), None);
        assert_eq!(syllable(""), None);
        assert_eq!(syllable("3"), None);
    }

    #[test]
    fn words_run_together_and_pauses_keep_their_marks() {
        let spoken = crate::text::pinyin_words("你好，我们去公园吧。");
        assert_eq!(chinese(&spoken), "ni↗xau↓, wo↓mən ʨʰy↘ kʊ→ŋɥɛ↗n pa.");
    }

    #[test]
    fn english_from_espeak_ipa() {
        assert_eq!(
            english("ðə mˈiːɾɪŋ stˈɑː^ɹts æt nˈa^ɪn θˈɜːɾi"),
            "ðə mˈiːɾɪŋ stˈɑːɹts æt nˈIn θˈɜːɾi"
        );
        assert_eq!(english("təmˈɑːɹo^ʊ  mˈoː^ɹnɪŋ"), "təmˈɑːɹO mˈɔːɹnɪŋ");
        assert_eq!(
            english_clauses("Hello, world! How are you?"),
            [
                ("Hello".to_string(), ",".to_string()),
                ("world".to_string(), "!".to_string()),
                ("How are you".to_string(), "?".to_string())
            ]
        );
        assert_eq!(
            english_clauses("no marks"),
            [("no marks".to_string(), String::new())]
        );
        assert_eq!(as_ipa("həlˈO"), "həlˈoʊ");
    }
}
