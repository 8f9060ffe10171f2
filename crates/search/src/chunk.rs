//! Splitting text into passages that respect sentence boundaries in
//! Chinese (。！？；…) and English (". ", "! ", "? "), so a retrieved passage
//! never starts or ends mid-sentence unless one sentence is longer than a
//! whole passage.

/// Byte offsets where the sentences of `text` end (the last is `text.len()`).
fn sentence_ends(text: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let end = match c {
            '。' | '！' | '？' | '；' | '…' => {
                // Keep closing quotes with their sentence: 。」 。”
                let mut e = i + c.len_utf8();
                while let Some(&(j, q)) = chars.peek() {
                    if matches!(q, '”' | '」' | '』' | '’' | '）' | ')' | '"') {
                        e = j + q.len_utf8();
                        chars.next();
                    } else {
                        break;
                    }
                }
                Some(e)
            }
            '.' | '!' | '?' | ';' => {
                // Closing quotes stay with the sentence: He said "hi." Then…
                let mut e = i + 1;
                let mut rest = text[e..].chars();
                let mut after = rest.next();
                while let Some(q @ ('"' | '\'' | ')' | '”' | '’')) = after {
                    e += q.len_utf8();
                    after = rest.next();
                }
                match after {
                    None => Some(e),
                    Some(n) if n.is_whitespace() || ('\u{4e00}'..='\u{9fff}').contains(&n) => {
                        while chars.peek().is_some_and(|&(j, _)| j < e) {
                            chars.next();
                        }
                        Some(e)
                    }
                    _ => None,
                }
            }
            '\n' => match chars.peek().map(|&(_, n)| n) {
                Some('\n') | Some('\r') => Some(i + 1),
                _ => None,
            },
            _ => None,
        };
        if let Some(e) = end {
            out.push(e);
        }
    }
    if out.last() != Some(&text.len()) {
        out.push(text.len());
    }
    out
}

/// Sentences of `text`, each with its closing punctuation, trimmed; blank
/// lines end a sentence too.
pub fn sentences(text: &str) -> Vec<&str> {
    sentences_keep_space(text)
        .into_iter()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// The sentences of `text` untrimmed: joined, they are `text` again.
pub fn sentences_keep_space(text: &str) -> Vec<&str> {
    let mut start = 0;
    let mut out = Vec::new();
    for e in sentence_ends(text) {
        if e > start {
            out.push(&text[start..e]);
        }
        start = e;
    }
    out
}

/// Passages of at most about `max_chars` characters made of whole
/// sentences; each passage after the first repeats the previous passage's
/// last sentence (overlap), so a fact split across a boundary is still
/// found whole. A sentence longer than `max_chars` is cut on its own.
pub fn chunk(text: &str, max_chars: usize) -> Vec<String> {
    let max_chars = max_chars.max(20);
    // Untrimmed sentences, so a passage keeps the text's own line breaks.
    let mut pieces: Vec<String> = Vec::new();
    for s in sentences_keep_space(text) {
        if s.trim().is_empty() {
            if let Some(last) = pieces.last_mut() {
                last.push_str(s);
            }
            continue;
        }
        let cs: Vec<char> = s.chars().collect();
        if cs.len() <= max_chars {
            pieces.push(s.to_string());
        } else {
            for part in cs.chunks(max_chars) {
                pieces.push(part.iter().collect());
            }
        }
    }
    let mut out: Vec<String> = Vec::new();
    let mut cur: Vec<&str> = Vec::new();
    let mut len = 0;
    let count = |s: &str| s.trim().chars().count();
    for p in &pieces {
        let n = count(p);
        if !cur.is_empty() && len + n > max_chars {
            out.push(cur.concat().trim().to_string());
            // Overlap: start the next passage with the last sentence, if it fits.
            let last = cur[cur.len() - 1];
            let ln = count(last);
            cur.clear();
            len = 0;
            if ln + n <= max_chars {
                cur.push(last);
                len = ln;
            }
        }
        cur.push(p);
        len += n;
    }
    if !cur.is_empty() {
        let c = cur.concat().trim().to_string();
        if !c.is_empty() {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_in_chinese_and_english() {
        let t = "床前明月光，疑是地上霜。举头望明月，低头思故乡！\n\nHe said \"hi.\" Then left. Version 2.5 is out? Yes";
        assert_eq!(
            sentences(t),
            [
                "床前明月光，疑是地上霜。",
                "举头望明月，低头思故乡！",
                "He said \"hi.\"",
                "Then left.",
                "Version 2.5 is out?",
                "Yes"
            ]
        );
        assert_eq!(
            sentences("他说：“走吧。”然后走了。"),
            ["他说：“走吧。”", "然后走了。"]
        );
        assert_eq!(sentences_keep_space(t).concat(), t);
    }

    #[test]
    fn chunks_keep_sentences_whole_and_overlap() {
        let text = "一二三四五六七八九十。".repeat(10); // ten 11-character sentences
        let chunks = chunk(&text, 40);
        assert!(chunks.len() >= 3);
        for c in &chunks {
            assert!(c.chars().count() <= 40, "{c}");
            assert!(c.ends_with('。'), "{c}");
        }
        // Every chunk after the first starts with the previous one's last sentence.
        for w in chunks.windows(2) {
            let last = sentences(&w[0]).pop().expect("a sentence");
            assert!(w[1].starts_with(last));
        }
        // A giant sentence is cut, nothing is lost.
        let long = "长".repeat(95);
        let parts = chunk(&long, 40);
        assert_eq!(parts.concat(), long);
        assert!(chunk("", 40).is_empty());
        assert_eq!(chunk("One. Two.", 100), ["One. Two."]);
    }
}
