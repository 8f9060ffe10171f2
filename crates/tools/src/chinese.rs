//! Chinese numerals in and out: 三千二百 ↔ 3200, 三点一四 → 3.14,
//! 壹万贰仟 → 12000, 1.5万 → 15000 (on `chinese-number`).

use chinese_number::{
    ChineseCase, ChineseCountMethod, ChineseToNumber, ChineseVariant, NumberToChinese,
};

fn is_digit(c: char) -> bool {
    "零〇一二两兩三四五六七八九壹贰貳叁參肆伍陆陸柒捌玖".contains(c)
}

fn is_unit(c: char) -> bool {
    "十百千万萬亿億拾佰仟".contains(c)
}

fn is_numeral(c: char) -> bool {
    is_digit(c) || is_unit(c)
}

fn digit_value(c: char) -> Option<u32> {
    Some(match c {
        '零' | '〇' => 0,
        '一' | '壹' => 1,
        '二' | '两' | '兩' | '贰' | '貳' => 2,
        '三' | '叁' | '參' => 3,
        '四' | '肆' => 4,
        '五' | '伍' => 5,
        '六' | '陆' | '陸' => 6,
        '七' | '柒' => 7,
        '八' | '捌' => 8,
        '九' | '玖' => 9,
        _ => return None,
    })
}

/// The value of a run of numeral characters (一千零二十, 二〇二六,
/// 十万), as decimal digits.
fn run_value(run: &str) -> Option<String> {
    // Digits only (二〇二六): read digit by digit.
    if run.chars().all(is_digit) && run.chars().count() > 1 {
        return run
            .chars()
            .map(|c| digit_value(c).and_then(|d| char::from_digit(d, 10)))
            .collect();
    }
    let normal: String = run
        .chars()
        .map(|c| match c {
            '〇' => '零',
            '两' | '兩' => '二',
            c => c,
        })
        .collect();
    normal
        .to_number(ChineseCountMethod::TenThousand)
        .ok()
        .map(|n: u128| n.to_string())
}

/// A number written in text: Arabic digits (`12.5`, `1.5万`) or Chinese
/// numerals (`三千二百`, `三点一四`, `负十五`, `两`).
#[derive(Debug, Clone, PartialEq)]
pub struct Numeral {
    /// Byte range in the text it was read from.
    pub start: usize,
    pub end: usize,
    /// Decimal digits, with a leading `-` when negative and a `.` when
    /// it has a fraction (before any scale).
    pub digits: String,
    /// Powers of ten it is scaled by, as written: 万 → 4, 亿 → 8, 千 → 3.
    pub scales: Vec<u32>,
    /// Written in Chinese numerals.
    pub chinese: bool,
}

impl Numeral {
    /// The value (scaled).
    pub fn value(&self) -> Option<f64> {
        let v: f64 = self.digits.parse().ok()?;
        Some(v * 10f64.powi(self.scales.iter().sum::<u32>() as i32))
    }

    /// Digits written after the decimal point.
    pub fn decimals(&self) -> usize {
        self.digits.split_once('.').map_or(0, |(_, f)| f.len())
    }

    /// The power of ten its last written digit stands for (`1.5万` → 3,
    /// `12.35` → -2, `300` → 0): how precisely it was written.
    pub fn precision(&self) -> i32 {
        self.scales.iter().sum::<u32>() as i32 - self.decimals() as i32
    }

    /// How `to_arabic` writes it: `3200`, `(-15)`, `(1.5*10000)`.
    fn arabic(&self) -> String {
        if self.scales.is_empty() {
            if self.digits.starts_with('-') {
                format!("({})", self.digits)
            } else {
                self.digits.clone()
            }
        } else {
            let mut s = format!("({}", self.digits);
            for e in &self.scales {
                s.push('*');
                s.push_str(&10u64.pow(*e).to_string());
            }
            s.push(')');
            s
        }
    }
}

/// The numbers written in `text`, in order: runs of Arabic digits (with a
/// `.`; scaled by a following 万 / 亿 / 千), and runs of Chinese numeral
/// characters (with 点 for a decimal point and 负 for minus). The one
/// number reader the calculator (through [`to_arabic`]) and the writer's
/// fact check share.
pub fn numerals(text: &str) -> Vec<Numeral> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let at = |i: usize| chars.get(i).map(|&(_, c)| c);
    let byte = |i: usize| chars.get(i).map_or(text.len(), |&(b, _)| b);
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i].1;
        // An Arabic number, perhaps followed by 万 / 亿.
        if c.is_ascii_digit() {
            let start = i;
            while at(i).is_some_and(|c| c.is_ascii_digit() || c == '.') {
                i += 1;
            }
            let digits: String = chars[start..i].iter().map(|&(_, c)| c).collect();
            let mut scales = Vec::new();
            while let Some(e) = at(i).and_then(|c| match c {
                '万' | '萬' => Some(4),
                '千' => Some(3),
                '亿' | '億' => Some(8),
                _ => None,
            }) {
                scales.push(e);
                i += 1;
            }
            out.push(Numeral {
                start: byte(start),
                end: byte(i),
                digits,
                scales,
                chinese: false,
            });
            continue;
        }
        let negative = matches!(c, '负' | '負') && at(i + 1).is_some_and(is_numeral);
        let start = if negative { i + 1 } else { i };
        if !at(start).is_some_and(is_numeral) {
            i += 1;
            continue;
        }
        let mut j = start;
        while at(j).is_some_and(is_numeral) {
            j += 1;
        }
        let int: String = chars[start..j].iter().map(|&(_, c)| c).collect();
        let Some(mut value) = run_value(&int) else {
            i = j;
            continue;
        };
        // 点 + digits: the fraction, digit by digit.
        if matches!(at(j), Some('点' | '點')) && at(j + 1).is_some_and(is_digit) {
            let mut k = j + 1;
            let mut frac = String::new();
            while let Some(d) = at(k).and_then(digit_value) {
                frac.push(char::from_digit(d, 10).unwrap_or('0'));
                k += 1;
            }
            value = format!("{value}.{frac}");
            j = k;
        }
        if negative {
            value.insert(0, '-');
        }
        out.push(Numeral {
            start: byte(i),
            end: byte(j),
            digits: value,
            scales: Vec::new(),
            chinese: true,
        });
        i = j;
    }
    out
}

/// `text` with its Chinese numerals written in Arabic digits (see
/// [`numerals`]), and Arabic numbers scaled by 万 or 亿 as products
/// (`1.5万` → `(1.5*10000)`). Text that is not a numeral stays as it is.
pub fn to_arabic(text: &str) -> String {
    let mut out = String::new();
    let mut last = 0;
    for n in numerals(text) {
        out.push_str(&text[last..n.start]);
        out.push_str(&n.arabic());
        last = n.end;
    }
    out.push_str(&text[last..]);
    out
}

/// Whether `text` writes a number in Chinese numerals.
pub fn has_numerals(text: &str) -> bool {
    let chars: Vec<char> = text.chars().collect();
    chars.iter().enumerate().any(|(i, &c)| {
        // A lone 一 or 十 inside words (一下, 十分) is not a number.
        is_numeral(c)
            && (chars.get(i + 1).is_some_and(|&n| is_numeral(n))
                || (i > 0 && is_numeral(chars[i - 1])))
    })
}

/// An integer (optionally negative, decimal digits) in simplified Chinese
/// numerals: `3200` → 三千二百.
pub fn to_chinese(digits: &str) -> Option<String> {
    let n: i128 = digits.trim().parse().ok()?;
    n.to_chinese(
        ChineseVariant::Simple,
        ChineseCase::Lower,
        ChineseCountMethod::TenThousand,
    )
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numerals_both_ways() {
        assert_eq!(to_arabic("三千二百"), "3200");
        assert_eq!(to_arabic("一千零二十乘以三"), "1020乘以3");
        assert_eq!(to_arabic("两万五千"), "25000");
        assert_eq!(to_arabic("壹万贰仟"), "12000");
        assert_eq!(to_arabic("三点一四"), "3.14");
        assert_eq!(to_arabic("负十五加七"), "(-15)加7");
        assert_eq!(to_arabic("二〇二六年"), "2026年");
        assert_eq!(to_arabic("1.5万元的百分之十"), "(1.5*10000)元的百分之10");
        assert_eq!(to_arabic("3亿"), "(3*100000000)");
        assert_eq!(to_arabic("十"), "10");
        assert_eq!(to_arabic("abc + 2"), "abc + 2");
        assert_eq!(to_chinese("3200").as_deref(), Some("三千二百"));
        assert_eq!(to_chinese("-15").as_deref(), Some("负十五"));
        assert_eq!(to_chinese("100000000").as_deref(), Some("一亿"));
        assert!(to_chinese("1.5").is_none());
        assert!(has_numerals("三千二百乘以五"));
        assert!(!has_numerals("等一下"));
    }

    #[test]
    fn numerals_with_their_places_and_precision() {
        let text = "观众2.3万人，三比一，负十五，12.35元";
        let ns = numerals(text);
        let read: Vec<(&str, Option<f64>, i32, bool)> = ns
            .iter()
            .map(|n| (&text[n.start..n.end], n.value(), n.precision(), n.chinese))
            .collect();
        assert_eq!(
            read,
            vec![
                ("2.3万", Some(23000.0), 3, false),
                ("三", Some(3.0), 0, true),
                ("一", Some(1.0), 0, true),
                ("负十五", Some(-15.0), 0, true),
                ("12.35", Some(12.35), -2, false),
            ]
        );
    }
}
