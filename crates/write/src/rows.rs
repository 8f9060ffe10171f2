//! The rows an article is written from: CSV (a header line, then one row
//! per line), JSONL (one object per line) or JSON (an array of objects).

use crate::WriteError;
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::path::Path;

/// Input files larger than this are refused (a data file, not a dump).
pub const MAX_BYTES: u64 = 64 << 20;
/// Rows per file.
pub const MAX_ROWS: usize = 100_000;

/// One row of data.
#[derive(Debug, Clone)]
pub struct Row {
    /// 1-based position in the file (line or element), for messages.
    pub number: usize,
    /// What names its articles: the id field's value, or the position.
    pub id: String,
    pub fields: Map<String, Value>,
}

/// Read `path` (by its extension: `.csv`, `.jsonl` / `.ndjson`, `.json`).
/// `id_field` names the field that identifies a row (default: `id` when
/// every row has one, else the row's position).
pub fn read(path: &Path, id_field: Option<&str>) -> Result<Vec<Row>, WriteError> {
    let size = std::fs::metadata(path)
        .map_err(|e| WriteError::Io(path.display().to_string(), e))?
        .len();
    if size > MAX_BYTES {
        return Err(WriteError::Data(format!(
            "{} is {size} bytes; the limit is {MAX_BYTES}",
            path.display()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| WriteError::Io(path.display().to_string(), e))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    parse(&bytes, &ext, id_field).map_err(|e| match e {
        WriteError::Data(m) => WriteError::Data(format!("{}: {m}", path.display())),
        e => e,
    })
}

/// Rows from `bytes` in `format` (`csv`, `jsonl` / `ndjson`, `json`).
pub fn parse(bytes: &[u8], format: &str, id_field: Option<&str>) -> Result<Vec<Row>, WriteError> {
    if bytes.len() as u64 > MAX_BYTES {
        return Err(WriteError::Data(format!(
            "{} bytes; the limit is {MAX_BYTES}",
            bytes.len()
        )));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| WriteError::Data(format!("not UTF-8 text ({e})")))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let objects = match format {
        "csv" => csv_rows(text)?,
        "jsonl" | "ndjson" => jsonl_rows(text)?,
        "json" => json_rows(text)?,
        other => {
            return Err(WriteError::Data(format!(
                "unknown data format {other:?} (use .csv, .jsonl or .json)"
            )))
        }
    };
    identify(objects, id_field)
}

/// Row objects with their 1-based positions.
type Numbered = Vec<(usize, Map<String, Value>)>;

/// CSV cells that read wholly as numbers become numbers.
fn csv_rows(text: &str) -> Result<Numbered, WriteError> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(false)
        .from_reader(text.as_bytes());
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| WriteError::Data(format!("CSV header: {e}")))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    let mut seen = HashSet::new();
    for h in &headers {
        if h.is_empty() || !seen.insert(h) {
            return Err(WriteError::Data(format!(
                "CSV header: empty or repeated column name {h:?}"
            )));
        }
    }
    let mut out = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| WriteError::Data(format!("CSV row {}: {e}", i + 1)))?;
        let mut fields = Map::new();
        for (h, cell) in headers.iter().zip(record.iter()) {
            fields.insert(h.clone(), cell_value(cell));
        }
        out.push((i + 1, fields));
        if out.len() > MAX_ROWS {
            return Err(WriteError::Data(format!("more than {MAX_ROWS} rows")));
        }
    }
    Ok(out)
}

fn cell_value(cell: &str) -> Value {
    let t = cell.trim();
    if let Ok(i) = t.parse::<i64>() {
        return Value::from(i);
    }
    match t.parse::<f64>() {
        Ok(f) if f.is_finite() && !t.is_empty() && !t.starts_with('+') => Value::from(f),
        _ => Value::String(t.to_string()),
    }
}

fn jsonl_rows(text: &str) -> Result<Numbered, WriteError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(m)) => out.push((i + 1, m)),
            Ok(_) => {
                return Err(WriteError::Data(format!(
                    "line {}: a row must be a JSON object",
                    i + 1
                )))
            }
            Err(e) => return Err(WriteError::Data(format!("line {}: {e}", i + 1))),
        }
        if out.len() > MAX_ROWS {
            return Err(WriteError::Data(format!("more than {MAX_ROWS} rows")));
        }
    }
    Ok(out)
}

fn json_rows(text: &str) -> Result<Numbered, WriteError> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| WriteError::Data(format!("JSON: {e}")))?;
    let Value::Array(items) = value else {
        return Err(WriteError::Data(
            "JSON: the file must be an array of row objects".into(),
        ));
    };
    if items.len() > MAX_ROWS {
        return Err(WriteError::Data(format!("more than {MAX_ROWS} rows")));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::Object(m) => Ok((i + 1, m)),
            _ => Err(WriteError::Data(format!(
                "element {}: a row must be a JSON object",
                i + 1
            ))),
        })
        .collect()
}

fn identify(objects: Numbered, id_field: Option<&str>) -> Result<Vec<Row>, WriteError> {
    let field = match id_field {
        Some(f) => Some(f),
        None if !objects.is_empty() && objects.iter().all(|(_, m)| m.contains_key("id")) => {
            Some("id")
        }
        None => None,
    };
    let mut seen = HashSet::new();
    let mut rows = Vec::with_capacity(objects.len());
    for (number, fields) in objects {
        let id = match field {
            None => number.to_string(),
            Some(f) => match fields.get(f) {
                Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
                Some(Value::Number(n)) => n.to_string(),
                _ => {
                    return Err(WriteError::Data(format!(
                        "row {number}: no {f:?} to name it by"
                    )))
                }
            },
        };
        let id = file_stem(&id);
        if !seen.insert(id.clone()) {
            return Err(WriteError::Data(format!(
                "row {number}: the id {id:?} is used by an earlier row"
            )));
        }
        rows.push(Row { number, id, fields });
    }
    Ok(rows)
}

/// An id as a file name: letters, digits, `-`, `_` and `.` (not leading)
/// kept, anything else `_`, at most 80 characters.
fn file_stem(id: &str) -> String {
    let s: String = id
        .chars()
        .take(80)
        .map(|c| {
            if c.is_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_start_matches('.').to_string();
    if s.is_empty() {
        "_".into()
    } else {
        s
    }
}

/// Every leaf of a row (nested objects and arrays walked), for the fact
/// check.
pub fn leaves(fields: &Map<String, Value>) -> Vec<&Value> {
    fn walk<'a>(v: &'a Value, out: &mut Vec<&'a Value>, depth: usize) {
        match v {
            Value::Object(m) if depth < 16 => m.values().for_each(|v| walk(v, out, depth + 1)),
            Value::Array(a) if depth < 16 => a.iter().for_each(|v| walk(v, out, depth + 1)),
            Value::Object(_) | Value::Array(_) | Value::Null => {}
            v => out.push(v),
        }
    }
    let mut out = Vec::new();
    fields.values().for_each(|v| walk(v, &mut out, 0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn three_formats_read_alike() {
        let (_d, csv) = file(
            "a.csv",
            "id,team,goals,rate\nm1,青川,3,0.5\nm2,\"Baisha, FC\",0,x\n",
        );
        let rows = read(&csv, None).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].id, "m1");
        assert_eq!(rows[0].fields["goals"], Value::from(3));
        assert_eq!(rows[0].fields["rate"], Value::from(0.5));
        assert_eq!(rows[1].fields["team"], Value::from("Baisha, FC"));
        assert_eq!(rows[1].fields["rate"], Value::from("x"));

        let (_d, jsonl) = file("a.jsonl", "{\"team\":\"a\"}\n\n{\"team\":\"b/c\"}\n");
        let rows = read(&jsonl, None).unwrap();
        assert_eq!(
            rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["1", "3"]
        );
        let (_d, json) = file("a.json", r#"[{"k":"../x y","v":1}]"#);
        let rows = read(&json, Some("k")).unwrap();
        assert_eq!(rows[0].id, "_x_y");
    }

    #[test]
    fn bad_data_is_a_clear_error() {
        for (name, text, says) in [
            ("a.csv", "id,x\n1,2,3\n", "CSV row 1"),
            ("a.csv", "id,id\n1,2\n", "repeated column"),
            ("a.jsonl", "{\"a\":1}\n[1]\n", "line 2"),
            ("a.jsonl", "{\"a\":1}\n{oops\n", "line 2"),
            ("a.json", "{\"a\":1}", "array"),
            ("a.json", "[{\"id\":1},{\"id\":1}]", "earlier row"),
            ("a.json", "[{\"id\":1},{}]", "no \"id\""),
            ("a.txt", "x", "unknown data format"),
        ] {
            let (_d, p) = file(name, text);
            let e = read(
                &p,
                if text.contains("{}") {
                    Some("id")
                } else {
                    None
                },
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }
}
