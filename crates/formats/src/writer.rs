//! GGUF writer (version 3). Used to generate tiny models in tests and by the
//! trainer's export.

use crate::gguf::Value;
use crate::GgmlType;
use std::io::{self, Write};

/// A tensor to be written: name, ggml dims (`dims[0]` = row length), type and raw bytes.
pub struct WriteTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub data: Vec<u8>,
}

const ALIGN: usize = 32;

fn put_str(w: &mut impl Write, s: &str) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(w: &mut impl Write, v: &Value) -> io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x]),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[*x as u8]),
        Value::String(s) => put_str(w, s),
        Value::Array(items) => {
            let elem = items.first().map(type_id).unwrap_or(8);
            w.write_all(&elem.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            for it in items {
                if type_id(it) != elem {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "GGUF arrays must hold one element type",
                    ));
                }
                put_value(w, it)?;
            }
            Ok(())
        }
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
    }
}

/// Write a complete GGUF file.
pub fn write_gguf(
    w: &mut impl Write,
    metadata: &[(String, Value)],
    tensors: &[WriteTensor],
) -> io::Result<()> {
    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut head, k)?;
        head.extend_from_slice(&type_id(v).to_le_bytes());
        put_value(&mut head, v)?;
    }
    let mut offset = 0usize;
    for t in tensors {
        let expect = t.dims.iter().product::<u64>() as usize / t.ty.block_size() * t.ty.type_size();
        if t.data.len() != expect || !(t.dims[0] as usize).is_multiple_of(t.ty.block_size()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "tensor {} has {} bytes, expected {expect}",
                    t.name,
                    t.data.len()
                ),
            ));
        }
        put_str(&mut head, &t.name)?;
        head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            head.extend_from_slice(&d.to_le_bytes());
        }
        head.extend_from_slice(&t.ty.to_u32().to_le_bytes());
        head.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += t.data.len().div_ceil(ALIGN) * ALIGN;
    }
    let pad = head.len().div_ceil(ALIGN) * ALIGN - head.len();
    head.resize(head.len() + pad, 0);
    w.write_all(&head)?;
    for t in tensors {
        w.write_all(&t.data)?;
        let pad = t.data.len().div_ceil(ALIGN) * ALIGN - t.data.len();
        w.write_all(&vec![0u8; pad])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::parse;

    fn sample() -> Vec<u8> {
        let md = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("llama.block_count".to_string(), Value::U32(2)),
            (
                "tokenizer.ggml.tokens".to_string(),
                Value::Array(vec![Value::String("a".into()), Value::String("好".into())]),
            ),
        ];
        let t = WriteTensor {
            name: "w".into(),
            dims: vec![32, 2],
            ty: GgmlType::Q8_0,
            data: vec![0u8; 68],
        };
        let mut out = Vec::new();
        write_gguf(&mut out, &md, &[t]).expect("write");
        out
    }

    #[test]
    fn roundtrip() {
        let buf = sample();
        let h = parse(&buf).expect("parse");
        assert_eq!(h.version, 3);
        assert_eq!(h.architecture(), Some("llama"));
        assert_eq!(h.get_u64("llama.block_count"), Some(2));
        let toks = h
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .expect("tokens");
        assert_eq!(toks[1].as_str(), Some("好"));
        let t = h.tensor("w").expect("tensor");
        assert_eq!((t.row_len(), t.n_rows(), t.size), (32, 2, 68));
        assert_eq!(t.offset % 32, 0);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let buf = sample();
        let end = parse(&buf).expect("parse").tensors[0].offset + 68;
        // Trailing alignment padding after the last tensor may be missing; any
        // shorter prefix cuts into the header or the tensor data.
        for n in 0..end {
            assert!(parse(&buf[..n]).is_err(), "prefix of {n} bytes parsed");
        }
        assert!(parse(&buf[..end]).is_ok());
    }

    #[test]
    fn hostile_counts_are_rejected_without_allocating() {
        let mut buf = sample();
        // tensor count = u64::MAX
        buf[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = parse(&buf).expect_err("must fail");
        assert!(err.to_string().contains("impossible"), "{err}");
        let mut buf = sample();
        // first key length = huge
        buf[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(parse(&buf).is_err());
        assert!(matches!(
            parse(b"GGUF\x01\0\0\0"),
            Err(crate::FormatError::UnsupportedVersion(1))
        ));
        assert!(matches!(
            parse(b"PK\x03\x04xxxxxxxx"),
            Err(crate::FormatError::NotGguf)
        ));
    }

    #[test]
    fn huge_tensor_offset_is_an_error() {
        // Found by the fuzzer: an offset near u64::MAX overflowed while the
        // error message was being built.
        let mut buf = sample();
        let at = buf
            .windows(9)
            .position(|w| w == b"\x01\0\0\0\0\0\0\0w")
            .expect("tensor name")
            + 9
            + 4
            + 16
            + 4;
        buf[at..at + 8].copy_from_slice(&(u64::MAX - 127).to_le_bytes());
        assert!(parse(&buf)
            .expect_err("huge offset")
            .to_string()
            .contains("truncated"));
    }

    #[test]
    fn every_single_byte_corruption_is_handled() {
        let buf = sample();
        for i in 0..buf.len() {
            for v in [0u8, 0xff, 0x7f, 0x80] {
                let mut b = buf.clone();
                b[i] = v;
                let _ = parse(&b); // must not panic or allocate absurdly
            }
        }
    }
}
