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

/// `text` with its Chinese numerals written in Arabic digits: runs of
/// numeral characters (with 点 for a decimal point and 负 for minus), and
/// Arabic numbers scaled by 万 or 亿 (`1.5万` → `(1.5*10000)`). Text that
/// is not a numeral stays as it is.
pub fn to_arabic(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        // An Arabic number followed by 万 / 亿.
        if c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            let num: String = chars[start..i].iter().collect();
            let mut scale = String::new();
            while i < chars.len() && matches!(chars[i], '万' | '萬' | '亿' | '億' | '千') {
                scale.push_str(match chars[i] {
                    '万' | '萬' => "*10000",
                    '千' => "*1000",
                    _ => "*100000000",
                });
                i += 1;
            }
            if scale.is_empty() {
                out.push_str(&num);
            } else {
                out.push_str(&format!("({num}{scale})"));
            }
            continue;
        }
        let negative = matches!(c, '负' | '負') && chars.get(i + 1).is_some_and(|&n| is_numeral(n));
        let start = if negative { i + 1 } else { i };
        if !chars.get(start).is_some_and(|&n| is_numeral(n)) {
            out.push(c);
            i += 1;
            continue;
        }
        let mut j = start;
        while j < chars.len() && is_numeral(chars[j]) {
            j += 1;
        }
        let int: String = chars[start..j].iter().collect();
        let Some(mut value) = run_value(&int) else {
            out.extend(&chars[i..j]);
            i = j;
            continue;
        };
        // 点 + digits: the fraction, digit by digit.
        if matches!(chars.get(j), Some('点' | '點'))
            && chars.get(j + 1).is_some_and(|&d| is_digit(d))
        {
            let mut k = j + 1;
            let mut frac = String::new();
            while let Some(d) = chars.get(k).and_then(|&d| digit_value(d)) {
                frac.push(char::from_digit(d, 10).unwrap_or('0'));
                k += 1;
            }
            value = format!("{value}.{frac}");
            j = k;
        }
        if negative {
            out.push_str(&format!("(-{value})"));
        } else {
            out.push_str(&value);
        }
        i = j;
    }
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
}
