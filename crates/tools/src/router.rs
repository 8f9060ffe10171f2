//! The router: small models often answer "what is 123456 × 654321?",
//! "how many days from 2026-03-15 to 2026-12-25?" or "how many kilometres
//! is 26.2 miles?" from memory, wrongly, instead of calling a tool. When
//! the question plainly holds such a task, the loop runs the tool on it
//! before the first model step, and the model answers with the result in
//! front of it. What it recognises ([`route`], first match wins):
//!
//! - dates ([`date_task`]): a weekday asked of one date; the days between
//!   two dates; a date plus or minus N days/weeks/months/years — dates
//!   written 2026-11-28, 2026/11/28, 2026年11月28日 or January 1, 2026;
//! - a unit conversion ([`conversion`]): a number with a unit and a second
//!   unit of the same kind (26.2 miles … kilometers, 3.5 小时 … 分钟,
//!   一天有多少秒), checked by the calculator converting it;
//! - a price change ([`percent_change`]): 30% off, rises by 15%, 打八五折,
//!   降价百分之二十五;
//! - an arithmetic expression ([`arithmetic`]): digits (or Chinese
//!   numerals) joined by operators or operator words (times, divided by,
//!   乘以, 加上, 的平方, 的百分之十二 …).
//!
//! Anything else (a word problem, a question about documents) is left to
//! the model's own calls.

use crate::{calculator, chinese};
use chrono::NaiveDate;
use regex::Regex;
use serde_json::{json, Value};
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
    ("百分之", " pct "),
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
    let s = plain(question);
    // "A plus B, then times C" / "A 加 B 再乘以 C": what came before applies first.
    let s = s.replace("再", " then ").replace("然后", " then ");
    // Dates and times are not subtractions.
    let mut s = dates().replace_all(&s, " date ").into_owned();
    s = calculator::power().replace_all(&s, "^$1").into_owned();
    for (from, to) in WORDS {
        s = s.replace(from, to);
    }
    let s = pct_word().replace_all(&s, "$1%").into_owned();
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

/// A task the router found: the tool to run and its arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct Routed {
    pub tool: &'static str,
    pub arguments: Value,
}

/// The tool call `question` plainly asks for, if any (see the module
/// documentation).
pub fn route(question: &str) -> Option<Routed> {
    let calc = |e: String| Routed {
        tool: "calculator",
        arguments: json!({ "expression": e }),
    };
    if let Some(q) = knowledge(question) {
        return Some(Routed {
            tool: "search_knowledge",
            arguments: json!({ "query": q, "k": 4 }),
        });
    }
    date_task(question)
        .map(|a| Routed {
            tool: "datetime",
            arguments: a,
        })
        .or_else(|| conversion(question).map(calc))
        .or_else(|| percent_change(question).map(calc))
        .or_else(|| arithmetic(question).map(calc))
}

/// The search for a question that names the knowledge base ("According
/// to the knowledge base, …", "根据知识库，…"): the question without those
/// words.
pub fn knowledge(question: &str) -> Option<String> {
    static KB: OnceLock<Regex> = OnceLock::new();
    let kb = regex(
        &KB,
        r"(?i)(?:according to|based on|using|from|search|in|check)?\s*(?:(?:the|my|our)\s+knowledge ?base|(?:my|our)\s+(?:documents|docs|notes|files))\s*[,，:：]?|(?:根据|根據|按照|依据|依據|查一?下|搜索|在)?\s*(?:(?:我的|我们的|我們的)?(?:知识库|知識庫|资料库|資料庫)|(?:我的|我们的|我們的)(?:文档|文檔|笔记|筆記|文件))(?:里|裡|中|内|內)?\s*[,，:：]?",
    );
    let m = kb.find(question)?;
    let q = format!("{} {}", &question[..m.start()], &question[m.end()..]);
    let q = q.trim_matches(|c: char| c.is_whitespace() || ",，:：".contains(c));
    (!q.is_empty()).then(|| q.to_string())
}

fn regex(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pattern).unwrap_or_else(|_| unreachable!()))
}

fn pct_word() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    regex(&RE, r"pct\s*(\d+(?:\.\d+)?)")
}

/// The question as the router reads it: NFKC, lower case, Chinese
/// numerals as digits, no thousands separators.
fn plain(question: &str) -> String {
    let s: String = question.nfkc().collect::<String>().to_lowercase();
    let mut s = chinese::to_arabic(&s);
    while thousands().is_match(&s) {
        s = thousands().replace_all(&s, "$1$2").into_owned();
    }
    s
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];

/// The dates written in `s` (lower case), in order, with their spans:
/// 2026-11-28, 2026/11/28, 2026.11.28, 2026年11月28日, January 1, 2026,
/// 1 January 2026.
fn find_dates(s: &str) -> Vec<(usize, usize, NaiveDate)> {
    static ISO: OnceLock<Regex> = OnceLock::new();
    static ZH: OnceLock<Regex> = OnceLock::new();
    static MDY: OnceLock<Regex> = OnceLock::new();
    static DMY: OnceLock<Regex> = OnceLock::new();
    let month = r"(jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?";
    let mut out: Vec<(usize, usize, NaiveDate)> = Vec::new();
    let mut add = |start: usize, end: usize, y: &str, m: u32, d: &str| {
        let (Ok(y), Ok(d)) = (y.parse::<i32>(), d.parse::<u32>()) else {
            return;
        };
        if let Some(date) = NaiveDate::from_ymd_opt(y, m, d) {
            if !out.iter().any(|(s, e, _)| start < *e && *s < end) {
                out.push((start, end, date));
            }
        }
    };
    let month_no = |m: &str| {
        MONTHS
            .iter()
            .position(|x| m.starts_with(x))
            .map(|i| i as u32 + 1)
    };
    for c in regex(&ISO, r"\b(\d{4})[-/.](\d{1,2})[-/.](\d{1,2})\b").captures_iter(s) {
        let (Some(all), Ok(m)) = (c.get(0), c[2].parse::<u32>()) else {
            continue;
        };
        add(all.start(), all.end(), &c[1], m, &c[3]);
    }
    for c in regex(
        &ZH,
        r"(\d{4})\s*年\s*(\d{1,2})\s*月\s*(\d{1,2})\s*[日号號]?",
    )
    .captures_iter(s)
    {
        let (Some(all), Ok(m)) = (c.get(0), c[2].parse::<u32>()) else {
            continue;
        };
        add(all.start(), all.end(), &c[1], m, &c[3]);
    }
    let mdy = format!(r"\b{month}\s+(\d{{1,2}})(?:st|nd|rd|th)?,?\s+(\d{{4}})\b");
    for c in regex(&MDY, &mdy).captures_iter(s) {
        let (Some(all), Some(m)) = (c.get(0), month_no(&c[1])) else {
            continue;
        };
        add(all.start(), all.end(), &c[3], m, &c[2]);
    }
    let dmy = format!(r"\b(\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?{month},?\s+(\d{{4}})\b");
    for c in regex(&DMY, &dmy).captures_iter(s) {
        let (Some(all), Some(m)) = (c.get(0), month_no(&c[2])) else {
            continue;
        };
        add(all.start(), all.end(), &c[3], m, &c[1]);
    }
    out.sort_by_key(|(s, _, _)| *s);
    out
}

/// The `datetime` arguments for a date question: a weekday, the days
/// between two dates, or a date moved by some days/weeks/months/years.
pub fn date_task(question: &str) -> Option<Value> {
    static WEEKDAY: OnceLock<Regex> = OnceLock::new();
    static BETWEEN: OnceLock<Regex> = OnceLock::new();
    static OFFSET: OnceLock<Regex> = OnceLock::new();
    static BACK: OnceLock<Regex> = OnceLock::new();
    static FORTH: OnceLock<Regex> = OnceLock::new();
    static UNTIL: OnceLock<Regex> = OnceLock::new();
    let s = plain(question);
    let dates = find_dates(&s);
    let first = dates.first()?;
    let iso = |d: &NaiveDate| d.format("%Y-%m-%d").to_string();
    // The text without its dates, for the numbers and words around them.
    let mut rest = String::new();
    let mut at = 0;
    for (a, b, _) in &dates {
        rest.push_str(&s[at..*a]);
        rest.push_str(" date ");
        at = *b;
    }
    rest.push_str(&s[at..]);
    let between = regex(
        &BETWEEN,
        r"how many (days|weeks)|how long|days? (between|from)|number of days|多少天|几天|幾天|天数|天數|相差|相隔|间隔|間隔|多少个?星期|多少周",
    );
    if dates.len() == 2 && between.is_match(&rest) {
        return Some(json!({
            "operation": "diff", "date": iso(&first.2), "to": iso(&dates[1].2)
        }));
    }
    if dates.len() != 1 {
        return None;
    }
    let offset = regex(
        &OFFSET,
        r"(\d+)\s*(days?|weeks?|months?|years?|个工作日|天|日|个?星期|周|週|个月|個月|月|年)",
    );
    let back = regex(
        &BACK,
        r"\b(before|earlier|ago|prior)\b|往前|之前|以前|前|减去|減去|减|減",
    );
    let forth = regex(
        &FORTH,
        r"\b(after|later|from|plus|add)\b|往后|往後|之后|之後|以后|以後|后|後|加上|加|过|過",
    );
    if let Some(c) = offset.captures(&rest) {
        let unit = &c[2];
        let n: i64 = c[1].parse().ok()?;
        if unit.contains("工作日") {
            return None;
        }
        let sign = if back.is_match(&rest) {
            -1
        } else if forth.is_match(&rest) {
            1
        } else {
            return None;
        };
        let key = match unit {
            u if u.starts_with("day") || u == "天" || u == "日" => "days",
            u if u.starts_with("week") || u.contains("星期") || u == "周" || u == "週" => {
                "weeks"
            }
            u if u.starts_with("month") || u.contains('月') => "months",
            _ => "years",
        };
        let mut a = json!({ "operation": "add", "date": iso(&first.2) });
        a[key] = json!(sign * n);
        return Some(a);
    }
    let weekday = regex(
        &WEEKDAY,
        r"day of (the )?week|weekday|what day (is|was|will)|星期几|星期幾|周几|週幾|礼拜几|禮拜幾|星期天?几",
    );
    if weekday.is_match(&rest) {
        return Some(json!({ "operation": "info", "date": iso(&first.2) }));
    }
    let until = regex(
        &UNTIL,
        r"\b(until|till|since)\b|距离|距離|距今|离|離|还有多少天|還有多少天",
    );
    if until.is_match(&rest) && between.is_match(&rest) {
        return Some(json!({ "operation": "diff", "date": "today", "to": iso(&first.2) }));
    }
    None
}

/// A unit: the words people write for it and fend's name.
struct Unit {
    words: &'static [&'static str],
    fend: &'static str,
}

const UNITS: &[Unit] = &[
    Unit {
        words: &[
            "kilometers",
            "kilometres",
            "kilometer",
            "kilometre",
            "km",
            "公里",
            "千米",
        ],
        fend: "km",
    },
    Unit {
        words: &[
            "centimeters",
            "centimetres",
            "centimeter",
            "centimetre",
            "cm",
            "厘米",
        ],
        fend: "cm",
    },
    Unit {
        words: &[
            "millimeters",
            "millimetres",
            "millimeter",
            "millimetre",
            "mm",
            "毫米",
        ],
        fend: "mm",
    },
    Unit {
        words: &["nautical miles", "nautical mile", "海里"],
        fend: "nautical_miles",
    },
    Unit {
        words: &["meters", "metres", "meter", "metre", "米"],
        fend: "m",
    },
    Unit {
        words: &["miles", "mile", "英里"],
        fend: "miles",
    },
    Unit {
        words: &["feet", "foot", "ft", "英尺"],
        fend: "feet",
    },
    Unit {
        words: &["inches", "inch", "英寸"],
        fend: "inches",
    },
    Unit {
        words: &["yards", "yard"],
        fend: "yards",
    },
    Unit {
        words: &["kilograms", "kilogram", "kg", "公斤", "千克"],
        fend: "kg",
    },
    Unit {
        words: &["milligrams", "milligram", "mg", "毫克"],
        fend: "mg",
    },
    Unit {
        words: &["grams", "gram", "克"],
        fend: "g",
    },
    Unit {
        words: &["pounds", "pound", "lbs", "lb", "磅"],
        fend: "lb",
    },
    Unit {
        words: &["ounces", "ounce", "oz", "盎司"],
        fend: "oz",
    },
    Unit {
        words: &["tonnes", "tonne", "metric tons", "吨", "噸"],
        fend: "tonnes",
    },
    Unit {
        words: &["milliseconds", "millisecond", "毫秒"],
        fend: "ms",
    },
    Unit {
        words: &["seconds", "second", "secs", "sec", "秒钟", "秒鐘", "秒"],
        fend: "seconds",
    },
    Unit {
        words: &["minutes", "minute", "mins", "分钟", "分鐘"],
        fend: "minutes",
    },
    Unit {
        words: &["hours", "hour", "hrs", "小时", "小時", "钟头", "鐘頭"],
        fend: "hours",
    },
    Unit {
        words: &["days", "day", "天"],
        fend: "days",
    },
    Unit {
        words: &["weeks", "week", "星期", "周", "週"],
        fend: "weeks",
    },
    Unit {
        words: &[
            "milliliters",
            "millilitres",
            "milliliter",
            "millilitre",
            "ml",
            "毫升",
        ],
        fend: "mL",
    },
    Unit {
        words: &["liters", "litres", "liter", "litre", "升"],
        fend: "L",
    },
    Unit {
        words: &["gallons", "gallon", "加仑", "加侖"],
        fend: "gallons",
    },
    Unit {
        words: &[
            "square kilometers",
            "square kilometres",
            "平方公里",
            "平方千米",
        ],
        fend: "km^2",
    },
    Unit {
        words: &["square meters", "square metres", "平方米"],
        fend: "m^2",
    },
    Unit {
        words: &["hectares", "hectare", "公顷", "公頃"],
        fend: "hectares",
    },
    Unit {
        words: &["acres", "acre", "英亩", "英畝"],
        fend: "acres",
    },
    Unit {
        words: &[
            "degrees celsius",
            "celsius",
            "centigrade",
            "摄氏度",
            "攝氏度",
            "摄氏",
            "攝氏",
        ],
        fend: "°C",
    },
    Unit {
        words: &[
            "degrees fahrenheit",
            "fahrenheit",
            "华氏度",
            "華氏度",
            "华氏",
            "華氏",
        ],
        fend: "°F",
    },
    Unit {
        words: &["kelvin", "开尔文"],
        fend: "K",
    },
    Unit {
        words: &[
            "km/h",
            "kilometers per hour",
            "kilometres per hour",
            "公里每小时",
            "千米每小时",
        ],
        fend: "km/h",
    },
    Unit {
        words: &["mph", "miles per hour"],
        fend: "mph",
    },
];

/// The units mentioned in `s`, in order: (start, end, index into UNITS),
/// the longest word winning where words overlap; English words only as
/// whole words.
fn find_units(s: &str) -> Vec<(usize, usize, usize)> {
    let mut all: Vec<(usize, usize, usize)> = Vec::new();
    for (u, unit) in UNITS.iter().enumerate() {
        for w in unit.words {
            let ascii = w.is_ascii();
            for (start, _) in s.match_indices(w) {
                let end = start + w.len();
                let letter = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphabetic());
                if ascii
                    && (letter(s[..start].chars().next_back()) || letter(s[end..].chars().next()))
                {
                    continue;
                }
                all.push((start, end, u));
            }
        }
    }
    all.sort_by_key(|&(s, e, _)| (s, std::cmp::Reverse(e)));
    let mut out: Vec<(usize, usize, usize)> = Vec::new();
    for m in all {
        if out.last().is_none_or(|l| m.0 >= l.1) {
            out.push(m);
        }
    }
    out
}

/// The calculator expression for a unit conversion in `question`
/// (`26.2 miles to km`): one unit with a number before it, and another of
/// the same kind.
pub fn conversion(question: &str) -> Option<String> {
    static NUMBER: OnceLock<Regex> = OnceLock::new();
    let s = plain(question);
    let number = regex(
        &NUMBER,
        r"(?:(\d+(?:\.\d+)?)|\b(one|a|an)|(每))\s*(?:degrees?|度|个|個)?\s*$",
    );
    let units = find_units(&s);
    let mut source = None;
    for &(start, _, u) in &units {
        if let Some(c) = number.captures(&s[..start]) {
            let n = c.get(1).map_or("1", |m| m.as_str());
            if source.is_some() {
                return None;
            }
            source = Some((n.to_string(), u));
        }
    }
    let (n, from) = source?;
    let to = units.iter().map(|&(_, _, u)| u).find(|&u| u != from)?;
    let expr = format!("{n} {} to {}", UNITS[from].fend, UNITS[to].fend);
    calculator::evaluate(&expr, Duration::from_millis(500)).ok()?;
    Some(expr)
}

/// The calculator expression for a price raised or cut by a percentage
/// (`250 * (1 - 30%)`), or a Chinese discount (打八五折: `8600 * 85%`).
pub fn percent_change(question: &str) -> Option<String> {
    static OFF: OnceLock<Regex> = OnceLock::new();
    static UP: OnceLock<Regex> = OnceLock::new();
    static DOWN: OnceLock<Regex> = OnceLock::new();
    static ZHE: OnceLock<Regex> = OnceLock::new();
    static NUM: OnceLock<Regex> = OnceLock::new();
    let raw: String = question.nfkc().collect();
    // 打八五折 before the numerals become digits (八五 is 8 and 5, not 85).
    let zhe = regex(
        &ZHE,
        r"打\s*([一二三四五六七八九\d])([一二三四五六七八九\d])?\s*折",
    );
    let digit = |c: &str| -> Option<u32> {
        let ch = c.chars().next()?;
        ch.to_digit(10).or_else(|| {
            "一二三四五六七八九"
                .chars()
                .position(|x| x == ch)
                .map(|i| i as u32 + 1)
        })
    };
    let s = plain(&zhe.replace_all(&raw, " zhe "));
    let pct = r"(?:百分之\s*(\d+(?:\.\d+)?)|(\d+(?:\.\d+)?)\s*%)";
    let (rate, matched) = if let Some(c) = zhe.captures(&raw) {
        let a = digit(&c[1])?;
        let rate = match c.get(2).and_then(|m| digit(m.as_str())) {
            Some(b) => format!("{}", a * 10 + b),
            None => format!("{}", a * 10),
        };
        (format!("{rate}%"), "zhe".to_string())
    } else {
        let off = regex(&OFF, &format!(r"{pct}\s*(?:off|discount)"));
        let up = regex(
            &UP,
            &format!(
                r"(?:\b(?:rises?|rose|increases?|increased|grows?|grew|goes up|went up|raised|up)\s+by|涨价|漲價|上涨|上漲|涨了|漲了|增加了?|提高了?|增长了?|增長了?|上调|上調)\s*{pct}"
            ),
        );
        let down = regex(
            &DOWN,
            &format!(
                r"(?:\b(?:falls?|fell|drops?|dropped|decreases?|decreased|goes down|went down|reduced|cut|discounted|down)\s+by|降价|降價|下降了?|下跌了?|减少了?|減少了?|便宜了?|下调|下調|优惠|優惠)\s*{pct}"
            ),
        );
        let found = |re: &Regex, sign: &str| {
            re.captures(&s).and_then(|c| {
                let p = c.get(1).or(c.get(2))?.as_str().to_string();
                Some((format!("(1 {sign} {p}%)"), c.get(0)?.as_str().to_string()))
            })
        };
        found(off, "-")
            .or_else(|| found(down, "-"))
            .or_else(|| found(up, "+"))?
    };
    // The price: the one other number in the question.
    let rest = s.replacen(&matched, " ", 1);
    let num = regex(
        &NUM,
        r"([$¥])?\s*(\d+(?:\.\d+)?)\s*(元|块|塊|dollars?|美元|yuan|rmb|euros?|欧元)?",
    );
    let numbers: Vec<(bool, &str)> = num
        .captures_iter(&rest)
        .filter_map(|c| Some((c.get(1).is_some() || c.get(3).is_some(), c.get(2)?.as_str())))
        .collect();
    // More than one number ("一件 1280 元"): the one written as money.
    let money: Vec<&str> = numbers.iter().filter(|n| n.0).map(|n| n.1).collect();
    let price = match (numbers.as_slice(), money.as_slice()) {
        ([(_, p)], _) | (_, [p]) => *p,
        _ => return None,
    };
    let expr = format!("{price} * {rate}");
    calculator::evaluate(&expr, Duration::from_millis(500)).ok()?;
    Some(expr)
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

    fn dt(q: &str) -> Option<Value> {
        date_task(q)
    }

    #[test]
    fn finds_date_tasks() {
        assert_eq!(
            dt("How many days from 2025-06-01 to 2026-06-01?"),
            Some(json!({"operation": "diff", "date": "2025-06-01", "to": "2026-06-01"}))
        );
        assert_eq!(
            dt("2026年5月20日到2026年8月8日有多少天？"),
            Some(json!({"operation": "diff", "date": "2026-05-20", "to": "2026-08-08"}))
        );
        assert_eq!(
            dt("How many days between July 4, 1776 and 4th of July 2026?"),
            Some(json!({"operation": "diff", "date": "1776-07-04", "to": "2026-07-04"}))
        );
        assert_eq!(
            dt("Which weekday is 2030-01-01?"),
            Some(json!({"operation": "info", "date": "2030-01-01"}))
        );
        assert_eq!(
            dt("2027年2月14日是星期几？"),
            Some(json!({"operation": "info", "date": "2027-02-14"}))
        );
        assert_eq!(
            dt("What is the date 30 days before 2027-01-15?"),
            Some(json!({"operation": "add", "date": "2027-01-15", "days": -30}))
        );
        assert_eq!(
            dt("2026年12月1日加上90天是哪一天？"),
            Some(json!({"operation": "add", "date": "2026-12-01", "days": 90}))
        );
        assert_eq!(
            dt("2026年12月1日再过三个月是几号？"),
            Some(json!({"operation": "add", "date": "2026-12-01", "months": 3}))
        );
        assert_eq!(
            dt("What day of the week is 2 weeks after Dec 25, 2026?"),
            Some(json!({"operation": "add", "date": "2026-12-25", "weeks": 2}))
        );
        assert_eq!(
            dt("How many days until 2027-01-01?"),
            Some(json!({"operation": "diff", "date": "today", "to": "2027-01-01"}))
        );
        // No date, a date that does not exist, or no task: left alone.
        assert_eq!(dt("What day is it today?"), None);
        assert_eq!(dt("What day of the week is 2026-02-30?"), None);
        assert_eq!(dt("What happened on 1949-10-01?"), None);
        assert_eq!(dt("10 个工作日后是 2026-12-01 吗？"), None);
    }

    #[test]
    fn finds_unit_conversions() {
        assert_eq!(
            conversion("How many grams are in 2.75 kilograms?").as_deref(),
            Some("2.75 kg to g")
        );
        assert_eq!(
            conversion("How many seconds are in 3 hours?").as_deref(),
            Some("3 hours to seconds")
        );
        assert_eq!(
            conversion("12 公斤等于多少克？").as_deref(),
            Some("12 kg to g")
        );
        assert_eq!(
            conversion("一天有多少秒？").as_deref(),
            Some("1 days to seconds")
        );
        assert_eq!(
            conversion("Convert 30 degrees Celsius to Fahrenheit.").as_deref(),
            Some("30 °C to °F")
        );
        assert_eq!(
            conversion("马拉松 42.195 公里合多少英里？").as_deref(),
            Some("42.195 km to miles")
        );
        // Different kinds, no number, or two numbers: left alone.
        assert_eq!(conversion("How many grams are in 3 hours?"), None);
        assert_eq!(
            conversion("How many meters is a kilometer?").as_deref(),
            Some("1 km to m")
        );
        assert_eq!(conversion("Is a mile longer than a kilometer?"), None);
        assert_eq!(conversion("I walked 3 miles and 5 km."), None);
        assert_eq!(conversion("Who wrote 静夜思?"), None);
    }

    #[test]
    fn finds_price_changes() {
        assert_eq!(
            percent_change("A 250 dollar jacket is 30% off. What does it cost?").as_deref(),
            Some("250 * (1 - 30%)")
        );
        assert_eq!(
            percent_change("一件 1280 元的商品降价百分之二十五，现价多少元？").as_deref(),
            Some("1280 * (1 - 25%)")
        );
        assert_eq!(
            percent_change("Rent of 1,500 went up by 4.5%. New rent?").as_deref(),
            Some("1500 * (1 + 4.5%)")
        );
        assert_eq!(
            percent_change("原价 300 元，打七折后多少钱？").as_deref(),
            Some("300 * 70%")
        );
        assert_eq!(
            percent_change("原价 300 元，打七五折后多少钱？").as_deref(),
            Some("300 * 75%")
        );
        assert_eq!(
            percent_change("Prices rose by 5% in 2025 and 3% in 2026."),
            None
        );
        assert_eq!(percent_change("What is 12% of 7550?"), None);
        assert_eq!(
            arithmetic("3600 的百分之七点五是多少？").as_deref(),
            Some("3600 * 7.5%")
        );
    }

    #[test]
    fn route_picks_the_tool() {
        let r = |q: &str| route(q).map(|r| (r.tool, r.arguments["expression"].clone()));
        assert_eq!(
            r("What is 2 to the power of 40?").map(|x| x.0),
            Some("calculator")
        );
        assert_eq!(r("2027年2月14日是星期几？").map(|x| x.0), Some("datetime"));
        assert_eq!(
            r("3.5 小时是多少分钟？").map(|x| x.1),
            Some(json!("3.5 hours to minutes"))
        );
        assert_eq!(r("Who wrote 静夜思?"), None);
        assert_eq!(r("Where are the docs for serde?"), None);
        let kb = |q: &str| route(q).map(|r| (r.tool, r.arguments["query"].clone()));
        assert_eq!(
            kb("根据知识库，北京故宫是哪一年建成的？"),
            Some(("search_knowledge", json!("北京故宫是哪一年建成的？")))
        );
        assert_eq!(
            kb("According to the knowledge base, into which sea does the Yellow River flow?"),
            Some((
                "search_knowledge",
                json!("into which sea does the Yellow River flow?")
            ))
        );
        assert_eq!(
            kb("What do my notes say about 翰林院?"),
            Some(("search_knowledge", json!("What do say about 翰林院?")))
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
