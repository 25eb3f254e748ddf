//! Reading and writing Hugging Face safetensors checkpoints, streaming (spec §7, §8).
//!
//! The file format is the `safetensors` crate's: [`Checkpoint`] memory-maps `model.safetensors`
//! or every shard named by `model.safetensors.index.json` and validates each header at open
//! time with [`SafeTensors::read_metadata`]; [`write_safetensors`] writes through
//! [`safetensors::serialize_to_file`]. What is this project's own: resolving tensor names
//! across shards, converting one tensor at a time to f32 (threaded, transposed in the same
//! pass), dequantizing FP8 block-quantized weights with their `weight_scale_inv` grid, releasing
//! each tensor's pages once converted, a durable atomic write, and errors that name the file and
//! the tensor.
//!
//! Nothing here depends on Burn.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::{btree_map, BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::tensor::{Metadata, SafeTensorError, View};
use safetensors::SafeTensors;
use serde_json::Value;

pub use safetensors::Dtype;

use crate::fp8;

/// File name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of the shard index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Whether tensors of `dtype` convert to f32 here (F32, BF16, F16, F8_E4M3). Tensors of the
/// other safetensors dtypes are listed by [`Checkpoint::unsupported`]; reading one is an error.
fn readable(dtype: Dtype) -> bool {
    matches!(
        dtype,
        Dtype::F32 | Dtype::BF16 | Dtype::F16 | Dtype::F8_E4M3
    )
}

/// Where a tensor lives: its dtype, shape, file (index into the checkpoint's files) and absolute
/// byte range in that file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorInfo<'a> {
    pub dtype: Dtype,
    pub shape: &'a [usize],
    /// Index into the checkpoint's files (see [`Checkpoint::file_path`]).
    pub file: usize,
    /// Absolute byte range `start..end` in the file (header included in the count).
    pub start: usize,
    pub end: usize,
}

impl TensorInfo<'_> {
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
    /// A model path that is not a directory (`what` says whether it is missing or a file).
    #[error("{}: {what}", path.display())]
    NotADirectory { path: PathBuf, what: &'static str },
    #[error("{}: bad checkpoint index: {reason}", path.display())]
    BadIndex { path: PathBuf, reason: String },
    /// A header the `safetensors` crate rejects.
    #[error("{}: invalid safetensors file: {source}", path.display())]
    Format {
        path: PathBuf,
        #[source]
        source: SafeTensorError,
    },
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
    /// A header entry whose byte range does not fit its shape and dtype (what the crate reports
    /// without naming the tensor).
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
        dtype: Dtype,
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
    /// A read the tensor cannot satisfy (transpose of a non-2-D tensor, FP8 block size 0).
    #[error("{}: tensor '{tensor}': {reason}", path.display())]
    InvalidRequest {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    /// A tensor [`write_safetensors`] cannot write (dtype, value count, failed read of its
    /// values), or an error of the crate's writer other than I/O.
    #[error("{}: writing safetensors: {reason}", path.display())]
    Writer { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LoadError + '_ {
    move |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    }
}

// ---------------------------------------------------------------------------------------------
// Header errors
// ---------------------------------------------------------------------------------------------

/// Wraps the crate's rejection of the header of `buf` (a whole file) with the file's path, and
/// names the tensor at fault where the crate does not: a data section shorter than the header
/// promises (a truncated download), or an entry whose byte range does not match its shape.
fn header_error(path: &Path, buf: &[u8], source: SafeTensorError) -> LoadError {
    use SafeTensorError::*;
    let unnamed = matches!(
        source,
        MetadataIncompleteBuffer | TensorInvalidInfo | MisalignedSlice | ValidationOverflow
    );
    if let Some(e) = unnamed.then(|| name_the_tensor(path, buf)).flatten() {
        return e;
    }
    LoadError::Format {
        path: path.to_path_buf(),
        source,
    }
}

/// The first tensor (by offset) whose byte range does not fit its shape and dtype or runs past
/// the end of `buf`, for a header the crate rejected; `None` when none is found that way.
fn name_the_tensor(path: &Path, buf: &[u8]) -> Option<LoadError> {
    let n = usize::try_from(u64::from_le_bytes(buf.get(..8)?.try_into().ok()?)).ok()?;
    let header = buf.get(8..n.checked_add(8)?)?;
    let entries: HashMap<String, Value> = serde_json::from_slice(header).ok()?;
    let mut tensors = entries
        .into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .map(|(name, v)| Some((name, serde_json::from_value(v).ok()?)))
        .collect::<Option<Vec<(String, safetensors::tensor::TensorInfo)>>>()?;
    tensors.sort_by_key(|(_, t)| t.data_offsets);
    let data_len = buf.len() - 8 - n;
    for (tensor, t) in tensors {
        let (start, end) = t.data_offsets;
        let bits = t
            .shape
            .iter()
            .try_fold(t.dtype.bitsize(), |a, &d| a.checked_mul(d));
        let reason = match (bits, end.checked_sub(start)) {
            (None, _) => Some(format!("shape {:?} overflows", t.shape)),
            (Some(b), _) if b % 8 != 0 => Some(format!(
                "shape {:?} of {} is not a whole number of bytes",
                t.shape, t.dtype
            )),
            (Some(_), None) => Some(format!("[{start}, {end}] ends before it starts")),
            (Some(b), Some(len)) if len != b / 8 => Some(format!(
                "[{start}, {end}] spans {len} bytes but shape {:?} of {} needs {}",
                t.shape,
                t.dtype,
                b / 8
            )),
            _ => None,
        };
        if let Some(reason) = reason {
            return Some(LoadError::BadOffsets {
                path: path.to_path_buf(),
                tensor,
                reason,
            });
        }
        if end > data_len {
            return Some(LoadError::Truncated {
                path: path.to_path_buf(),
                tensor,
                end: (8 + n + end) as u64,
                file_len: buf.len() as u64,
            });
        }
    }
    None
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

/// Converts `bytes` (W bytes per element, `rows × cols` row-major) into `out`, optionally
/// transposed, in one pass. `out` holds the result's elements from index `first` on (a whole
/// number of output rows when transposed), so threads can share one tensor.
#[inline(always)]
fn convert<const W: usize, T: Copy + Default>(
    bytes: &[u8],
    rows: usize,
    cols: usize,
    transpose: bool,
    first: usize,
    out: &mut [T],
    f: impl Fn([u8; W]) -> T + Copy,
) {
    let (elems, rest) = bytes.as_chunks::<W>();
    debug_assert!(rest.is_empty() && elems.len() == rows * cols);
    if !transpose || rows <= 1 || cols <= 1 {
        for (o, &e) in out.iter_mut().zip(&elems[first..]) {
            *o = f(e);
        }
        return;
    }
    // Output row j is input column j, by 64×64 tiles: each tile's input rows are read once,
    // contiguously (one pass over its pages: the rows of a checkpoint matrix are pages apart),
    // converted into a tile buffer that stays in L1, and written out as contiguous output rows.
    // Reading the input column by column instead touched 64 pages per output run: the 1.6 GB
    // BF16 → bf16 load of `scripts/bench-load.sh` took 1.44 s that way, 1.31 s this way.
    const TILE: usize = 64;
    let j0 = first / rows;
    let j1 = j0 + out.len() / rows;
    let mut tile = [[T::default(); TILE]; TILE];
    for ib in (0..rows).step_by(TILE) {
        let ie = (ib + TILE).min(rows);
        for jb in (j0..j1).step_by(TILE) {
            let je = (jb + TILE).min(j1);
            for i in ib..ie {
                for (jj, &e) in elems[i * cols + jb..i * cols + je].iter().enumerate() {
                    tile[jj][i - ib] = f(e);
                }
            }
            for j in jb..je {
                out[(j - j0) * rows + ib..(j - j0) * rows + ie]
                    .copy_from_slice(&tile[j - jb][..ie - ib]);
            }
        }
    }
}

/// Tensors with fewer elements convert on the calling thread (spawning costs more).
const PARALLEL_MIN_ELEMS: usize = 1 << 18;

/// Converts a float tensor's bytes (F32/BF16/F16) to `T`, split by output rows over the
/// machine's threads for large tensors (reading the mapped file in parallel too): BF16 through
/// `from_bf16` (to bf16: its bits as they are), the others through f32 and `from_f32`.
#[allow(clippy::too_many_arguments)]
fn convert_float_to<T: Copy + Default + Send>(
    dtype: Dtype,
    bytes: &[u8],
    rows: usize,
    cols: usize,
    transpose: bool,
    out: &mut [T],
    from_bf16: impl Fn([u8; 2]) -> T + Copy + Sync,
    from_f32: impl Fn(f32) -> T + Copy + Sync,
) {
    let run = |first: usize, out: &mut [T]| match dtype {
        Dtype::F32 => convert::<4, _>(bytes, rows, cols, transpose, first, out, |b| {
            from_f32(f32_le(b))
        }),
        Dtype::BF16 => convert::<2, _>(bytes, rows, cols, transpose, first, out, from_bf16),
        Dtype::F16 => convert::<2, _>(bytes, rows, cols, transpose, first, out, |b| {
            from_f32(f16_le(b))
        }),
        // FP8 goes through fp8::dequantize_blocks_into; other dtypes are refused by `lookup`.
        other => unreachable!("convert_float of {other}"),
    };
    on_cores(rows, cols, transpose, out, run);
}

/// [`convert_float_to`] f32.
fn convert_float(
    dtype: Dtype,
    bytes: &[u8],
    rows: usize,
    cols: usize,
    transpose: bool,
    out: &mut [f32],
) {
    convert_float_to(dtype, bytes, rows, cols, transpose, out, bf16_le, |v| v);
}

/// Runs `run(first_element, chunk)` over `out` split by output rows on every core (large
/// tensors only; spawning costs more than small ones take).
fn on_cores<T: Send>(
    rows: usize,
    cols: usize,
    transpose: bool,
    out: &mut [T],
    run: impl Fn(usize, &mut [T]) + Sync,
) {
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
    let run = &run;
    std::thread::scope(|s| {
        for (i, chunk) in out.chunks_mut(per * width).enumerate() {
            s.spawn(move || run(i * per * width, chunk));
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Checkpoint
// ---------------------------------------------------------------------------------------------

/// A byte range of a mapped file, owning a handle on the mapping (the owner of a zero-copy
/// tensor's bytes).
struct MappedRange {
    map: Arc<Mmap>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for MappedRange {
    fn as_ref(&self) -> &[u8] {
        &self.map[self.start..self.end]
    }
}

/// One mapped safetensors file and its header, as the crate parsed it.
struct Shard {
    path: PathBuf,
    /// Shared with the zero-copy tensors of [`Checkpoint::share_bf16`], which keep it mapped.
    map: Arc<Mmap>,
    /// Absolute offset of the data section (8 + header length).
    data_start: usize,
    metadata: Metadata,
}

impl Shard {
    fn open(path: &Path) -> Result<Self, LoadError> {
        let file = File::open(path).map_err(io_err(path))?;
        if file.metadata().map_err(io_err(path))?.len() == 0 {
            // Not mapped: an empty mapping is an error on some systems.
            return Err(LoadError::Format {
                path: path.to_path_buf(),
                source: SafeTensorError::HeaderTooSmall,
            });
        }
        // SAFETY: the map is read-only; as with every mmap-based loader, the file must not be
        // truncated or modified by another process while the checkpoint is open.
        let map = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
        let (n, metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| header_error(path, &map, e))?;
        Ok(Shard {
            path: path.to_path_buf(),
            map: Arc::new(map),
            data_start: 8 + n,
            metadata,
        })
    }
}

/// A memory-mapped safetensors checkpoint (one file or a sharded set). Opening reads only the
/// headers; tensor data is read (through the page cache) when converted.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<Shard>,
    /// Every tensor of every file (readable or not) -> index into `files`.
    index: BTreeMap<String, usize>,
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field(
                "files",
                &self.files.iter().map(|m| &m.path).collect::<Vec<_>>(),
            )
            .field("tensors", &self.index.len())
            .finish()
    }
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or else `dir/model.safetensors.index.json` and every shard
    /// it names (the single file wins when both exist, as in HF transformers). `dir` may also be
    /// a `.safetensors` file. Memory-maps the files and validates the headers; reads no tensor
    /// data.
    ///
    /// # Errors
    /// [`LoadError::NoCheckpoint`] when neither file is there; [`LoadError::BadIndex`] for an
    /// index that is not valid JSON, names a missing shard or maps a tensor to a shard that
    /// lacks it; and the errors of [`Checkpoint::open_files`].
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
            let Some(&file) = ck.index.get(name) else {
                return Err(bad(format!(
                    "tensor '{name}' is mapped to shard '{shard}', which does not contain it"
                )));
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
    ///
    /// # Errors
    /// [`LoadError::Io`] when a file cannot be opened or mapped; [`LoadError::Format`],
    /// [`LoadError::Truncated`] or [`LoadError::BadOffsets`] for a header the `safetensors`
    /// crate rejects (naming the tensor where the fault is one tensor's);
    /// [`LoadError::DuplicateTensor`] when a name is in two files.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self, LoadError> {
        let dir = paths
            .first()
            .and_then(|p| p.parent())
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut files: Vec<Shard> = Vec::with_capacity(paths.len());
        let mut index = BTreeMap::new();
        for path in paths {
            let shard = Shard::open(path)?;
            for name in shard.metadata.offset_keys() {
                match index.entry(name) {
                    btree_map::Entry::Vacant(v) => {
                        v.insert(files.len());
                    }
                    btree_map::Entry::Occupied(o) => {
                        return Err(LoadError::DuplicateTensor {
                            name: o.key().clone(),
                            first: files[*o.get()].path.clone(),
                            second: path.clone(),
                        })
                    }
                }
            }
            files.push(shard);
        }
        Ok(Checkpoint { dir, files, index })
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
    pub fn file_metadata(&self, file: usize) -> Option<&HashMap<String, String>> {
        self.files
            .get(file)
            .and_then(|f| f.metadata.metadata().as_ref())
    }

    /// Any tensor, readable or not.
    fn entry(&self, name: &str) -> Option<TensorInfo<'_>> {
        self.located(name, *self.index.get(name)?)
    }

    /// Tensor `name` of file `file`.
    fn located(&self, name: &str, file: usize) -> Option<TensorInfo<'_>> {
        let shard = &self.files[file];
        let t = shard.metadata.info(name)?;
        let (start, end) = t.data_offsets;
        Some(TensorInfo {
            dtype: t.dtype,
            shape: &t.shape,
            file,
            start: shard.data_start + start,
            end: shard.data_start + end,
        })
    }

    /// Names of the readable tensors (dtype F32/BF16/F16/F8_E4M3), sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.iter().filter_map(|(n, &file)| {
            let t = self.located(n, file)?;
            readable(t.dtype).then_some(n.as_str())
        })
    }

    /// Tensors present in the files with a dtype this crate does not convert, sorted by name.
    pub fn unsupported(&self) -> impl Iterator<Item = (&str, Dtype)> {
        self.index.iter().filter_map(|(n, &file)| {
            let t = self.located(n, file)?;
            (!readable(t.dtype)).then_some((n.as_str(), t.dtype))
        })
    }

    /// Number of readable tensors.
    pub fn len(&self) -> usize {
        self.names().count()
    }

    /// Whether there are no readable tensors.
    pub fn is_empty(&self) -> bool {
        self.names().next().is_none()
    }

    /// Whether `name` is a readable tensor.
    pub fn contains(&self, name: &str) -> bool {
        self.info(name).is_some()
    }

    /// Where readable tensor `name` lives.
    pub fn info(&self, name: &str) -> Option<TensorInfo<'_>> {
        self.entry(name).filter(|t| readable(t.dtype))
    }

    /// The path of the file holding `info`.
    pub fn file_path(&self, info: &TensorInfo) -> &Path {
        &self.files[info.file].path
    }

    /// Sum of the data bytes of all tensors (headers excluded; unsupported dtypes included), as
    /// the index's `total_size`.
    pub fn total_bytes(&self) -> u64 {
        self.files
            .iter()
            .map(|f| f.metadata.data_len() as u64)
            .sum()
    }

    fn lookup(&self, name: &str) -> Result<TensorInfo<'_>, LoadError> {
        match self.entry(name) {
            Some(t) if readable(t.dtype) => Ok(t),
            Some(t) => Err(LoadError::UnsupportedDtype {
                path: self.file_path(&t).to_path_buf(),
                tensor: name.to_string(),
                dtype: t.dtype,
            }),
            None => Err(LoadError::MissingTensor {
                dir: self.dir.clone(),
                name: name.to_string(),
            }),
        }
    }

    /// Raw bytes of tensor `name` (little-endian, row-major) with its info.
    ///
    /// # Errors
    /// [`LoadError::MissingTensor`] when there is no such tensor, [`LoadError::UnsupportedDtype`]
    /// when its dtype is not one this crate converts.
    pub fn raw(&self, name: &str) -> Result<(TensorInfo<'_>, &[u8]), LoadError> {
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
    ///
    /// # Errors
    /// [`LoadError::MissingTensor`], [`LoadError::UnsupportedDtype`], [`LoadError::WrongShape`];
    /// [`LoadError::InvalidRequest`] for a transpose of a non-2-D tensor or an FP8 block of 0;
    /// for FP8 tensors the errors of [`Checkpoint::block_scales`].
    pub fn read_f32(
        &self,
        name: &str,
        expected: &[usize],
        transpose: bool,
        fp8_block: usize,
    ) -> Result<Vec<f32>, LoadError> {
        let info = self.shaped(name, expected)?;
        let mut out = vec![0.0f32; info.numel()];
        self.read_into(name, &info, transpose, fp8_block, &mut out)?;
        self.release(name);
        Ok(out)
    }

    /// Reads tensor `name` as bf16, checking its shape as [`Self::read_f32`] does: a BF16
    /// tensor's values exactly (its bits copied, no f32 buffer in between), F32/F16 rounded to
    /// nearest even; optionally transposed in the same pass. For FP8 tensors use
    /// [`Self::read_f32`] (dequantization needs the scales).
    ///
    /// # Errors
    /// As [`Self::read_f32`]; [`LoadError::InvalidRequest`] for an FP8 tensor.
    pub fn read_bf16(
        &self,
        name: &str,
        expected: &[usize],
        transpose: bool,
    ) -> Result<Vec<half::bf16>, LoadError> {
        let info = self.shaped(name, expected)?;
        if info.dtype == Dtype::F8_E4M3 {
            return Err(LoadError::InvalidRequest {
                path: self.file_path(&info).to_path_buf(),
                tensor: name.to_string(),
                reason: "FP8 tensors are read with read_f32 (scales)".into(),
            });
        }
        let (rows, cols) = self.matrix(name, &info, transpose)?;
        // Zeroed u16s come from the allocator's zero pages (calloc), so the first touch of the
        // buffer happens in the converting threads, not in a memset.
        use half::slice::HalfBitsSliceExt;
        use half::vec::HalfBitsVecExt;
        let mut bits = vec![0u16; info.numel()];
        self.populate(&info);
        let bytes = &self.files[info.file].map[info.start..info.end];
        convert_float_to(
            info.dtype,
            bytes,
            rows,
            cols,
            transpose,
            bits.reinterpret_cast_mut::<half::bf16>(),
            |b| half::bf16::from_bits(u16::from_le_bytes(b)),
            half::bf16::from_f32,
        );
        self.release(name);
        Ok(bits.reinterpret_into::<half::bf16>())
    }

    /// A BF16 tensor as it lies in the file (its shape, row-major),
    /// backed by the checkpoint's memory map instead of a copy: its pages are mapped in
    /// (`MADV_POPULATE_READ`) and shared with the page cache, and stay mapped while the tensor
    /// (or any view of it) lives, after the checkpoint is dropped. A write to the tensor copies
    /// it first (Burn's shared bytes are copy-on-write). `None` when the tensor is not stored as
    /// BF16 or its bytes are not 2-byte aligned in the file; read it with [`Self::read_bf16`].
    ///
    /// The file must not be modified in place while such a tensor lives (as for every mmap
    /// loader; files replaced by a rename are safe: the mapping keeps the old one).
    ///
    /// # Errors
    /// As [`Self::read_f32`]: a missing tensor or another shape than `expected`.
    pub fn share_bf16(
        &self,
        name: &str,
        expected: &[usize],
    ) -> Result<Option<burn::tensor::TensorData>, LoadError> {
        let info = self.shaped(name, expected)?;
        // The file's little-endian bits are the in-memory bf16 only on a little-endian CPU.
        if info.dtype != Dtype::BF16 || info.start % 2 != 0 || cfg!(target_endian = "big") {
            return Ok(None);
        }
        let shape = info.shape.to_vec();
        self.populate(&info);
        let owner = MappedRange {
            map: Arc::clone(&self.files[info.file].map),
            start: info.start,
            end: info.end,
        };
        let bytes = burn::tensor::Bytes::from_shared(
            bytes::Bytes::from_owner(owner),
            burn::tensor::AllocationProperty::File,
        );
        Ok(Some(burn::tensor::TensorData::from_bytes(
            bytes,
            shape,
            burn::tensor::DType::BF16,
        )))
    }

    /// The whole pages `(offset, length)` of the mapping that hold a tensor's bytes.
    fn pages(&self, info: &TensorInfo) -> (usize, usize) {
        let page = 4096;
        let start = info.start / page * page;
        let end = info.end.div_ceil(page) * page;
        (start, end.min(self.files[info.file].map.len()) - start)
    }

    /// Tensor `name`'s info, checked to have shape `expected` (the error names the file, the
    /// tensor and both shapes).
    fn shaped(&self, name: &str, expected: &[usize]) -> Result<TensorInfo<'_>, LoadError> {
        let info = self.lookup(name)?;
        if info.shape != expected {
            return Err(LoadError::WrongShape {
                path: self.file_path(&info).to_path_buf(),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                found: info.shape.to_vec(),
            });
        }
        Ok(info)
    }

    /// `(rows, cols)` of a tensor read as a matrix (1-D and others: one row); a transpose asks
    /// for a 2-D tensor.
    fn matrix(
        &self,
        name: &str,
        info: &TensorInfo,
        transpose: bool,
    ) -> Result<(usize, usize), LoadError> {
        if transpose && info.shape.len() != 2 {
            return Err(LoadError::InvalidRequest {
                path: self.file_path(info).to_path_buf(),
                tensor: name.to_string(),
                reason: format!("cannot transpose shape {:?}: not 2-D", info.shape),
            });
        }
        Ok(match info.shape {
            &[r, c] => (r, c),
            _ => (1, info.numel()),
        })
    }

    /// Maps the pages of a tensor's bytes in one call (`MADV_POPULATE_READ`) instead of one
    /// page fault per 4 KiB while converting. A kernel without it (before 5.14) ignores it.
    fn populate(&self, info: &TensorInfo) {
        #[cfg(target_os = "linux")]
        {
            let (start, len) = self.pages(info);
            let _ =
                self.files[info.file]
                    .map
                    .advise_range(memmap2::Advice::PopulateRead, start, len);
        }
        #[cfg(not(target_os = "linux"))]
        let _ = info;
    }

    /// Drops the pages of tensor `name` (and its FP8 scale) from this process's resident set.
    ///
    /// Touched pages of a file mapping count in RSS until unmapped; releasing each tensor once
    /// converted keeps peak memory at the loaded model plus one tensor instead of model + file.
    /// The mapping stays valid: a later access re-reads the pages from the file.
    pub fn release(&self, name: &str) {
        for n in [name.to_string(), format!("{name}_scale_inv")] {
            let Some(info) = self.entry(&n) else {
                continue;
            };
            let map = &self.files[info.file].map;
            let (start, len) = self.pages(&info);
            // SAFETY: the map is a private read-only file mapping and no reference into the
            // released range is held across this call; MADV_DONTNEED on it only discards
            // clean pages, which the kernel reloads from the file on the next access.
            #[cfg(unix)]
            unsafe {
                let _ = map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len);
            }
        }
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
        let (rows, cols) = self.matrix(name, info, transpose)?;
        self.populate(info);
        let bytes = &self.files[info.file].map[info.start..info.end];
        if info.dtype != Dtype::F8_E4M3 {
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
        let path = self.file_path(&info);
        let scale = format!("{name}_scale_inv");
        let bad_scale = |reason: String| LoadError::BadScale {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            scale: scale.clone(),
            reason,
        };
        let &[rows, cols] = info.shape else {
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
        let spath = self.file_path(&sinfo).display();
        if sinfo.dtype == Dtype::F8_E4M3 {
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

/// The f32 values of a tensor to write, produced when the writer reaches the tensor.
pub type Values<'a> = Box<dyn FnOnce() -> Result<Vec<f32>, String> + 'a>;

/// A tensor for [`write_safetensors`]: stored as `dtype` (F32, BF16 or F16) with `shape`;
/// `values` gives its row-major f32 values in that shape.
pub struct TensorSource<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub values: Values<'a>,
}

impl fmt::Debug for TensorSource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TensorSource")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

/// One tensor as the crate's writer sees it: the bytes are produced by [`View::data`], which
/// the crate calls once per tensor while writing, so only one tensor is in memory at a time.
struct Lazy<'s, 'a> {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    nbytes: usize,
    values: Cell<Option<Values<'a>>>,
    /// The first failure (a value producer's error, a wrong value count); the rest is skipped.
    failed: &'s RefCell<Option<String>>,
}

impl Lazy<'_, '_> {
    fn bytes(&self) -> Result<Vec<u8>, String> {
        let produce = self.values.take().ok_or("values already taken")?;
        let v = produce()?;
        let numel: usize = self.shape.iter().product();
        if v.len() != numel {
            return Err(format!(
                "got {} values, shape {:?} has {numel}",
                v.len(),
                self.shape
            ));
        }
        Ok(match self.dtype {
            Dtype::F32 => encode(&v, f32::to_le_bytes),
            Dtype::BF16 => encode(&v, |x| half::bf16::from_f32(x).to_le_bytes()),
            Dtype::F16 => encode(&v, |x| half::f16::from_f32(x).to_le_bytes()),
            other => unreachable!("checked by write_safetensors: {other}"),
        })
    }
}

impl View for Lazy<'_, '_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data_len(&self) -> usize {
        self.nbytes
    }
    fn data(&self) -> Cow<'_, [u8]> {
        if self.failed.borrow().is_some() {
            return Cow::Borrowed(&[]);
        }
        match self.bytes() {
            Ok(b) => Cow::Owned(b),
            Err(e) => {
                *self.failed.borrow_mut() = Some(format!("tensor '{}': {e}", self.name));
                Cow::Borrowed(&[])
            }
        }
    }
}

/// `values` as little-endian bytes, `W` per element (round to nearest even for the halves).
fn encode<const W: usize>(values: &[f32], f: impl Fn(f32) -> [u8; W]) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * W];
    for (o, &x) in out.as_chunks_mut::<W>().0.iter_mut().zip(values) {
        *o = f(x);
    }
    out
}

/// Writes `tensors` as a safetensors file at `path` with [`safetensors::serialize_to_file`]
/// (which lays the data out by descending dtype, then by name). Each tensor's values are
/// produced and converted only when the crate writes that tensor: F32 as is, BF16 and F16
/// rounded to nearest even (`half`). `metadata` becomes the header's `__metadata__`, with
/// `"format": "pt"` added when absent (HF transformers refuses files without a known format).
///
/// The crate writes a temporary file and renames it, without fsync; here that is `<path>.tmp`,
/// which is then fsynced and renamed to `path` (and the directory fsynced), so that a crash
/// leaves the old file or the complete new one. On error `<path>.tmp` is removed and `path` is
/// left as it was.
///
/// # Errors
/// [`LoadError::Writer`] when a tensor's values cannot be read or do not match its shape, or
/// the crate refuses the set (duplicate names); [`LoadError::Io`] when writing, syncing or
/// renaming fails.
pub fn write_safetensors(
    path: &Path,
    tensors: Vec<(String, TensorSource<'_>)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<(), LoadError> {
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

    let failed = RefCell::new(None);
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        if !matches!(t.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
            return Err(werr(format!(
                "tensor '{name}': cannot write {} from f32 values (F32, BF16 or F16)",
                t.dtype
            )));
        }
        let nbytes = t
            .shape
            .iter()
            .try_fold(t.dtype.bitsize() / 8, |a, &d| a.checked_mul(d))
            .ok_or_else(|| werr(format!("tensor '{name}': shape {:?} overflows", t.shape)))?;
        views.push((
            name.clone(),
            Lazy {
                name,
                dtype: t.dtype,
                shape: t.shape,
                nbytes,
                values: Cell::new(Some(t.values)),
                failed: &failed,
            },
        ));
    }
    let mut meta = metadata.unwrap_or_default();
    meta.entry("format".into()).or_insert_with(|| "pt".into());

    // The crate writes a private (0600) temporary file and renames it over `tmp`: give the
    // result the permissions of a file created the ordinary way (0666 less the umask), read
    // off a placeholder at `tmp`.
    let perms = File::create(&tmp)
        .and_then(|f| f.metadata())
        .map_err(io_err(&tmp))?
        .permissions();
    let written = safetensors::serialize_to_file(views, Some(meta), &tmp)
        .map_err(|e| match e {
            SafeTensorError::IoError(source) => LoadError::Io {
                path: tmp.clone(),
                source,
            },
            e => werr(e.to_string()),
        })
        .and_then(|()| failed.take().map_or(Ok(()), |reason| Err(werr(reason))))
        .and_then(|()| {
            std::fs::set_permissions(&tmp, perms)
                .and_then(|()| File::open(&tmp)?.sync_all())
                .map_err(io_err(&tmp))
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    sync_parent(path);
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;
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

    /// Values uniform in `[-4, 4)` from the workspace's one generator.
    fn randn(n: usize, seed: u64) -> Vec<f32> {
        let mut r = dsv3_backends::SplitMix64::new(seed);
        (0..n).map(|_| (r.uniform() * 8.0 - 4.0) as f32).collect()
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

    fn le(x: &[f32]) -> Vec<u8> {
        x.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// Writes `(name, dtype, shape, raw little-endian bytes)` with the crate.
    fn write_raw(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, &[u8])]) {
        let views = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()));
        safetensors::serialize_to_file(views, None, path).unwrap();
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
        let w = randn(300 * 200, 4);
        let (codes, scales) = fp8::quantize_blocks(&w, 300, 200, 128);
        let s = Sample {
            f32_: randn(6 * 7, 1),
            bf16: randn(5 * 9, 2),
            f16: randn(11, 3),
            w,
            codes,
            scales,
        };
        let bf: Vec<u8> = s
            .bf16
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        let hf: Vec<u8> = s
            .f16
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        write_raw(
            path,
            &[
                ("a.f16", Dtype::F16, vec![11], &hf),
                (
                    "layer.proj.weight",
                    Dtype::F8_E4M3,
                    W_SHAPE.to_vec(),
                    &s.codes,
                ),
                ("b.bf16", Dtype::BF16, vec![5, 9], &bf),
                (
                    "layer.proj.weight_scale_inv",
                    Dtype::F32,
                    vec![3, 2],
                    &le(&s.scales),
                ),
                ("c.f32", Dtype::F32, vec![6, 7], &le(&s.f32_)),
            ],
        );
        s
    }

    #[test]
    fn round_trip_all_dtypes() {
        let d = TempDir::new("rt");
        let path = d.path("model.safetensors");
        let s = write_sample(&path);
        let ck = Checkpoint::open(&d.0).unwrap();
        assert_eq!(ck.len(), 5);
        assert_eq!(ck.dir(), d.0.as_path());
        assert!(ck.file_metadata(0).is_none());

        let f = ck.read_f32("c.f32", &[6, 7], false, 128).unwrap();
        assert_eq!(bits(&f), bits(&s.f32_));
        let b = ck.read_f32("b.bf16", &[5, 9], false, 128).unwrap();
        let want: Vec<f32> = s
            .bf16
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect();
        assert_eq!(bits(&b), bits(&want));
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
            (Dtype::F8_E4M3, 60000, 60000)
        );
        assert_eq!(ck.file_path(&info), path.as_path());
        let (_, raw) = ck.raw("c.f32").unwrap();
        assert_eq!(raw, le(&s.f32_));
        assert_eq!(ck.total_bytes(), 11 * 2 + 60000 + 45 * 2 + 6 * 4 + 42 * 4);
    }

    /// `write_safetensors` converts each tensor when the crate writes it (BF16/F16 rounded to
    /// nearest even), adds `"format": "pt"`, and leaves nothing behind when it fails.
    #[test]
    fn writer_round_trip_and_failure() {
        let d = TempDir::new("writer");
        let p = d.path("w.safetensors");
        let tmp = d.path("w.safetensors.tmp");
        let mut x = randn(4 * 6, 5);
        // Exact ties between two bf16 values (round to even) and their neighbours, and specials.
        for (i, b) in [
            0x3F80_8000u32,
            0x3F81_8000,
            0x0000_8000,
            0x7F7F_8000,
            0x8001_8000,
        ]
        .into_iter()
        .enumerate()
        {
            let v = f32::from_bits(b);
            x[3 * i..3 * i + 3].copy_from_slice(&[v, v.next_up(), v.next_down()]);
        }
        x[15..19].copy_from_slice(&[f32::MAX, f32::MIN, f32::INFINITY, -0.0]);
        let src = |dtype, shape: Vec<usize>, v: &[f32]| {
            let v = v.to_vec();
            TensorSource {
                dtype,
                shape,
                values: Box::new(move || Ok(v)),
            }
        };
        let tensors = vec![
            ("b".to_string(), src(Dtype::BF16, vec![4, 6], &x)),
            ("f".to_string(), src(Dtype::F32, vec![24], &x)),
            ("h".to_string(), src(Dtype::F16, vec![2, 3, 4], &x)),
        ];
        write_safetensors(&p, tensors, None).unwrap();
        assert!(!tmp.exists());
        // Created with the ordinary permissions, not the crate's private temporary file's.
        let plain = d.path("plain");
        std::fs::write(&plain, b"").unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions(),
            std::fs::metadata(&plain).unwrap().permissions()
        );
        let ck = Checkpoint::open(&p).unwrap();
        assert_eq!(ck.file_metadata(0).unwrap()["format"], "pt");
        let want = |f: fn(f32) -> f32| x.iter().map(|&v| f(v)).collect::<Vec<_>>();
        let b = ck.read_f32("b", &[4, 6], false, 128).unwrap();
        assert_eq!(bits(&b), bits(&want(|v| half::bf16::from_f32(v).to_f32())));
        assert_ne!(bits(&b), bits(&x)); // really rounded
        let f = ck.read_f32("f", &[24], false, 128).unwrap();
        assert_eq!(bits(&f), bits(&x));
        let h = ck.read_f32("h", &[2, 3, 4], false, 128).unwrap();
        assert_eq!(bits(&h), bits(&want(|v| half::f16::from_f32(v).to_f32())));

        // A failing producer, a wrong value count or dtype: an error naming the file and the
        // tensor, no temporary file left, and the previous file at `p` untouched.
        drop(ck);
        let before = std::fs::read(&p).unwrap();
        for (tensors, words) in [
            (
                vec![(
                    "bad".to_string(),
                    TensorSource {
                        dtype: Dtype::F32,
                        shape: vec![2],
                        values: Box::new(|| Err("device lost".to_string())),
                    },
                )],
                ["'bad'", "device lost"],
            ),
            (
                vec![("short".to_string(), src(Dtype::BF16, vec![3], &[1.0]))],
                ["'short'", "1 values"],
            ),
            (
                vec![("q".to_string(), src(Dtype::F8_E4M3, vec![1], &[1.0]))],
                ["'q'", "F8_E4M3"],
            ),
        ] {
            let e = write_safetensors(&p, tensors, None).unwrap_err();
            assert!(matches!(e, LoadError::Writer { .. }), "{e}");
            assert_names(&e, &["w.safetensors", words[0], words[1]]);
            assert!(!tmp.exists());
            assert_eq!(std::fs::read(&p).unwrap(), before);
        }
        // No tensors is a valid (empty) file.
        write_safetensors(&p, vec![], None).unwrap();
        assert!(Checkpoint::open(&p).unwrap().is_empty());
    }

    #[test]
    fn transpose_all_dtypes() {
        let d = TempDir::new("tr");
        write_sample(&d.path("model.safetensors"));
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
        // A 1-D tensor cannot be transposed.
        let e = ck.read_f32("a.f16", &[11], true, 128).unwrap_err();
        assert!(matches!(e, LoadError::InvalidRequest { .. }), "{e}");
        assert_names(&e, &["a.f16", "model.safetensors", "2-D"]);
    }

    fn write_index(dir: &Path, weight_map: &[(&str, &str)]) {
        let map: BTreeMap<&str, &str> = weight_map.iter().copied().collect();
        let json = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
        std::fs::write(dir.join(INDEX_FILE), json.to_string()).unwrap();
    }

    #[test]
    fn sharded_index_two_shards() {
        let d = TempDir::new("shard");
        let (s1, s2) = (
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        );
        let x = randn(4 * 3, 7);
        let y = randn(130 * 260, 8);
        let (yc, ys) = fp8::quantize_blocks(&y, 130, 260, 128);
        write_raw(
            &d.path(s1),
            &[
                ("x", Dtype::F32, vec![4, 3], &le(&x)),
                ("y.weight", Dtype::F8_E4M3, vec![130, 260], &yc),
            ],
        );
        // The scale lives in the other shard (allowed: lookup is by name across files).
        write_raw(
            &d.path(s2),
            &[("y.weight_scale_inv", Dtype::F32, vec![2, 3], &le(&ys))],
        );
        let map = [("x", s1), ("y.weight", s1), ("y.weight_scale_inv", s2)];
        write_index(&d.0, &map);

        let ck = Checkpoint::open(&d.0).unwrap();
        assert_eq!(
            ck.names().collect::<Vec<_>>(),
            ["x", "y.weight", "y.weight_scale_inv"]
        );
        assert_eq!(ck.total_bytes(), (12 * 4 + 130 * 260 + 6 * 4) as u64);
        assert_eq!(ck.files().count(), 2);
        let yi = ck.info("y.weight_scale_inv").unwrap();
        assert!(ck.file_path(&yi).ends_with(s2));
        let got = ck.read_f32("y.weight", &[130, 260], true, 128).unwrap();
        let want = fp8::dequantize_blocks(&yc, 130, 260, &ys, 128, true).unwrap();
        assert_eq!(bits(&got), bits(&want));
        let got = ck.read_f32("x", &[4, 3], false, 128).unwrap();
        assert_eq!(bits(&got), bits(&x));

        // An index that maps a tensor to the wrong shard, or names a missing shard.
        let mut bad = map;
        bad[0].1 = s2;
        write_index(&d.0, &bad);
        let e = Checkpoint::open(&d.0).unwrap_err();
        assert!(matches!(e, LoadError::BadIndex { .. }), "{e}");
        assert_names(&e, &[INDEX_FILE, "'x'", "model-00002-of-00002"]);
        bad[0].1 = "model-00003-of-00002.safetensors";
        write_index(&d.0, &bad);
        let e = Checkpoint::open(&d.0).unwrap_err();
        assert!(matches!(e, LoadError::BadIndex { .. }), "{e}");
        assert_names(
            &e,
            &[
                INDEX_FILE,
                "model-00003-of-00002.safetensors",
                "'x'",
                "does not exist",
            ],
        );
        // A tensor the index names that no shard holds.
        write_index(&d.0, &[("x", s1), ("ghost", s1)]);
        let e = Checkpoint::open(&d.0).unwrap_err();
        assert!(matches!(e, LoadError::BadIndex { .. }), "{e}");
        assert_names(&e, &[INDEX_FILE, "'ghost'", s1]);
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
        // An empty file, and one the crate rejects: its error with the path.
        std::fs::write(&p, []).unwrap();
        assert_names(&open_err(&p), &["nope.safetensors", "header too small"]);
        raw_file(&p, "{\"a\": {\"dtype\": \"F32\", ", &[]);
        let e = open_err(&p);
        assert!(matches!(e, LoadError::Format { .. }), "{e}");
        assert_names(&e, &["nope.safetensors", "JSON"]);
        // A file path works with `open` too.
        write_sample(&d.path("other.safetensors"));
        let ck = Checkpoint::open(&d.path("other.safetensors")).unwrap();
        assert!(ck.contains("c.f32") && !ck.is_empty());
    }

    /// A data section shorter than the header promises (an interrupted download) names the
    /// file and the first tensor cut off.
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
            [
                ("g", Dtype::F64),
                ("h", Dtype::BOOL),
                ("ids", Dtype::I64),
                ("q", Dtype::I8)
            ]
        );
        assert_eq!(ck.total_bytes(), 24);
        let e = ck.read_f32("q", &[3], false, 128).unwrap_err();
        assert!(
            matches!(&e, LoadError::UnsupportedDtype { tensor, dtype, .. } if tensor == "q" && *dtype == Dtype::I8),
            "{e}"
        );
        assert_names(&e, &["m.safetensors", "'q'", "I8"]);
        assert!(matches!(
            ck.raw("ids").unwrap_err(),
            LoadError::UnsupportedDtype { .. }
        ));
        // A dtype safetensors does not define fails at open (the crate's JSON error).
        raw_file(
            &p,
            r#"{"w": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 2]}}"#,
            &[0; 2],
        );
        let e = open_err(&p);
        assert!(matches!(e, LoadError::Format { .. }), "{e}");
        assert_names(&e, &["m.safetensors", "Q4_K"]);
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
        let o_scale: Vec<u8> = [0.5f32, 2.0]
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        write_raw(
            &p,
            &[
                ("m.weight", Dtype::F8_E4M3, vec![130, 4], &codes),
                ("n.weight", Dtype::F8_E4M3, vec![130, 4], &codes),
                ("n.weight_scale_inv", Dtype::F32, vec![1, 1], &le(&[0.5])),
                ("o.weight", Dtype::F8_E4M3, vec![130, 4], &codes),
                ("o.weight_scale_inv", Dtype::BF16, vec![2, 1], &o_scale),
            ],
        );
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
            write_raw(
                &d.path(f),
                &[
                    ("t", Dtype::F32, vec![1], &le(&[1.0])),
                    (f, Dtype::F32, vec![1], &le(&[2.0])),
                ],
            );
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
}
