//! Text as a speaker reads it: numbers, dates, times, percentages and
//! units written the way a Chinese speaker says them (`2026年11月29日` →
//! 二零二六年十一月二十九日, `9:30` → 九点三十分, `25%` → 百分之二十五),
//! Hanzi turned into tone-numbered pinyin with word context (jieba) for
//! common polyphones and the tone sandhi of 3-3, 一 and 不, mixed
//! Chinese / English split into runs for the two voices, and sentences
//! for speaking as they are ready.

use chinese_number::{ChineseCase, ChineseCountMethod, ChineseVariant, NumberToChinese};
use pinyin::ToPinyin;
use regex::Regex;
use std::sync::LazyLock;

/// A stretch of text for one voice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Run {
    /// Tone-numbered pinyin syllables and pauses, for espeak-ng's
    /// `cmn-latn-pinyin` voice.
    Chinese(String),
    /// Plain text for the English voice.
    English(String),
}

fn is_han(c: char) -> bool {
    matches!(c as u32, 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF | 0x20000..=0x2FA1F)
}

fn integer(n: &str) -> String {
    match n.parse::<i128>() {
        Ok(v) => v
            .to_chinese(
                ChineseVariant::Simple,
                ChineseCase::Lower,
                ChineseCountMethod::TenThousand,
            )
            .unwrap_or_else(|_| digits(n)),
        Err(_) => digits(n),
    }
}

/// Digits one by one (years, phone numbers, decimals): 2026 → 二零二六.
fn digits(n: &str) -> String {
    n.chars()
        .map(|c| match c {
            '0' => '零',
            '1' => '一',
            '2' => '二',
            '3' => '三',
            '4' => '四',
            '5' => '五',
            '6' => '六',
            '7' => '七',
            '8' => '八',
            '9' => '九',
            c => c,
        })
        .collect()
}

fn number(int: &str, frac: Option<&str>) -> String {
    // Long digit strings (phone numbers, codes) are read digit by digit.
    let mut s = if int.len() > 10 {
        digits(int)
    } else {
        integer(int)
    };
    if let Some(f) = frac.filter(|f| !f.is_empty()) {
        s.push('点');
        s.push_str(&digits(f));
    }
    s
}

static UNITS: &[(&str, &str)] = &[
    ("km/h", "公里每小时"),
    ("km", "公里"),
    ("kg", "公斤"),
    ("cm", "厘米"),
    ("mm", "毫米"),
    ("ml", "毫升"),
    ("°C", "摄氏度"),
    ("℃", "摄氏度"),
    ("kW", "千瓦"),
    ("GB", "G B"),
    ("m", "米"),
    ("g", "克"),
    ("L", "升"),
];

// Constant patterns: a failure to compile is a bug every test catches.
// `(?-u:\b)`: an ASCII word boundary (Chinese characters count as word
// characters for the Unicode one).
static YEAR: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(\d{4})\s*年").expect("constant pattern"));
static TIME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?-u:\b)(\d{1,2}):(\d{2})(?-u:\b)").expect("constant pattern"));
static PERCENT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(-?)(\d+)(?:\.(\d+))?\s*[%％]").expect("constant pattern"));
static NUM_UNIT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(-?)(\d+)(?:\.(\d+))?\s*(°C|℃|(?:km/h|km|kg|cm|mm|ml|kW|GB|m|g|L)(?-u:\b))?")
        .expect("constant pattern")
});

/// "负" for a minus sign, "到" for a dash between numbers (3-5天).
fn sign(text: &str, c: &regex::Captures) -> &'static str {
    let (Some(m), Some(all)) = (c.get(1), c.get(0)) else {
        return "";
    };
    if m.as_str().is_empty() {
        return "";
    }
    let before = text[..all.start()].chars().next_back();
    if before.is_some_and(|b| b.is_ascii_digit() || "零一二三四五六七八九十百千万".contains(b))
    {
        "到"
    } else {
        "负"
    }
}

/// Numbers, dates, times, percentages and units as a Chinese speaker says
/// them. Applied only to text that holds Chinese characters; English text
/// is left to the English voice, which reads digits itself.
pub fn normalize_zh(text: &str) -> String {
    if !text.chars().any(is_han) {
        return text.to_string();
    }
    let s = YEAR.replace_all(text, |c: &regex::Captures| format!("{}年", digits(&c[1])));
    let s = TIME.replace_all(&s, |c: &regex::Captures| {
        let m: u32 = c[2].parse().unwrap_or(0);
        let minutes = match m {
            0 => "整".to_string(),
            1..=9 => format!("零{}分", integer(&m.to_string())),
            _ => format!("{}分", integer(&m.to_string())),
        };
        format!("{}点{minutes}", integer(&c[1]))
    });
    let t = s.clone();
    let s = PERCENT.replace_all(&t, |c: &regex::Captures| {
        let neg = sign(&t, c);
        format!("{neg}百分之{}", number(&c[2], c.get(3).map(|m| m.as_str())))
    });
    let t = s.into_owned();
    let s = NUM_UNIT.replace_all(&t, |c: &regex::Captures| {
        let neg = sign(&t, c);
        let unit = c
            .get(4)
            .and_then(|u| UNITS.iter().find(|(k, _)| *k == u.as_str()))
            .map(|(_, v)| *v)
            .unwrap_or("");
        format!("{neg}{}{unit}", number(&c[2], c.get(3).map(|m| m.as_str())))
    });
    s.into_owned()
}

/// Words whose characters are read differently from their most common
/// reading (the polyphones a news or chat text meets most).
static WORDS: &[(&str, &[&str])] = &[
    ("银行", &["yin2", "hang2"]),
    ("行业", &["hang2", "ye4"]),
    ("长城", &["chang2", "cheng2"]),
    ("长大", &["zhang3", "da4"]),
    ("成长", &["cheng2", "zhang3"]),
    ("校长", &["xiao4", "zhang3"]),
    ("重要", &["zhong4", "yao4"]),
    ("重新", &["chong2", "xin1"]),
    ("还是", &["hai2", "shi4"]),
    ("还有", &["hai2", "you3"]),
    ("还款", &["huan2", "kuan3"]),
    ("音乐", &["yin1", "yue4"]),
    ("快乐", &["kuai4", "le4"]),
    ("觉得", &["jue2", "de5"]),
    ("睡觉", &["shui4", "jiao4"]),
    ("得到", &["de2", "dao4"]),
    ("一会儿", &["yi2", "hui4", "er5"]),
    ("地方", &["di4", "fang5"]),
    ("东西", &["dong1", "xi5"]),
    ("朋友", &["peng2", "you5"]),
    ("什么", &["shen2", "me5"]),
    ("为了", &["wei4", "le5"]),
    ("因为", &["yin1", "wei4"]),
    ("了解", &["liao3", "jie3"]),
    ("数据", &["shu4", "ju4"]),
    ("处理", &["chu3", "li3"]),
    ("中国", &["zhong1", "guo2"]),
    ("都是", &["dou1", "shi4"]),
    ("首都", &["shou3", "du1"]),
    ("差不多", &["cha4", "bu5", "duo1"]),
    ("好的", &["hao3", "de5"]),
    ("部长", &["bu4", "zhang3"]),
    ("家长", &["jia1", "zhang3"]),
    ("市长", &["shi4", "zhang3"]),
    ("队长", &["dui4", "zhang3"]),
    ("增长", &["zeng1", "zhang3"]),
    ("生长", &["sheng1", "zhang3"]),
];

/// Characters whose everyday reading is not the pinyin table's first one.
static CHARS: &[(char, &str)] = &[
    ('长', "chang2"),
    ('还', "hai2"),
    ('着', "zhe5"),
    ('得', "de5"),
];

/// Characters that are usually unstressed after another syllable.
const NEUTRAL: &[char] = &['的', '了', '吗', '呢', '吧', '啊', '么', '们', '着', '过'];

/// Tone-numbered pinyin syllables of one word (no sandhi yet).
fn word_pinyin(word: &str, first_in_text: bool) -> Vec<String> {
    if let Some((_, p)) = WORDS.iter().find(|(w, _)| *w == word) {
        return p.iter().map(|s| s.to_string()).collect();
    }
    let chars: Vec<char> = word.chars().collect();
    let mut out = Vec::new();
    for (i, c) in chars.iter().enumerate() {
        let Some(p) = c.to_pinyin() else {
            continue;
        };
        let mut s = CHARS
            .iter()
            .find(|(k, _)| k == c)
            .map(|(_, v)| v.to_string())
            .unwrap_or_else(|| p.with_tone_num_end().to_string());
        if !s.ends_with(|d: char| d.is_ascii_digit()) {
            s.push('5');
        }
        let lone_particle = chars.len() == 1 && !first_in_text && NEUTRAL.contains(c);
        if (i > 0 || lone_particle) && NEUTRAL.contains(c) {
            s.pop();
            s.push('5');
        }
        out.push(s);
    }
    out
}

fn tone(s: &str) -> u8 {
    s.chars().last().and_then(|c| c.to_digit(10)).unwrap_or(5) as u8
}

fn set_tone(s: &mut String, t: u8) {
    s.pop();
    s.push(char::from(b'0' + t));
}

/// Tone sandhi over a phrase's syllables (`han` marks the source
/// characters: 一 and 不 change, other syllables keep their tone):
/// third + third → second + third; 一 is yi2 before a fourth tone and yi4
/// before the others (not in counting, at the end, or between numbers);
/// 不 is bu2 before a fourth tone.
fn sandhi(syl: &mut [String], chars: &[char]) {
    for i in 0..syl.len() {
        let next = syl.get(i + 1).map(|s| tone(s));
        let c = chars.get(i).copied();
        let numeric_next = chars
            .get(i + 1)
            .is_some_and(|n| "零一二三四五六七八九十百千万亿点".contains(*n));
        let numeric_prev = i > 0 && "零一二三四五六七八九十百千万亿点第".contains(chars[i - 1]);
        match (c, next) {
            (Some('一'), Some(t)) if !numeric_next && !numeric_prev && t != 5 => {
                set_tone(&mut syl[i], if t == 4 { 2 } else { 4 })
            }
            (Some('不'), Some(4)) => set_tone(&mut syl[i], 2),
            (_, Some(3)) if tone(&syl[i]) == 3 => set_tone(&mut syl[i], 2),
            _ => {}
        }
    }
}

/// Chinese text as it is spoken: words of tone-numbered pinyin syllables,
/// and pauses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spoken {
    Word(Vec<String>),
    /// A pause, as its ASCII punctuation mark: `.` `!` `?` `;` end a
    /// clause, `,` `:` `…` pause within one.
    Pause(char),
}

/// Chinese text (already normalized) as words of pinyin, with tone sandhi
/// across the words of each phrase, and its punctuation as pauses.
pub fn pinyin_words(text: &str) -> Vec<Spoken> {
    static JIEBA: LazyLock<jieba_rs::Jieba> = LazyLock::new(jieba_rs::Jieba::new);
    let mut out: Vec<Spoken> = Vec::new();
    // Phrases between punctuation get sandhi across their words: the
    // phrase's syllables, their characters, and each word's length.
    let mut phrase: Vec<String> = Vec::new();
    let mut chars: Vec<char> = Vec::new();
    let mut lens: Vec<usize> = Vec::new();
    let flush = |phrase: &mut Vec<String>,
                 chars: &mut Vec<char>,
                 lens: &mut Vec<usize>,
                 out: &mut Vec<Spoken>| {
        sandhi(phrase, chars);
        let mut syl = phrase.drain(..);
        for n in lens.drain(..) {
            out.push(Spoken::Word(syl.by_ref().take(n).collect()));
        }
        chars.clear();
    };
    for w in JIEBA.cut(text, false) {
        let w = w.word;
        if w.chars().any(is_han) {
            let han: Vec<char> = w.chars().filter(|c| is_han(*c)).collect();
            let syl = word_pinyin(w, out.is_empty() && phrase.is_empty());
            if syl.len() == han.len() {
                chars.extend(han);
            } else {
                chars.extend(std::iter::repeat_n(' ', syl.len()));
            }
            lens.push(syl.len());
            phrase.extend(syl);
            continue;
        }
        flush(&mut phrase, &mut chars, &mut lens, &mut out);
        let pause = w.chars().find_map(|c| match c {
            '。' | '.' | '．' => Some('.'),
            '！' | '!' => Some('!'),
            '？' | '?' => Some('?'),
            '；' | ';' => Some(';'),
            '，' | '、' | ',' => Some(','),
            '：' | ':' => Some(':'),
            '…' => Some('…'),
            _ => None,
        });
        if let Some(p) = pause {
            if let Some(Spoken::Word(_)) = out.last() {
                out.push(Spoken::Pause(p));
            }
        }
    }
    flush(&mut phrase, &mut chars, &mut lens, &mut out);
    out.retain(|s| !matches!(s, Spoken::Word(w) if w.is_empty()));
    out
}

/// Chinese text (already normalized) as pinyin for espeak-ng, with
/// punctuation kept as pauses (`.` at a clause's end, `,` within one).
pub fn to_pinyin(text: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    for s in pinyin_words(text) {
        match s {
            Spoken::Word(w) => out.extend(w),
            Spoken::Pause(p) => {
                if let Some(l) = out.last_mut() {
                    l.push(if matches!(p, '.' | '!' | '?' | ';') {
                        '.'
                    } else {
                        ','
                    });
                }
            }
        }
    }
    out.join(" ")
}

/// Split text into runs for the Chinese and the English voice. Latin
/// words (and digits left in them) go to English; Chinese characters,
/// with the punctuation around them, to Chinese.
pub fn runs(text: &str) -> Vec<Run> {
    segments(text)
        .into_iter()
        .filter_map(|(zh, s)| {
            if zh {
                let p = to_pinyin(&s);
                (!p.is_empty()).then_some(Run::Chinese(p))
            } else {
                Some(Run::English(s))
            }
        })
        .collect()
}

/// Text (normalized for a Chinese reader) split into Chinese (`true`) and
/// English stretches, each with the punctuation that follows it; blank
/// stretches are left out.
pub fn segments(text: &str) -> Vec<(bool, String)> {
    let text = normalize_zh(text);
    let mut out: Vec<(bool, String)> = Vec::new();
    for c in text.chars() {
        let zh = if is_han(c) {
            Some(true)
        } else if c.is_ascii_alphanumeric() {
            Some(false)
        } else {
            None
        };
        match (zh, out.last_mut()) {
            (Some(z), Some((lz, s))) if *lz == z => s.push(c),
            (Some(z), _) => out.push((z, c.to_string())),
            (None, Some((_, s))) => s.push(c),
            (None, None) => {}
        }
    }
    out.into_iter()
        .map(|(zh, s)| (zh, s.trim().to_string()))
        .filter(|(_, s)| !s.is_empty())
        .collect()
}

/// Sentences, in order, for speaking one at a time: cut after sentence
/// punctuation and newlines, and long ones again at commas.
pub fn sentences(text: &str) -> Vec<String> {
    const MAX: usize = 120;
    let mut out = Vec::new();
    let mut cur = String::new();
    let chars: Vec<char> = text.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        cur.push(c);
        let next_space = chars.get(i + 1).is_none_or(|n| n.is_whitespace());
        let end = matches!(c, '。' | '！' | '？' | '\n' | '；')
            || (matches!(c, '.' | '!' | '?' | ';') && next_space)
            || (matches!(c, '，' | ',' | '、') && cur.chars().count() > MAX);
        if end {
            let t = cur.trim().to_string();
            if !t.is_empty() {
                out.push(t);
            }
            cur.clear();
        }
    }
    let t = cur.trim().to_string();
    if !t.is_empty() {
        out.push(t);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_dates_and_units_are_read_as_a_chinese_speaker_says_them() {
        assert_eq!(normalize_zh("2026年11月29日"), "二零二六年十一月二十九日");
        assert_eq!(
            normalize_zh("会议9:30开始，10:05结束"),
            "会议九点三十分开始，十点零五分结束"
        );
        assert_eq!(
            normalize_zh("增长了25%，跌了-3.5%"),
            "增长了百分之二十五，跌了负百分之三点五"
        );
        assert_eq!(
            normalize_zh("体重65kg，跑了3.2km"),
            "体重六十五公斤，跑了三点二公里"
        );
        assert_eq!(normalize_zh("气温-5℃"), "气温负五摄氏度");
        assert_eq!(normalize_zh("需要3-5天"), "需要三到五天");
        assert_eq!(normalize_zh("共10086人"), "共一万零八十六人");
        assert_eq!(
            normalize_zh("电话13800138000"),
            "电话一三八零零一三八零零零"
        );
        // English text keeps its digits for the English voice.
        assert_eq!(normalize_zh("at 9:30 on May 5"), "at 9:30 on May 5");
    }

    #[test]
    fn pinyin_with_polyphones_and_tone_sandhi() {
        assert_eq!(to_pinyin("你好"), "ni2 hao3");
        assert_eq!(to_pinyin("我去银行。"), "wo3 qu4 yin2 hang2.");
        assert_eq!(to_pinyin("长城很长"), "chang2 cheng2 hen3 chang2");
        assert_eq!(
            to_pinyin("一样，一天，第一"),
            "yi2 yang4, yi4 tian1, di4 yi1"
        );
        assert_eq!(to_pinyin("不是，不好"), "bu2 shi4, bu4 hao3");
        assert_eq!(to_pinyin("我们的朋友"), "wo3 men5 de5 peng2 you5");
    }

    #[test]
    fn mixed_text_splits_into_runs_and_sentences() {
        let r = runs("我用Python写了3个程序。Great!");
        assert_eq!(
            r,
            vec![
                Run::Chinese("wo3 yong4".into()),
                Run::English("Python".into()),
                Run::Chinese("xie3 le5 san1 ge4 cheng2 xu4.".into()),
                Run::English("Great!".into()),
            ]
        );
        assert_eq!(
            sentences("第一句。第二句！Third one. 3.5 stays whole? 最后"),
            [
                "第一句。",
                "第二句！",
                "Third one.",
                "3.5 stays whole?",
                "最后"
            ]
        );
        assert!(runs("，。!").is_empty());
    }
}
