//! Documents from files: plain text and Markdown, HTML (visible text), Word
//! (.docx), JSON (an object or an array of objects) and JSON Lines (one
//! document per line). A file that cannot be read is skipped with a reason;
//! the caller indexes the rest.

use serde_json::Value;
use std::path::{Path, PathBuf};

/// Files larger than this are skipped.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// One document to index.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Document {
    pub title: String,
    /// Where it came from: a path or URL.
    pub source: String,
    pub text: String,
    /// Publication time (unix seconds), when known.
    pub published: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("{path}: {reason}")]
    Skipped { path: PathBuf, reason: String },
}

fn skip(path: &Path, reason: impl Into<String>) -> ExtractError {
    ExtractError::Skipped {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The files under `paths` (directories walked recursively, hidden entries
/// skipped) whose extension we read, sorted.
pub fn walk(paths: &[PathBuf]) -> (Vec<PathBuf>, Vec<ExtractError>) {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    let mut stack: Vec<PathBuf> = paths.to_vec();
    while let Some(p) = stack.pop() {
        match std::fs::metadata(&p) {
            Err(e) => errors.push(skip(&p, e.to_string())),
            Ok(m) if m.is_dir() => match std::fs::read_dir(&p) {
                Err(e) => errors.push(skip(&p, e.to_string())),
                Ok(rd) => {
                    for entry in rd.flatten() {
                        let hidden = entry.file_name().to_string_lossy().starts_with('.');
                        if !hidden {
                            stack.push(entry.path());
                        }
                    }
                }
            },
            Ok(_) => {
                if kind(&p).is_some() {
                    files.push(p);
                } else if paths.contains(&p) {
                    // Named on the command line but not a kind we read: say so.
                    errors.push(skip(
                        &p,
                        "not a supported file type (.txt .md .html .pdf .docx .json .jsonl)",
                    ));
                }
            }
        }
    }
    files.sort();
    (files, errors)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Html,
    Docx,
    Json,
    Jsonl,
    Pdf,
}

fn kind(p: &Path) -> Option<Kind> {
    let ext = p.extension()?.to_str()?.to_ascii_lowercase();
    Some(match ext.as_str() {
        "txt" | "md" | "markdown" | "text" => Kind::Text,
        "html" | "htm" => Kind::Html,
        "docx" => Kind::Docx,
        "json" => Kind::Json,
        "jsonl" | "ndjson" => Kind::Jsonl,
        "pdf" => Kind::Pdf,
        _ => return None,
    })
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The documents in one file.
pub fn extract(path: &Path) -> Result<Vec<Document>, ExtractError> {
    let k = kind(path).ok_or_else(|| skip(path, "not a supported file type"))?;
    let size = std::fs::metadata(path)
        .map_err(|e| skip(path, e.to_string()))?
        .len();
    if size > MAX_FILE_BYTES {
        return Err(skip(
            path,
            format!("{size} bytes is over the {MAX_FILE_BYTES}-byte limit"),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| skip(path, e.to_string()))?;
    let source = path.display().to_string();
    let utf8 = |b: Vec<u8>| String::from_utf8(b).map_err(|_| skip(path, "not UTF-8 text"));
    let docs = match k {
        Kind::Text => {
            let text = utf8(bytes)?;
            vec![Document {
                title: text_title(&text).unwrap_or_else(|| stem(path)),
                source,
                text,
                published: None,
            }]
        }
        Kind::Html => {
            let (title, text) = html_text(&utf8(bytes)?);
            vec![Document {
                title: title.unwrap_or_else(|| stem(path)),
                source,
                text,
                published: None,
            }]
        }
        Kind::Docx => vec![Document {
            title: stem(path),
            source,
            text: docx_text(&bytes).map_err(|e| skip(path, e))?,
            published: None,
        }],
        Kind::Json => {
            let v: Value = serde_json::from_slice(&bytes)
                .map_err(|e| skip(path, format!("invalid JSON: {e}")))?;
            let items = match v {
                Value::Array(a) => a,
                other => vec![other],
            };
            items
                .iter()
                .enumerate()
                .map(|(i, v)| json_doc(v, &source, &format!("{}#{i}", stem(path))))
                .collect::<Result<_, _>>()
                .map_err(|e| skip(path, e))?
        }
        Kind::Jsonl => {
            let text = utf8(bytes)?;
            let mut out = Vec::new();
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v: Value = serde_json::from_str(line)
                    .map_err(|e| skip(path, format!("line {}: invalid JSON: {e}", i + 1)))?;
                out.push(
                    json_doc(&v, &source, &format!("{}#{}", stem(path), i + 1))
                        .map_err(|e| skip(path, format!("line {}: {e}", i + 1)))?,
                );
            }
            out
        }
        Kind::Pdf => vec![Document {
            title: stem(path),
            source,
            text: pdf_text(&bytes).map_err(|e| skip(path, e))?,
            published: None,
        }],
    };
    let docs: Vec<Document> = docs
        .into_iter()
        .filter(|d| !d.text.trim().is_empty())
        .collect();
    if docs.is_empty() {
        return Err(skip(path, "no text in it"));
    }
    Ok(docs)
}

/// A Markdown heading or the first line, if short.
fn text_title(text: &str) -> Option<String> {
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    let line = line.trim_start_matches('#').trim();
    (line.chars().count() <= 80).then(|| line.to_string())
}

/// A document from a JSON object: `text` / `content` / `body` (required),
/// `title`, `url` / `source`, `published` / `date` (unix seconds or
/// RFC 3339 / `YYYY-MM-DD`).
pub fn json_doc(v: &Value, default_source: &str, default_title: &str) -> Result<Document, String> {
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    let text = s("text")
        .or_else(|| s("content"))
        .or_else(|| s("body"))
        .ok_or("a document needs a \"text\" (or \"content\" / \"body\") string")?;
    let published = ["published", "date", "time", "pubDate"]
        .iter()
        .find_map(|k| v.get(*k))
        .and_then(|d| match d {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => parse_date(s),
            _ => None,
        });
    Ok(Document {
        title: s("title").unwrap_or_else(|| default_title.to_string()),
        source: s("url")
            .or_else(|| s("source"))
            .unwrap_or_else(|| default_source.to_string()),
        text,
        published,
    })
}

/// Unix seconds of an RFC 3339, RFC 2822 or `YYYY-MM-DD` date.
pub fn parse_date(s: &str) -> Option<i64> {
    use time::format_description::well_known::{Rfc2822, Rfc3339};
    let s = s.trim();
    if let Ok(t) = time::OffsetDateTime::parse(s, &Rfc3339) {
        return Some(t.unix_timestamp());
    }
    if let Ok(t) = time::OffsetDateTime::parse(s, &Rfc2822) {
        return Some(t.unix_timestamp());
    }
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(s.get(..10)?, &fmt)
        .ok()
        .map(|d| d.midnight().assume_utc().unix_timestamp())
}

/// Deeper than this (as [`nesting_depth`] counts), a page is not parsed as
/// a tree: the HTML parser's cost grows with the square of the depth (200,000
/// nested `<div>`s took minutes), and no real page nests this deep.
pub const MAX_HTML_DEPTH: usize = 1024;

/// The title and visible text of an HTML page (scripts and styles dropped,
/// block elements on their own lines). A page nested deeper than
/// [`MAX_HTML_DEPTH`] gets its text by stripping the tags instead.
pub fn html_text(html: &str) -> (Option<String>, String) {
    if nesting_depth(html) > MAX_HTML_DEPTH {
        return (None, strip_tags(html));
    }
    let doc = scraper::Html::parse_document(html);
    let title = scraper::Selector::parse("title")
        .ok()
        .and_then(|s| doc.select(&s).next())
        .map(|t| t.text().collect::<String>().trim().to_string())
        .filter(|t| !t.is_empty());
    let mut out = String::new();
    let root = scraper::Selector::parse("body")
        .ok()
        .and_then(|s| doc.select(&s).next())
        .map(|b| *b)
        .unwrap_or_else(|| *doc.root_element());
    walk_html(root, &mut out);
    (title, out.trim().to_string())
}

/// Elements that have no end tag, or whose end tag pages often leave out
/// (the parser closes them itself): they do not deepen the count.
const UNNESTED: &[&str] = &[
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track",
    "wbr", "p", "li", "dt", "dd", "tr", "td", "th", "option", "!doctype",
];

/// The deepest element nesting of `html`, counted in one pass over its tags
/// (start tags deepen, end tags return; void and self-closing elements and
/// those in [`UNNESTED`] do not count).
pub fn nesting_depth(html: &str) -> usize {
    let b = html.as_bytes();
    let (mut depth, mut max, mut i) = (0usize, 0usize, 0usize);
    while let Some(off) = b[i..].iter().position(|&c| c == b'<') {
        i += off + 1;
        let end = b[i..]
            .iter()
            .position(|&c| c == b'>')
            .map_or(b.len(), |e| i + e);
        let tag = &html[i..end];
        i = end;
        if let Some(name) = tag.strip_prefix('/') {
            if !UNNESTED.iter().any(|u| name.trim().eq_ignore_ascii_case(u)) {
                depth = depth.saturating_sub(1);
            }
            continue;
        }
        let name = tag
            .split(|c: char| c.is_ascii_whitespace() || c == '/')
            .next()
            .unwrap_or("");
        let opens = name.starts_with(|c: char| c.is_ascii_alphabetic())
            && !tag.ends_with('/')
            && !UNNESTED.iter().any(|u| name.eq_ignore_ascii_case(u));
        if opens {
            depth += 1;
            max = max.max(depth);
        }
    }
    max
}

/// Text with every `<…>` removed and whitespace runs collapsed (linear
/// time, for pages too deep to parse).
fn strip_tags(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                if !out.ends_with(' ') {
                    out.push(' ');
                }
            }
            c if !in_tag => {
                if c.is_whitespace() {
                    if !out.ends_with(' ') {
                        out.push(' ');
                    }
                } else {
                    out.push(c);
                }
            }
            _ => {}
        }
    }
    out.trim().to_string()
}

/// The visible text under `node`, walked with an explicit stack: untrusted
/// markup can nest as deep as it likes without growing the thread's stack.
fn walk_html(node: ego_tree::NodeRef<'_, scraper::Node>, out: &mut String) {
    enum Step<'a> {
        Enter(ego_tree::NodeRef<'a, scraper::Node>),
        /// An element's children are done: end its line if it is a block.
        Leave(bool),
    }
    let mut stack: Vec<Step<'_>> = node.children().rev().map(Step::Enter).collect();
    while let Some(step) = stack.pop() {
        let child = match step {
            Step::Leave(block) => {
                if block && !out.ends_with('\n') {
                    out.push('\n');
                }
                continue;
            }
            Step::Enter(child) => child,
        };
        match child.value() {
            scraper::Node::Text(t) => {
                let t = t.trim();
                if !t.is_empty() {
                    if out
                        .chars()
                        .last()
                        .is_some_and(|c| c.is_ascii_alphanumeric())
                        && t.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
                    {
                        out.push(' ');
                    }
                    out.push_str(t);
                }
            }
            scraper::Node::Element(e) => {
                let name = e.name();
                if matches!(name, "script" | "style" | "noscript" | "template" | "head") {
                    continue;
                }
                let block = matches!(
                    name,
                    "p" | "div"
                        | "br"
                        | "li"
                        | "h1"
                        | "h2"
                        | "h3"
                        | "h4"
                        | "h5"
                        | "h6"
                        | "tr"
                        | "section"
                        | "article"
                        | "pre"
                        | "blockquote"
                );
                stack.push(Step::Leave(block));
                stack.extend(child.children().rev().map(Step::Enter));
            }
            _ => {}
        }
    }
}

/// The text of a PDF. The parser is given untrusted bytes: a panic inside
/// it is caught and reported like any other unreadable file.
pub fn pdf_text(bytes: &[u8]) -> Result<String, String> {
    let owned = bytes.to_vec();
    let r = std::panic::catch_unwind(move || pdf_extract::extract_text_from_mem(&owned));
    match r {
        Ok(Ok(text)) => Ok(text.trim().to_string()),
        Ok(Err(e)) => Err(format!("not a readable PDF: {e}")),
        Err(_) => Err("not a readable PDF (the PDF parser failed on it)".into()),
    }
}

/// The paragraphs of a .docx file (word/document.xml's `w:t` runs).
pub fn docx_text(bytes: &[u8]) -> Result<String, String> {
    use std::io::Read;
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| format!("not a .docx (zip) file: {e}"))?;
    let mut xml = String::new();
    zip.by_name("word/document.xml")
        .map_err(|e| format!("no word/document.xml: {e}"))?
        .take(MAX_FILE_BYTES * 4)
        .read_to_string(&mut xml)
        .map_err(|e| format!("reading word/document.xml: {e}"))?;
    let mut reader = quick_xml::Reader::from_str(&xml);
    let mut out = String::new();
    let mut in_text = false;
    loop {
        match reader.read_event() {
            Ok(quick_xml::events::Event::Start(e)) if e.name().as_ref() == b"w:t" => in_text = true,
            Ok(quick_xml::events::Event::End(e)) => match e.name().as_ref() {
                b"w:t" => in_text = false,
                b"w:p" => out.push('\n'),
                _ => {}
            },
            Ok(quick_xml::events::Event::Text(t)) if in_text => {
                let s = t
                    .decode()
                    .map_err(|e| format!("bad text in word/document.xml: {e}"))?;
                out.push_str(&s);
            }
            Ok(quick_xml::events::Event::GeneralRef(r)) if in_text => {
                let name = r.decode().map_err(|e| format!("bad entity: {e}"))?;
                let c = match name.as_ref() {
                    "amp" => Some('&'),
                    "lt" => Some('<'),
                    "gt" => Some('>'),
                    "quot" => Some('"'),
                    "apos" => Some('\''),
                    _ => r.resolve_char_ref().ok().flatten(),
                };
                if let Some(c) = c {
                    out.push(c);
                }
            }
            Ok(quick_xml::events::Event::Eof) => break,
            Err(e) => return Err(format!("word/document.xml is not valid XML: {e}")),
            _ => {}
        }
    }
    Ok(out.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A one-page PDF showing `text` in Helvetica, with a correct xref table.
    fn minimal_pdf(text: &str) -> Vec<u8> {
        let stream = format!("BT /F1 12 Tf 72 720 Td ({text}) Tj ET");
        let objects = [
            "<< /Type /Catalog /Pages 2 0 R >>".to_string(),
            "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_string(),
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>".to_string(),
            format!("<< /Length {} >>\nstream\n{stream}\nendstream", stream.len()),
            "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_string(),
        ];
        let mut out = b"%PDF-1.4\n".to_vec();
        let mut offsets = Vec::new();
        for (i, o) in objects.iter().enumerate() {
            offsets.push(out.len());
            out.extend(format!("{} 0 obj\n{o}\nendobj\n", i + 1).as_bytes());
        }
        let xref = out.len();
        out.extend(format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes());
        for off in offsets {
            out.extend(format!("{off:010} 00000 n \n").as_bytes());
        }
        out.extend(
            format!(
                "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
                objects.len() + 1
            )
            .as_bytes(),
        );
        out
    }

    #[test]
    fn deeply_nested_html_does_not_overflow_the_stack() {
        // Nested elements on a 64 KiB stack: the walk used to recurse once
        // per level and abort the whole process (200,000 levels on the
        // server's 2 MiB blocking threads). Just under the parsing limit the
        // tree is walked; far over it, the tags are stripped (in linear
        // time: parsing 200,000 levels took minutes).
        for depth in [MAX_HTML_DEPTH - 2, 200_000] {
            let html = format!(
                "<html><body><p>top</p>{}深处{}",
                "<div>".repeat(depth),
                "</div>".repeat(depth)
            );
            let started = std::time::Instant::now();
            let (_, text) = std::thread::Builder::new()
                .stack_size(64 << 10)
                .spawn(move || html_text(&html))
                .expect("thread")
                .join()
                .expect("no stack overflow");
            assert!(text.starts_with("top"), "{}", &text[..20.min(text.len())]);
            assert!(text.contains("深处"));
            assert!(started.elapsed() < std::time::Duration::from_secs(60));
        }
        assert_eq!(
            nesting_depth("<p>a<p>b<br><img src=x/><div><b>c</b></div>"),
            2
        );
        assert_eq!(nesting_depth(&"<span>".repeat(5000)), 5000);
    }

    #[test]
    fn html_keeps_visible_text_only() {
        let (title, text) = html_text(
            "<html><head><title>长城</title><style>p{}</style></head><body><h1>长城</h1><p>长城长约<b>两万</b>公里。</p><script>alert(1)</script><p>Built over centuries.</p></body></html>",
        );
        assert_eq!(title.as_deref(), Some("长城"));
        assert_eq!(text, "长城\n长城长约两万公里。\nBuilt over centuries.");
    }

    #[test]
    fn every_format_and_the_failures() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("a.md"), "# 标题\n\n正文。").expect("write");
        std::fs::write(
            p("b.jsonl"),
            "{\"title\": \"新闻\", \"text\": \"今天下雨。\", \"date\": \"2026-11-20\"}\n\n{\"content\": \"第二条\"}\n",
        )
        .expect("write");
        std::fs::write(
            p("c.json"),
            "[{\"text\": \"一\"}, {\"body\": \"二\", \"published\": 1700000000}]",
        )
        .expect("write");
        let mut z = zip::ZipWriter::new(std::fs::File::create(p("d.docx")).expect("create"));
        z.start_file(
            "word/document.xml",
            zip::write::SimpleFileOptions::default(),
        )
        .expect("zip");
        z.write_all(r#"<?xml version="1.0"?><w:document xmlns:w="x"><w:body><w:p><w:r><w:t>第一段</w:t></w:r><w:r><w:t xml:space="preserve"> &amp; more</w:t></w:r></w:p><w:p><w:r><w:t>第二段</w:t></w:r></w:p></w:body></w:document>"#.as_bytes()).expect("zip");
        z.finish().expect("zip");
        std::fs::write(p("bad.json"), "{nope").expect("write");
        std::fs::write(p("latin1.txt"), [0xff, 0xfe, 0x41]).expect("write");
        std::fs::write(p("empty.txt"), "  \n").expect("write");
        std::fs::write(p("x.pdf"), "%PDF-1.4 garbage").expect("write");
        std::fs::write(p("hello.pdf"), minimal_pdf("Hello from a PDF file")).expect("write");
        std::fs::write(p("ignored.bin"), "x").expect("write");

        let md = extract(&p("a.md")).expect("md");
        assert_eq!(
            (md[0].title.as_str(), md[0].text.as_str()),
            ("标题", "# 标题\n\n正文。")
        );
        let jl = extract(&p("b.jsonl")).expect("jsonl");
        assert_eq!(jl.len(), 2);
        assert_eq!(jl[0].published, Some(1_795_132_800));
        assert_eq!(jl[1].title, "b#3");
        let js = extract(&p("c.json")).expect("json");
        assert_eq!(js[1].published, Some(1_700_000_000));
        let pdf = extract(&p("hello.pdf")).expect("pdf");
        assert!(
            pdf[0].text.contains("Hello from a PDF file"),
            "{:?}",
            pdf[0].text
        );
        let dx = extract(&p("d.docx")).expect("docx");
        assert_eq!(dx[0].text, "第一段 & more\n第二段");
        for bad in ["bad.json", "latin1.txt", "empty.txt", "x.pdf"] {
            let e = extract(&p(bad)).expect_err(bad).to_string();
            assert!(e.contains(bad), "{e}");
        }
        let (files, errors) = walk(&[dir.path().to_path_buf()]);
        assert_eq!(files.len(), 9, "{files:?}");
        assert!(errors.is_empty());
        let (_, errors) = walk(&[p("ignored.bin"), p("missing.txt")]);
        assert_eq!(errors.len(), 2);
    }
}
