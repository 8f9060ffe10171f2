//! The fact check: every number, date, weekday, score and name in an
//! article must come from its row (or the prompt the template made of it),
//! or follow from the row by a stated rule.
//!
//! The method, in order:
//! 1. The text is NFKC-normalised (full-width digits and colons become
//!    ASCII) and thousands separators are dropped (`23,456` → `23456`).
//! 2. **Dates** — `2026-03-14`, `2026年3月14日`, `三月十四日`, `3月`,
//!    `March 14, 2026`, `14 March` — must be a date of the row (year, month
//!    and day, as far as written). **Weekdays** (`Saturday`, `周六`,
//!    `星期六`) must be the weekday of a date of the row.
//! 3. **Scores and ratios** — `3-1`, `3:1`, `3∶1`, `3比1`, `三比一` — must
//!    be two numeric fields of the row (either order) or a pair the prompt
//!    writes.
//! 4. **Numbers** — Arabic (`12.35`, `1.5万`, `2.3 million`), Chinese
//!    numerals (`两万三千`, `百分之十二`), English number words (`three`,
//!    `twenty-one`, `third`) — read by the calculator's reader
//!    (`hanlin_tools::chinese::numerals`) must equal, to the precision
//!    written (`2.3万` stands for 22,500–23,500; an integer for a fraction
//!    rounds), a number of the row or its prompt, or one derived from two
//!    numeric fields: their sum, difference, ratio as a percentage, change
//!    as a percentage, or a percentage's complement (100 − x). Signs are
//!    ignored (`fell 1.2%` for −1.2). Counting words are not facts: a lone
//!    一, 两 or 二 (一场, 两队), `one`, `two`, `both`.
//! 5. **Names** — three sources: (a) every text value of every row of the
//!    dataset is a known name; one that appears in the article must be in
//!    this row or its prompt (another match's team, another product's
//!    brand); (b) runs of capitalised Latin words in the body (not a
//!    sentence's first word alone, not function words, months or
//!    weekdays) must have every word in the row or prompt; (c) Chinese
//!    words jieba tags as place, organisation
//!    (`ns`, `nt`), and person (`nr`: two to four characters starting with
//!    one of the hundred common surnames, and — when longer than two — not
//!    a dictionary word: jieba's dictionary tags some common words `nr`,
//!    晋级, 高水平) must be in the row or prompt. The dataset's text values
//!    are added to jieba's dictionary, so a name stays one word.

use crate::article::Article;
use crate::rows::{leaves, Row};
use chrono::{Datelike, NaiveDate};
use hanlin_tools::chinese::{numerals, to_arabic};
use jieba_rs::Jieba;
use regex::Regex;
use serde_json::Value;
use std::collections::HashSet;
use std::fmt;
use std::ops::Range;
use std::sync::LazyLock;
use unicode_normalization::UnicodeNormalization;

/// What an article states that its row does not.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(tag = "kind", content = "text", rename_all = "snake_case")]
pub enum Problem {
    Number(String),
    Date(String),
    Weekday(String),
    Score(String),
    Name(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Number(s) => write!(f, "number {s}"),
            Problem::Date(s) => write!(f, "date {s}"),
            Problem::Weekday(s) => write!(f, "weekday {s}"),
            Problem::Score(s) => write!(f, "score {s}"),
            Problem::Name(s) => write!(f, "name {s}"),
        }
    }
}

/// Checks articles against their rows; built once per dataset (the
/// dataset's text values are the known names).
pub struct Checker {
    jieba: Jieba,
    /// Every text value of the dataset that can name something.
    vocabulary: Vec<String>,
}

/// Numeric fields beyond this many are not paired for derived values.
const MAX_DERIVED_FIELDS: usize = 48;

impl Checker {
    pub fn new(rows: &[Row]) -> Self {
        let mut seen = HashSet::new();
        let mut vocabulary = Vec::new();
        for row in rows {
            for v in leaves(&row.fields) {
                let Value::String(s) = v else { continue };
                let s = s.trim();
                let ascii = s.is_ascii();
                let n = s.chars().count();
                if n < 2 || (ascii && n < 3) || n > 60 {
                    continue;
                }
                // Dates and numbers are checked as such.
                if !s.chars().any(char::is_alphabetic) || date_in(s).is_some() {
                    continue;
                }
                if seen.insert(s.to_lowercase()) {
                    vocabulary.push(s.to_string());
                }
            }
        }
        // The dataset's names are words, so 陈浩在 splits as 陈浩 + 在.
        let mut jieba = Jieba::new();
        for v in vocabulary.iter().filter(|v| !v.is_ascii()) {
            jieba.add_word(v, None, Some("nz"));
        }
        Self { jieba, vocabulary }
    }

    /// What `article` states that `row` (and `prompt`, the template's
    /// text for it) does not; empty when it passes.
    pub fn check(&self, row: &Row, prompt: &str, article: &Article) -> Vec<Problem> {
        let facts = Facts::new(row, prompt);
        let text = normalize(&article.text());
        let mut problems = Vec::new();
        let mut taken: Vec<Range<usize>> = Vec::new();
        check_dates(&text, &facts, &mut taken, &mut problems);
        check_scores(&text, &facts, &mut taken, &mut problems);
        check_numbers(&text, &facts, &mut taken, &mut problems);
        self.check_names(&text, &normalize(&article.body), &facts, &mut problems);
        let mut seen = HashSet::new();
        problems.retain(|p| seen.insert(p.clone()));
        problems
    }

    fn check_names(&self, text: &str, body: &str, facts: &Facts, problems: &mut Vec<Problem>) {
        let lower = text.to_lowercase();
        for v in &self.vocabulary {
            let vl = v.to_lowercase();
            let found = if v.is_ascii() {
                word_in(&lower, &vl)
            } else {
                lower.contains(&vl)
            };
            if found && !facts.text.contains(&vl) {
                problems.push(Problem::Name(v.clone()));
            }
        }
        for span in capitalised_runs(body) {
            if !span
                .split_whitespace()
                .all(|w| facts.words.contains(&w.to_lowercase()))
            {
                problems.push(Problem::Name(span));
            }
        }
        for t in self.jieba.tag(text, true) {
            let n = t.word.chars().count();
            let proper = match t.tag {
                "ns" | "nsf" | "nt" => true,
                // jieba's dictionary tags some common words as names
                // (晋级 nr): a person's name also starts with a common
                // surname and is two to four characters long.
                "nr" | "nrt" | "nrfg" => {
                    (2..=4).contains(&n)
                        && t.word.chars().next().is_some_and(|c| SURNAMES.contains(c))
                        // A longer dictionary word tagged nr is a word
                        // (高水平); a name found by jieba's HMM is not in it.
                        && (n == 2 || !self.jieba.has_word(t.word))
                }
                _ => false,
            };
            if proper
                && t.word.chars().count() >= 2
                && !t.word.is_ascii()
                && !facts.text.contains(&t.word.to_lowercase())
            {
                problems.push(Problem::Name(t.word.to_string()));
            }
        }
    }
}

/// The hundred most common Chinese surnames.
const SURNAMES: &str = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾萧肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤";

/// What a row (and its prompt) states.
struct Facts {
    /// Numbers stated or derivable.
    numbers: Vec<f64>,
    /// Pairs the prompt writes as a score or ratio.
    pairs: Vec<(f64, f64)>,
    /// Numeric fields (for a score: two of them).
    fields: Vec<f64>,
    dates: Vec<NaiveDate>,
    /// Row text values and prompt, normalised and lower-cased.
    text: String,
    /// Its Latin words, lower-cased.
    words: HashSet<String>,
}

impl Facts {
    fn new(row: &Row, prompt: &str) -> Self {
        let p = normalize(prompt);
        let mut numbers = Vec::new();
        let mut fields = Vec::new();
        let mut text = p.clone();
        let mut dates = Vec::new();
        for v in leaves(&row.fields) {
            match v {
                Value::Number(n) => {
                    if let Some(f) = n.as_f64() {
                        fields.push(f);
                        numbers.push(f);
                    }
                }
                Value::String(s) => {
                    let s = normalize(s);
                    numbers.extend(numerals(&s).iter().filter_map(|n| n.value()));
                    if let Some(d) = date_in(&s) {
                        dates.push(d);
                    }
                    text.push('\n');
                    text.push_str(&s);
                }
                Value::Bool(_) | Value::Null | Value::Array(_) | Value::Object(_) => {}
            }
        }
        numbers.extend(numerals(&p).iter().filter_map(|n| n.value()));
        dates.extend(all_dates(&p));
        let pairs = SCORE
            .captures_iter(&p)
            .filter_map(|c| Some((numeral_value(&c[1])?, numeral_value(&c[2])?)))
            .collect();
        // Derived: sums, differences, ratios and changes as percentages,
        // complements of percentages.
        let base: Vec<f64> = fields.iter().copied().take(MAX_DERIVED_FIELDS).collect();
        for (i, &a) in base.iter().enumerate() {
            if (0.0..=100.0).contains(&a) {
                numbers.push(100.0 - a);
            }
            for (j, &b) in base.iter().enumerate() {
                if i == j {
                    continue;
                }
                numbers.push(a + b);
                numbers.push(a - b);
                if b != 0.0 {
                    numbers.push(a / b * 100.0);
                    numbers.push((a - b) / b * 100.0);
                }
            }
        }
        let text = text.to_lowercase();
        let words = WORD
            .find_iter(&text)
            .map(|m| m.as_str().to_string())
            .collect();
        Self {
            numbers,
            pairs,
            fields,
            dates,
            text,
            words,
        }
    }

    /// Whether `x`, written to `precision` (the power of ten of its last
    /// digit), states one of the row's numbers.
    fn has_number(&self, x: f64, precision: i32) -> bool {
        self.numbers.iter().any(|&v| close(x, v, precision))
    }
}

fn close(x: f64, v: f64, precision: i32) -> bool {
    let (x, v) = (x.abs(), v.abs());
    let eps = 1e-9 * v.max(1.0);
    if precision == 0 && v.fract() == 0.0 {
        return (x - v).abs() <= eps;
    }
    (x - v).abs() <= 0.5 * 10f64.powi(precision) + eps
}

fn normalize(s: &str) -> String {
    let s: String = s
        .nfkc()
        .map(|c| match c {
            '∶' | '：' => ':',
            '–' | '—' | '－' => '-',
            c => c,
        })
        .collect();
    let mut s = s;
    loop {
        let next = THOUSANDS.replace_all(&s, "$1$2").into_owned();
        if next == s {
            return s;
        }
        s = next;
    }
}

static THOUSANDS: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(\d),(\d{3})").unwrap());
static WORD: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"[\p{L}\d][\p{L}\d'’]*").unwrap());

const CN_NUM: &str = "[零〇一二两三四五六七八九十]";
const MONTHS: [&str; 12] = [
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
];
const WEEKDAYS: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

static ISO_DATE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b(\d{4})[-/.](\d{1,2})[-/.](\d{1,2})\b").unwrap());
static ZH_DATE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(
        r"(?:(\d{{4}}|{CN_NUM}{{4}})\s*年\s*)?(\d{{1,2}}|{CN_NUM}{{1,3}})\s*月(?:\s*(\d{{1,2}}|{CN_NUM}{{1,3}})\s*[日号])?"
    ))
    .unwrap()
});
const EN_MONTH: &str = r"(Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sept?(?:ember)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)";
static EN_DAY_FIRST: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(
        r"\b(\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?{EN_MONTH}\b\.?(?:,?\s+(\d{{4}})\b)?"
    ))
    .unwrap()
});
static EN_MONTH_FIRST: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(
        r"\b{EN_MONTH}\b\.?(?:\s+(\d{{1,2}})(?:st|nd|rd|th)?\b)?(?:,?\s+(\d{{4}})\b)?"
    ))
    .unwrap()
});
static EN_WEEKDAY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\b(Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)s?\b").unwrap()
});
static ZH_WEEKDAY: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?:星期|周|礼拜)([一二三四五六日天])").unwrap());
static SCORE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(r"(\d+|{CN_NUM}+)\s*(?:比|:|-)\s*(\d+|{CN_NUM}+)")).unwrap()
});
static EN_SCALED: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)\b(\d+(?:\.\d+)?)\s*(thousand|million|billion)\b").unwrap());
static EN_WORDS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b(twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety)(?:-(one|two|three|four|five|six|seven|eight|nine))?\b|\b(three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|sixteen|seventeen|eighteen|nineteen|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth)\b").unwrap()
});

fn numeral_value(s: &str) -> Option<f64> {
    to_arabic(s).parse().ok()
}

fn month_number(name: &str) -> Option<u32> {
    let l = name.to_lowercase();
    MONTHS
        .iter()
        .position(|m| m.starts_with(&l[..l.len().min(3)]))
        .map(|i| i as u32 + 1)
}

/// The first date written `2026-03-14` or `2026年3月14日` in `s`.
fn date_in(s: &str) -> Option<NaiveDate> {
    all_dates(s).into_iter().next()
}

fn all_dates(s: &str) -> Vec<NaiveDate> {
    let mut out = Vec::new();
    for c in ISO_DATE.captures_iter(s) {
        if let (Ok(y), Ok(m), Ok(d)) = (c[1].parse(), c[2].parse(), c[3].parse()) {
            out.extend(NaiveDate::from_ymd_opt(y, m, d));
        }
    }
    for c in ZH_DATE.captures_iter(s) {
        let get = |i: usize| c.get(i).and_then(|m| numeral_value(m.as_str()));
        if let (Some(y), Some(m), Some(d)) = (get(1), get(2), get(3)) {
            out.extend(NaiveDate::from_ymd_opt(y as i32, m as u32, d as u32));
        }
    }
    out
}

fn overlaps(taken: &[Range<usize>], r: &Range<usize>) -> bool {
    taken.iter().any(|t| t.start < r.end && r.start < t.end)
}

/// A date written with what was written of it (year, month, day).
fn check_date(
    facts: &Facts,
    y: Option<f64>,
    m: Option<u32>,
    d: Option<f64>,
    written: &str,
    problems: &mut Vec<Problem>,
) {
    let ok = facts.dates.iter().any(|date| {
        m.is_none_or(|m| date.month() == m)
            && d.is_none_or(|d| date.day() as f64 == d)
            && y.is_none_or(|y| date.year() as f64 == y)
    });
    if !ok {
        problems.push(Problem::Date(written.trim().to_string()));
    }
}

fn check_dates(
    text: &str,
    facts: &Facts,
    taken: &mut Vec<Range<usize>>,
    problems: &mut Vec<Problem>,
) {
    for c in ISO_DATE.captures_iter(text) {
        let r = c.get(0).map_or(0..0, |m| m.range());
        let n = |i: usize| c[i].parse::<f64>().ok();
        check_date(facts, n(1), n(2).map(|m| m as u32), n(3), &c[0], problems);
        taken.push(r);
    }
    for c in ZH_DATE.captures_iter(text) {
        let r = c.get(0).map_or(0..0, |m| m.range());
        if overlaps(taken, &r) {
            continue;
        }
        let n = |i: usize| c.get(i).and_then(|m| numeral_value(m.as_str()));
        check_date(facts, n(1), n(2).map(|m| m as u32), n(3), &c[0], problems);
        taken.push(r);
    }
    for re in [&*EN_DAY_FIRST, &*EN_MONTH_FIRST] {
        let day_first = std::ptr::eq(re, &*EN_DAY_FIRST);
        for c in re.captures_iter(text) {
            let r = c.get(0).map_or(0..0, |m| m.range());
            if overlaps(taken, &r) {
                continue;
            }
            let (month, day) = if day_first { (2, 1) } else { (1, 2) };
            let day = c.get(day).and_then(|m| m.as_str().parse::<f64>().ok());
            // "May" alone is a verb as often as a month.
            if &c[month] == "May" && day.is_none() {
                continue;
            }
            let year = c.get(3).and_then(|m| m.as_str().parse::<f64>().ok());
            check_date(facts, year, month_number(&c[month]), day, &c[0], problems);
            taken.push(r);
        }
    }
    // A weekday (0 = Monday) must be one of the row's dates'.
    let weekdays: Vec<usize> = facts
        .dates
        .iter()
        .map(|d| d.weekday().num_days_from_monday() as usize)
        .collect();
    let named = EN_WEEKDAY.captures_iter(text).map(|c| {
        let i = WEEKDAYS.iter().position(|w| c[1].eq_ignore_ascii_case(w));
        (c, i)
    });
    let zh = ZH_WEEKDAY.captures_iter(text).map(|c| {
        let i = "一二三四五六日"
            .chars()
            .position(|d| c[1].starts_with(d))
            .or(Some(6));
        (c, i)
    });
    for (c, i) in named.chain(zh) {
        if !i.is_some_and(|i| weekdays.contains(&i)) {
            problems.push(Problem::Weekday(c[0].to_string()));
        }
        taken.extend(c.get(0).map(|m| m.range()));
    }
}

fn check_scores(
    text: &str,
    facts: &Facts,
    taken: &mut Vec<Range<usize>>,
    problems: &mut Vec<Problem>,
) {
    for c in SCORE.captures_iter(text) {
        let r = c.get(0).map_or(0..0, |m| m.range());
        if overlaps(taken, &r) {
            continue;
        }
        let (Some(a), Some(b)) = (numeral_value(&c[1]), numeral_value(&c[2])) else {
            continue;
        };
        let in_prompt = facts
            .pairs
            .iter()
            .any(|&(x, y)| (x, y) == (a, b) || (x, y) == (b, a));
        let in_fields = facts.fields.iter().enumerate().any(|(i, &x)| {
            facts
                .fields
                .iter()
                .enumerate()
                .any(|(j, &y)| i != j && (x, y) == (a, b))
        });
        if !in_prompt && !in_fields {
            problems.push(Problem::Score(c[0].to_string()));
        }
        taken.push(r);
    }
}

fn check_numbers(
    text: &str,
    facts: &Facts,
    taken: &mut Vec<Range<usize>>,
    problems: &mut Vec<Problem>,
) {
    for c in EN_SCALED.captures_iter(text) {
        let r = c.get(0).map_or(0..0, |m| m.range());
        if overlaps(taken, &r) {
            continue;
        }
        let (Ok(x), exp) = (
            c[1].parse::<f64>(),
            match c[2].to_lowercase().as_str() {
                "thousand" => 3,
                "million" => 6,
                _ => 9,
            },
        ) else {
            continue;
        };
        let decimals = c[1].split_once('.').map_or(0, |(_, f)| f.len()) as i32;
        if !facts.has_number(x * 10f64.powi(exp), exp - decimals) {
            problems.push(Problem::Number(c[0].to_string()));
        }
        taken.push(r);
    }
    for c in EN_WORDS.captures_iter(text) {
        let r = c.get(0).map_or(0..0, |m| m.range());
        let value = if let Some(tens) = c.get(1) {
            let t = [
                "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
            ]
            .iter()
            .position(|w| tens.as_str().eq_ignore_ascii_case(w))
            .unwrap_or(0) as f64
                * 10.0
                + 20.0;
            let u = c.get(2).map_or(0.0, |u| {
                [
                    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                ]
                .iter()
                .position(|w| u.as_str().eq_ignore_ascii_case(w))
                .map_or(0.0, |i| i as f64 + 1.0)
            });
            t + u
        } else {
            let w = c[3].to_lowercase();
            [
                "three",
                "four",
                "five",
                "six",
                "seven",
                "eight",
                "nine",
                "ten",
                "eleven",
                "twelve",
                "thirteen",
                "fourteen",
                "fifteen",
                "sixteen",
                "seventeen",
                "eighteen",
                "nineteen",
            ]
            .iter()
            .position(|x| *x == w)
            .map(|i| i as f64 + 3.0)
            .or_else(|| {
                [
                    "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
                ]
                .iter()
                .position(|x| *x == w)
                .map(|i| i as f64 + 3.0)
            })
            .unwrap_or(0.0)
        };
        if !facts.has_number(value, 0) {
            problems.push(Problem::Number(c[0].to_string()));
        }
        taken.push(r);
    }
    for n in numerals(text) {
        let r = n.start..n.end;
        if overlaps(taken, &r) {
            continue;
        }
        let written = &text[r.clone()];
        // Counting words: 一场, 两队, 第二.
        if n.chinese && matches!(written, "一" | "两" | "二" | "兩") {
            continue;
        }
        // 十分 (very), not 十分钟 (ten minutes).
        if written == "十" && text[r.end..].starts_with('分') && !text[r.end..].starts_with("分钟")
        {
            continue;
        }
        // Part of a name: U23, A1.
        if !n.chinese
            && text[..r.start]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphabetic())
        {
            continue;
        }
        let Some(x) = n.value() else { continue };
        // 两万, 三千万: as precise as their trailing zeros.
        let precision = if n.chinese && written.contains(['万', '萬', '亿', '億']) {
            let mut p = 0;
            while x != 0.0 && (x / 10f64.powi(p + 1)).fract() == 0.0 {
                p += 1;
            }
            p
        } else {
            n.precision()
        };
        if !facts.has_number(x, precision) {
            problems.push(Problem::Number(written.to_string()));
        }
    }
}

fn word_in(haystack: &str, word: &str) -> bool {
    haystack.match_indices(word).any(|(i, _)| {
        let before = haystack[..i].chars().next_back();
        let after = haystack[i + word.len()..].chars().next();
        !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
    })
}

/// Words that are capitalised for grammar, not because they name something.
const FUNCTION_WORDS: &[&str] = &[
    "a",
    "an",
    "the",
    "in",
    "on",
    "at",
    "after",
    "before",
    "with",
    "but",
    "and",
    "or",
    "it",
    "its",
    "this",
    "that",
    "these",
    "those",
    "they",
    "their",
    "he",
    "she",
    "his",
    "her",
    "both",
    "as",
    "by",
    "for",
    "from",
    "despite",
    "while",
    "when",
    "however",
    "meanwhile",
    "i",
    "we",
    "our",
    "there",
    "here",
    "what",
    "with",
    "of",
    "to",
    "not",
    "no",
    "yet",
    "so",
    "then",
    "thanks",
    "overall",
    "finally",
    "also",
    "though",
    "although",
    "if",
];

/// Runs of capitalised Latin words in `body` that may name something: not
/// a sentence's first word alone, function words, months or weekdays
/// taken off.
fn capitalised_runs(body: &str) -> Vec<String> {
    static SENTENCE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"[.!?。！？\n:;]+").unwrap());
    static LATIN: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"[A-Za-z][A-Za-z0-9'’\-]*").unwrap());
    let mut out = Vec::new();
    // Headings (`## Match Details`, `Key facts:`) are title-cased.
    let body: String = body
        .lines()
        .filter(|l| {
            let l = l.trim();
            !(l.starts_with('#')
                || (l.starts_with("**") && l.ends_with("**"))
                || (l.ends_with(':') && l.split_whitespace().count() <= 6))
        })
        .collect::<Vec<_>>()
        .join("\n");
    for sentence in SENTENCE.split(&body) {
        let sentence = sentence.trim_start_matches(|c: char| !c.is_alphanumeric());
        let mut run: Vec<(usize, &str)> = Vec::new();
        let mut last_end = 0;
        let words: Vec<_> = LATIN.find_iter(sentence).collect();
        let flush = |run: &mut Vec<(usize, &str)>, out: &mut Vec<String>| {
            let kept: Vec<(usize, &str)> = run
                .drain(..)
                .filter(|(_, w)| {
                    let l = w.to_lowercase();
                    let l = l
                        .trim_end_matches("'s")
                        .trim_end_matches("’s")
                        .trim_end_matches(['\'', '’']);
                    !FUNCTION_WORDS.contains(&l) && !MONTHS.contains(&l) && !WEEKDAYS.contains(&l)
                })
                .collect();
            let alone_first = kept.len() == 1 && kept[0].0 == 0;
            if !kept.is_empty() && !alone_first {
                out.push(
                    kept.iter()
                        .map(|(_, w)| {
                            w.trim_end_matches("'s")
                                .trim_end_matches("’s")
                                .trim_end_matches(['-', '\'', '’'])
                        })
                        .collect::<Vec<_>>()
                        .join(" "),
                );
            }
        };
        for (i, m) in words.iter().enumerate() {
            let w = m.as_str();
            let capital = w.chars().next().is_some_and(|c| c.is_ascii_uppercase());
            let adjacent = run.is_empty() || sentence[last_end..m.start()].trim().is_empty();
            if capital && adjacent {
                run.push((i, w));
            } else {
                flush(&mut run, &mut out);
                if capital {
                    run.push((i, w));
                }
            }
            last_end = m.end();
        }
        flush(&mut run, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rows() -> Vec<Row> {
        let r = |n: usize, v: Value| Row {
            number: n,
            id: format!("m{n}"),
            fields: v.as_object().unwrap().clone(),
        };
        vec![
            r(
                1,
                json!({"date": "2026-03-14", "round": 3, "home_zh": "青川雄狮", "home_en": "Qingchuan Lions",
                       "away_zh": "白沙海鸥", "away_en": "Baisha Seagulls", "home_goals": 3, "away_goals": 1,
                       "attendance": 23456, "star_zh": "王磊", "star_en": "Wang Lei", "possession": 58}),
            ),
            r(
                2,
                json!({"date": "2026-03-21", "round": 4, "home_zh": "云岭猎豹", "home_en": "Yunling Leopards",
                       "away_zh": "东湖骑士", "away_en": "Donghu Knights", "home_goals": 0, "away_goals": 0,
                       "attendance": 8000, "star_zh": "陈浩", "star_en": "Chen Hao", "possession": 50}),
            ),
        ]
    }

    fn check(zh: bool, title: &str, body: &str) -> Vec<Problem> {
        let rows = rows();
        let checker = Checker::new(&rows);
        let prompt = if zh {
            "翰林联赛第3轮，2026-03-14，青川雄狮主场3比1战胜白沙海鸥，观众23456人，最佳球员王磊。"
        } else {
            "Hanlin League round 3, 2026-03-14: Qingchuan Lions 3, Baisha Seagulls 1. Attendance 23456. Player of the match: Wang Lei."
        };
        checker.check(
            &rows[0],
            prompt,
            &Article {
                title: title.into(),
                body: body.into(),
            },
        )
    }

    #[test]
    fn true_chinese_articles_pass_in_every_number_form() {
        assert_eq!(
            check(
                true,
                "青川雄狮三比一击败白沙海鸥",
                "2026年3月14日（周六），翰林联赛第三轮，青川雄狮在主场以3∶1战胜白沙海鸥。\
                 王磊在比赛中表现出色，展现了高水平，两队共打进四球，比赛十分激烈。现场约2.3万名观众观战，主队控球率58%，\
                 客队为百分之四十二，主队净胜两球。三月十四日的这场比赛……"
            ),
            vec![]
        );
    }

    #[test]
    fn true_english_articles_pass() {
        assert_eq!(
            check(
                false,
                "Qingchuan Lions Beat Baisha Seagulls 3-1",
                "On Saturday, March 14, 2026, the Qingchuan Lions beat the Baisha Seagulls 3:1 in round three \
                 of the Hanlin League. Wang Lei was the player of the match in front of 23,456 fans \
                 (about 23.5 thousand). The Lions had 58% of the ball, the Baisha Seagulls' keeper the rest. Both sides scored; four goals in all.\n\
                 ## Key Match Details\nAll Goals Came Late:\n"
            ),
            vec![]
        );
    }

    #[test]
    fn invented_facts_are_caught() {
        let p = check(
            true,
            "青川雄狮2比1胜白沙海鸥",
            "3月15日周日，云岭猎豹的陈浩在第90分钟破门，张三助攻，观众三万人。",
        );
        for want in [
            Problem::Score("2比1".into()),
            Problem::Date("3月15日".into()),
            Problem::Weekday("周日".into()),
            Problem::Name("云岭猎豹".into()),
            Problem::Name("陈浩".into()),
            Problem::Number("90".into()),
            Problem::Number("三万".into()),
        ] {
            assert!(p.contains(&want), "{want:?} not in {p:?}");
        }
        let p = check(
            false,
            "Lions win",
            "On Sunday, March 15 the Lions beat the Seagulls 2-1; striker John Smith scored in the 90th minute \
             before 30,000 fans, their seventh win.",
        );
        for want in [
            Problem::Weekday("Sunday".into()),
            Problem::Date("March 15".into()),
            Problem::Score("2-1".into()),
            Problem::Name("John Smith".into()),
            Problem::Number("90".into()),
            Problem::Number("30000".into()),
            Problem::Number("seventh".into()),
        ] {
            assert!(p.contains(&want), "{want:?} not in {p:?}");
        }
    }

    #[test]
    fn precision_is_what_was_written() {
        assert!(close(23000.0, 23456.0, 3));
        assert!(!close(23000.0, 23456.0, 0));
        assert!(close(12.4, 12.35, -1));
        assert!(!close(12.5, 12.35, -2));
        assert!(close(33.0, 100.0 / 3.0, 0));
        assert!(close(1.2, -1.2, -1));
        assert!(!close(3.0, 2.0, 0));
    }
}
