//! The ChatGPT data export (`conversations.json`) read into conversations
//! to import ([`crate::chats::ImportConversation`]).

use crate::chats::{ImportConversation, Message, MessageRole, MessageStatus, MAX_MESSAGE_CHARS};
use serde_json::Value;

/// Conversations from a ChatGPT data export (`conversations.json`): an
/// array of `{title, create_time, update_time, mapping: {id: {message,
/// parent, children}}, current_node}`. Everything is checked before
/// anything is stored, and stored in one transaction.
pub fn parse_chatgpt_export(v: &Value) -> Result<Vec<ImportConversation>, String> {
    let list = v
        .as_array()
        .ok_or("conversations.json must be a JSON array of conversations")?;
    let mut out = Vec::with_capacity(list.len());
    for (i, c) in list.iter().enumerate() {
        let at = |what: &str| format!("conversation {i}: {what}");
        let mapping = c
            .get("mapping")
            .and_then(Value::as_object)
            .ok_or_else(|| at("no 'mapping' object"))?;
        let title = c
            .get("title")
            .and_then(Value::as_str)
            .filter(|t| !t.trim().is_empty())
            .unwrap_or("Imported chat")
            .to_string();
        let time = |k: &str| c.get(k).and_then(Value::as_f64).map(|t| t as i64);
        let created_at = time("create_time").unwrap_or_else(crate::now);
        let updated_at = time("update_time").unwrap_or(created_at);
        // Walk from the roots so parents come first; nodes without a
        // message (ChatGPT's root) are skipped and their children attach
        // to the nearest kept ancestor.
        let mut roots: Vec<&String> = mapping
            .iter()
            .filter(|(_, n)| {
                n.get("parent")
                    .and_then(Value::as_str)
                    .is_none_or(|p| !mapping.contains_key(p))
            })
            .map(|(k, _)| k)
            .collect();
        roots.sort();
        let mut messages = Vec::new();
        let mut stack: Vec<(&String, Option<String>)> =
            roots.into_iter().rev().map(|r| (r, None)).collect();
        let mut seen = std::collections::HashSet::new();
        while let Some((node_id, parent)) = stack.pop() {
            if !seen.insert(node_id.clone()) {
                return Err(at("the message tree has a cycle"));
            }
            let node = &mapping[node_id];
            let mut kept_parent = parent.clone();
            if let Some(m) = node.get("message").filter(|m| !m.is_null()) {
                let role = m
                    .pointer("/author/role")
                    .and_then(Value::as_str)
                    .ok_or_else(|| at("a message without author.role"))?;
                let parts = m.pointer("/content/parts").and_then(Value::as_array);
                let text = match parts {
                    Some(ps) => ps
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join("\n"),
                    None => m
                        .pointer("/content/text")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                };
                // Tool output and empty system stubs are not conversation turns.
                let role = MessageRole::parse(role)
                    .filter(|r| !(*r == MessageRole::System && text.trim().is_empty()));
                if let Some(role) = role {
                    if text.chars().count() > MAX_MESSAGE_CHARS {
                        return Err(at("a message is longer than the limit"));
                    }
                    messages.push(Message {
                        id: node_id.clone(),
                        parent_id: parent,
                        role,
                        content: text,
                        status: MessageStatus::Done,
                        model: m
                            .pointer("/metadata/model_slug")
                            .and_then(Value::as_str)
                            .map(String::from),
                        created_at: m
                            .get("create_time")
                            .and_then(Value::as_f64)
                            .map(|t| t as i64)
                            .unwrap_or(created_at),
                        sources: None,
                        tools: None,
                    });
                    kept_parent = Some(node_id.clone());
                }
            }
            let children = node
                .get("children")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>())
                .unwrap_or_default();
            for ch in children.into_iter().rev() {
                let Some((k, _)) = mapping.get_key_value(ch) else {
                    return Err(at(&format!("child {ch:?} is not in the mapping")));
                };
                stack.push((k, kept_parent.clone()));
            }
        }
        // The shown branch ends at current_node, or at its nearest kept ancestor.
        let mut leaf = c
            .get("current_node")
            .and_then(Value::as_str)
            .map(String::from);
        while let Some(l) = leaf.clone() {
            if messages.iter().any(|m| m.id == l) {
                break;
            }
            leaf = mapping
                .get(&l)
                .and_then(|n| n.get("parent"))
                .and_then(Value::as_str)
                .map(String::from);
        }
        out.push(ImportConversation {
            title,
            created_at,
            updated_at,
            messages,
            current_leaf: leaf,
        });
    }
    Ok(out)
}
