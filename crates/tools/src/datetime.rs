//! `datetime`: what time it is (in the server's or a named time zone),
//! weekdays, date arithmetic and the days between dates, with the Chinese
//! (lunisolar) calendar date — things a model cannot know or reliably
//! count.

use crate::{Context, Spec, Tool, ToolError};
use chrono::{Datelike, Duration, Months, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Timelike};
use futures::future::BoxFuture;
use serde_json::{json, Value};

pub struct DateTime;

const WEEKDAYS: [(&str, &str); 7] = [
    ("Monday", "星期一"),
    ("Tuesday", "星期二"),
    ("Wednesday", "星期三"),
    ("Thursday", "星期四"),
    ("Friday", "星期五"),
    ("Saturday", "星期六"),
    ("Sunday", "星期日"),
];

/// Years outside this range are refused (chrono's range is wider, but
/// nobody asks, and arithmetic near its ends overflows).
const YEARS: std::ops::RangeInclusive<i32> = -9999..=9999;

fn weekday(d: NaiveDate) -> String {
    let (en, zh) = WEEKDAYS[d.weekday().num_days_from_monday() as usize];
    format!("{en} {zh}")
}

/// The Chinese calendar date, where the calendar crate covers it
/// (1901–2100).
fn lunar(d: NaiveDate) -> Option<String> {
    let l = chinese_lunisolar_calendar::LunisolarDate::from_date(d).ok()?;
    Some(format!("农历 {l:#}"))
}

fn describe(d: NaiveDate) -> String {
    let mut s = format!(
        "{} is a {}, day {} of {}, ISO week {}",
        d,
        weekday(d),
        d.ordinal(),
        d.year(),
        d.iso_week().week()
    );
    if let Some(l) = lunar(d) {
        s.push_str(&format!("; {l}"));
    }
    s
}

/// A date (and maybe a time) as people write them: 2026-11-28,
/// 2026/11/28, 2026年11月28日, 11/28/2026, "today", 明天, with
/// `HH:MM[:SS]` after it.
pub fn parse(s: &str, today: NaiveDateTime) -> Result<NaiveDateTime, ToolError> {
    let t = s.trim();
    let rel = |days: i64| {
        today
            .date()
            .and_time(NaiveTime::MIN)
            .checked_add_signed(Duration::days(days))
    };
    let named = match t.to_lowercase().as_str() {
        "now" | "现在" => Some(today),
        "today" | "今天" | "今日" => rel(0),
        "tomorrow" | "明天" => rel(1),
        "yesterday" | "昨天" => rel(-1),
        "后天" => rel(2),
        "前天" => rel(-2),
        _ => None,
    };
    if let Some(d) = named {
        return Ok(d);
    }
    let norm = t
        .replace(['年', '月', '/', '.'], "-")
        .replace(['日', '号'], " ")
        .replace('T', " ");
    let norm = norm.trim();
    for f in ["%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M"] {
        if let Ok(dt) = NaiveDateTime::parse_from_str(norm, f) {
            return Ok(dt);
        }
    }
    for f in ["%Y-%m-%d", "%m-%d-%Y"] {
        if let Ok(d) = NaiveDate::parse_from_str(norm, f) {
            return Ok(d.and_time(NaiveTime::MIN));
        }
    }
    Err(ToolError::Arguments(format!(
        "cannot read {t:?} as a date; write it as YYYY-MM-DD (optionally with HH:MM), or \"today\""
    )))
}

fn int(args: &Value, k: &str) -> i64 {
    args[k].as_i64().unwrap_or(0)
}

fn checked(d: NaiveDateTime) -> Result<NaiveDateTime, ToolError> {
    if YEARS.contains(&d.year()) {
        Ok(d)
    } else {
        Err(ToolError::Failed(
            "the date is outside the years -9999 to 9999".into(),
        ))
    }
}

fn add(mut d: NaiveDateTime, args: &Value) -> Result<NaiveDateTime, ToolError> {
    let months = int(args, "years")
        .checked_mul(12)
        .and_then(|m| m.checked_add(int(args, "months")))
        .ok_or_else(|| ToolError::Arguments("too many months".into()))?;
    let far = || ToolError::Failed("the date is out of range".into());
    if months != 0 {
        let m = Months::new(months.unsigned_abs().min(u32::MAX as u64) as u32);
        d = if months > 0 {
            d.checked_add_months(m)
        } else {
            d.checked_sub_months(m)
        }
        .ok_or_else(far)?;
    }
    let span = Duration::try_weeks(int(args, "weeks"))
        .zip(Duration::try_days(int(args, "days")))
        .zip(Duration::try_hours(int(args, "hours")))
        .zip(Duration::try_minutes(int(args, "minutes")))
        .and_then(|(((w, dd), h), m)| w.checked_add(&dd)?.checked_add(&h)?.checked_add(&m))
        .ok_or_else(far)?;
    checked(d.checked_add_signed(span).ok_or_else(far)?)
}

fn show(d: NaiveDateTime) -> String {
    if d.time() == NaiveTime::MIN {
        d.date().to_string()
    } else {
        d.format("%Y-%m-%d %H:%M").to_string()
    }
}

/// Whole years, months and days from `a` to `b` (`a` ≤ `b`).
fn ymd_between(a: NaiveDate, b: NaiveDate) -> (u32, u32, i64) {
    let mut months = (b.year() - a.year()) as i64 * 12 + b.month() as i64 - a.month() as i64;
    let step = |m: i64| a.checked_add_months(Months::new(m.max(0) as u32));
    while months > 0 && step(months).is_none_or(|x| x > b) {
        months -= 1;
    }
    let base = step(months).unwrap_or(a);
    let days = (b - base).num_days();
    ((months / 12) as u32, (months % 12) as u32, days)
}

fn run(args: &Value, cx: &Context) -> Result<String, ToolError> {
    let tz: chrono_tz::Tz = match args["timezone"].as_str() {
        Some(name) if !name.trim().is_empty() => name.trim().parse().map_err(|_| {
            ToolError::Arguments(format!(
                "unknown time zone {name:?}; use an IANA name such as Asia/Shanghai or America/New_York"
            ))
        })?,
        _ => cx.timezone,
    };
    let now = tz.from_utc_datetime(&cx.now.naive_utc());
    let today = now.naive_local();
    let op = match args["operation"].as_str() {
        Some(op) => op,
        None if args.get("to").is_some() => "diff",
        None if ["years", "months", "weeks", "days", "hours", "minutes"]
            .iter()
            .any(|k| args.get(*k).is_some()) =>
        {
            "add"
        }
        None if args.get("date").is_some() => "info",
        None => "now",
    };
    let date = |k: &str| match args[k].as_str() {
        Some(s) => parse(s, today).and_then(checked),
        None => Ok(today.date().and_time(NaiveTime::MIN)),
    };
    Ok(match op {
        "now" => {
            let d = today.date();
            let mut s = format!(
                "Now: {} {:02}:{:02} ({}), time zone {} (UTC{})",
                d,
                today.hour(),
                today.minute(),
                weekday(d),
                tz.name(),
                now.format("%:z")
            );
            if let Some(l) = lunar(d) {
                s.push_str(&format!("; {l}"));
            }
            s
        }
        "info" => describe(date("date")?.date()),
        "add" => {
            let from = date("date")?;
            let to = add(from, args)?;
            format!("{} → {} ({})", show(from), show(to), describe(to.date()))
        }
        "diff" => {
            let a = date("date")?;
            let b = date("to")?;
            let (lo, hi, sign) = if a <= b { (a, b, "") } else { (b, a, "-") };
            let days = (hi.date() - lo.date()).num_days();
            let (y, m, d) = ymd_between(lo.date(), hi.date());
            let mut s = format!(
                "From {} to {}: {sign}{days} days ({} weeks and {} days; {y} years, {m} months and {d} days)",
                show(a),
                show(b),
                days / 7,
                days % 7
            );
            let mins = (hi - lo).num_minutes();
            if lo.time() != NaiveTime::MIN || hi.time() != NaiveTime::MIN {
                s.push_str(&format!(
                    "; {sign}{} hours {} minutes in all",
                    mins / 60,
                    mins % 60
                ));
            }
            s
        }
        other => {
            return Err(ToolError::Arguments(format!(
                "unknown operation {other:?}: use now, info, add or diff"
            )))
        }
    })
}

impl Tool for DateTime {
    fn spec(&self) -> Spec {
        Spec {
            name: "datetime".into(),
            description: "Dates and times. operation \"now\": the current date, time and weekday; \"info\": the weekday and Chinese calendar date of `date`; \"add\": `date` plus years/months/weeks/days/hours/minutes (negative to subtract); \"diff\": the days from `date` to `to`. Dates are YYYY-MM-DD (optionally HH:MM) or \"today\".".into(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "operation": {"type": "string", "enum": ["now", "info", "add", "diff"]},
                    "date": {"type": "string", "description": "YYYY-MM-DD, or \"today\" (the default)"},
                    "to": {"type": "string", "description": "The second date, for diff"},
                    "years": {"type": "integer", "minimum": -10000, "maximum": 10000},
                    "months": {"type": "integer", "minimum": -120000, "maximum": 120000},
                    "weeks": {"type": "integer", "minimum": -600000, "maximum": 600000},
                    "days": {"type": "integer", "minimum": -4000000, "maximum": 4000000},
                    "hours": {"type": "integer", "minimum": -100000000, "maximum": 100000000},
                    "minutes": {"type": "integer", "minimum": -1000000000, "maximum": 1000000000},
                    "timezone": {"type": "string", "description": "IANA time zone, e.g. Asia/Shanghai (default: the server's)"}
                },
                "additionalProperties": false
            }),
        }
    }

    fn call<'a>(
        &'a self,
        args: Value,
        cx: &'a Context,
    ) -> BoxFuture<'a, Result<String, ToolError>> {
        Box::pin(async move { run(&args, cx) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Limits;

    fn cx() -> Context {
        let mut c = Context::new(chrono_tz::Asia::Shanghai, Limits::default());
        // 2026-11-28 13:50 UTC = 21:50 in Shanghai.
        c.now = chrono::Utc
            .with_ymd_and_hms(2026, 11, 28, 13, 50, 0)
            .single()
            .expect("valid");
        c
    }

    fn call(args: Value) -> String {
        run(&args, &cx()).unwrap_or_else(|e| format!("ERR {e}"))
    }

    #[test]
    fn dates() {
        let now = call(json!({"operation": "now"}));
        assert!(
            now.starts_with(
                "Now: 2026-11-28 21:50 (Saturday 星期六), time zone Asia/Shanghai (UTC+08:00)"
            ),
            "{now}"
        );
        assert!(now.contains("农历"), "{now}");
        let ny = call(json!({"operation": "now", "timezone": "America/New_York"}));
        assert!(ny.starts_with("Now: 2026-11-28 08:50"), "{ny}");
        assert!(call(json!({"date": "2027-01-01"}))
            .starts_with("2027-01-01 is a Friday 星期五, day 1 of 2027"));
        assert!(call(json!({"date": "2026年10月1日"})).starts_with("2026-10-01 is a Thursday"));
        // 2026-02-17 is the Spring Festival (正月初一).
        assert!(
            call(json!({"date": "2026-02-17"})).contains("正月　初一"),
            "{}",
            call(json!({"date": "2026-02-17"}))
        );
        assert!(call(json!({"date": "today", "days": 100}))
            .starts_with("2026-11-28 → 2027-03-08 (2027-03-08 is a Monday"));
        assert!(
            call(json!({"operation": "add", "date": "2024-01-31", "months": 1}))
                .contains("→ 2024-02-29")
        );
        assert!(
            call(json!({"operation": "add", "date": "2026-03-01", "days": -1}))
                .contains("→ 2026-02-28")
        );
        let d = call(json!({"date": "2026-11-28", "to": "2027-01-01"}));
        assert!(
            d.contains(": 34 days (4 weeks and 6 days; 0 years, 1 months and 4 days)"),
            "{d}"
        );
        let d = call(json!({"operation": "diff", "date": "2000-02-29", "to": "2026-11-28"}));
        assert!(
            d.contains("9769 days") && d.contains("26 years, 8 months and 30 days"),
            "{d}"
        );
        assert!(call(json!({"date": "2027-01-01", "to": "today"})).contains("-34 days"));
    }

    #[test]
    fn bad_dates_are_short_errors() {
        assert!(call(json!({"date": "next blursday"})).contains("YYYY-MM-DD"));
        assert!(call(json!({"date": "2026-02-30"})).starts_with("ERR"));
        assert!(call(json!({"timezone": "Mars/Olympus"})).contains("unknown time zone"));
        assert!(call(json!({"date": "9999-12-31", "days": 4000000})).starts_with("ERR"));
        assert!(
            call(json!({"date": "2026-01-01", "years": 10000, "months": 120000}))
                .starts_with("ERR")
        );
        assert!(call(json!({"operation": "sing"})).contains("unknown operation"));
    }
}
