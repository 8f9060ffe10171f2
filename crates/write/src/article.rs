//! From a row to a prompt (the user's minijinja template, the built-in
//! framing per language) and from the model's text to an article.

use crate::rows::Row;
use crate::WriteError;
use hanlin_tokenizer::Message;
use minijinja::{Environment, UndefinedBehavior, Value};
use std::collections::BTreeSet;

/// Templates larger than this are refused.
pub const MAX_TEMPLATE_BYTES: usize = 256 << 10;

/// The user's template: a row in, the facts and instructions for one
/// article out. It sees the row's fields by name (and the whole row as
/// `row`), `id`, `lang` (`zh`, `en`, …) and `style`.
pub struct Template {
    env: Environment<'static>,
    /// Top-level names it reads that the writer does not supply: row
    /// fields every row must have.
    fields: BTreeSet<String>,
    /// `row.x` names it reads.
    row_fields: BTreeSet<String>,
}

const NAME: &str = "template";
const SUPPLIED: [&str; 4] = ["row", "id", "lang", "style"];

impl Template {
    pub fn new(source: &str) -> Result<Self, WriteError> {
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(WriteError::Template(format!(
                "the template is {} bytes; the limit is {MAX_TEMPLATE_BYTES}",
                source.len()
            )));
        }
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_fuel(Some(1_000_000));
        env.add_filter("weekday", weekday);
        env.add_filter("date_text", date_text);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| WriteError::Template(e.to_string()))?;
        let t = env
            .get_template(NAME)
            .map_err(|e| WriteError::Template(e.to_string()))?;
        // Names the template assigns itself (`{% set x = … %}`, in any
        // branch) are not row fields.
        let assigned: BTreeSet<String> =
            regex::Regex::new(r"\{%-?\s*set\s+([A-Za-z_][A-Za-z0-9_]*)")
                .map(|re| re.captures_iter(source).map(|c| c[1].to_string()).collect())
                .unwrap_or_default();
        let mut fields = BTreeSet::new();
        let mut row_fields = BTreeSet::new();
        for name in t.undeclared_variables(true) {
            if assigned.contains(name.split('.').next().unwrap_or("")) {
                continue;
            }
            match name.split_once('.') {
                Some(("row", f)) => {
                    row_fields.insert(f.to_string());
                }
                _ if SUPPLIED.contains(&name.as_str()) => {}
                Some((top, _)) => {
                    fields.insert(top.to_string());
                }
                None => {
                    fields.insert(name);
                }
            }
        }
        Ok(Self {
            env,
            fields,
            row_fields,
        })
    }

    /// The prompt for `row` in `lang` and `style`. A field the template
    /// reads that the row lacks is named in the error.
    pub fn render(&self, row: &Row, lang: &str, style: &str) -> Result<String, WriteError> {
        let mut ctx = row.fields.clone();
        ctx.insert("row".into(), serde_json::Value::Object(row.fields.clone()));
        ctx.insert("id".into(), row.id.clone().into());
        ctx.insert("lang".into(), lang.into());
        ctx.insert("style".into(), style.into());
        let t = self
            .env
            .get_template(NAME)
            .map_err(|e| WriteError::Template(e.to_string()))?;
        let text = t.render(Value::from_serialize(&ctx)).map_err(|e| {
            // An undefined name: the row lacks a field the template reads.
            let missing = (e.kind() == minijinja::ErrorKind::UndefinedError)
                .then(|| {
                    self.fields
                        .iter()
                        .chain(&self.row_fields)
                        .find(|f| !row.fields.contains_key(f.as_str()))
                })
                .flatten();
            match missing {
                Some(f) => WriteError::MissingField {
                    row: row.number,
                    field: f.clone(),
                },
                None => WriteError::Render {
                    row: row.number,
                    message: e.to_string(),
                },
            }
        })?;
        let text = text.trim().to_string();
        if text.is_empty() {
            return Err(WriteError::Render {
                row: row.number,
                message: format!("the template gives nothing for lang {lang:?}"),
            });
        }
        Ok(text)
    }
}

fn parse_date(value: &str) -> Result<chrono::NaiveDate, minijinja::Error> {
    let v = value.trim();
    chrono::NaiveDate::parse_from_str(v.get(..10).unwrap_or(v), "%Y-%m-%d").map_err(|_| {
        minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("{value:?} is not a date written YYYY-MM-DD"),
        )
    })
}

/// `{{ date | weekday(lang) }}`: 星期六 / Saturday.
fn weekday(value: String, lang: Option<String>) -> Result<String, minijinja::Error> {
    use chrono::Datelike;
    let d = parse_date(&value)?;
    let i = d.weekday().num_days_from_monday() as usize;
    Ok(if lang.as_deref().unwrap_or("en").starts_with("zh") {
        format!("星期{}", ["一", "二", "三", "四", "五", "六", "日"][i])
    } else {
        [
            "Monday",
            "Tuesday",
            "Wednesday",
            "Thursday",
            "Friday",
            "Saturday",
            "Sunday",
        ][i]
            .to_string()
    })
}

/// `{{ date | date_text(lang) }}`: 2026年3月7日 / March 7, 2026.
fn date_text(value: String, lang: Option<String>) -> Result<String, minijinja::Error> {
    let d = parse_date(&value)?;
    Ok(if lang.as_deref().unwrap_or("en").starts_with("zh") {
        d.format("%Y年%-m月%-d日").to_string()
    } else {
        d.format("%B %-d, %Y").to_string()
    })
}

/// The conversation for one attempt: the framing for `lang`, the rendered
/// prompt, and — on a retry — what the last draft got wrong.
pub fn messages(prompt: &str, lang: &str, problems: &[String]) -> Vec<Message> {
    let zh = lang.starts_with("zh");
    let system = if zh {
        "你是一名严谨的编辑。只根据用户给出的事实写作：不要添加事实里没有的数字、日期、人名、地名或机构名。\
         第一行写标题（不加“标题”等前缀），空一行，再写正文。全文使用简体中文。"
            .to_string()
    } else {
        format!(
            "You are a careful editor. Write only from the facts the user gives: add no number, \
             date, name, place or organisation that is not in them. Put the headline on the first \
             line (no \"Title:\" prefix), then a blank line, then the body. Write in {}.",
            language_name(lang)
        )
    };
    let mut user = prompt.to_string();
    // Small models follow a form at the end of the message better than a
    // rule in the system prompt.
    user.push_str(if zh {
        "\n\n按以下格式输出：\n标题：（一行标题）\n正文：（正文）"
    } else {
        "\n\nAnswer in this form:\nTitle: (one line)\nBody: (the article)"
    });
    if !problems.is_empty() {
        let list = problems.join("; ");
        if zh {
            user.push_str(&format!(
                "\n\n（上一稿写了事实里没有的内容：{list}。这一稿只用上面的事实。）"
            ));
        } else {
            user.push_str(&format!(
                "\n\n(The last draft stated things that are not in the facts: {list}. Use only the facts above.)"
            ));
        }
    }
    vec![Message::new("system", system), Message::new("user", user)]
}

fn language_name(lang: &str) -> &str {
    match lang.split(['-', '_']).next().unwrap_or(lang) {
        "en" => "English",
        "fr" => "French",
        "de" => "German",
        "es" => "Spanish",
        "ja" => "Japanese",
        "ko" => "Korean",
        "ru" => "Russian",
        _ => lang,
    }
}

/// An article: a title and a body (Markdown).
#[derive(Debug, Clone, PartialEq)]
pub struct Article {
    pub title: String,
    pub body: String,
}

impl Article {
    /// The model's text as an article: the first line is the title (any
    /// Markdown heading marks, bold, quotes or "标题："/"Title:" taken
    /// off), the rest the body. `None` when there is no body.
    pub fn parse(text: &str) -> Option<Article> {
        let text = text.trim();
        let text = text
            .strip_prefix("```markdown")
            .or_else(|| text.strip_prefix("```"))
            .map(|t| t.trim_end_matches("```"))
            .unwrap_or(text)
            .trim();
        // The title and body on one line: "标题：… 正文：…".
        let split = text.split_once('\n').or_else(|| {
            ["正文：", "正文:", "Body:"]
                .iter()
                .find_map(|m| text.find(m).map(|i| (&text[..i], &text[i..])))
        });
        let (first, rest) = split?;
        let decoration = |c: char| matches!(c, '*' | '"' | '“' | '”' | '《' | '》' | '#' | ' ');
        let mut title = first.trim().trim_matches(decoration);
        for prefix in ["标题：", "标题:", "【标题】", "Title:", "Headline:"] {
            if let Some(t) = title.strip_prefix(prefix) {
                title = t.trim_matches(decoration);
            }
        }
        let title = title.trim().to_string();
        let mut body = rest.trim();
        for prefix in [
            "正文：",
            "正文:",
            "【正文】",
            "**正文**：",
            "**正文：**",
            "Body:",
            "**Body:**",
        ] {
            if let Some(b) = body.strip_prefix(prefix) {
                body = b.trim();
            }
        }
        if title.is_empty() || body.is_empty() {
            return None;
        }
        Some(Article {
            title,
            body: body.to_string(),
        })
    }

    pub fn markdown(&self) -> String {
        format!("# {}\n\n{}\n", self.title, self.body)
    }

    /// Title and body as one text (what the fact check reads).
    pub fn text(&self) -> String {
        format!("{}\n{}", self.title, self.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(v: serde_json::Value) -> Row {
        Row {
            number: 7,
            id: "m7".into(),
            fields: v.as_object().unwrap().clone(),
        }
    }

    #[test]
    fn templates_see_fields_lang_and_style_and_name_what_is_missing() {
        let t = Template::new(
            "{% if lang == 'zh' %}{% set r = 1 %}{% else %}{% set r = 2 %}{% endif %}{% if lang == 'zh' %}{{ home }}{{ row.goals }}比{{ away }}{% else %}{{ home }} {{ goals }}{% endif %} {{ style }} {{ id }}",
        )
        .unwrap();
        let r = row(json!({"home": "青川", "away": "白沙", "goals": 3}));
        assert_eq!(t.render(&r, "zh", "news").unwrap(), "青川3比白沙 news m7");
        assert_eq!(t.render(&r, "en", "news").unwrap(), "青川 3 news m7");
        let e = t
            .render(&row(json!({"home": "青川", "goals": 1})), "zh", "news")
            .unwrap_err();
        assert!(
            matches!(&e, WriteError::MissingField { row: 7, field } if field == "away"),
            "{e}"
        );
        assert!(Template::new("{% if %}").is_err());
        assert!(Template::new(&"x".repeat(MAX_TEMPLATE_BYTES + 1)).is_err());
        // A template that loops forever runs out of fuel.
        let t = Template::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        )
        .unwrap();
        assert!(t.render(&r, "zh", "news").is_err());
    }

    #[test]
    fn date_filters_in_both_languages() {
        let t = Template::new("{{ date | date_text(lang) }} {{ date | weekday(lang) }}").unwrap();
        let r = row(json!({"date": "2026-03-07"}));
        assert_eq!(t.render(&r, "zh", "news").unwrap(), "2026年3月7日 星期六");
        assert_eq!(
            t.render(&r, "en", "news").unwrap(),
            "March 7, 2026 Saturday"
        );
        let e = t
            .render(&row(json!({"date": "soon"})), "en", "news")
            .unwrap_err();
        assert!(e.to_string().contains("YYYY-MM-DD"), "{e}");
    }

    #[test]
    fn model_text_becomes_title_and_body() {
        let a = Article::parse("## **标题：青川3比1胜白沙**\n\n正文：青川队主场获胜。\n第二段。")
            .unwrap();
        assert_eq!(a.title, "青川3比1胜白沙");
        assert_eq!(a.body, "青川队主场获胜。\n第二段。");
        assert_eq!(
            a.markdown(),
            "# 青川3比1胜白沙\n\n青川队主场获胜。\n第二段。\n"
        );
        let a = Article::parse("```markdown\nTitle: \"Lions roar\"\n\nBody text.\n```").unwrap();
        assert_eq!(
            (a.title.as_str(), a.body.as_str()),
            ("Lions roar", "Body text.")
        );
        assert!(Article::parse("only a title").is_none());
        let a = Article::parse("标题：青川胜 正文：青川队获胜。").unwrap();
        assert_eq!(
            (a.title.as_str(), a.body.as_str()),
            ("青川胜", "青川队获胜。")
        );
        assert!(Article::parse("\n\n").is_none());
    }

    #[test]
    fn a_retry_says_what_was_wrong() {
        let m = messages("事实", "zh", &["数字 90".into()]);
        assert!(m[1].content.contains("数字 90"));
        assert!(m[0].content.contains("简体中文"));
        let m = messages("facts", "en", &[]);
        assert!(m[1].content.starts_with("facts\n\nAnswer in this form:"));
        assert!(m[0].content.contains("English"));
    }
}
