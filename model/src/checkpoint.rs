//! Reading and writing Hugging Face safetensors checkpoints, streaming (spec §7, §8).
//!
//! [`Checkpoint`] memory-maps `model.safetensors` or every shard named by
//! `model.safetensors.index.json`, validates every header up front (so that a lying header is
//! reported at open time with the file and tensor it concerns), and converts one tensor at a
//! time to f32 on request ([`Checkpoint::read_f32`]), dequantizing FP8 block-quantized weights
//! with their `weight_scale_inv` grid.
//!
//! [`SafetensorsWriter`] writes a safetensors file tensor by tensor, holding at most one
//! tensor's bytes (less: conversions go through a small buffer), to `<path>.tmp`, renamed to
//! `<path>` by [`SafetensorsWriter::finish`]. [`write_index`] writes the shard index.
//!
//! File format (as the reference `safetensors` crate reads and writes it): an 8-byte
//! little-endian header length `n`, `n` bytes of UTF-8 JSON (`{"__metadata__": {str: str}?,
//! name: {"dtype", "shape", "data_offsets": [start, end]}, ...}`, padded with spaces to a
//! multiple of 8), then the data section; offsets are relative to the data section, and the
//! tensors' byte ranges must tile it exactly (no gap, no overlap, nothing after the last one).
//!
//! Nothing here depends on Burn.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

use crate::fp8;

/// File name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of the shard index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Largest header accepted (the reference implementation's limit).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// Element types this crate reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    BF16,
    F16,
    /// `float8_e4m3fn`, safetensors name `F8_E4M3`.
    F8E4M3,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            Dtype::F8E4M3 => 1,
        }
    }

    /// The safetensors header spelling (`"F32"`, `"BF16"`, `"F16"`, `"F8_E4M3"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::BF16 => "BF16",
            Dtype::F16 => "F16",
            Dtype::F8E4M3 => "F8_E4M3",
        }
    }

    /// Parses a safetensors header spelling; `None` for any other dtype.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "F32" => Some(Dtype::F32),
            "BF16" => Some(Dtype::BF16),
            "F16" => Some(Dtype::F16),
            "F8_E4M3" => Some(Dtype::F8E4M3),
            _ => None,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Bit width of the other dtypes the safetensors format defines (not convertible here, but
/// their byte ranges can still be validated, so a file holding one opens fine).
fn other_dtype_bits(s: &str) -> Option<usize> {
    Some(match s {
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E8M0" | "F8_E4M3FNUZ" | "F8_E5M2FNUZ" => 8,
        "I16" | "U16" => 16,
        "I32" | "U32" => 32,
        "I64" | "U64" | "F64" | "C64" => 64,
        _ => return None,
    })
}

/// Where a tensor lives: its dtype, shape, file (index into the checkpoint's files) and absolute
/// byte range in that file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Index into the checkpoint's files (see [`Checkpoint::file_path`]).
    pub file: usize,
    /// Absolute byte range `start..end` in the file (header included in the count).
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of data bytes.
    pub fn nbytes(&self) -> usize {
        self.end - self.start
    }
}

/// Errors of reading and writing checkpoints. Each prints as one line naming the file and the
/// tensor concerned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{}: no checkpoint: neither {SINGLE_FILE} nor {INDEX_FILE} found there",
        dir.display()
    )]
    NoCheckpoint { dir: PathBuf },
    #[error("{}: bad checkpoint index: {reason}", path.display())]
    BadIndex { path: PathBuf, reason: String },
    #[error("{}: bad safetensors header: {reason}", path.display())]
    BadHeader { path: PathBuf, reason: String },
    #[error(
        "{}: tensor '{tensor}' is truncated: its data ends at byte {end} but the file has only \
         {file_len} bytes",
        path.display()
    )]
    Truncated {
        path: PathBuf,
        tensor: String,
        end: u64,
        file_len: u64,
    },
    #[error("{}: tensor '{tensor}': bad data_offsets: {reason}", path.display())]
    BadOffsets {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    #[error(
        "{}: tensor '{tensor}' has unsupported dtype {dtype} (supported: F32, BF16, F16, F8_E4M3)",
        path.display()
    )]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{}: tensor '{name}' is not in the checkpoint", dir.display())]
    MissingTensor { dir: PathBuf, name: String },
    #[error(
        "{}: tensor '{tensor}' has shape {found:?}, expected {expected:?}",
        path.display()
    )]
    WrongShape {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error(
        "{}: FP8 tensor '{tensor}' has no scale tensor '{scale}' in the checkpoint",
        path.display()
    )]
    MissingScale {
        path: PathBuf,
        tensor: String,
        scale: String,
    },
    #[error("{}: FP8 tensor '{tensor}', scale '{scale}': {reason}", path.display())]
    BadScale {
        path: PathBuf,
        tensor: String,
        scale: String,
        reason: String,
    },
    #[error(
        "tensor '{name}' is in two files: {} and {}",
        first.display(),
        second.display()
    )]
    DuplicateTensor {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    /// A read the tensor cannot satisfy (transpose of a non-2-D tensor, wrong output buffer
    /// size, FP8 block size 0).
    #[error("{}: tensor '{tensor}': {reason}", path.display())]
    InvalidRequest {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    /// Strict loading: checkpoint tensors that the model does not use.
    #[error(
        "the checkpoint has {} tensor(s) the model does not use: {}",
        names.len(),
        list_names(names)
    )]
    Unexpected { names: Vec<String> },
    /// Misuse of [`SafetensorsWriter`] (undeclared or duplicate tensor, wrong data length,
    /// tensors left unwritten, ...).
    #[error("{}: writing safetensors: {reason}", path.display())]
    Writer { path: PathBuf, reason: String },
}

/// `'a', 'b', 'c' and 7 more`: a short one-line list.
fn list_names(names: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut s = names
        .iter()
        .take(SHOWN)
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LoadError + '_ {
    move |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    }
}

// ---------------------------------------------------------------------------------------------
// Header parsing
// ---------------------------------------------------------------------------------------------

/// The header's top-level entries in file order, duplicates kept (serde_json's map would drop
/// them and sort the keys).
struct Entries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut v = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(e) = map.next_entry::<String, Value>()? {
                    v.push(e);
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// One tensor of a parsed header.
struct Parsed {
    name: String,
    /// `Ok` for a supported dtype, `Err(spelling)` for another safetensors dtype.
    dtype: Result<Dtype, String>,
    shape: Vec<usize>,
    /// Relative to the data section.
    start: usize,
    end: usize,
}

struct ParsedHeader {
    /// Absolute offset of the data section (8 + header length).
    data_start: usize,
    metadata: Option<BTreeMap<String, String>>,
    tensors: Vec<Parsed>,
}

fn parse_usize(v: &Value) -> Option<usize> {
    v.as_u64().and_then(|x| usize::try_from(x).ok())
}

/// Parses and validates the header of a whole safetensors file held in `buf`.
fn parse_header(path: &Path, buf: &[u8]) -> Result<ParsedHeader, LoadError> {
    let bad = |reason: String| LoadError::BadHeader {
        path: path.to_path_buf(),
        reason,
    };
    let file_len = buf.len() as u64;
    if buf.len() < 8 {
        return Err(bad(format!(
            "the file is {file_len} bytes, shorter than the 8-byte header length"
        )));
    }
    let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER_LEN {
        return Err(bad(format!(
            "header length {n} exceeds the {MAX_HEADER_LEN}-byte limit (file is {file_len} bytes)"
        )));
    }
    if 8 + n > file_len {
        return Err(bad(format!(
            "header length {n} runs past the end of the file ({file_len} bytes)"
        )));
    }
    let data_start = 8 + n as usize;
    let text = std::str::from_utf8(&buf[8..data_start])
        .map_err(|e| bad(format!("header is not UTF-8: {e}")))?;
    let Entries(entries) = serde_json::from_str(text)
        .map_err(|e| bad(format!("header is not a valid JSON object: {e}")))?;

    let data_len = buf.len() - data_start;
    let mut metadata = None;
    let mut seen = BTreeSet::new();
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if !seen.insert(name.clone()) {
            return Err(bad(format!("'{name}' appears twice in the header")));
        }
        if name == "__metadata__" {
            let Value::Object(map) = value else {
                return Err(bad("__metadata__ is not an object".into()));
            };
            let mut m = BTreeMap::new();
            for (k, v) in map {
                let Value::String(s) = v else {
                    return Err(bad(format!("__metadata__ value '{k}' is not a string")));
                };
                m.insert(k, s);
            }
            metadata = Some(m);
            continue;
        }
        let field = |key: &str| -> Result<&Value, LoadError> {
            value
                .get(key)
                .ok_or_else(|| bad(format!("tensor '{name}' has no \"{key}\"")))
        };
        let dtype_str = field("dtype")?
            .as_str()
            .ok_or_else(|| bad(format!("tensor '{name}': \"dtype\" is not a string")))?;
        let shape: Vec<usize> = field("shape")?
            .as_array()
            .and_then(|a| a.iter().map(parse_usize).collect::<Option<Vec<_>>>())
            .ok_or_else(|| {
                bad(format!(
                    "tensor '{name}': \"shape\" is not an array of non-negative integers"
                ))
            })?;
        let offsets: Vec<usize> = field("data_offsets")?
            .as_array()
            .and_then(|a| a.iter().map(parse_usize).collect::<Option<Vec<_>>>())
            .filter(|a| a.len() == 2)
            .ok_or_else(|| {
                bad(format!(
                    "tensor '{name}': \"data_offsets\" is not [start, end] with non-negative \
                     integers"
                ))
            })?;
        let (start, end) = (offsets[0], offsets[1]);
        let (dtype, bits) = match Dtype::parse(dtype_str) {
            Some(d) => (Ok(d), d.size() * 8),
            None => match other_dtype_bits(dtype_str) {
                Some(b) => (Err(dtype_str.to_string()), b),
                None => {
                    return Err(LoadError::UnsupportedDtype {
                        path: path.to_path_buf(),
                        tensor: name,
                        dtype: dtype_str.to_string(),
                    })
                }
            },
        };
        let bad_off = |reason: String| LoadError::BadOffsets {
            path: path.to_path_buf(),
            tensor: name.clone(),
            reason,
        };
        let nbits = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(bits))
            .ok_or_else(|| bad_off(format!("shape {shape:?} overflows")))?;
        if nbits % 8 != 0 {
            return Err(bad_off(format!(
                "shape {shape:?} of {dtype_str} is not a whole number of bytes"
            )));
        }
        if end < start {
            return Err(bad_off(format!("[{start}, {end}] ends before it starts")));
        }
        if end - start != nbits / 8 {
            return Err(bad_off(format!(
                "[{start}, {end}] spans {} bytes but shape {shape:?} of {dtype_str} needs {}",
                end - start,
                nbits / 8
            )));
        }
        if end > data_len {
            return Err(LoadError::Truncated {
                path: path.to_path_buf(),
                tensor: name,
                end: (data_start + end) as u64,
                file_len,
            });
        }
        tensors.push(Parsed {
            name,
            dtype,
            shape,
            start,
            end,
        });
    }

    // The byte ranges must tile the data section, as the reference reader requires (JSON order
    // does not matter; it sorts by offset too).
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| (tensors[i].start, tensors[i].end));
    let mut prev: Option<&Parsed> = None;
    for &i in &order {
        let t = &tensors[i];
        let prev_end = prev.map_or(0, |p| p.end);
        if t.start != prev_end {
            let reason = match prev {
                Some(p) if t.start < p.end => format!(
                    "[{}, {}] overlaps tensor '{}' at [{}, {}]",
                    t.start, t.end, p.name, p.start, p.end
                ),
                Some(p) => format!(
                    "[{}, {}] leaves a gap of {} bytes after tensor '{}' at [{}, {}]",
                    t.start,
                    t.end,
                    t.start - p.end,
                    p.name,
                    p.start,
                    p.end
                ),
                None => format!(
                    "[{}, {}]: the first tensor must start at 0 (gap of {} bytes)",
                    t.start, t.end, t.start
                ),
            };
            return Err(LoadError::BadOffsets {
                path: path.to_path_buf(),
                tensor: t.name.clone(),
                reason,
            });
        }
        prev = Some(t);
    }
    let covered = prev.map_or(0, |p| p.end);
    if covered != data_len {
        return Err(bad(format!(
            "{} bytes after the end of the last tensor's data (data section is {data_len} bytes, \
             tensors cover {covered})",
            data_len - covered
        )));
    }
    Ok(ParsedHeader {
        data_start,
        metadata,
        tensors,
    })
}

// ---------------------------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn f32_le(b: [u8; 4]) -> f32 {
    f32::from_le_bytes(b)
}

#[inline(always)]
fn bf16_le(b: [u8; 2]) -> f32 {
    f32::from_bits((u16::from_le_bytes(b) as u32) << 16)
}

#[inline(always)]
fn f16_le(b: [u8; 2]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes(b)).to_f32()
}

/// f32 → bf16 bits, round to nearest even, bit-identical to torch's `.bfloat16()` for every
/// non-NaN input (checked on 3M values; overflow rounds to ±inf). Every NaN becomes 0x7FC0, as
/// c10's scalar `round_to_nearest_even` does (torch's vectorized CPU path gives 0xFFFF instead).
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7FC0;
    }
    let b = x.to_bits();
    // No overflow: the largest non-NaN pattern is 0xFF80_0000.
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// Converts `bytes` (W bytes per element, `rows × cols` row-major) into `out`, optionally
/// transposed, in one pass. `out` holds the result's elements from index `first` on (a whole
/// number of output rows when transposed), so threads can share one tensor.
#[inline(always)]
fn convert<const W: usize>(
    bytes: &[u8],
    rows: usize,
    cols: usize,
    transpose: bool,
    first: usize,
    out: &mut [f32],
    f: impl Fn([u8; W]) -> f32 + Copy,
) {
    let (elems, rest) = bytes.as_chunks::<W>();
    debug_assert!(rest.is_empty() && elems.len() == rows * cols);
    if !transpose || rows <= 1 || cols <= 1 {
        for (o, &e) in out.iter_mut().zip(&elems[first..]) {
            *o = f(e);
        }
        return;
    }
    // Output row j is input column j. 64×64 tiles, inner loop along the *output* row
    // (contiguous writes, strided reads). Checkpoint dimensions are multiples of 1024, so row
    // strides are multiples of 4 KiB and alias in the cache; this order measured ~3× faster
    // than read-contiguous 32×32 tiles.
    const TILE: usize = 64;
    let j0 = first / rows;
    let j1 = j0 + out.len() / rows;
    for ib in (0..rows).step_by(TILE) {
        let ie = (ib + TILE).min(rows);
        for jb in (j0..j1).step_by(TILE) {
            let je = (jb + TILE).min(j1);
            for j in jb..je {
                let dst = &mut out[(j - j0) * rows + ib..(j - j0) * rows + ie];
                for (di, o) in dst.iter_mut().enumerate() {
                    *o = f(elems[(ib + di) * cols + j]);
                }
            }
        }
    }
}

/// Tensors with fewer elements convert on the calling thread (spawning costs more).
const PARALLEL_MIN_ELEMS: usize = 1 << 18;

/// Converts a float tensor's bytes (F32/BF16/F16) to f32, split by output rows over the
/// machine's threads for large tensors (reading the mapped file in parallel too).
fn convert_float(
    dtype: Dtype,
    bytes: &[u8],
    rows: usize,
    cols: usize,
    transpose: bool,
    out: &mut [f32],
) {
    let run = |first: usize, out: &mut [f32]| match dtype {
        Dtype::F32 => convert::<4>(bytes, rows, cols, transpose, first, out, f32_le),
        Dtype::BF16 => convert::<2>(bytes, rows, cols, transpose, first, out, bf16_le),
        Dtype::F16 => convert::<2>(bytes, rows, cols, transpose, first, out, f16_le),
        Dtype::F8E4M3 => unreachable!("FP8 goes through fp8::dequantize_blocks_into"),
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (out_rows, width) = if transpose && rows > 1 && cols > 1 {
        (cols, rows)
    } else {
        (rows * cols, 1)
    };
    if threads <= 1 || out.len() < PARALLEL_MIN_ELEMS {
        return run(0, out);
    }
    let per = out_rows.div_ceil(threads);
    std::thread::scope(|s| {
        for (i, chunk) in out.chunks_mut(per * width).enumerate() {
            s.spawn(move || run(i * per * width, chunk));
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Checkpoint
// ---------------------------------------------------------------------------------------------

struct MappedFile {
    path: PathBuf,
    map: Mmap,
    metadata: Option<BTreeMap<String, String>>,
}

/// A tensor of a dtype this crate cannot convert (e.g. I64, F64): listed so that a read names
/// the dtype instead of reporting a missing tensor.
struct OtherTensor {
    dtype: String,
    file: usize,
    nbytes: usize,
}

/// A memory-mapped safetensors checkpoint (one file or a sharded set). Opening reads only the
/// headers; tensor data is read (through the page cache) when converted.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<MappedFile>,
    tensors: BTreeMap<String, TensorInfo>,
    other: BTreeMap<String, OtherTensor>,
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field(
                "files",
                &self.files.iter().map(|m| &m.path).collect::<Vec<_>>(),
            )
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or else `dir/model.safetensors.index.json` and every shard
    /// it names (the single file wins when both exist, as in HF transformers). `dir` may also be
    /// a `.safetensors` file. Memory-maps the files and validates the headers; reads no tensor
    /// data.
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        if dir.is_file() {
            return Self::open_files(&[dir.to_path_buf()]);
        }
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            let mut ck = Self::open_files(&[single])?;
            ck.dir = dir.to_path_buf();
            return Ok(ck);
        }
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_index(dir, &index);
        }
        Err(LoadError::NoCheckpoint {
            dir: dir.to_path_buf(),
        })
    }

    fn open_index(dir: &Path, index: &Path) -> Result<Self, LoadError> {
        let bad = |reason: String| LoadError::BadIndex {
            path: index.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(index).map_err(io_err(index))?;
        let json: Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let Some(Value::Object(map)) = json.get("weight_map") else {
            return Err(bad("no \"weight_map\" object".into()));
        };
        let mut weight_map: BTreeMap<&str, &str> = BTreeMap::new();
        let mut shards: BTreeMap<&str, &str> = BTreeMap::new(); // shard -> first tensor
        for (name, v) in map {
            let Value::String(shard) = v else {
                return Err(bad(format!("weight_map entry '{name}' is not a string")));
            };
            weight_map.insert(name, shard);
            shards.entry(shard).or_insert(name);
        }
        let mut paths = Vec::with_capacity(shards.len());
        for (shard, tensor) in &shards {
            let p = dir.join(shard);
            if !p.is_file() {
                return Err(bad(format!(
                    "shard '{shard}' (holding e.g. '{tensor}') does not exist: {}",
                    p.display()
                )));
            }
            paths.push(p);
        }
        let mut ck = Self::open_files(&paths)?;
        ck.dir = dir.to_path_buf();
        for (name, shard) in weight_map {
            let file = match (ck.tensors.get(name), ck.other.get(name)) {
                (Some(t), _) => t.file,
                (None, Some(o)) => o.file,
                (None, None) => {
                    return Err(bad(format!(
                        "tensor '{name}' is mapped to shard '{shard}', which does not contain it"
                    )))
                }
            };
            if ck.files[file].path != dir.join(shard) {
                return Err(bad(format!(
                    "tensor '{name}' is mapped to shard '{shard}' but is in {}",
                    ck.files[file].path.display()
                )));
            }
        }
        Ok(ck)
    }

    /// Opens the given safetensors files as one checkpoint (a tensor name may appear in only
    /// one of them). The checkpoint's directory is the first file's parent.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self, LoadError> {
        let dir = paths
            .first()
            .and_then(|p| p.parent())
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut ck = Checkpoint {
            dir,
            files: Vec::with_capacity(paths.len()),
            tensors: BTreeMap::new(),
            other: BTreeMap::new(),
        };
        for path in paths {
            let file = File::open(path).map_err(io_err(path))?;
            let len = file.metadata().map_err(io_err(path))?.len();
            if len < 8 {
                // Also avoids mapping an empty file.
                return Err(LoadError::BadHeader {
                    path: path.clone(),
                    reason: format!(
                        "the file is {len} bytes, shorter than the 8-byte header length"
                    ),
                });
            }
            // SAFETY: the map is read-only; as with every mmap-based loader, the file must not be
            // truncated or modified by another process while the checkpoint is open.
            let map = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
            let header = parse_header(path, &map)?;
            let fi = ck.files.len();
            for t in header.tensors {
                let existing = ck
                    .tensors
                    .get(&t.name)
                    .map(|i| i.file)
                    .or_else(|| ck.other.get(&t.name).map(|o| o.file));
                if let Some(first) = existing {
                    return Err(LoadError::DuplicateTensor {
                        name: t.name,
                        first: ck.files[first].path.clone(),
                        second: path.clone(),
                    });
                }
                let (start, end) = (header.data_start + t.start, header.data_start + t.end);
                match t.dtype {
                    Ok(dtype) => {
                        ck.tensors.insert(
                            t.name,
                            TensorInfo {
                                dtype,
                                shape: t.shape,
                                file: fi,
                                start,
                                end,
                            },
                        );
                    }
                    Err(dtype) => {
                        ck.other.insert(
                            t.name,
                            OtherTensor {
                                dtype,
                                file: fi,
                                nbytes: end - start,
                            },
                        );
                    }
                }
            }
            ck.files.push(MappedFile {
                path: path.clone(),
                map,
                metadata: header.metadata,
            });
        }
        Ok(ck)
    }

    /// The checkpoint directory (for [`Checkpoint::open_files`], the first file's parent).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The paths of the mapped files, in file-index order.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|f| f.path.as_path())
    }

    /// The `__metadata__` map of file `file`, if it has one.
    pub fn file_metadata(&self, file: usize) -> Option<&BTreeMap<String, String>> {
        self.files.get(file).and_then(|f| f.metadata.as_ref())
    }

    /// Names of the readable tensors (dtype F32/BF16/F16/F8_E4M3), sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Tensors present in the files with a dtype this crate does not convert: `(name, dtype)`.
    pub fn unsupported(&self) -> impl Iterator<Item = (&str, &str)> {
        self.other
            .iter()
            .map(|(n, o)| (n.as_str(), o.dtype.as_str()))
    }

    /// Number of readable tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are no readable tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Whether `name` is a readable tensor.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Where tensor `name` lives.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The path of the file holding `info`.
    pub fn file_path(&self, info: &TensorInfo) -> &Path {
        &self.files[info.file].path
    }

    /// Sum of the data bytes of all tensors (headers excluded; unsupported dtypes included), as
    /// the index's `total_size`.
    pub fn total_bytes(&self) -> u64 {
        self.tensors
            .values()
            .map(|t| t.nbytes() as u64)
            .sum::<u64>()
            + self.other.values().map(|o| o.nbytes as u64).sum::<u64>()
    }

    fn lookup(&self, name: &str) -> Result<&TensorInfo, LoadError> {
        if let Some(t) = self.tensors.get(name) {
            return Ok(t);
        }
        if let Some(o) = self.other.get(name) {
            return Err(LoadError::UnsupportedDtype {
                path: self.files[o.file].path.clone(),
                tensor: name.to_string(),
                dtype: o.dtype.clone(),
            });
        }
        Err(LoadError::MissingTensor {
            dir: self.dir.clone(),
            name: name.to_string(),
        })
    }

    /// Raw bytes of tensor `name` (little-endian, row-major) with its info.
    pub fn raw(&self, name: &str) -> Result<(&TensorInfo, &[u8]), LoadError> {
        let info = self.lookup(name)?;
        Ok((info, &self.files[info.file].map[info.start..info.end]))
    }

    /// Reads tensor `name` converted to f32, checking that its shape equals `expected` (the
    /// error names the file, the tensor and both shapes).
    ///
    /// F32/BF16/F16 convert exactly. An F8_E4M3 tensor `X` (2-D `[M, N]`) is dequantized with
    /// `X_scale_inv` (for `foo.weight`, `foo.weight_scale_inv`): F32 (BF16/F16 accepted too)
    /// of shape `[ceil(M/fp8_block), ceil(N/fp8_block)]`, one f32 multiply per element (see
    /// [`fp8::dequantize_blocks`]). `fp8_block` is the config's
    /// `quantization_config.weight_block_size` (128 in the release); it is ignored for other
    /// dtypes.
    ///
    /// With `transpose` (2-D tensors only) the result is in `[cols, rows]` order, produced in
    /// the same pass.
    pub fn read_f32(
        &self,
        name: &str,
        expected: &[usize],
        transpose: bool,
        fp8_block: usize,
    ) -> Result<Vec<f32>, LoadError> {
        let info = self.lookup(name)?;
        self.check_shape(name, info, expected)?;
        let mut out = vec![0.0f32; info.numel()];
        self.read_into(name, info, transpose, fp8_block, &mut out)?;
        self.release(name);
        Ok(out)
    }

    /// Drops the pages of tensor `name` (and its FP8 scale) from this process's resident set.
    ///
    /// Touched pages of a file mapping count in RSS until unmapped; releasing each tensor once
    /// converted keeps peak memory at the loaded model plus one tensor instead of model + file.
    /// The mapping stays valid: a later access re-reads the pages from the file.
    pub fn release(&self, name: &str) {
        for n in [name.to_string(), format!("{name}_scale_inv")] {
            let Some(info) = self.tensors.get(&n) else {
                continue;
            };
            let map = &self.files[info.file].map;
            let page = 4096;
            let start = info.start / page * page;
            let end = info.end.div_ceil(page) * page;
            let len = end.min(map.len()) - start;
            // SAFETY: the map is a private read-only file mapping and no reference into the
            // released range is held across this call; MADV_DONTNEED on it only discards
            // clean pages, which the kernel reloads from the file on the next access.
            #[cfg(unix)]
            unsafe {
                let _ = map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len);
            }
        }
    }

    /// Like [`Checkpoint::read_f32`], into `out`, which must hold exactly `numel` values (e.g.
    /// one expert's slice of a fused `[E, ...]` buffer).
    pub fn read_f32_into(
        &self,
        name: &str,
        expected: &[usize],
        transpose: bool,
        fp8_block: usize,
        out: &mut [f32],
    ) -> Result<(), LoadError> {
        let info = self.lookup(name)?;
        self.check_shape(name, info, expected)?;
        if out.len() != info.numel() {
            return Err(LoadError::InvalidRequest {
                path: self.file_path(info).to_path_buf(),
                tensor: name.to_string(),
                reason: format!(
                    "output buffer holds {} values, the tensor has {}",
                    out.len(),
                    info.numel()
                ),
            });
        }
        self.read_into(name, info, transpose, fp8_block, out)?;
        self.release(name);
        Ok(())
    }

    fn check_shape(
        &self,
        name: &str,
        info: &TensorInfo,
        expected: &[usize],
    ) -> Result<(), LoadError> {
        if info.shape != expected {
            return Err(LoadError::WrongShape {
                path: self.file_path(info).to_path_buf(),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
        Ok(())
    }

    fn read_into(
        &self,
        name: &str,
        info: &TensorInfo,
        transpose: bool,
        fp8_block: usize,
        out: &mut [f32],
    ) -> Result<(), LoadError> {
        let path = self.file_path(info);
        if transpose && info.shape.len() != 2 {
            return Err(LoadError::InvalidRequest {
                path: path.to_path_buf(),
                tensor: name.to_string(),
                reason: format!("cannot transpose shape {:?}: not 2-D", info.shape),
            });
        }
        let (rows, cols) = match info.shape[..] {
            [r, c] => (r, c),
            _ => (1, info.numel()),
        };
        let bytes = &self.files[info.file].map[info.start..info.end];
        if info.dtype != Dtype::F8E4M3 {
            convert_float(info.dtype, bytes, rows, cols, transpose, out);
            return Ok(());
        }

        if fp8_block == 0 {
            return Err(LoadError::InvalidRequest {
                path: path.to_path_buf(),
                tensor: name.to_string(),
                reason: "FP8 block size is 0".into(),
            });
        }
        let scales = self.block_scales(name, fp8_block)?;
        fp8::dequantize_blocks_into(bytes, rows, cols, &scales, fp8_block, transpose, out).map_err(
            |e| LoadError::BadScale {
                path: path.to_path_buf(),
                tensor: name.to_string(),
                scale: format!("{name}_scale_inv"),
                reason: e.to_string(),
            },
        )
    }

    /// The block scales of FP8 weight `name` (2-D `[rows, cols]`): `{name}_scale_inv`, F32 (or
    /// BF16/F16) of shape `[ceil(rows/block), ceil(cols/block)]`, converted to f32.
    ///
    /// # Errors
    /// [`LoadError::MissingScale`] when the scale tensor is absent; [`LoadError::BadScale`] when
    /// it is FP8, 1-D (per-channel scales, another quantization scheme) or of the wrong grid.
    pub fn block_scales(&self, name: &str, block: usize) -> Result<Vec<f32>, LoadError> {
        let info = self.lookup(name)?;
        let path = self.file_path(info);
        let scale = format!("{name}_scale_inv");
        let bad_scale = |reason: String| LoadError::BadScale {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            scale: scale.clone(),
            reason,
        };
        let [rows, cols] = info.shape[..] else {
            return Err(bad_scale(format!(
                "block scales need a 2-D weight, the tensor has shape {:?}",
                info.shape
            )));
        };
        let sinfo = match self.lookup(&scale) {
            Ok(s) => s,
            Err(LoadError::MissingTensor { .. }) => {
                return Err(LoadError::MissingScale {
                    path: path.to_path_buf(),
                    tensor: name.to_string(),
                    scale,
                })
            }
            Err(e) => return Err(bad_scale(e.to_string())),
        };
        let spath = self.file_path(sinfo).display();
        if sinfo.dtype == Dtype::F8E4M3 {
            return Err(bad_scale(format!(
                "dtype is F8_E4M3 (in {spath}), expected F32"
            )));
        }
        let grid = [fp8::num_blocks(rows, block), fp8::num_blocks(cols, block)];
        if sinfo.shape.len() != 2 {
            return Err(bad_scale(format!(
                "shape {:?} (in {spath}) is not a 2-D block grid: per-channel or per-tensor FP8 \
                 scales are another quantization scheme; DeepSeek's is {block}x{block} blocks, \
                 scales of shape {grid:?} for this [{rows}, {cols}] weight",
                sinfo.shape
            )));
        }
        if sinfo.shape != grid {
            return Err(bad_scale(format!(
                "shape {:?} (in {spath}), expected {grid:?} for a [{rows}, {cols}] weight with block \
                 {block}",
                sinfo.shape
            )));
        }
        let mut scales = vec![0.0f32; sinfo.numel()];
        let sbytes = &self.files[sinfo.file].map[sinfo.start..sinfo.end];
        convert_float(sinfo.dtype, sbytes, 1, scales.len(), false, &mut scales);
        Ok(scales)
    }
}

// ---------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------

struct Declared {
    name: String,
    dtype: Dtype,
    numel: usize,
    /// Absolute file offset of the tensor's data.
    offset: u64,
    nbytes: u64,
    written: bool,
}

/// Streaming safetensors writer.
///
/// All tensors (name, dtype, shape) are declared up front; the header is written at once, then
/// each tensor's bytes as it is given. The data section is laid out by descending dtype size
/// (F32, then BF16/F16, then F8), stable in declaration order, like the reference writer, so
/// that every tensor's data is aligned to its element size in the file (what torch needs to
/// view the bytes without a copy). Tensors may therefore be written in any order (the writer
/// seeks when needed; writing in declaration order is fine); each exactly once.
///
/// The file is written to `<path>.tmp` and renamed to `<path>` by [`SafetensorsWriter::finish`];
/// a writer dropped before `finish` removes its temporary file.
pub struct SafetensorsWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    tensors: Vec<Declared>,
    by_name: HashMap<String, usize>,
    /// Current file position, `None` after an I/O error (the writer is then unusable).
    pos: Option<u64>,
    buf: Vec<u8>,
}

impl fmt::Debug for SafetensorsWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafetensorsWriter")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .field(
                "written",
                &self.tensors.iter().filter(|t| t.written).count(),
            )
            .finish()
    }
}

/// Elements converted per `write` call.
const WRITE_CHUNK: usize = 1 << 16;

impl SafetensorsWriter {
    /// Creates `<path>.tmp` and writes the header for `tensors` (name, dtype, shape).
    ///
    /// `metadata` becomes the header's `__metadata__`; `"format": "pt"` is added when absent
    /// (HF transformers refuses safetensors files whose metadata lacks a known format).
    pub fn create(
        path: &Path,
        tensors: &[(String, Dtype, Vec<usize>)],
        metadata: Option<BTreeMap<String, String>>,
    ) -> Result<Self, LoadError> {
        let werr = |reason: String| LoadError::Writer {
            path: path.to_path_buf(),
            reason,
        };
        let Some(fname) = path.file_name() else {
            return Err(werr("the path has no file name".into()));
        };
        let mut tmp_name = fname.to_os_string();
        tmp_name.push(".tmp");
        let tmp = path.with_file_name(tmp_name);

        let mut by_name = HashMap::with_capacity(tensors.len());
        for (i, (name, _, _)) in tensors.iter().enumerate() {
            if name.is_empty() || name == "__metadata__" {
                return Err(werr(format!("invalid tensor name '{name}'")));
            }
            if by_name.insert(name.clone(), i).is_some() {
                return Err(werr(format!("tensor '{name}' is declared twice")));
            }
        }
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(tensors[i].1.size()));

        let mut meta = metadata.unwrap_or_default();
        meta.entry("format".into()).or_insert_with(|| "pt".into());
        let mut header = String::with_capacity(64 + 96 * tensors.len());
        header.push_str("{\"__metadata__\":");
        header.push_str(&serde_json::to_string(&meta).expect("string map serializes"));
        let mut rel = 0usize;
        let mut rel_offsets = vec![0usize; tensors.len()];
        for &i in &order {
            let (name, dtype, shape) = &tensors[i];
            let numel = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .and_then(|n| n.checked_mul(dtype.size()))
                .ok_or_else(|| werr(format!("tensor '{name}': shape {shape:?} overflows")))?;
            rel_offsets[i] = rel;
            let end = rel + numel;
            header.push(',');
            header.push_str(&serde_json::to_string(name).expect("string serializes"));
            header.push_str(&format!(
                ":{{\"dtype\":\"{}\",\"shape\":{},\"data_offsets\":[{rel},{end}]}}",
                dtype.as_str(),
                serde_json::to_string(shape).expect("shape serializes"),
            ));
            rel = end;
        }
        header.push('}');
        while !header.len().is_multiple_of(8) {
            header.push(' ');
        }
        if header.len() as u64 > MAX_HEADER_LEN {
            return Err(werr(format!(
                "header of {} bytes exceeds the {MAX_HEADER_LEN}-byte limit",
                header.len()
            )));
        }
        let data_start = 8 + header.len() as u64;
        let declared = tensors
            .iter()
            .zip(&rel_offsets)
            .map(|((name, dtype, shape), &off)| {
                let numel: usize = shape.iter().product();
                Declared {
                    name: name.clone(),
                    dtype: *dtype,
                    numel,
                    offset: data_start + off as u64,
                    nbytes: (numel * dtype.size()) as u64,
                    written: false,
                }
            })
            .collect();

        let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
        let mut w = SafetensorsWriter {
            path: path.to_path_buf(),
            tmp,
            file: None,
            tensors: declared,
            by_name,
            pos: Some(0),
            buf: Vec::new(),
        };
        // From here on, dropping `w` removes the temporary file.
        let res = file
            .write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|_| file.write_all(header.as_bytes()));
        w.file = Some(file);
        res.map_err(io_err(&w.tmp))?;
        w.pos = Some(data_start);
        Ok(w)
    }

    /// Final path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sum of the declared tensors' data bytes (for the index's `total_size`).
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.nbytes).sum()
    }

    fn werr(&self, reason: String) -> LoadError {
        LoadError::Writer {
            path: self.path.clone(),
            reason,
        }
    }

    /// Finds a declared, not yet written tensor and positions the file at its offset.
    fn begin(&mut self, name: &str) -> Result<usize, LoadError> {
        let Some(&i) = self.by_name.get(name) else {
            return Err(self.werr(format!("tensor '{name}' was not declared")));
        };
        if self.tensors[i].written {
            return Err(self.werr(format!("tensor '{name}' written twice")));
        }
        let Some(pos) = self.pos else {
            return Err(self.werr("the writer failed earlier".into()));
        };
        let offset = self.tensors[i].offset;
        if pos != offset {
            self.pos = None;
            let file = self.file.as_mut().expect("file open until finish");
            file.seek(SeekFrom::Start(offset))
                .map_err(io_err(&self.tmp))?;
            self.pos = Some(offset);
        }
        Ok(i)
    }

    /// Writes tensor `name` from f32 values, converted to its declared dtype (F32 as is, BF16
    /// and F16 rounded to nearest even, bit-identical to torch's `.to()` except for NaN payloads, see
    /// [`f32_to_bf16`]). F8_E4M3 tensors must be written
    /// with [`SafetensorsWriter::write_raw`] (quantize with [`fp8::quantize_blocks`] and write
    /// the scale grid as its own F32 tensor).
    pub fn write_f32(&mut self, name: &str, data: &[f32]) -> Result<(), LoadError> {
        let i = self.begin(name)?;
        let (dtype, numel) = (self.tensors[i].dtype, self.tensors[i].numel);
        if data.len() != numel {
            return Err(self.werr(format!(
                "tensor '{name}': got {} values, declared shape has {numel}",
                data.len()
            )));
        }
        if dtype == Dtype::F8E4M3 {
            return Err(self.werr(format!(
                "tensor '{name}' is declared F8_E4M3: quantize it (fp8::quantize_blocks) and use \
                 write_raw"
            )));
        }
        let nbytes = self.tensors[i].nbytes;
        // Poisoned (None) until the whole tensor is written.
        let pos = self.pos.take();
        let file = self.file.as_mut().expect("file open until finish");
        let buf = &mut self.buf;
        for chunk in data.chunks(WRITE_CHUNK) {
            buf.clear();
            match dtype {
                Dtype::F32 => buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes())),
                Dtype::BF16 => buf.extend(chunk.iter().flat_map(|&x| f32_to_bf16(x).to_le_bytes())),
                Dtype::F16 => buf.extend(
                    chunk
                        .iter()
                        .flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes()),
                ),
                Dtype::F8E4M3 => unreachable!("rejected above"),
            }
            file.write_all(buf).map_err(io_err(&self.tmp))?;
        }
        self.pos = pos.map(|p| p + nbytes);
        self.tensors[i].written = true;
        Ok(())
    }

    /// Writes tensor `name` from its raw little-endian bytes (exactly numel × dtype size).
    pub fn write_raw(&mut self, name: &str, bytes: &[u8]) -> Result<(), LoadError> {
        let i = self.begin(name)?;
        if bytes.len() as u64 != self.tensors[i].nbytes {
            return Err(self.werr(format!(
                "tensor '{name}': got {} bytes, declared {} {:?} needs {}",
                bytes.len(),
                self.tensors[i].dtype,
                self.tensors[i].numel,
                self.tensors[i].nbytes
            )));
        }
        let pos = self.pos.take();
        let file = self.file.as_mut().expect("file open until finish");
        file.write_all(bytes).map_err(io_err(&self.tmp))?;
        self.pos = pos.map(|p| p + bytes.len() as u64);
        self.tensors[i].written = true;
        Ok(())
    }

    /// Checks that every declared tensor was written, fsyncs the file, and renames it from
    /// `<path>.tmp` to `<path>`.
    pub fn finish(mut self) -> Result<(), LoadError> {
        let missing: Vec<String> = self
            .tensors
            .iter()
            .filter(|t| !t.written)
            .map(|t| t.name.clone())
            .collect();
        if !missing.is_empty() {
            return Err(self.werr(format!(
                "{} declared tensor(s) never written: {}",
                missing.len(),
                list_names(&missing)
            )));
        }
        let file = self.file.take().expect("file open until finish");
        file.sync_all().map_err(io_err(&self.tmp))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(io_err(&self.path))?;
        sync_parent(&self.path);
        Ok(())
    }
}

impl Drop for SafetensorsWriter {
    fn drop(&mut self) {
        // Unfinished (or failed) writer: remove the partial file.
        self.file = None;
        if self.tmp.exists() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Best-effort fsync of a file's directory so that a rename survives a crash.
fn sync_parent(path: &Path) {
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// Writes `dir/model.safetensors.index.json` (`{"metadata": {"total_size": N}, "weight_map":
/// {tensor: shard file name}}`, keys sorted, 2-space indent, as HF writes it), atomically.
pub fn write_index(
    dir: &Path,
    weight_map: &BTreeMap<String, String>,
    total_size: u64,
) -> Result<(), LoadError> {
    let path = dir.join(INDEX_FILE);
    let tmp = dir.join(format!("{INDEX_FILE}.tmp"));
    let json = serde_json::json!({
        "metadata": { "total_size": total_size },
        "weight_map": weight_map,
    });
    let mut text = serde_json::to_string_pretty(&json).expect("index serializes");
    text.push('\n');
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(&tmp)(e));
    }
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_parent(&path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The threaded conversion (tensors above `PARALLEL_MIN_ELEMS`, split by output rows) gives
    /// exactly the element-by-element result, plain and transposed, for odd shapes whose row
    /// count does not divide by the thread count.
    #[test]
    fn threaded_conversion_is_exact() {
        let (rows, cols) = (701, 523);
        assert!(rows * cols > PARALLEL_MIN_ELEMS);
        let vals: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 10007) as f32 - 5000.0) / 64.0)
            .collect();
        let bf: Vec<u8> = vals
            .iter()
            .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        let f: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        for (dtype, bytes) in [(Dtype::BF16, &bf), (Dtype::F32, &f)] {
            for transpose in [false, true] {
                let mut out = vec![f32::NAN; rows * cols];
                convert_float(dtype, bytes, rows, cols, transpose, &mut out);
                for i in 0..rows {
                    for j in 0..cols {
                        let want = match dtype {
                            Dtype::BF16 => {
                                f32::from_bits(vals[i * cols + j].to_bits() & 0xFFFF_0000)
                            }
                            _ => vals[i * cols + j],
                        };
                        let at = if transpose {
                            j * rows + i
                        } else {
                            i * cols + j
                        };
                        assert_eq!(
                            out[at].to_bits(),
                            want.to_bits(),
                            "{dtype:?} {transpose} ({i},{j})"
                        );
                    }
                }
            }
        }
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "dsv3-ckpt-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    fn randn(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| ((rng(&mut s) >> 11) as f64 / (1u64 << 53) as f64 * 8.0 - 4.0) as f32)
            .collect()
    }

    fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut t = vec![0.0; x.len()];
        for i in 0..rows {
            for j in 0..cols {
                t[j * rows + i] = x[i * cols + j];
            }
        }
        t
    }

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    /// Writes a file with a hand-made header (no padding added) and data.
    fn raw_file(path: &Path, header: &str, data: &[u8]) {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend_from_slice(data);
        std::fs::write(path, b).unwrap();
    }

    fn open_err(path: &Path) -> LoadError {
        Checkpoint::open_files(&[path.to_path_buf()]).unwrap_err()
    }

    fn assert_names(err: &LoadError, parts: &[&str]) {
        let msg = err.to_string();
        assert!(!msg.contains('\n'), "one line: {msg}");
        for p in parts {
            assert!(msg.contains(p), "message {msg:?} should contain {p:?}");
        }
    }

    /// The standard test file: one tensor of each dtype, plus an FP8 weight with partial blocks
    /// and its scale.
    struct Sample {
        f32_: Vec<f32>,
        bf16: Vec<f32>,
        f16: Vec<f32>,
        w: Vec<f32>,
        codes: Vec<u8>,
        scales: Vec<f32>,
    }

    const W_SHAPE: [usize; 2] = [300, 200];

    fn write_sample(path: &Path) -> Sample {
        let s = Sample {
            f32_: randn(6 * 7, 1),
            bf16: randn(5 * 9, 2),
            f16: randn(11, 3),
            w: randn(300 * 200, 4),
            codes: vec![],
            scales: vec![],
        };
        let (codes, scales) = fp8::quantize_blocks(&s.w, 300, 200, 128);
        let decl = vec![
            ("a.f16".to_string(), Dtype::F16, vec![11]),
            (
                "layer.proj.weight".to_string(),
                Dtype::F8E4M3,
                W_SHAPE.to_vec(),
            ),
            ("b.bf16".to_string(), Dtype::BF16, vec![5, 9]),
            (
                "layer.proj.weight_scale_inv".to_string(),
                Dtype::F32,
                vec![3, 2],
            ),
            ("c.f32".to_string(), Dtype::F32, vec![6, 7]),
        ];
        let mut w = SafetensorsWriter::create(path, &decl, None).unwrap();
        w.write_f32("a.f16", &s.f16).unwrap();
        w.write_raw("layer.proj.weight", &codes).unwrap();
        w.write_f32("b.bf16", &s.bf16).unwrap();
        w.write_f32("layer.proj.weight_scale_inv", &scales).unwrap();
        w.write_f32("c.f32", &s.f32_).unwrap();
        w.finish().unwrap();
        Sample { codes, scales, ..s }
    }

    #[test]
    fn round_trip_all_dtypes() {
        let d = TempDir::new("rt");
        let path = d.path("model.safetensors");
        let s = write_sample(&path);
        assert!(!d.path("model.safetensors.tmp").exists());
        let ck = Checkpoint::open(&d.0).unwrap();
        assert_eq!(ck.len(), 5);
        assert_eq!(ck.dir(), d.0.as_path());
        assert_eq!(ck.file_metadata(0).unwrap()["format"], "pt");

        let f = ck.read_f32("c.f32", &[6, 7], false, 128).unwrap();
        assert_eq!(bits(&f), bits(&s.f32_));
        let b = ck.read_f32("b.bf16", &[5, 9], false, 128).unwrap();
        let want: Vec<f32> = s
            .bf16
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect();
        assert_eq!(bits(&b), bits(&want));
        assert_ne!(bits(&b), bits(&s.bf16)); // really rounded
        let h = ck.read_f32("a.f16", &[11], false, 128).unwrap();
        let want: Vec<f32> = s
            .f16
            .iter()
            .map(|&x| half::f16::from_f32(x).to_f32())
            .collect();
        assert_eq!(bits(&h), bits(&want));
        let w = ck
            .read_f32("layer.proj.weight", &W_SHAPE, false, 128)
            .unwrap();
        let want = fp8::dequantize_blocks(&s.codes, 300, 200, &s.scales, 128, false).unwrap();
        assert_eq!(bits(&w), bits(&want));
        for (x, y) in w.iter().zip(&s.w) {
            assert!((x - y).abs() <= y.abs() / 16.0 + 4.0 / 448.0 / 512.0);
        }

        // Raw bytes and the info.
        let (info, raw) = ck.raw("layer.proj.weight").unwrap();
        assert_eq!(raw, &s.codes[..]);
        assert_eq!(
            (info.dtype, info.numel(), info.nbytes()),
            (Dtype::F8E4M3, 60000, 60000)
        );
        assert_eq!(ck.file_path(info), path.as_path());
        let (_, raw) = ck.raw("c.f32").unwrap();
        assert_eq!(
            raw,
            s.f32_
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<_>>()
        );
        assert_eq!(ck.total_bytes(), 11 * 2 + 60000 + 45 * 2 + 6 * 4 + 42 * 4);

        // Layout: header padded to 8, data aligned to the element size, sorted by offset.
        let bytes = std::fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        let mut infos: Vec<_> = ck.names().map(|nm| ck.info(nm).unwrap()).collect();
        infos.sort_by_key(|i| i.start);
        assert_eq!(infos[0].start, 8 + n);
        for w in infos.windows(2) {
            assert_eq!(w[0].end, w[1].start);
            assert!(w[0].dtype.size() >= w[1].dtype.size());
        }
        for i in &infos {
            assert_eq!((i.start - 8 - n) % i.dtype.size(), 0);
        }
        assert_eq!(infos.last().unwrap().end, bytes.len());
    }

    #[test]
    fn bf16_rounding_matches_half() {
        let mut xs = vec![
            0.0f32,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        // Exact ties between two bf16 values (round to even) and their neighbours.
        for b in [
            0x3F80_8000u32,
            0x3F81_8000,
            0x0000_8000,
            0x7F7F_8000,
            0x8001_8000,
        ] {
            let x = f32::from_bits(b);
            xs.extend([x, x.next_up(), x.next_down()]);
        }
        let mut b = 0u32;
        while b < u32::MAX - 65_521 {
            xs.push(f32::from_bits(b));
            b += 65_521;
        }
        for x in xs {
            if x.is_nan() {
                assert_eq!(f32_to_bf16(x), 0x7FC0);
            } else {
                assert_eq!(f32_to_bf16(x), half::bf16::from_f32(x).to_bits(), "{x:e}");
            }
        }
    }

    #[test]
    fn transpose_all_dtypes() {
        let d = TempDir::new("tr");
        let s = write_sample(&d.path("model.safetensors"));
        let ck = Checkpoint::open(&d.0).unwrap();
        for (name, shape) in [
            ("c.f32", [6, 7]),
            ("b.bf16", [5, 9]),
            ("layer.proj.weight", W_SHAPE),
        ] {
            let plain = ck.read_f32(name, &shape, false, 128).unwrap();
            let t = ck.read_f32(name, &shape, true, 128).unwrap();
            assert_eq!(
                bits(&t),
                bits(&transpose(&plain, shape[0], shape[1])),
                "{name}"
            );
        }
        assert_eq!(s.f32_.len(), 42);
        // A 1-D tensor cannot be transposed.
        let e = ck.read_f32("a.f16", &[11], true, 128).unwrap_err();
        assert!(matches!(e, LoadError::InvalidRequest { .. }), "{e}");
        assert_names(&e, &["a.f16", "model.safetensors", "2-D"]);
        // read_f32_into a slice of a larger buffer.
        let mut buf = vec![0.0f32; 84];
        ck.read_f32_into("c.f32", &[6, 7], true, 128, &mut buf[42..])
            .unwrap();
        assert_eq!(bits(&buf[42..]), bits(&transpose(&s.f32_, 6, 7)));
        let e = ck
            .read_f32_into("c.f32", &[6, 7], true, 128, &mut buf)
            .unwrap_err();
        assert!(matches!(e, LoadError::InvalidRequest { .. }), "{e}");
    }

    #[test]
    fn sharded_index_two_shards() {
        let d = TempDir::new("shard");
        let x = randn(4 * 3, 7);
        let y = randn(130 * 260, 8);
        let (yc, ys) = fp8::quantize_blocks(&y, 130, 260, 128);
        let mut w1 = SafetensorsWriter::create(
            &d.path("model-00001-of-00002.safetensors"),
            &[
                ("x".into(), Dtype::BF16, vec![4, 3]),
                ("y.weight".into(), Dtype::F8E4M3, vec![130, 260]),
            ],
            None,
        )
        .unwrap();
        w1.write_f32("x", &x).unwrap();
        w1.write_raw("y.weight", &yc).unwrap();
        let size1 = w1.data_bytes();
        w1.finish().unwrap();
        // The scale lives in the other shard (allowed: lookup is by name across files).
        let mut w2 = SafetensorsWriter::create(
            &d.path("model-00002-of-00002.safetensors"),
            &[("y.weight_scale_inv".into(), Dtype::F32, vec![2, 3])],
            Some(BTreeMap::from([("note".to_string(), "hi".to_string())])),
        )
        .unwrap();
        w2.write_f32("y.weight_scale_inv", &ys).unwrap();
        let size2 = w2.data_bytes();
        w2.finish().unwrap();
        let map: BTreeMap<String, String> = [
            ("x", "model-00001-of-00002.safetensors"),
            ("y.weight", "model-00001-of-00002.safetensors"),
            ("y.weight_scale_inv", "model-00002-of-00002.safetensors"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        write_index(&d.0, &map, size1 + size2).unwrap();

        let ck = Checkpoint::open(&d.0).unwrap();
        assert_eq!(
            ck.names().collect::<Vec<_>>(),
            ["x", "y.weight", "y.weight_scale_inv"]
        );
        assert_eq!(ck.total_bytes(), size1 + size2);
        assert_eq!(ck.files().count(), 2);
        let yi = ck.info("y.weight_scale_inv").unwrap();
        assert!(ck
            .file_path(yi)
            .ends_with("model-00002-of-00002.safetensors"));
        assert_eq!(ck.file_metadata(yi.file).unwrap()["note"], "hi");
        let got = ck.read_f32("y.weight", &[130, 260], true, 128).unwrap();
        let want = fp8::dequantize_blocks(&yc, 130, 260, &ys, 128, true).unwrap();
        assert_eq!(bits(&got), bits(&want));
        let got = ck.read_f32("x", &[4, 3], false, 128).unwrap();
        let want: Vec<f32> = x
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        assert_eq!(bits(&got), bits(&want));
        let idx: Value =
            serde_json::from_str(&std::fs::read_to_string(d.path(INDEX_FILE)).unwrap()).unwrap();
        assert_eq!(idx["metadata"]["total_size"], size1 + size2);

        // An index that maps a tensor to the wrong shard, or names a missing shard.
        let mut bad = map.clone();
        bad.insert("x".into(), "model-00002-of-00002.safetensors".into());
        write_index(&d.0, &bad, 0).unwrap();
        let e = Checkpoint::open(&d.0).unwrap_err();
        assert!(matches!(e, LoadError::BadIndex { .. }), "{e}");
        assert_names(&e, &[INDEX_FILE, "'x'", "model-00002-of-00002"]);
        bad.insert("x".into(), "model-00003-of-00002.safetensors".into());
        write_index(&d.0, &bad, 0).unwrap();
        let e = Checkpoint::open(&d.0).unwrap_err();
        assert!(matches!(e, LoadError::BadIndex { .. }), "{e}");
        assert_names(
            &e,
            &[
                INDEX_FILE,
                "model-00003-of-00002.safetensors",
                "does not exist",
            ],
        );
        std::fs::write(d.path(INDEX_FILE), "{\"weight_map\": [").unwrap();
        let e = Checkpoint::open(&d.0).unwrap_err();
        assert!(matches!(e, LoadError::BadIndex { .. }), "{e}");
        assert_names(&e, &[INDEX_FILE, "JSON"]);
    }

    #[test]
    fn missing_file_and_missing_checkpoint() {
        let d = TempDir::new("missing");
        let e = Checkpoint::open(&d.0).unwrap_err();
        assert!(matches!(e, LoadError::NoCheckpoint { .. }), "{e}");
        assert_names(&e, &[d.0.to_str().unwrap(), SINGLE_FILE, INDEX_FILE]);
        let p = d.path("nope.safetensors");
        let e = open_err(&p);
        assert!(
            matches!(&e, LoadError::Io { path, source } if path == &p
                && source.kind() == std::io::ErrorKind::NotFound),
            "{e}"
        );
        assert_names(&e, &["nope.safetensors"]);
        // A file path works with `open` too.
        write_sample(&d.path("other.safetensors"));
        let ck = Checkpoint::open(&d.path("other.safetensors")).unwrap();
        assert!(ck.contains("c.f32") && !ck.is_empty());
    }

    #[test]
    fn header_length_beyond_file() {
        let d = TempDir::new("hlen");
        let p = d.path("m.safetensors");
        let mut b = 1000u64.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}      ");
        std::fs::write(&p, &b).unwrap();
        let e = open_err(&p);
        assert!(matches!(e, LoadError::BadHeader { .. }), "{e}");
        assert_names(&e, &["m.safetensors", "1000", "16 bytes"]);
        // Shorter than the length prefix.
        std::fs::write(&p, [1u8, 2, 3]).unwrap();
        let e = open_err(&p);
        assert!(matches!(e, LoadError::BadHeader { .. }), "{e}");
        assert_names(&e, &["m.safetensors", "3 bytes"]);
        // Absurd header length.
        std::fs::write(&p, u64::MAX.to_le_bytes()).unwrap();
        assert!(matches!(open_err(&p), LoadError::BadHeader { .. }));
    }

    #[test]
    fn invalid_json_header() {
        let d = TempDir::new("json");
        let p = d.path("m.safetensors");
        raw_file(&p, "{\"a\": {\"dtype\": \"F32\", ", &[]);
        let e = open_err(&p);
        assert!(matches!(e, LoadError::BadHeader { .. }), "{e}");
        assert_names(&e, &["m.safetensors", "JSON"]);
        raw_file(&p, "[1, 2]", &[]);
        assert!(matches!(open_err(&p), LoadError::BadHeader { .. }));
        let mut b = 4u64.to_le_bytes().to_vec();
        b.extend_from_slice(&[0x7B, 0xFF, 0xFE, 0x7D]);
        std::fs::write(&p, &b).unwrap();
        let e = open_err(&p);
        assert!(matches!(e, LoadError::BadHeader { .. }), "{e}");
        assert_names(&e, &["UTF-8"]);
        // Structurally wrong entries.
        raw_file(
            &p,
            r#"{"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}"#,
            &[0; 4],
        );
        let e = open_err(&p);
        assert!(matches!(e, LoadError::BadHeader { .. }), "{e}");
        assert_names(&e, &["'t'", "shape"]);
        raw_file(&p, r#"{"t": {"dtype": "F32", "shape": [1]}}"#, &[0; 4]);
        assert_names(&open_err(&p), &["'t'", "data_offsets"]);
        raw_file(
            &p,
            r#"{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}"#,
            &[0; 4],
        );
        assert_names(&open_err(&p), &["'t'", "twice"]);
    }

    #[test]
    fn truncated_data() {
        let d = TempDir::new("trunc");
        let p = d.path("m.safetensors");
        write_sample(&p);
        let len = std::fs::metadata(&p).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(len - 10).unwrap();
        drop(f);
        let e = open_err(&p);
        // The last tensor in the file is the FP8 weight (1-byte dtype goes last).
        assert!(
            matches!(&e, LoadError::Truncated { tensor, end, file_len, .. }
                if tensor == "layer.proj.weight" && *end == len && *file_len == len - 10),
            "{e}"
        );
        assert_names(&e, &["m.safetensors", "layer.proj.weight", "truncated"]);
    }

    #[test]
    fn offsets_that_lie_about_length() {
        let d = TempDir::new("lie");
        let p = d.path("m.safetensors");
        raw_file(
            &p,
            r#"{"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 8]}}"#,
            &[0; 8],
        );
        let e = open_err(&p);
        assert!(
            matches!(&e, LoadError::BadOffsets { tensor, .. } if tensor == "w"),
            "{e}"
        );
        assert_names(&e, &["m.safetensors", "'w'", "8 bytes", "needs 12"]);
        // end before start
        raw_file(
            &p,
            r#"{"w": {"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}}"#,
            &[0; 4],
        );
        assert!(matches!(open_err(&p), LoadError::BadOffsets { .. }));
    }

    #[test]
    fn overlapping_and_gapped_offsets() {
        let d = TempDir::new("overlap");
        let p = d.path("m.safetensors");
        raw_file(
            &p,
            r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}"#,
            &[0; 12],
        );
        let e = open_err(&p);
        assert!(
            matches!(&e, LoadError::BadOffsets { tensor, .. } if tensor == "b"),
            "{e}"
        );
        assert_names(&e, &["m.safetensors", "'b'", "overlaps", "'a'"]);
        raw_file(
            &p,
            r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}"#,
            &[0; 16],
        );
        let e = open_err(&p);
        assert!(
            matches!(&e, LoadError::BadOffsets { tensor, .. } if tensor == "b"),
            "{e}"
        );
        assert_names(&e, &["gap"]);
        // JSON order does not matter, only the byte ranges.
        raw_file(
            &p,
            r#"{"b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}"#,
            &[0; 12],
        );
        assert_eq!(
            Checkpoint::open_files(std::slice::from_ref(&p))
                .unwrap()
                .len(),
            2
        );
        // Trailing bytes after the last tensor.
        raw_file(
            &p,
            r#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}"#,
            &[0; 6],
        );
        let e = open_err(&p);
        assert!(matches!(e, LoadError::BadHeader { .. }), "{e}");
        assert_names(&e, &["2 bytes after"]);
    }

    #[test]
    fn unsupported_dtypes() {
        let d = TempDir::new("dtype");
        let p = d.path("m.safetensors");
        // A safetensors dtype we do not convert: the file opens, reading it names the dtype.
        raw_file(
            &p,
            r#"{"ids": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}, "q": {"dtype": "I8", "shape": [3], "data_offsets": [16, 19]}, "f": {"dtype": "F32", "shape": [1], "data_offsets": [20, 24]}, "g": {"dtype": "F64", "shape": [0], "data_offsets": [19, 19]}, "h": {"dtype": "BOOL", "shape": [1], "data_offsets": [19, 20]}}"#,
            &[0; 24],
        );
        let ck = Checkpoint::open_files(std::slice::from_ref(&p)).unwrap();
        assert_eq!(ck.names().collect::<Vec<_>>(), ["f"]);
        assert_eq!(
            ck.unsupported().collect::<Vec<_>>(),
            [("g", "F64"), ("h", "BOOL"), ("ids", "I64"), ("q", "I8")]
        );
        assert_eq!(ck.total_bytes(), 24);
        let e = ck.read_f32("q", &[3], false, 128).unwrap_err();
        assert!(
            matches!(&e, LoadError::UnsupportedDtype { tensor, dtype, .. } if tensor == "q" && dtype == "I8"),
            "{e}"
        );
        assert_names(&e, &["m.safetensors", "'q'", "I8"]);
        assert!(matches!(
            ck.raw("ids").unwrap_err(),
            LoadError::UnsupportedDtype { .. }
        ));
        // A dtype safetensors does not define fails at open.
        raw_file(
            &p,
            r#"{"w": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 2]}}"#,
            &[0; 2],
        );
        let e = open_err(&p);
        assert!(matches!(e, LoadError::UnsupportedDtype { .. }), "{e}");
        assert_names(&e, &["m.safetensors", "'w'", "Q4_K"]);
    }

    #[test]
    fn wrong_shape_and_missing_tensor() {
        let d = TempDir::new("shape");
        write_sample(&d.path("model.safetensors"));
        let ck = Checkpoint::open(&d.0).unwrap();
        let e = ck.read_f32("c.f32", &[7, 6], false, 128).unwrap_err();
        assert!(
            matches!(&e, LoadError::WrongShape { expected, found, .. } if expected == &[7, 6] && found == &[6, 7]),
            "{e}"
        );
        assert_names(&e, &["model.safetensors", "'c.f32'", "[6, 7]", "[7, 6]"]);
        let e = ck.read_f32("nope", &[1], false, 128).unwrap_err();
        assert!(matches!(e, LoadError::MissingTensor { .. }), "{e}");
        assert_names(&e, &["'nope'"]);
    }

    #[test]
    fn missing_and_bad_scale() {
        let d = TempDir::new("scale");
        let p = d.path("model.safetensors");
        let codes = vec![0x38u8; 130 * 4];
        let mut w = SafetensorsWriter::create(
            &p,
            &[
                ("m.weight".into(), Dtype::F8E4M3, vec![130, 4]),
                ("n.weight".into(), Dtype::F8E4M3, vec![130, 4]),
                ("n.weight_scale_inv".into(), Dtype::F32, vec![1, 1]),
                ("o.weight".into(), Dtype::F8E4M3, vec![130, 4]),
                ("o.weight_scale_inv".into(), Dtype::BF16, vec![2, 1]),
            ],
            None,
        )
        .unwrap();
        w.write_raw("m.weight", &codes).unwrap();
        w.write_raw("n.weight", &codes).unwrap();
        w.write_f32("n.weight_scale_inv", &[0.5]).unwrap();
        w.write_raw("o.weight", &codes).unwrap();
        w.write_f32("o.weight_scale_inv", &[0.5, 2.0]).unwrap();
        w.finish().unwrap();
        let ck = Checkpoint::open(&d.0).unwrap();
        let e = ck.read_f32("m.weight", &[130, 4], false, 128).unwrap_err();
        assert!(
            matches!(&e, LoadError::MissingScale { tensor, scale, .. } if tensor == "m.weight" && scale == "m.weight_scale_inv"),
            "{e}"
        );
        assert_names(
            &e,
            &["model.safetensors", "'m.weight'", "'m.weight_scale_inv'"],
        );
        let e = ck.read_f32("n.weight", &[130, 4], false, 128).unwrap_err();
        assert!(matches!(e, LoadError::BadScale { .. }), "{e}");
        assert_names(
            &e,
            &["'n.weight'", "'n.weight_scale_inv'", "[1, 1]", "[2, 1]"],
        );
        // BF16 scales are accepted; the row blocks get 0.5 and 2.0.
        let o = ck.read_f32("o.weight", &[130, 4], false, 128).unwrap();
        assert_eq!(
            (o[0], o[127 * 4], o[128 * 4], o[129 * 4 + 3]),
            (0.5, 0.5, 2.0, 2.0)
        );
        // The block size comes from the caller: with 256 the grid is [1, 1] and n reads fine.
        let n = ck.read_f32("n.weight", &[130, 4], false, 256).unwrap();
        assert!(n.iter().all(|&x| x == 0.5));
    }

    #[test]
    fn duplicate_across_shards() {
        let d = TempDir::new("dup");
        for f in ["a.safetensors", "b.safetensors"] {
            let mut w = SafetensorsWriter::create(
                &d.path(f),
                &[
                    ("t".into(), Dtype::F32, vec![1]),
                    (f.into(), Dtype::F32, vec![1]),
                ],
                None,
            )
            .unwrap();
            w.write_f32("t", &[1.0]).unwrap();
            w.write_f32(f, &[2.0]).unwrap();
            w.finish().unwrap();
        }
        let e = Checkpoint::open_files(&[d.path("a.safetensors"), d.path("b.safetensors")])
            .unwrap_err();
        assert!(
            matches!(&e, LoadError::DuplicateTensor { name, first, second }
                if name == "t" && first.ends_with("a.safetensors") && second.ends_with("b.safetensors")),
            "{e}"
        );
        assert_names(&e, &["'t'", "a.safetensors", "b.safetensors"]);
    }

    #[test]
    fn writer_misuse() {
        let d = TempDir::new("writer");
        let p = d.path("w.safetensors");
        let tmp = d.path("w.safetensors.tmp");
        let decl = vec![
            ("a".to_string(), Dtype::F32, vec![2]),
            ("b".to_string(), Dtype::F8E4M3, vec![3]),
        ];
        let dup = vec![decl[0].clone(), decl[0].clone()];
        assert!(matches!(
            SafetensorsWriter::create(&p, &dup, None).unwrap_err(),
            LoadError::Writer { .. }
        ));
        let mut w = SafetensorsWriter::create(&p, &decl, None).unwrap();
        assert!(tmp.exists());
        let e = w.write_f32("zz", &[1.0]).unwrap_err();
        assert_names(&e, &["w.safetensors", "'zz'", "not declared"]);
        let e = w.write_f32("a", &[1.0]).unwrap_err();
        assert_names(&e, &["'a'", "1 values", "2"]);
        let e = w.write_f32("b", &[1.0; 3]).unwrap_err();
        assert_names(&e, &["'b'", "write_raw"]);
        let e = w.write_raw("b", &[0; 4]).unwrap_err();
        assert_names(&e, &["'b'", "4 bytes"]);
        w.write_raw("b", &[0x38; 3]).unwrap();
        let e = w.write_raw("b", &[0x38; 3]).unwrap_err();
        assert_names(&e, &["'b'", "twice"]);
        let e = w.finish().unwrap_err();
        assert!(matches!(e, LoadError::Writer { .. }), "{e}");
        assert_names(&e, &["w.safetensors", "never written", "'a'"]);
        assert!(
            !tmp.exists() && !p.exists(),
            "failed writer leaves nothing behind"
        );
        // Dropped without finish: nothing left either.
        let w = SafetensorsWriter::create(&p, &decl, None).unwrap();
        drop(w);
        assert!(!tmp.exists() && !p.exists());
        // Empty file (no tensors) is valid.
        SafetensorsWriter::create(&p, &[], None)
            .unwrap()
            .finish()
            .unwrap();
        let ck = Checkpoint::open_files(&[p]).unwrap();
        assert!(ck.is_empty());
    }
}
