//! GGUF v2/v3 reader. Every count, offset and size read from the file is checked
//! against the bytes actually present before it is used, so a truncated or hostile
//! file produces a [`GgufError`], never a panic or an oversized allocation.

use crate::{FormatError, GgmlType};
use std::collections::BTreeMap;
use std::path::Path;

/// At most this many elements are reserved ahead from a count a file gives.
const PREALLOC_MAX: usize = 4096;

const MAGIC: &[u8; 4] = b"GGUF";
/// Arrays nested deeper than this are rejected (real files use depth 1).
const MAX_ARRAY_DEPTH: usize = 4;
/// Tensors with more dimensions than this are rejected (ggml's limit).
pub const MAX_DIMS: usize = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any integer-typed value as u64 (negative values give `None`).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            Value::Bool(v) => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => self.as_u64().map(|v| v != 0),
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    /// Short, human-readable rendering (arrays are summarised).
    pub fn summary(&self) -> String {
        match self {
            Value::String(s) if s.chars().count() > 60 => {
                let head: String = s.chars().take(57).collect();
                format!("{head:?}…")
            }
            Value::String(s) => format!("{s:?}"),
            Value::Array(a) => format!("[{} items]", a.len()),
            Value::F32(v) => format!("{v}"),
            Value::F64(v) => format!("{v}"),
            Value::Bool(v) => format!("{v}"),
            other => other.as_i64().map(|v| v.to_string()).unwrap_or_default(),
        }
    }
}

/// Where one tensor lives inside the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the fastest-varying (row length).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte offset of the tensor data in the file.
    pub offset: usize,
    /// Size of the tensor data in bytes.
    pub size: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
    /// Number of elements per row (`dims[0]`).
    pub fn row_len(&self) -> usize {
        self.dims.first().copied().unwrap_or(1) as usize
    }
    /// Number of rows (product of all dims but the first).
    pub fn n_rows(&self) -> usize {
        self.dims.iter().skip(1).product::<u64>() as usize
    }
}

/// Parsed header of a GGUF file: metadata and tensor directory.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: usize,
    pub data_offset: usize,
}

impl GgufHeader {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Value::as_f64)
    }
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], FormatError> {
        if n > self.remaining() {
            return Err(FormatError::Truncated {
                what: what.to_string(),
                offset: self.pos as u64,
                needed: n as u64,
                available: self.remaining() as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], FormatError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    /// A count that must fit in the remaining bytes given a minimum element size.
    fn count(&mut self, min_elem: usize, what: &str) -> Result<usize, FormatError> {
        let at = self.pos;
        let n = self.u64(what)?;
        let max = (self.remaining() / min_elem.max(1)) as u64;
        if n > max {
            return Err(FormatError::Invalid {
                offset: at as u64,
                msg: format!(
                    "{what} count {n} is impossible: only {} bytes remain",
                    self.remaining()
                ),
            });
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String, FormatError> {
        let n = self.count(1, what)?;
        let bytes = self.take(n, what)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
    fn value(&mut self, ty: u32, depth: usize, key: &str) -> Result<Value, FormatError> {
        let at = self.pos as u64;
        Ok(match ty {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(FormatError::Invalid {
                        offset: at,
                        msg: format!("metadata {key:?}: bool byte {b} is neither 0 nor 1"),
                    })
                }
            },
            8 => Value::String(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(FormatError::Invalid {
                        offset: at,
                        msg: format!(
                            "metadata {key:?}: arrays nested deeper than {MAX_ARRAY_DEPTH}"
                        ),
                    });
                }
                let elem_ty = self.u32(key)?;
                let min = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8..=12 => 8,
                    _ => 1,
                };
                let n = self.count(min, key)?;
                // The count is checked against the bytes left, but a Value
                // is larger than its smallest encoding: reserve a bounded
                // amount and let the vector grow with what is really read.
                let mut items = Vec::with_capacity(n.min(PREALLOC_MAX));
                for _ in 0..n {
                    items.push(self.value(elem_ty, depth + 1, key)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(FormatError::Invalid {
                    offset: at,
                    msg: format!("metadata {key:?}: unknown value type {other}"),
                })
            }
        })
    }
}

/// Parse the header and tensor directory of a GGUF file held in `buf`
/// (the whole file). Validates that every tensor's data lies inside `buf`.
pub fn parse(buf: &[u8]) -> Result<GgufHeader, FormatError> {
    let mut c = Cursor { buf, pos: 0 };
    let magic = c.take(4, "magic")?;
    if magic != MAGIC {
        return Err(FormatError::NotGguf);
    }
    let version = c.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(FormatError::UnsupportedVersion(version));
    }
    let n_tensors = c.count(8 + 4 + 8 + 4 + 8, "tensor")?;
    let n_kv = c.count(8 + 4 + 1, "metadata")?;
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = c.string("metadata key")?;
        let ty = c.u32("metadata type")?;
        let v = c.value(ty, 0, &key)?;
        metadata.insert(key, v);
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= 1 << 20 => a as usize,
            _ => {
                return Err(FormatError::Invalid {
                    offset: 0,
                    msg: format!("general.alignment {} is not a power of two", v.summary()),
                })
            }
        },
    };
    let mut raw = Vec::with_capacity(n_tensors.min(PREALLOC_MAX));
    for _ in 0..n_tensors {
        let at = c.pos as u64;
        let name = c.string("tensor name")?;
        let n_dims = c.u32("tensor dims")? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(FormatError::Invalid {
                offset: at,
                msg: format!("tensor {name:?} has {n_dims} dimensions (1..={MAX_DIMS} allowed)"),
            });
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            dims.push(c.u64("tensor dim")?);
        }
        let ty_raw = c.u32("tensor type")?;
        let ty = GgmlType::from_u32(ty_raw).ok_or_else(|| FormatError::UnsupportedType {
            tensor: name.clone(),
            ty: ty_raw,
        })?;
        let rel = c.u64("tensor offset")?;
        raw.push((at, name, dims, ty, rel));
    }
    let data_offset = c.pos.div_ceil(alignment) * alignment;
    if data_offset > buf.len() && n_tensors > 0 {
        return Err(FormatError::Truncated {
            what: "tensor data".into(),
            offset: c.pos as u64,
            needed: (data_offset - c.pos) as u64,
            available: c.remaining() as u64,
        });
    }
    let data_len = buf.len().saturating_sub(data_offset) as u64;
    let mut tensors = Vec::with_capacity(raw.len());
    let mut names = std::collections::HashSet::new();
    for (at, name, dims, ty, rel) in raw {
        let invalid = |msg: String| FormatError::Invalid { offset: at, msg };
        if !names.insert(name.clone()) {
            return Err(invalid(format!("tensor {name:?} appears twice")));
        }
        let n_el = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| invalid(format!("tensor {name:?}: element count overflows")))?;
        let bs = ty.block_size() as u64;
        if dims[0] % bs != 0 {
            return Err(invalid(format!(
                "tensor {name:?}: row length {} is not a multiple of the {:?} block size {bs}",
                dims[0], ty
            )));
        }
        let size = (n_el / bs)
            .checked_mul(ty.type_size() as u64)
            .ok_or_else(|| invalid(format!("tensor {name:?}: byte size overflows")))?;
        if rel % alignment as u64 != 0 {
            return Err(invalid(format!(
                "tensor {name:?}: offset {rel} is not aligned to {alignment}"
            )));
        }
        let end = rel
            .checked_add(size)
            .ok_or_else(|| invalid(format!("tensor {name:?}: offset overflows")))?;
        if end > data_len {
            return Err(FormatError::Truncated {
                what: format!("data of tensor {name:?}"),
                offset: (data_offset as u64).saturating_add(rel),
                needed: size,
                available: data_len.saturating_sub(rel),
            });
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ty,
            offset: data_offset + rel as usize,
            size: size as usize,
        });
    }
    Ok(GgufHeader {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

/// The bytes one thread of [`read_all`] reads at a time.
const READ_CHUNK: usize = 32 << 20;

/// Fill `buf` from the start of `file` (exactly `buf.len()` bytes). A
/// large file is read by several threads at once, `chunk` bytes at a time:
/// the kernel's copy from the page cache and the zeroing of each freshly
/// touched page run in the thread that reads it, so one thread leaves
/// the other cores idle while a model loads (a 1.1 GB file took 0.3–1.5 s).
fn read_all(file: &mut std::fs::File, buf: &mut [u8], chunk: usize) -> std::io::Result<()> {
    let chunk = chunk.max(1);
    #[cfg(unix)]
    if buf.len() > chunk {
        use std::os::unix::fs::FileExt;
        let file = &*file;
        let chunks: Vec<_> = buf.chunks_mut(chunk).enumerate().collect();
        return crate::par::for_each(chunks, |(i, part)| {
            file.read_exact_at(part, (i * chunk) as u64)
        });
    }
    // One read: a small file, or no positioned reads on this platform.
    let _ = chunk;
    std::io::Read::read_exact(file, buf)
}

/// A GGUF file mapped into memory with its parsed header.
pub struct GgufFile {
    pub header: GgufHeader,
    map: memmap2::MmapMut,
}

impl GgufFile {
    /// Read a GGUF file into memory. The bytes go into an anonymous mapping
    /// that asks for transparent huge pages (the forward pass streams every
    /// weight once per token, and 2 MiB pages spare the TLB); reading with
    /// `read` rather than mapping the file keeps the page cache out of the
    /// process's resident memory, so peak RSS stays at about the file size.
    pub fn open(path: &Path) -> Result<Self, FormatError> {
        let io = |e: std::io::Error| FormatError::Io {
            path: path.display().to_string(),
            source: e,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let len = usize::try_from(len).map_err(|_| FormatError::Invalid {
            offset: 0,
            msg: "file too large for this platform".into(),
        })?;
        if len == 0 {
            return Err(FormatError::NotGguf);
        }
        let mut anon = memmap2::MmapMut::map_anon(len).map_err(io)?;
        #[cfg(target_os = "linux")]
        let _ = anon.advise(memmap2::Advice::HugePage);
        read_all(&mut file, &mut anon[..], READ_CHUNK).map_err(io)?;
        let header = parse(&anon)?;
        Ok(Self { header, map: anon })
    }

    /// A Hugging Face directory (config.json, tokenizer.json, *.safetensors),
    /// converted in memory to GGUF form (see [`crate::hf`]).
    pub fn from_hf_dir(dir: &Path) -> Result<Self, FormatError> {
        let bytes = crate::hf::hf_dir_to_gguf(dir)?;
        Self::from_bytes(&bytes)
    }

    /// GGUF bytes already in memory.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FormatError> {
        let io = |e: std::io::Error| FormatError::Io {
            path: "<memory>".into(),
            source: e,
        };
        if bytes.is_empty() {
            return Err(FormatError::NotGguf);
        }
        let mut anon = memmap2::MmapMut::map_anon(bytes.len()).map_err(io)?;
        anon.copy_from_slice(bytes);
        let header = parse(&anon)?;
        Ok(Self { header, map: anon })
    }

    /// Raw bytes of a tensor (already bounds-checked by [`parse`]).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.offset..t.offset + t.size]
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The bytes, to rearrange tensors in place (the engine interleaves
    /// weight rows for its kernels once, at load). The header is parsed
    /// already and stays as it was.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Several threads reading small chunks put every byte where a single
    /// `read` would, including a last chunk shorter than the others; a file
    /// shorter than the buffer is an error, not a silently short model.
    #[test]
    fn read_all_in_chunks_gives_the_files_bytes() {
        let bytes: Vec<u8> = (0..1_000_003u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut tmp = tempfile::NamedTempFile::new().expect("temp file");
        tmp.write_all(&bytes).expect("write");
        for chunk in [4096, 65_536, 1 << 20, 32 << 20] {
            let mut f = std::fs::File::open(tmp.path()).expect("open");
            let mut buf = vec![0u8; bytes.len()];
            read_all(&mut f, &mut buf, chunk).expect("read");
            assert!(buf == bytes, "chunk {chunk}");
        }
        let mut f = std::fs::File::open(tmp.path()).expect("open");
        let mut buf = vec![0u8; bytes.len() + 1];
        let err = read_all(&mut f, &mut buf, 4096).expect_err("past the end");
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
