//! CTranslate2's `model.bin` (binary versions 5 and 6), the format
//! faster-whisper's models ship in: a version, the model spec's name and
//! revision, then named variables (rank, dimensions, element type, byte
//! count, bytes) and aliases (a name for another variable). Every count,
//! length and size is checked against the file before it is used; the
//! tensor bytes stay in the caller's buffer.

use crate::FormatError;
use std::collections::HashMap;

/// Element types of CTranslate2's `DataType` enum, by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ct2Type {
    F32,
    I8,
    I16,
    I32,
    F16,
    BF16,
}

impl Ct2Type {
    fn from_id(id: u8) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::I8,
            2 => Self::I16,
            3 => Self::I32,
            4 => Self::F16,
            5 => Self::BF16,
            _ => return None,
        })
    }

    pub fn id(self) -> u8 {
        self as u8
    }

    pub fn size(self) -> usize {
        match self {
            Self::I8 => 1,
            Self::I16 | Self::F16 | Self::BF16 => 2,
            Self::F32 | Self::I32 => 4,
        }
    }
}

/// One variable: its type, shape and byte range in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Ct2Var {
    pub ty: Ct2Type,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
}

impl Ct2Var {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed `model.bin`.
#[derive(Debug, Clone)]
pub struct Ct2File {
    pub version: u32,
    pub spec: String,
    pub revision: u32,
    pub vars: HashMap<String, Ct2Var>,
}

/// Variables a file may hold (far above any real model's few thousand).
const MAX_VARS: u32 = 100_000;
const MAX_RANK: u8 = 8;

struct Cursor<'a> {
    b: &'a [u8],
    p: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], FormatError> {
        match self.p.checked_add(n).filter(|e| *e <= self.b.len()) {
            Some(end) => {
                let s = &self.b[self.p..end];
                self.p = end;
                Ok(s)
            }
            None => Err(FormatError::Truncated {
                what: what.to_string(),
                offset: self.p as u64,
                needed: n as u64,
                available: self.b.len().saturating_sub(self.p) as u64,
            }),
        }
    }
    fn u8(&mut self, what: &str) -> Result<u8, FormatError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, FormatError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32, FormatError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A string: u16 length (with the trailing NUL), bytes, NUL.
    fn string(&mut self, what: &str) -> Result<String, FormatError> {
        let at = self.p as u64;
        let n = self.u16(what)? as usize;
        let b = self.take(n, what)?;
        let Some((0, text)) = b.split_last() else {
            return Err(FormatError::Invalid {
                offset: at,
                msg: format!("{what}: string without its terminating NUL"),
            });
        };
        String::from_utf8(text.to_vec()).map_err(|_| FormatError::Invalid {
            offset: at,
            msg: format!("{what}: not UTF-8"),
        })
    }
}

impl Ct2File {
    pub fn parse(b: &[u8]) -> Result<Self, FormatError> {
        let mut c = Cursor { b, p: 0 };
        let version = c.u32("version")?;
        if !(5..=6).contains(&version) {
            return Err(FormatError::Invalid {
                offset: 0,
                msg: format!("CTranslate2 binary version {version} is not supported (5 and 6 are)"),
            });
        }
        let spec = c.string("spec name")?;
        let revision = c.u32("spec revision")?;
        let n = c.u32("variable count")?;
        if n > MAX_VARS {
            return Err(FormatError::Invalid {
                offset: c.p as u64 - 4,
                msg: format!("{n} variables (at most {MAX_VARS})"),
            });
        }
        let mut vars = HashMap::new();
        for _ in 0..n {
            let at = c.p as u64;
            let name = c.string("variable name")?;
            let rank = c.u8("rank")?;
            if rank > MAX_RANK {
                return Err(FormatError::Invalid {
                    offset: at,
                    msg: format!("{name}: rank {rank} (at most {MAX_RANK})"),
                });
            }
            let mut shape = Vec::with_capacity(rank as usize);
            for _ in 0..rank {
                shape.push(c.u32("dimension")? as usize);
            }
            let id = c.u8("type")?;
            let ty = Ct2Type::from_id(id).ok_or_else(|| FormatError::Invalid {
                offset: at,
                msg: format!("{name}: unknown element type {id}"),
            })?;
            let len = c.u32("byte count")? as usize;
            let expected = shape
                .iter()
                .try_fold(ty.size(), |a, d| a.checked_mul(*d))
                .filter(|e| *e == len);
            if expected.is_none() {
                return Err(FormatError::Invalid {
                    offset: at,
                    msg: format!("{name}: {len} bytes do not hold shape {shape:?} of {ty:?}"),
                });
            }
            let offset = c.p;
            c.take(len, &name)?;
            if vars
                .insert(
                    name.clone(),
                    Ct2Var {
                        ty,
                        shape,
                        offset,
                        len,
                    },
                )
                .is_some()
            {
                return Err(FormatError::Invalid {
                    offset: at,
                    msg: format!("{name}: defined twice"),
                });
            }
        }
        let n_alias = c.u32("alias count")?;
        if n_alias > MAX_VARS {
            return Err(FormatError::Invalid {
                offset: c.p as u64 - 4,
                msg: format!("{n_alias} aliases (at most {MAX_VARS})"),
            });
        }
        for _ in 0..n_alias {
            let at = c.p as u64;
            let alias = c.string("alias")?;
            let target = c.string("alias target")?;
            let v = vars
                .get(&target)
                .cloned()
                .ok_or_else(|| FormatError::Invalid {
                    offset: at,
                    msg: format!("alias {alias} names {target}, which is not in the file"),
                })?;
            vars.entry(alias).or_insert(v);
        }
        Ok(Self {
            version,
            spec,
            revision,
            vars,
        })
    }

    /// A variable, or an error naming it.
    pub fn var(&self, name: &str) -> Result<&Ct2Var, FormatError> {
        self.vars.get(name).ok_or_else(|| FormatError::Invalid {
            offset: 0,
            msg: format!("variable {name} is missing"),
        })
    }

    /// A variable's values as f32 (from f32, f16, bf16 or integer types).
    pub fn floats(&self, bytes: &[u8], name: &str) -> Result<Vec<f32>, FormatError> {
        let v = self.var(name)?;
        let b = &bytes[v.offset..v.offset + v.len];
        Ok(match v.ty {
            Ct2Type::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Ct2Type::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            Ct2Type::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            Ct2Type::I8 => b.iter().map(|x| *x as i8 as f32).collect(),
            Ct2Type::I16 => b
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as f32)
                .collect(),
            Ct2Type::I32 => b
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
                .collect(),
        })
    }
}

/// Write a `model.bin` (version 6) from `(name, shape, type, bytes)`
/// variables and `(alias, target)` pairs: tests build tiny models with it.
pub fn write(
    spec: &str,
    revision: u32,
    vars: &[(String, Vec<usize>, Ct2Type, Vec<u8>)],
    aliases: &[(&str, &str)],
) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&((s.len() + 1) as u16).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }
    let mut out = Vec::new();
    out.extend_from_slice(&6u32.to_le_bytes());
    string(&mut out, spec);
    out.extend_from_slice(&revision.to_le_bytes());
    out.extend_from_slice(&(vars.len() as u32).to_le_bytes());
    for (name, shape, ty, bytes) in vars {
        string(&mut out, name);
        out.push(shape.len() as u8);
        for d in shape {
            out.extend_from_slice(&(*d as u32).to_le_bytes());
        }
        out.push(ty.id());
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    out.extend_from_slice(&(aliases.len() as u32).to_le_bytes());
    for (a, t) in aliases {
        string(&mut out, a);
        string(&mut out, t);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let w: Vec<u8> = [1.0f32, -2.0, 0.5, 4.0]
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
            .collect();
        write(
            "WhisperSpec",
            3,
            &[
                ("a/weight".into(), vec![2, 2], Ct2Type::F16, w),
                (
                    "a/heads".into(),
                    vec![],
                    Ct2Type::I16,
                    8i16.to_le_bytes().to_vec(),
                ),
            ],
            &[("b/weight", "a/weight")],
        )
    }

    #[test]
    fn variables_and_aliases_are_read() {
        let b = sample();
        let f = Ct2File::parse(&b).expect("parse");
        assert_eq!(
            (f.version, f.spec.as_str(), f.revision),
            (6, "WhisperSpec", 3)
        );
        assert_eq!(
            f.floats(&b, "b/weight").expect("alias"),
            [1.0, -2.0, 0.5, 4.0]
        );
        assert_eq!(f.floats(&b, "a/heads").expect("scalar"), [8.0]);
        assert_eq!(f.var("a/weight").expect("var").shape, [2, 2]);
        assert!(f.var("missing").is_err());
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error() {
        let b = sample();
        for n in 0..b.len() {
            assert!(Ct2File::parse(&b[..n]).is_err(), "prefix of {n} bytes");
        }
        // A byte count that does not match the shape.
        let mut bad = sample();
        let at = bad.windows(8).position(|w| w == b"a/weight").expect("name") + 9;
        // rank 2, dims 2 and 2, type, then the byte count.
        bad[at + 1 + 8 + 1] = 7;
        assert!(Ct2File::parse(&bad).is_err());
        // An unknown type, an absurd rank, a wrong version.
        let mut bad = sample();
        bad[at + 1 + 8] = 9;
        assert!(Ct2File::parse(&bad).is_err());
        let mut bad = sample();
        bad[at] = 200;
        assert!(Ct2File::parse(&bad).is_err());
        let mut bad = sample();
        bad[0] = 2;
        assert!(Ct2File::parse(&bad).is_err());
    }
}
