//! `calculator`: exact arithmetic on `fend-core` — big integers and exact
//! fractions, decimals, percentages, powers, roots, functions and unit
//! conversion — with Chinese operators, units and numerals read
//! (三千二百乘以五, 5公里等于多少英里) and integer results also given in
//! Chinese numerals when asked in them. No floats where the answer is
//! exact; an inexact result (1/3, √2) says `approx.`.

use crate::{chinese, Context, Spec, Tool, ToolError};
use futures::future::BoxFuture;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use unicode_normalization::UnicodeNormalization;

/// Longest expression taken, in characters.
pub const MAX_EXPRESSION: usize = 1000;
/// Longest result shown, in characters (2^100000 has 30,103 digits).
pub const MAX_RESULT: usize = 2000;

pub struct Calculator;

/// Chinese operator and unit words → what fend reads. Longer words first.
const WORDS: &[(&str, &str)] = &[
    ("的平方根", " sqrt_of "),
    ("的立方根", " cbrt_of "),
    ("等于多少", " ask_for "),
    ("是多少", " ask_for "),
    ("等于几", " ask_for "),
    ("换算成", " to "),
    ("转换成", " to "),
    ("转换为", " to "),
    ("换算为", " to "),
    ("的平方", "^2"),
    ("的立方", "^3"),
    ("次方", ""),
    ("次幂", ""),
    ("乘以", "*"),
    ("除以", "/"),
    ("加上", "+"),
    ("减去", "-"),
    ("減去", "-"),
    ("百分之", " pct_of "),
    ("平方米", " m^2 "),
    ("平方公里", " km^2 "),
    ("平方千米", " km^2 "),
    ("立方米", " m^3 "),
    ("摄氏度", " °C "),
    ("华氏度", " °F "),
    ("公里", " km "),
    ("千米", " km "),
    ("厘米", " cm "),
    ("毫米", " mm "),
    ("英里", " miles "),
    ("英尺", " feet "),
    ("英寸", " inches "),
    ("海里", " nautical_miles "),
    ("公斤", " kg "),
    ("千克", " kg "),
    ("毫升", " mL "),
    ("小时", " hours "),
    ("分钟", " minutes "),
    ("公顷", " hectares "),
    ("的", "*"),
    ("乘", "*"),
    ("加", "+"),
    ("减", "-"),
    ("減", "-"),
    ("×", "*"),
    ("÷", "/"),
    ("·", "*"),
    ("米", " m "),
    ("克", " g "),
    ("斤", " (500 g) "),
    ("磅", " lb "),
    ("升", " L "),
    ("秒", " seconds "),
    ("天", " days "),
    ("周", " weeks "),
    ("亩", " (10000/15 m^2) "),
    ("开方", " sqrt_of "),
    ("？", ""),
    ("?", ""),
    ("。", ""),
];

/// The expression as fend reads it.
pub fn normalize(expr: &str) -> String {
    // Full-width digits and operators → ASCII.
    let s: String = expr.nfkc().collect();
    // Numerals first (两 as a number before 两 as a weight).
    let s = chinese::to_arabic(&s);
    let mut s = power().replace_all(&s, "^$1").into_owned();
    for (from, to) in WORDS {
        s = s.replace(from, to);
    }
    // "X sqrt_of" → "sqrt(X)"; "pct_of X" → "X%"; "ask_for" → nothing, or
    // "to" when a unit follows.
    s = rewrite_postfix(&s, "sqrt_of", "sqrt");
    s = rewrite_postfix(&s, "cbrt_of", "cbrt");
    s = rewrite_prefix_percent(&s);
    if let Some(i) = s.find("ask_for") {
        let after = s[i + "ask_for".len()..].trim();
        s = if after.is_empty() {
            s[..i].to_string()
        } else {
            format!("{} to {after}", &s[..i])
        };
    }
    let s = s.replace('=', "");
    // fend keeps `%` as a unit (15% * 80 = 1200%): a percentage is a
    // number over 100.
    let s = percent().replace_all(&s, "($1/100)");
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `的 10 次方` / `的10次幂` → `^10`.
pub(crate) fn power() -> &'static regex::Regex {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| {
        regex::Regex::new(r"的\s*(\d+)\s*次[方幂]").unwrap_or_else(|_| unreachable!())
    })
}

fn percent() -> &'static regex::Regex {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| regex::Regex::new(r"(\d+(?:\.\d+)?)\s*%").unwrap_or_else(|_| unreachable!()))
}

/// `A word` → `f(A)`, A being the operand just before `word`.
fn rewrite_postfix(s: &str, word: &str, f: &str) -> String {
    let Some(i) = s.find(word) else {
        return s.to_string();
    };
    let before = s[..i].trim_end();
    let start = operand_start(before);
    format!(
        "{}{f}({}){}",
        &before[..start],
        &before[start..],
        &s[i + word.len()..]
    )
}

/// Where the number or parenthesised group ending `s` begins.
fn operand_start(s: &str) -> usize {
    let b = s.as_bytes();
    let mut i = b.len();
    if i > 0 && b[i - 1] == b')' {
        let mut depth = 0;
        while i > 0 {
            i -= 1;
            match b[i] {
                b')' => depth += 1,
                b'(' => {
                    depth -= 1;
                    if depth == 0 {
                        return i;
                    }
                }
                _ => {}
            }
        }
        return 0;
    }
    while i > 0 && (b[i - 1].is_ascii_digit() || b[i - 1] == b'.') {
        i -= 1;
    }
    i
}

/// `pct_of X` → `X%`.
fn rewrite_prefix_percent(s: &str) -> String {
    let mut s = s.to_string();
    while let Some(i) = s.find("pct_of") {
        let rest = s[i + "pct_of".len()..].trim_start();
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        s = format!("{}{}%{}", &s[..i], &rest[..n], &rest[n..]);
    }
    s
}

struct Deadline(Instant);

impl fend_core::Interrupt for Deadline {
    fn should_interrupt(&self) -> bool {
        Instant::now() >= self.0
    }
}

/// Evaluate `expr` exactly, giving up at `limit`.
pub fn evaluate(expr: &str, limit: Duration) -> Result<String, ToolError> {
    if expr.chars().count() > MAX_EXPRESSION {
        return Err(ToolError::Arguments(format!(
            "the expression is longer than {MAX_EXPRESSION} characters"
        )));
    }
    let input = normalize(expr);
    if input.is_empty() {
        return Err(ToolError::Arguments("the expression is empty".into()));
    }
    let mut cx = fend_core::Context::new();
    cx.disable_rng();
    let r = fend_core::evaluate_with_interrupt(&input, &mut cx, &Deadline(Instant::now() + limit))
        .map_err(|e| {
            if e.contains("interrupted") {
                ToolError::Failed(format!(
                    "the calculation of {input:?} did not finish in {} s: the number is too large",
                    limit.as_secs_f32()
                ))
            } else {
                ToolError::Failed(format!("cannot calculate {input:?}: {e}"))
            }
        })?;
    let result = r.get_main_result().trim().to_string();
    if result.is_empty() {
        return Err(ToolError::Failed(format!("{input:?} has no value")));
    }
    if result.chars().count() > MAX_RESULT {
        let digits = result.chars().filter(char::is_ascii_digit).count();
        return Err(ToolError::Failed(format!(
            "the result has about {digits} digits, too long to show; it begins {}…",
            result.chars().take(40).collect::<String>()
        )));
    }
    Ok(result)
}

impl Tool for Calculator {
    fn spec(&self) -> Spec {
        Spec {
            name: "calculator".into(),
            description: "Exact arithmetic. Use it for every calculation instead of working it out yourself: + - * / ^, parentheses, percentages (15% of 80), sqrt(2), big integers, fractions, and unit conversion (5 km to miles, 100 °F to °C). Chinese numerals and operators are understood (三千二百乘以五).".into(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "expression": {"type": "string", "description": "The calculation, e.g. \"123456 * 654321\" or \"(3 + 4) / 7 * 2^10\""},
                    "chinese": {"type": "boolean", "description": "Also give an integer result in Chinese numerals"}
                },
                "required": ["expression"],
                "additionalProperties": false
            }),
        }
    }

    fn call<'a>(
        &'a self,
        args: Value,
        cx: &'a Context,
    ) -> BoxFuture<'a, Result<String, ToolError>> {
        Box::pin(async move {
            let expr = args["expression"].as_str().unwrap_or_default().to_string();
            let chinese =
                args["chinese"].as_bool().unwrap_or(false) || chinese::has_numerals(&expr);
            // Stops itself a little before the call's time limit.
            let limit = cx.limits.timeout.mul_f32(0.9);
            let e2 = expr.clone();
            let result = tokio::task::spawn_blocking(move || evaluate(&e2, limit))
                .await
                .map_err(|e| ToolError::Failed(format!("the calculator failed: {e}")))??;
            let zh = chinese
                .then(|| chinese::to_chinese(&result.replace(',', "")))
                .flatten();
            // The expression with its value: a bare number reads to small
            // models like a new question.
            let shown = normalize(&expr);
            Ok(match zh {
                Some(zh) => format!("{shown} = {result}（{zh}）"),
                None => format!("{shown} = {result}"),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calc(e: &str) -> String {
        evaluate(e, Duration::from_secs(5)).unwrap_or_else(|err| format!("ERR {err}"))
    }

    #[test]
    fn exact_answers() {
        assert_eq!(calc("123456 * 654321"), "80779853376");
        assert_eq!(
            calc("123456789123456789 * 987654321987654321"),
            "121932631356500531347203169112635269"
        );
        assert_eq!(calc("2^100"), "1267650600228229401496703205376");
        assert_eq!(calc("1/3 + 1/6"), "0.5");
        assert_eq!(calc("0.1 + 0.2"), "0.3");
        assert_eq!(calc("15% * 80"), "12");
        assert_eq!(calc("sqrt(144)"), "12");
        assert!(calc("1/3").starts_with("approx. 0.333"));
        assert_eq!(calc("（１２＋３）×４"), "60");
    }

    #[test]
    fn chinese_in() {
        assert_eq!(normalize("三千二百乘以五"), "3200*5");
        assert_eq!(calc("三千二百乘以五"), "16000");
        assert_eq!(calc("一百除以八"), "12.5");
        assert_eq!(calc("1.5万的百分之十二"), "1800");
        assert_eq!(calc("2的10次方"), "1024");
        assert_eq!(calc("九的平方根"), "3");
        assert_eq!(calc("12的平方是多少？"), "144");
        assert_eq!(calc("5公里等于多少英里").split(' ').next(), Some("approx."));
        assert!(
            calc("100 °F to °C").contains("37.7"),
            "{}",
            calc("100 °F to °C")
        );
    }

    #[test]
    fn bad_and_endless_expressions_are_short_errors() {
        let start = Instant::now();
        let e = evaluate("9^9^9^9", Duration::from_millis(500)).expect_err("too big");
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        assert!(e.to_string().len() < 300, "{e}");
        assert!(
            calc("2^100000").starts_with("ERR"),
            "{}",
            calc("2^100000").len()
        );
        assert!(calc("1 +").starts_with("ERR"));
        assert!(calc(&"1+".repeat(600)).contains("longer than"));
        assert!(calc("").starts_with("ERR"));
    }

    #[tokio::test]
    async fn chinese_out() {
        let cx = Context::new(chrono_tz::UTC, crate::Limits::default());
        let r = Calculator
            .call(json!({"expression": "三千二百乘以五"}), &cx)
            .await
            .expect("ok");
        assert_eq!(r, "3200*5 = 16000（一万六千）");
        let r = Calculator
            .call(json!({"expression": "1600 * 2", "chinese": true}), &cx)
            .await
            .expect("ok");
        assert_eq!(r, "1600 * 2 = 3200（三千二百）");
    }
}
