//! WeChat's XML: callbacks read into their fields, replies written with
//! CDATA. Bounded: the body's size, the nesting depth and the number of
//! fields; a document type declaration is refused (no entity is ever
//! defined, so none is expanded), and only XML's five predefined entities
//! and character references are read.

use crate::ChannelError;
use quick_xml::events::Event;
use std::collections::BTreeMap;

/// The largest callback body read.
pub const MAX_BODY: usize = 64 * 1024;
const MAX_DEPTH: usize = 8;
const MAX_FIELDS: usize = 256;

/// The text fields of a callback: each element's path below the root
/// (`MsgType`, `ScanCodeInfo/ScanType`) → its text; a repeated path keeps
/// its first value. Values are trimmed.
pub type Fields = BTreeMap<String, String>;

pub fn parse(body: &[u8]) -> Result<Fields, ChannelError> {
    let bad = |m: String| ChannelError::BadRequest(format!("XML: {m}"));
    if body.len() > MAX_BODY {
        return Err(bad(format!("larger than {MAX_BODY} bytes")));
    }
    let text = std::str::from_utf8(body).map_err(|_| bad("not UTF-8".into()))?;
    let mut reader = quick_xml::Reader::from_str(text);
    let mut path: Vec<String> = Vec::new();
    let mut value = String::new();
    let mut fields = Fields::new();
    let mut root_seen = false;
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) => {
                if path.len() >= MAX_DEPTH {
                    return Err(bad("nested too deeply".into()));
                }
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                if path.is_empty() {
                    if root_seen {
                        return Err(bad("more than one root element".into()));
                    }
                    root_seen = true;
                }
                path.push(name);
                value.clear();
            }
            Ok(Event::End(_)) => {
                if path.len() > 1 {
                    let key = path[1..].join("/");
                    if !fields.contains_key(&key) {
                        if fields.len() >= MAX_FIELDS {
                            return Err(bad("too many fields".into()));
                        }
                        fields.insert(key, value.trim().to_string());
                    }
                }
                value.clear();
                path.pop();
            }
            Ok(Event::Empty(e)) => {
                if !path.is_empty() {
                    let mut key = path[1..].join("/");
                    if !key.is_empty() {
                        key.push('/');
                    }
                    key.push_str(&String::from_utf8_lossy(e.name().as_ref()));
                    if fields.len() < MAX_FIELDS {
                        fields.entry(key).or_default();
                    }
                }
            }
            Ok(Event::Text(t)) => {
                let s = t.decode().map_err(|e| bad(e.to_string()))?;
                value.push_str(&s);
            }
            Ok(Event::CData(c)) => {
                let s = std::str::from_utf8(c.as_ref()).map_err(|_| bad("not UTF-8".into()))?;
                value.push_str(s);
            }
            Ok(Event::GeneralRef(r)) => {
                let name = r.decode().map_err(|e| bad(e.to_string()))?;
                let c = match name.as_ref() {
                    "amp" => '&',
                    "lt" => '<',
                    "gt" => '>',
                    "quot" => '"',
                    "apos" => '\'',
                    _ => match r.resolve_char_ref() {
                        Ok(Some(c)) => c,
                        _ => return Err(bad(format!("unknown entity &{name};"))),
                    },
                };
                value.push(c);
            }
            Ok(Event::DocType(_)) => {
                return Err(bad("document type declarations are refused".into()))
            }
            Ok(Event::Eof) => break,
            Ok(_) => {}
            Err(e) => return Err(bad(e.to_string())),
        }
    }
    if !root_seen || !path.is_empty() {
        return Err(bad("not a complete document".into()));
    }
    Ok(fields)
}

/// `s` as CDATA content, safe whatever it holds (`]]>` is split).
pub fn cdata(s: &str) -> String {
    format!("<![CDATA[{}]]>", s.replace("]]>", "]]]]><![CDATA[>"))
}

/// A passive text reply.
pub fn text_reply(to_user: &str, from_account: &str, now: i64, text: &str) -> String {
    format!(
        "<xml><ToUserName>{}</ToUserName><FromUserName>{}</FromUserName><CreateTime>{now}</CreateTime><MsgType>{}</MsgType><Content>{}</Content></xml>",
        cdata(to_user),
        cdata(from_account),
        cdata("text"),
        cdata(text)
    )
}

/// The envelope of an encrypted reply.
pub fn encrypted_reply(encrypt: &str, signature: &str, timestamp: i64, nonce: &str) -> String {
    format!(
        "<xml><Encrypt>{}</Encrypt><MsgSignature>{}</MsgSignature><TimeStamp>{timestamp}</TimeStamp><Nonce>{}</Nonce></xml>",
        cdata(encrypt),
        cdata(signature),
        cdata(nonce)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_text_message() {
        let f = parse(
            b"<xml>\n <ToUserName><![CDATA[gh_1]]></ToUserName>\n <FromUserName><![CDATA[o-user]]></FromUserName>\n <CreateTime>1348831860</CreateTime>\n <MsgType><![CDATA[text]]></MsgType>\n <Content><![CDATA[\xe4\xbd\xa0\xe5\xa5\xbd <b> ]]></Content>\n <MsgId>1234567890123456</MsgId>\n</xml>",
        )
        .unwrap();
        assert_eq!(f["ToUserName"], "gh_1");
        assert_eq!(f["Content"], "你好 <b>");
        assert_eq!(f["CreateTime"], "1348831860");
        assert_eq!(f["MsgId"], "1234567890123456");
    }

    #[test]
    fn entities_and_nesting() {
        let f = parse(b"<xml><Content>a &amp; b &#x4e2d;</Content><ScanCodeInfo><ScanType>qrcode</ScanType></ScanCodeInfo><Empty/></xml>").unwrap();
        assert_eq!(f["Content"], "a & b 中");
        assert_eq!(f["ScanCodeInfo/ScanType"], "qrcode");
        assert_eq!(f["Empty"], "");
    }

    #[test]
    fn hostile_documents_are_refused() {
        let bomb = b"<?xml version=\"1.0\"?><!DOCTYPE lolz [<!ENTITY lol \"lol\"><!ENTITY lol2 \"&lol;&lol;\">]><xml><Content>&lol2;</Content></xml>";
        assert!(parse(bomb).is_err());
        assert!(parse(b"<xml><Content>&lol;</Content></xml>").is_err());
        let deep = format!("{}{}", "<a>".repeat(100), "</a>".repeat(100));
        assert!(parse(deep.as_bytes()).is_err());
        assert!(parse(&vec![b' '; MAX_BODY + 1]).is_err());
        assert!(parse(b"<xml><Content>").is_err());
        assert!(parse(b"").is_err());
        assert!(parse(b"\xff\xfe").is_err());
        assert!(parse(b"<xml></xml><xml></xml>").is_err());
        let many: String = (0..1000).map(|i| format!("<F{i}>x</F{i}>")).collect();
        assert!(parse(format!("<xml>{many}</xml>").as_bytes()).is_err());
    }

    #[test]
    fn replies_survive_cdata_terminators() {
        let r = text_reply("u", "gh", 1, "a]]>b");
        let f = parse(r.as_bytes()).unwrap();
        assert_eq!(f["Content"], "a]]>b");
        assert_eq!(f["MsgType"], "text");
    }
}
