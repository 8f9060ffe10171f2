//! The arithmetic router: small models often answer "what is 123456 ×
//! 654321?" from memory, wrongly, instead of calling the calculator. When
//! the question holds an arithmetic expression — digits (or Chinese
//! numerals) joined by operators or operator words (times, divided by,
//! 乘以, 加上, 的平方 …) — the loop runs the calculator on it before the
//! first model step, and the model answers with the result in front of it.
//! A question without such an expression (a word problem, "15% off") is
//! left to the model's own calls.

use crate::{calculator, chinese};
use regex::Regex;
use std::sync::OnceLock;
use std::time::Duration;
use unicode_normalization::UnicodeNormalization;

/// Operator words → symbols (English lower-cased; longer phrases first).
const WORDS: &[(&str, &str)] = &[
    ("to the power of", "^"),
    ("raised to", "^"),
    ("multiplied by", "*"),
    ("divided by", "/"),
    ("percent of", "% * "),
    ("% of", "% * "),
    ("times", "*"),
    ("plus", "+"),
    ("minus", "-"),
    ("squared", "^2"),
    ("cubed", "^3"),
    ("的平方", "^2"),
    ("的立方", "^3"),
    ("次方", ""),
    ("乘以", "*"),
    ("除以", "/"),
    ("加上", "+"),
    ("减去", "-"),
    ("減去", "-"),
    ("乘", "*"),
    ("加", "+"),
    ("减", "-"),
    ("減", "-"),
    ("的", " * "),
    ("×", "*"),
    ("÷", "/"),
];

fn expr_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"[(\-]*\s*\d[\d\s.+\-*/^%()]*").unwrap_or_else(|_| unreachable!())
    })
}

fn dates() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}:\d{2}")
            .unwrap_or_else(|_| unreachable!())
    })
}

fn thousands() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"(\d),(\d{3})").unwrap_or_else(|_| unreachable!()))
}

/// `s` with unmatched parentheses dropped from its ends.
fn balance(s: &str) -> String {
    let mut s = s
        .trim()
        .trim_end_matches(['+', '-', '*', '/', '^'])
        .trim()
        .to_string();
    loop {
        let open = s.matches('(').count();
        let close = s.matches(')').count();
        if open > close && s.starts_with('(') {
            s.remove(0);
        } else if close > open && s.ends_with(')') {
            s.pop();
        } else {
            return s.trim().to_string();
        }
    }
}

/// The arithmetic expression `question` asks about, if it holds one the
/// calculator can evaluate.
pub fn arithmetic(question: &str) -> Option<String> {
    let s: String = question.nfkc().collect::<String>().to_lowercase();
    let s = chinese::to_arabic(&s);
    // "A plus B, then times C" / "A 加 B 再乘以 C": what came before applies first.
    let s = s.replace("再", " then ").replace("然后", " then ");
    // Dates and times are not subtractions.
    let s = dates().replace_all(&s, " date ");
    let mut s = s.into_owned();
    while thousands().is_match(&s) {
        s = thousands().replace_all(&s, "$1$2").into_owned();
    }
    s = calculator::power().replace_all(&s, "^$1").into_owned();
    for (from, to) in WORDS {
        s = s.replace(from, to);
    }
    let mut best: Option<String> = None;
    for part in s.split(" then ") {
        let m = expr_re()
            .find_iter(part)
            .map(|m| balance(m.as_str()))
            .filter(|e| {
                let numbers = e
                    .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                    .filter(|x| !x.is_empty())
                    .count();
                numbers >= 2 || e.contains('^')
            })
            .filter(|e| {
                e.trim_start_matches(['-', '('])
                    .contains(['+', '-', '*', '/', '^'])
            })
            .max_by_key(String::len);
        match (m, &best) {
            (Some(e), None) => best = Some(e),
            // A continuation: "then * 3".
            (Some(e), Some(b)) if e.starts_with(['+', '-', '*', '/', '^']) => {
                best = Some(format!("({b}) {e}"))
            }
            (None, Some(b)) => {
                let tail = expr_re()
                    .find(part.trim_start())
                    .map(|m| m.as_str().trim().to_string());
                let op = part.trim_start().chars().next();
                if let (Some(op @ ('+' | '-' | '*' | '/' | '^')), Some(t)) = (op, tail) {
                    best = Some(format!("({b}) {op} {}", balance(&t)));
                }
            }
            _ => {}
        }
    }
    let e = best?;
    let e = e.split_whitespace().collect::<Vec<_>>().join(" ");
    calculator::evaluate(&e, Duration::from_millis(500)).ok()?;
    Some(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_arithmetic_in_a_question() {
        assert_eq!(
            arithmetic("What is 123456 multiplied by 654321?").as_deref(),
            Some("123456 * 654321")
        );
        assert_eq!(
            arithmetic("计算 98765 × 4321。").as_deref(),
            Some("98765 * 4321")
        );
        assert_eq!(
            arithmetic("三千二百乘以十五是多少？").as_deref(),
            Some("3200*15")
        );
        assert_eq!(
            arithmetic("1024 的平方是多少？").as_deref(),
            Some("1024 ^2")
        );
        assert_eq!(
            arithmetic("What is 1,000,000 minus 987,654?").as_deref(),
            Some("1000000 - 987654")
        );
        let e = arithmetic("7777 加 8888 再乘以 3 等于几？").expect("found");
        assert_eq!(
            calculator::evaluate(&e, Duration::from_secs(1))
                .ok()
                .as_deref(),
            Some("49995")
        );
        assert_eq!(
            arithmetic("What is 2 to the power of 40?").as_deref(),
            Some("2 ^ 40")
        );
    }

    #[test]
    fn leaves_other_questions_alone() {
        assert_eq!(arithmetic("Who wrote 静夜思?"), None);
        assert_eq!(arithmetic("What day of the week is 2027-07-04?"), None);
        assert_eq!(arithmetic("2026年10月1日是星期几？"), None);
        assert_eq!(arithmetic("I have 3 cats."), None);
        assert_eq!(arithmetic("What date is 100 days after 2026-11-28?"), None);
        assert_eq!(arithmetic("Meet at 10:30 on 2026/12/01."), None);
    }
}
