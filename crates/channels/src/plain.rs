//! The model writes Markdown; chat apps such as WeChat show plain text.
//! [`from_markdown`] keeps what a reader needs — paragraphs, list markers,
//! code as indented lines, links as `title: url` — and drops the markup;
//! [`pages`] splits a long answer on paragraph, line or sentence
//! boundaries into messages of at most so many UTF-8 bytes.

use pulldown_cmark::{CodeBlockKind, Event, HeadingLevel, Options, Parser, Tag, TagEnd};

/// `md` as readable plain text.
pub fn from_markdown(md: &str) -> String {
    let mut out = String::new();
    // Open lists: the next number of an ordered one, None for bullets.
    let mut lists: Vec<Option<u64>> = Vec::new();
    let mut links: Vec<(String, usize)> = Vec::new();
    let mut in_code = false;
    let mut quote = 0usize;
    let mut cell = 0usize;
    let options = Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH;
    for ev in Parser::new_ext(md, options) {
        match ev {
            Event::Start(tag) => match tag {
                Tag::Paragraph => start_block(&mut out, quote),
                Tag::Heading { level, .. } => {
                    start_block(&mut out, quote);
                    if level == HeadingLevel::H1 {
                        out.push('【');
                    }
                }
                Tag::BlockQuote(_) => quote += 1,
                Tag::CodeBlock(kind) => {
                    start_block(&mut out, quote);
                    if let CodeBlockKind::Fenced(lang) = kind {
                        if !lang.is_empty() {
                            out.push_str(&format!("    ({lang})\n"));
                        }
                    }
                    in_code = true;
                }
                Tag::List(first) => {
                    if lists.is_empty() {
                        start_block(&mut out, quote);
                    }
                    lists.push(first);
                }
                Tag::Item => {
                    new_line(&mut out);
                    out.push_str(&"  ".repeat(lists.len().saturating_sub(1)));
                    match lists.last_mut() {
                        Some(Some(n)) => {
                            out.push_str(&format!("{n}. "));
                            *n += 1;
                        }
                        _ => out.push_str("• "),
                    }
                }
                Tag::Table(_) => start_block(&mut out, quote),
                Tag::TableRow | Tag::TableHead => {
                    new_line(&mut out);
                    cell = 0;
                }
                Tag::TableCell => {
                    if cell > 0 {
                        out.push_str(" | ");
                    }
                    cell += 1;
                }
                Tag::Link { dest_url, .. } | Tag::Image { dest_url, .. } => {
                    links.push((dest_url.to_string(), out.len()));
                }
                _ => {}
            },
            Event::End(tag) => match tag {
                TagEnd::Heading(HeadingLevel::H1) => out.push('】'),
                TagEnd::BlockQuote(_) => quote = quote.saturating_sub(1),
                TagEnd::CodeBlock => {
                    in_code = false;
                    while out.ends_with('\n') {
                        out.pop();
                    }
                }
                TagEnd::List(_) => {
                    lists.pop();
                }
                TagEnd::Link | TagEnd::Image => {
                    if let Some((url, at)) = links.pop() {
                        let title = out[at..].trim().to_string();
                        if title.is_empty() || title == url {
                            out.truncate(at);
                            out.push_str(&url);
                        } else if !url.is_empty() && !url.starts_with('#') {
                            out.push_str(": ");
                            out.push_str(&url);
                        }
                    }
                }
                _ => {}
            },
            Event::Text(t) => {
                if in_code {
                    for line in t.split_inclusive('\n') {
                        if out.is_empty() || out.ends_with('\n') {
                            out.push_str("    ");
                        }
                        out.push_str(line);
                    }
                } else {
                    out.push_str(&t);
                }
            }
            Event::Code(t) | Event::InlineMath(t) | Event::DisplayMath(t) => out.push_str(&t),
            Event::Html(t) | Event::InlineHtml(t) => out.push_str(&t),
            Event::SoftBreak | Event::HardBreak => {
                new_line(&mut out);
                out.push_str(&"> ".repeat(quote));
            }
            Event::Rule => {
                start_block(&mut out, quote);
                out.push_str("——————");
            }
            Event::TaskListMarker(done) => out.push_str(if done { "[x] " } else { "[ ] " }),
            Event::FootnoteReference(t) => out.push_str(&format!("[{t}]")),
        }
    }
    out.trim().to_string()
}

fn new_line(out: &mut String) {
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
}

/// A blank line before a new block (none at the start), and the quote
/// markers of the block.
fn start_block(out: &mut String, quote: usize) {
    if !out.is_empty() {
        new_line(out);
        if !out.ends_with("\n\n") {
            out.push('\n');
        }
    }
    out.push_str(&"> ".repeat(quote));
}

/// `text` in pages of at most `max_bytes` UTF-8 bytes each, cut after a
/// paragraph, else a line, else a sentence, else a word — only where
/// nothing else fits, inside one.
pub fn pages(text: &str, max_bytes: usize) -> Vec<String> {
    let max_bytes = max_bytes.max(16);
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        if rest.len() <= max_bytes {
            out.push(rest.to_string());
            break;
        }
        let cut = cut_point(rest, max_bytes);
        out.push(rest[..cut].trim_end().to_string());
        rest = rest[cut..].trim_start();
    }
    out
}

/// Where to end a page of `s` (which is longer than `max`): the latest
/// good boundary at or before `max` bytes, preferring the stronger ones
/// unless they would leave the page less than half full.
fn cut_point(s: &str, max: usize) -> usize {
    let mut limit = max;
    while !s.is_char_boundary(limit) {
        limit -= 1;
    }
    let head = &s[..limit];
    let half = limit / 2;
    let after = |i: Option<usize>, len: usize| i.map(|i| i + len).filter(|&c| c > half);
    if let Some(c) = after(head.rfind("\n\n"), 2) {
        return c;
    }
    if let Some(c) = after(head.rfind('\n'), 1) {
        return c;
    }
    let sentence = head
        .char_indices()
        .filter(|&(i, c)| {
            matches!(c, '。' | '！' | '？' | '；' | '…')
                || (matches!(c, '.' | '!' | '?' | ';')
                    && head[i + 1..].starts_with(|n: char| n.is_whitespace()))
        })
        .map(|(i, c)| i + c.len_utf8())
        .next_back();
    if let Some(c) = sentence.filter(|&c| c > half) {
        return c;
    }
    if let Some(c) = after(head.rfind([' ', '，', ',', '、']), 1) {
        return c;
    }
    limit.max(s.chars().next().map_or(1, char::len_utf8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_becomes_readable_text() {
        let md = "# 标题\n\n一段**加粗**的文字，见[文档](https://example.com/doc)。\n\n- 第一\n- 第二\n  1. 甲\n  2. 乙\n\n```rust\nfn main() {}\nlet x = 1;\n```\n\n> 引用\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n<https://example.org>";
        let t = from_markdown(md);
        assert_eq!(
            t,
            "【标题】\n\n一段加粗的文字，见文档: https://example.com/doc。\n\n• 第一\n• 第二\n  1. 甲\n  2. 乙\n\n    (rust)\n    fn main() {}\n    let x = 1;\n\n> 引用\n\na | b\n1 | 2\n\nhttps://example.org"
        );
    }

    #[test]
    fn plain_text_passes_through() {
        assert_eq!(
            from_markdown("你好，世界。\n第二行"),
            "你好，世界。\n第二行"
        );
        assert_eq!(from_markdown("  "), "");
    }

    #[test]
    fn pages_fit_and_lose_nothing() {
        let para = "这是一个句子。".repeat(40); // 840 bytes
        let text = format!("{para}\n\n{para}\n\n{para}");
        // Cut after the second paragraph (the third does not fit).
        assert_eq!(
            pages(&text, 2048),
            vec![format!("{para}\n\n{para}"), para.clone()]
        );
        // One long paragraph: cut after a sentence.
        let ps = pages(&"这是一个句子。".repeat(200), 2048);
        assert!(ps.iter().all(|p| p.len() <= 2048 && p.ends_with('。')));
        assert_eq!(ps.concat(), "这是一个句子。".repeat(200));
        // No boundary at all: cut on a character boundary.
        let ps = pages(&"字".repeat(1000), 100);
        assert!(ps.iter().all(|p| p.len() <= 100));
        assert_eq!(ps.concat(), "字".repeat(1000));
        assert!(pages("", 100).is_empty());
        // English sentences.
        let ps = pages(&"One sentence here. ".repeat(30), 100);
        assert!(ps.iter().all(|p| p.len() <= 100 && p.ends_with('.')));
    }
}
