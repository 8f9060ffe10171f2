//! Arguments checked against a tool's JSON schema: the subset tool schemas
//! use (`type`, `properties`, `required`, `enum`, `items`,
//! `additionalProperties: false`, `minimum` / `maximum`), enough that a
//! model's wrong call gets an error it can fix instead of a tool that
//! misreads it. Keywords outside the subset are not enforced.

use serde_json::Value;

/// Nesting checked at most this deep (arguments are the model's text).
const MAX_DEPTH: usize = 32;

pub(crate) fn check(schema: &Value, v: &Value) -> Result<(), String> {
    at(schema, v, "arguments", 0)
}

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => true,
    }
}

fn at(schema: &Value, v: &Value, path: &str, depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("{path} is nested too deeply"));
    }
    let Some(s) = schema.as_object() else {
        return Ok(());
    };
    match s.get("type") {
        Some(Value::String(t)) if !type_ok(t, v) => {
            return Err(format!("{path} must be of type {t}"));
        }
        Some(Value::Array(ts)) if !ts.iter().filter_map(Value::as_str).any(|t| type_ok(t, v)) => {
            return Err(format!("{path} has the wrong type"));
        }
        _ => {}
    }
    if let Some(Value::Array(allowed)) = s.get("enum") {
        if !allowed.contains(v) {
            let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
            return Err(format!("{path} must be one of {}", list.join(", ")));
        }
    }
    if let Some(x) = v.as_f64() {
        if let Some(min) = s.get("minimum").and_then(Value::as_f64) {
            if x < min {
                return Err(format!("{path} must be at least {min}"));
            }
        }
        if let Some(max) = s.get("maximum").and_then(Value::as_f64) {
            if x > max {
                return Err(format!("{path} must be at most {max}"));
            }
        }
    }
    if let Some(obj) = v.as_object() {
        let props = s.get("properties").and_then(Value::as_object);
        if let Some(Value::Array(req)) = s.get("required") {
            for r in req.iter().filter_map(Value::as_str) {
                if !obj.contains_key(r) {
                    return Err(format!("{path} needs the field {r:?}"));
                }
            }
        }
        for (k, x) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(sub) => at(sub, x, &format!("{path}.{k}"), depth + 1)?,
                None if s.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    let known: Vec<&str> = props
                        .map(|p| p.keys().map(String::as_str).collect())
                        .unwrap_or_default();
                    return Err(format!(
                        "{path} has an unknown field {k:?} (the fields are: {})",
                        known.join(", ")
                    ));
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(arr)) = (s.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            at(items, x, &format!("{path}[{i}]"), depth + 1)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wrong_calls_say_what_is_wrong() {
        let s = json!({"type": "object", "properties": {
            "op": {"type": "string", "enum": ["add", "diff"]},
            "days": {"type": "integer", "minimum": -100000, "maximum": 100000},
            "tags": {"type": "array", "items": {"type": "string"}}},
            "required": ["op"], "additionalProperties": false});
        assert!(check(&s, &json!({"op": "add", "days": 3, "tags": ["a"]})).is_ok());
        let err = |v| check(&s, &v).expect_err("refused");
        assert!(err(json!({})).contains("\"op\""));
        assert!(err(json!({"op": "mul"})).contains("one of"));
        assert!(err(json!({"op": "add", "days": "3"})).contains("integer"));
        assert!(err(json!({"op": "add", "days": 1_000_000_000})).contains("at most"));
        assert!(err(json!({"op": "add", "x": 1})).contains("unknown field"));
        assert!(err(json!({"op": "add", "tags": [1]})).contains("tags[0]"));
        assert!(err(json!([1])).contains("object"));
        let mut deep = json!(1);
        let mut ds = json!({"type": "integer"});
        for _ in 0..40 {
            deep = json!({"a": deep});
            ds = json!({"type": "object", "properties": {"a": ds}});
        }
        assert!(check(&ds, &deep).is_err());
    }
}
