//! Binding checkpoint tensors to the module tree by name, and saving it back.
//!
//! A [`ModuleMapper`] walks the model; the path of each parameter *is* its Hugging Face tensor
//! name (`model.layers.0.self_attn.kv_b_proj.weight`; the rules are in `names.rs`). Linear
//! weights are `[in, out]` in memory and `[out, in]` on disk: they are transposed while
//! converting, in the same pass.
//!
//! Tensors are read one at a time from memory-mapped files and converted straight into the
//! parameter, so peak memory is the loaded model plus one tensor.

use dsv3_backends::DsBackend;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};

use crate::checkpoint::{write_safetensors, Checkpoint, Dtype, LoadError, TensorSource};
use crate::config::DeepseekV3Config;
use crate::error::{ConfigError, ModelError};
use crate::held::HeldLayers;
use crate::model::DeepseekV3;
use crate::names::PathTracker;
use dsv3_backends::comm::CommExt;

/// Options for [`load`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Fail on checkpoint tensors the model does not use (otherwise they are only reported).
    pub strict: bool,
    /// Skip the MTP modules even when the checkpoint has them (saves their memory).
    pub skip_mtp: bool,
    /// `(rank, size)` of an expert-parallel group: read only the routed experts this rank
    /// holds ([`crate::owned_experts`]); the others become placeholders, never read from
    /// the (memory-mapped) files. Call [`DeepseekV3::set_expert_parallel`] on the result.
    pub expert_shard: Option<(usize, usize)>,
    /// A pipeline rank's part ([`HeldLayers`]): the tensors outside it (of 2 or more
    /// dimensions) become placeholders, never read.
    pub held: Option<HeldLayers>,
}

impl LoadOptions {
    /// Whether tensor `name` (of `dims` dimensions) lies outside this rank's pipeline part.
    fn not_held(&self, name: &str, dims: usize) -> bool {
        self.held
            .as_ref()
            .is_some_and(|h| !h.materialises(name, dims))
    }

    /// Whether checkpoint tensor `name` belongs to a routed expert held by another rank.
    fn elsewhere(&self, name: &str, n_experts: usize) -> bool {
        match (self.expert_shard, crate::expert_parallel::expert_of(name)) {
            (Some((rank, size)), Some(e)) => {
                crate::expert_parallel::expert_owner(e, n_experts, size) != rank
            }
            _ => false,
        }
    }
}

/// How the Linear weights are held in memory once loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WeightStorage {
    /// f32: float checkpoints converted, FP8 checkpoints dequantized while loading.
    #[default]
    F32,
    /// bf16: half the bytes of f32 (a BF16 checkpoint's values exactly, others rounded to
    /// nearest) and computed in the model's float type: products widen them on the fly
    /// (`DsBackend::dense_matmul`). Norms, embeddings, the router and `kv_b_proj` (which
    /// attention reads as per-head views, not through a Linear forward) stay f32. For inference.
    Bf16,
    /// An FP8 checkpoint's e4m3 codes plus block scales (about 1 byte per weight), multiplied
    /// through `DsBackend::fp8_matmul`. Float checkpoints are held as f32.
    Fp8,
}

impl WeightStorage {
    /// Every form with its name (`--weights` of the CLI).
    pub const ALL: [(&'static str, WeightStorage); 3] = [
        ("f32", WeightStorage::F32),
        ("bf16", WeightStorage::Bf16),
        ("fp8", WeightStorage::Fp8),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, w)| *w == self)
            .map_or("f32", |(n, _)| n)
    }
}

impl std::fmt::Display for WeightStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for WeightStorage {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(s.trim()))
            .map(|(_, w)| *w)
            .ok_or_else(|| format!("unknown weight form {s:?} (f32, bf16 or fp8)"))
    }
}

/// How weights are held in memory once loaded (what [`load_with`] adds to [`LoadOptions`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WeightOptions {
    /// The Linear weights' form.
    pub storage: WeightStorage,
    /// Stack each MoE layer's routed experts for the backend's grouped MoE kernels
    /// ([`DeepseekV3::pack_experts`]); the model is then for inference only.
    pub pack_experts: bool,
}

impl From<WeightStorage> for WeightOptions {
    fn from(storage: WeightStorage) -> Self {
        Self {
            storage,
            pack_experts: false,
        }
    }
}

/// What loading found, for the caller to report.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Checkpoint tensors that no parameter used (FP8 scales excluded).
    pub unexpected: Vec<String>,
    /// Checkpoint dtypes and how many tensors of each.
    pub dtypes: BTreeMap<String, usize>,
    /// Bytes of the checkpoint files.
    pub file_bytes: u64,
    /// Number of parameters loaded.
    pub params: u64,
    /// What was loaded other than as written (one line each, for the caller to print): a
    /// declared MTP module missing from the checkpoint, MTP tensors the config does not declare,
    /// a missing `e_score_correction_bias` (taken as zeros, as HF does), an FP8
    /// `quantization_config` over a checkpoint that holds no FP8 tensor.
    pub warnings: Vec<String>,
}

struct Loader<'a, B: DsBackend> {
    ckpt: &'a Checkpoint,
    device: B::Device,
    path: PathTracker,
    fp8_block: usize,
    used: BTreeSet<String>,
    /// Weights already bound in FP8 form (their float parameter is a placeholder).
    fp8: BTreeSet<String>,
    /// Linear weights in bf16 ([`WeightStorage::Bf16`]).
    bf16: bool,
    error: Option<LoadError>,
    params: u64,
    /// Router biases absent from the checkpoint, loaded as zeros.
    zero_bias: Vec<String>,
    opts: LoadOptions,
    n_experts: usize,
}

impl<B: DsBackend> ModuleMapper<B> for Loader<'_, B> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if self.error.is_some() {
            return param;
        }
        let (name, transpose) = self.path.name();
        if self.fp8.contains(&name) {
            self.used.insert(name);
            return param;
        }
        if self.opts.elsewhere(&name, self.n_experts) || self.opts.not_held(&name, D) {
            // Another rank's expert or stage: a placeholder, like `Linear::clear`.
            self.used.insert(name);
            let shape = [1; D];
            return Param::initialized(param.id, Tensor::<B, D>::zeros(shape, &self.device));
        }
        let shape: Vec<usize> = param.lazy_shape().dims::<D>().to_vec();
        let kv_b_proj = name.ends_with("kv_b_proj.weight");
        let disk_shape: Vec<usize> = if transpose {
            shape.iter().rev().copied().collect()
        } else {
            shape.clone()
        };
        // bf16 Linear weights from a float checkpoint: straight into bf16, without an f32
        // buffer in between.
        let direct_bf16 = self.bf16
            && transpose
            && D == 2
            && !kv_b_proj
            && self
                .ckpt
                .info(&name)
                .is_some_and(|i| matches!(i.dtype, Dtype::BF16 | Dtype::F32 | Dtype::F16));
        if direct_bf16 {
            // A BF16 file's `[out, in]` weight is used where it lies: a tensor over the memory
            // map, viewed transposed (`[in, out]`, strides `[1, in]`), no copy or transpose.
            // Other files (or unaligned bytes) are converted into a new `[in, out]` buffer.
            let bf16 = (&self.device, burn::tensor::DType::BF16);
            let t = match self.ckpt.share_bf16(&name, &disk_shape) {
                Ok(Some(data)) => Ok(Tensor::<B, D>::from_data(data, bf16).transpose()),
                Ok(None) => self
                    .ckpt
                    .read_bf16(&name, &disk_shape, true)
                    .map(|values| Tensor::<B, D>::from_data(TensorData::new(values, shape), bf16)),
                Err(e) => Err(e),
            };
            return match t {
                Ok(t) => {
                    self.params += t.shape().num_elements() as u64;
                    self.used.insert(name);
                    Param::initialized(param.id, t.require_grad())
                }
                Err(e) => {
                    self.error = Some(e);
                    param
                }
            };
        }
        match self
            .ckpt
            .read_f32(&name, &disk_shape, transpose, self.fp8_block)
        {
            Ok(values) => {
                self.params += values.len() as u64;
                self.used.insert(name);
                // kv_b_proj stays f32: attention reads it as per-head views every step (its
                // product is not a Linear forward), which would widen it on every call.
                let tensor = if self.bf16 && transpose && D == 2 && !kv_b_proj {
                    let values: Vec<half::bf16> =
                        values.into_iter().map(half::bf16::from_f32).collect();
                    Tensor::<B, D>::from_data(
                        TensorData::new(values, shape),
                        (&self.device, burn::tensor::DType::BF16),
                    )
                } else {
                    Tensor::<B, D>::from_data(TensorData::new(values, shape), &self.device)
                };
                // Keep the parameter's id, and mark it trainable like a fresh init (on an
                // autodiff backend a loaded model must be fine-tunable; elsewhere a no-op).
                Param::initialized(param.id, tensor.require_grad())
            }
            // HF initialises the buffer to zeros and only warns when the key is missing (some
            // conversions drop it); the router then selects by the unbiased scores.
            Err(LoadError::MissingTensor { .. }) if name.ends_with(".e_score_correction_bias") => {
                self.zero_bias.push(name);
                let zeros = Tensor::<B, D>::zeros(shape, &self.device);
                Param::initialized(param.id, zeros.require_grad())
            }
            Err(e) => {
                self.error = Some(e);
                param
            }
        }
    }
}

/// Loads `dir/config.json` and the safetensors checkpoint beside it.
///
/// # Errors
/// As [`load_with`] with f32 weights.
pub fn load<B: DsBackend>(
    dir: &Path,
    device: &B::Device,
    opts: &LoadOptions,
) -> Result<(DeepseekV3<B>, LoadReport), ModelError> {
    load_with(dir, device, opts, &WeightOptions::default())
}

/// [`load`], holding the weights as `weights` says (FP8 in memory, packed experts).
///
/// A checkpoint without the MTP layers that `config.json` declares loads without MTP (a
/// warning in the report, not an error).
///
/// # Errors
/// - [`ModelError::Load`] with [`LoadError::NotADirectory`]: `dir` is missing or a file; with
///   [`LoadError::NoCheckpoint`]: it holds neither `model.safetensors` nor its index; other [`LoadError`]s when a file or header is
///   unreadable or malformed ([`Checkpoint::open`]).
/// - [`ModelError::Config`]: `config.json` is missing, not JSON or not a computable config
///   ([`DeepseekV3Config::from_file`]).
/// - Everything [`load_from_with`] returns; a tensor of another shape or a missing one is
///   wrapped in [`ModelError::UnsetSizes`] when `config.json` leaves size fields
///   ([`DeepseekV3Config::SIZE_FIELDS`]) to their defaults.
///
/// A `config.json` that leaves size fields to their defaults also gives a warning when the
/// checkpoint loads (it then matches the 671B sizes in those fields).
pub fn load_with<B: DsBackend>(
    dir: &Path,
    device: &B::Device,
    opts: &LoadOptions,
    weights: &WeightOptions,
) -> Result<(DeepseekV3<B>, LoadReport), ModelError> {
    if !dir.is_dir() {
        let what = if dir.exists() {
            "not a directory (a model directory holds config.json and the safetensors files)"
        } else {
            "no such model directory"
        };
        return Err(LoadError::NotADirectory {
            path: dir.to_path_buf(),
            what,
        }
        .into());
    }
    let cfg_path = dir.join("config.json");
    let (mut cfg, unset) = DeepseekV3Config::from_file_unset(&cfg_path)?;
    let ckpt = Checkpoint::open(dir)?;
    let mut warnings = Vec::new();
    if !unset.is_empty() {
        warnings.push(format!(
            "config.json does not set {}: HF's defaults (the 671B model's sizes) are used",
            unset.join(", ")
        ));
    }
    let first_mtp = cfg.mtp_layer(0);
    let mtp_in_ckpt = ckpt
        .names()
        .any(|name| checkpoint_layer(name) == Some(first_mtp));
    if !mtp_in_ckpt && cfg.num_nextn_predict_layers > 0 && !opts.skip_mtp {
        // A checkpoint without its MTP layers (as converted by the official code) still loads.
        warnings.push(format!(
            "config.json declares num_nextn_predict_layers = {} but the checkpoint has no \
             model.layers.{first_mtp}.* tensors: loaded without MTP",
            cfg.num_nextn_predict_layers
        ));
    }
    if opts.skip_mtp || !mtp_in_ckpt {
        cfg.num_nextn_predict_layers = 0;
    }
    let (model, mut report) =
        load_from_with(cfg, &ckpt, device, opts, weights).map_err(|e| match e {
            // A tensor of another shape, or one the defaults ask for and the file lacks (more
            // layers or experts): the unset sizes are the likely cause.
            ModelError::Load(LoadError::WrongShape { .. } | LoadError::MissingTensor { .. })
                if !unset.is_empty() =>
            {
                ModelError::UnsetSizes {
                    source: Box::new(e),
                    fields: unset,
                }
            }
            e => e,
        })?;
    warnings.append(&mut report.warnings);
    report.warnings = warnings;
    Ok((model, report))
}

/// Binds the tensors of an opened checkpoint to a model of config `cfg`.
///
/// # Errors
/// As [`load_from_with`] with f32 weights.
pub fn load_from<B: DsBackend>(
    cfg: DeepseekV3Config,
    ckpt: &Checkpoint,
    device: &B::Device,
    opts: &LoadOptions,
) -> Result<(DeepseekV3<B>, LoadReport), ModelError> {
    load_from_with(cfg, ckpt, device, opts, &WeightOptions::default())
}

/// [`load_from`] with [`WeightOptions`].
///
/// # Errors
/// - [`ModelError::Config`]: `cfg` fails [`DeepseekV3Config::validate`].
/// - [`ModelError::Load`]: the first parameter whose tensor is missing
///   ([`LoadError::MissingTensor`]), of another shape ([`LoadError::WrongShape`]) or dtype
///   ([`LoadError::UnsupportedDtype`]), or an FP8 weight whose `_scale_inv` is missing or
///   malformed ([`LoadError::MissingScale`], [`LoadError::BadScale`]). A missing
///   `e_score_correction_bias` is not an error: it loads as zeros with a warning.
/// - [`ModelError::UnexpectedTensors`]: `opts.strict` and the checkpoint holds tensors no
///   parameter uses (FP8 scales and skipped MTP layers excepted).
/// - [`ModelError::Invalid`]: bf16 storage on a backend without bf16 tensors, or FP8 storage
///   with a block size that is not a positive multiple of 4.
/// - With `weights.pack_experts`, whatever [`DeepseekV3::pack_experts`] returns.
pub fn load_from_with<B: DsBackend>(
    cfg: DeepseekV3Config,
    ckpt: &Checkpoint,
    device: &B::Device,
    opts: &LoadOptions,
    weights: &WeightOptions,
) -> Result<(DeepseekV3<B>, LoadReport), ModelError> {
    let bf16 = weights.storage == WeightStorage::Bf16;
    if bf16
        && !<B as burn::tensor::backend::Backend>::supports_dtype(device, burn::tensor::DType::BF16)
    {
        return Err(ModelError::Invalid(format!(
            "backend {} cannot hold bf16 tensors: load the weights as f32 (or fp8)",
            <B as burn::tensor::backend::Backend>::name(device)
        )));
    }
    let mut model = DeepseekV3::<B>::init(&cfg, device)?;
    let (fp8, fp8_params) = if weights.storage == WeightStorage::Fp8 {
        bind_fp8(&mut model, ckpt, cfg.fp8_block(), device, opts)?
    } else {
        (BTreeSet::new(), 0)
    };
    let mut loader = Loader::<B> {
        ckpt,
        device: device.clone(),
        path: PathTracker::new(&cfg),
        fp8_block: cfg.fp8_block(),
        used: BTreeSet::new(),
        fp8,
        bf16,
        error: None,
        // The FP8-bound weights are parameters loaded too (held as codes + scales).
        params: fp8_params,
        zero_bias: Vec::new(),
        opts: opts.clone(),
        n_experts: cfg.n_routed_experts,
    };
    let mut model = model.map(&mut loader);
    if let Some(e) = loader.error {
        return Err(e.into());
    }
    let mut report = LoadReport {
        file_bytes: ckpt.total_bytes(),
        params: loader.params,
        ..Default::default()
    };
    if let Some(first) = loader.zero_bias.first() {
        report.warnings.push(format!(
            "{} MoE layer(s) have no e_score_correction_bias in the checkpoint (e.g. '{first}'): \
             taken as zeros, as HF does; routing then uses the unbiased scores",
            loader.zero_bias.len()
        ));
    }
    // Layers past the main stack are MTP modules (they have `eh_proj`) that were skipped or not
    // declared, or plain blocks: then config.json's `num_hidden_layers` is too small.
    let (mut undeclared_mtp, mut plain) = (BTreeSet::new(), BTreeSet::new());
    for name in ckpt.names() {
        if let Some(info) = ckpt.info(name) {
            *report
                .dtypes
                .entry(format!("{:?}", info.dtype))
                .or_default() += 1;
        }
        let aux = name.ends_with("_scale_inv");
        let past_main = checkpoint_layer(name).filter(|&l| cfg.mtp_module(l).is_some());
        let skipped_mtp = cfg.num_nextn_predict_layers == 0 && past_main.is_some();
        if let Some(l) = past_main {
            if !ckpt.contains(&format!("model.layers.{l}.eh_proj.weight")) {
                plain.insert(l);
            } else if skipped_mtp && !opts.skip_mtp {
                undeclared_mtp.insert(l);
            }
        }
        if !aux && !skipped_mtp && !loader.used.contains(name) {
            report.unexpected.push(name.to_string());
        }
    }
    let list = |layers: &BTreeSet<usize>| -> String {
        let v: Vec<String> = layers.iter().map(|l| l.to_string()).collect();
        v.join(", ")
    };
    if !undeclared_mtp.is_empty() {
        report.warnings.push(format!(
            "the checkpoint has layer(s) {} beyond num_hidden_layers = {} (MTP modules?) but \
             config.json declares num_nextn_predict_layers = 0: they were not loaded",
            list(&undeclared_mtp),
            cfg.num_hidden_layers
        ));
    }
    if !plain.is_empty() {
        report.warnings.push(format!(
            "checkpoint layer(s) {} lie past num_hidden_layers = {} but are not MTP modules (no \
             eh_proj): config.json's num_hidden_layers looks smaller than the checkpoint's",
            list(&plain),
            cfg.num_hidden_layers
        ));
    }
    let has_f8 = report.dtypes.contains_key(&format!("{:?}", Dtype::F8_E4M3));
    if weights.storage == WeightStorage::Fp8 && !has_f8 {
        report.warnings.push(
            "FP8 weights were asked for but the checkpoint holds no F8_E4M3 tensor: its float \
             Linear weights are held as f32"
                .into(),
        );
    }
    if cfg.quantization_config.is_some() && !has_f8 {
        report.warnings.push(
            "config.json has an FP8 quantization_config but the checkpoint holds no F8_E4M3 \
             tensor (a converted copy?): loaded the weights as stored"
                .into(),
        );
    }
    if opts.strict && !report.unexpected.is_empty() {
        return Err(ModelError::UnexpectedTensors {
            names: report.unexpected.clone(),
        });
    }
    if weights.pack_experts {
        model.pack_experts()?;
    }
    Ok((model, report))
}

/// The layer index of a checkpoint tensor name (`model.layers.{i}.…`), if it is in a layer.
fn checkpoint_layer(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Binds every Linear whose checkpoint weight is FP8 in FP8 form (codes + block scales, no
/// dequantization). Returns the weight names bound, which the float loader then skips, and
/// their number of weights.
fn bind_fp8<B: DsBackend>(
    model: &mut DeepseekV3<B>,
    ckpt: &Checkpoint,
    block: usize,
    device: &B::Device,
    opts: &LoadOptions,
) -> Result<(BTreeSet<String>, u64), ModelError> {
    let mut bound = BTreeSet::new();
    let mut params = 0u64;
    let n_experts = model.config.n_routed_experts;
    for (name, linear) in model.linears_mut() {
        let wname = format!("{name}.weight");
        if opts.elsewhere(&wname, n_experts) || opts.not_held(&wname, 2) {
            continue;
        }
        match ckpt.info(&wname) {
            Some(info) if info.dtype == Dtype::F8_E4M3 => {}
            _ => continue,
        }
        let (d_in, d_out) = linear.dims();
        let (info, codes) = ckpt.raw(&wname)?;
        if info.shape != [d_out, d_in] {
            return Err(LoadError::WrongShape {
                path: ckpt.file_path(&info).to_path_buf(),
                tensor: wname,
                expected: vec![d_out, d_in],
                found: info.shape.to_vec(),
            }
            .into());
        }
        if block == 0 || !block.is_multiple_of(4) {
            return Err(ModelError::Invalid(format!(
                "FP8 block size {block} is not a positive multiple of 4 (needed in FP8-in-memory form)"
            )));
        }
        let scales = ckpt.block_scales(&wname, block)?;
        let w =
            dsv3_backends::Fp8Weight::from_codes(codes, &scales, [1, d_out, d_in], block, device)
                .map_err(|e| ModelError::Invalid(format!("{wname}: {e}")))?;
        ckpt.release(&wname);
        linear.set_fp8(w);
        bound.insert(wname);
        params += (d_out * d_in) as u64;
    }
    Ok((bound, params))
}

/// Collects every parameter as a tensor to write: its HF name, dtype and shape on disk, and how
/// to read its values (Linear weights transposed back to `[out, in]`) once the writer gets to it.
struct Lister {
    path: PathTracker,
    dtype: SaveDtype,
    out: Vec<(String, TensorSource<'static>)>,
    /// Under expert parallelism: `(rank, size, n_experts)`; other ranks' experts are listed
    /// by name only (`names`), not as tensors.
    shard: Option<(usize, usize, usize)>,
    /// Every tensor name with the rank whose file holds it (expert parallelism).
    names: Vec<(String, usize)>,
}

impl<B: DsBackend> ModuleVisitor<B> for Lister {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let (name, transpose) = self.path.name();
        if let Some((rank, size, n)) = self.shard {
            let owner = crate::expert_parallel::expert_of(&name)
                .map_or(0, |e| crate::expert_parallel::expert_owner(e, n, size));
            self.names.push((name.clone(), owner));
            if owner != rank {
                return;
            }
        }
        let transpose = transpose && D == 2;
        let shape: Vec<usize> = param.lazy_shape().dims::<D>().to_vec();
        let shape = if transpose {
            shape.into_iter().rev().collect()
        } else {
            shape
        };
        // The router bias stays f32 (HF keeps it in float32).
        let dtype = if self.dtype == SaveDtype::BF16 && !name.ends_with("e_score_correction_bias") {
            Dtype::BF16
        } else {
            Dtype::F32
        };
        // A handle on the parameter's tensor: read (and copied off the device) only when the
        // writer reaches this tensor, so one tensor at a time is in memory.
        let tensor = param.val();
        let values = Box::new(move || {
            let tensor = if transpose {
                tensor.transpose()
            } else {
                tensor
            };
            tensor
                .into_data()
                .convert::<f32>()
                .into_vec()
                .map_err(|e| format!("{e:?}"))
        });
        self.out.push((
            name,
            TensorSource {
                dtype,
                shape,
                values,
            },
        ));
    }
}

/// Every tensor to write (FP8-held Linear weights dequantized first: saved in float), or under
/// expert parallelism (`shard` = `(rank, size, n_experts)`) this rank's part.
fn list_tensors<B: DsBackend>(
    model: &DeepseekV3<B>,
    dtype: SaveDtype,
    shard: Option<(usize, usize, usize)>,
) -> Lister {
    let mut lister = Lister {
        path: PathTracker::new(&model.config),
        dtype,
        out: Vec::new(),
        shard,
        names: Vec::new(),
    };
    if has_fp8(model) {
        let mut dense = model.clone();
        dense.dequantize_fp8();
        dense.visit(&mut lister);
    } else {
        model.visit(&mut lister);
    }
    lister
}

fn has_fp8<B: DsBackend>(model: &DeepseekV3<B>) -> bool {
    model
        .clone()
        .linears_mut()
        .iter()
        .any(|(_, l)| l.fp8.is_some())
}

/// Precision of saved tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SaveDtype {
    #[default]
    F32,
    BF16,
}

impl SaveDtype {
    pub fn name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "f32",
            SaveDtype::BF16 => "bf16",
        }
    }
}

impl std::fmt::Display for SaveDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SaveDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(SaveDtype::F32),
            "bf16" | "bfloat16" => Ok(SaveDtype::BF16),
            _ => Err(format!("unknown save dtype {s:?} (f32 or bf16)")),
        }
    }
}

/// Saves `model` to `dir` in the Hugging Face layout: `config.json` + `model.safetensors`
/// (MTP modules as `model.layers.{num_hidden_layers + k}`, the router bias in F32). Files are
/// written to a temporary name and renamed, so an interrupted save never leaves a torn file.
///
/// # Errors
/// [`ModelError::Invalid`] for a model whose experts are packed (save it before packing);
/// [`LoadError::Io`] or [`LoadError::Writer`] when writing `model.safetensors` fails;
/// [`ConfigError::Io`] when writing `config.json` fails.
pub fn save<B: DsBackend>(
    model: &DeepseekV3<B>,
    dir: &Path,
    dtype: SaveDtype,
) -> Result<(), ModelError> {
    if model.is_packed() {
        return Err(ModelError::Invalid(
            "cannot save a model whose experts are packed for inference; save it before packing"
                .into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| LoadError::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    let lister = list_tensors(model, dtype, None);
    write_safetensors(&dir.join("model.safetensors"), lister.out, None)?;
    write_config(model, dir, dtype)
}

/// Writes the tensors of `model` whose checkpoint names `keep` accepts to `dir/file` (one
/// shard of a checkpoint in the Hugging Face layout, f32 or bf16 as `dtype` says; `dir` must
/// exist). Returns their names. With [`save_index`] the shards of several processes (each
/// holding its part, [`HeldLayers`]) make one checkpoint that [`load`] reads whole.
///
/// # Errors
/// [`ModelError::Invalid`] for a model whose experts are packed; [`LoadError::Io`] or
/// [`LoadError::Writer`] when writing the file fails.
pub fn save_tensors<B: DsBackend>(
    model: &DeepseekV3<B>,
    dir: &Path,
    file: &str,
    dtype: SaveDtype,
    keep: &dyn Fn(&str) -> bool,
) -> Result<Vec<String>, ModelError> {
    if model.is_packed() {
        return Err(ModelError::Invalid(
            "cannot save a model whose experts are packed for inference; save it before packing"
                .into(),
        ));
    }
    let mut lister = list_tensors(model, dtype, None);
    lister.out.retain(|(name, _)| keep(name));
    let names = lister.out.iter().map(|(n, _)| n.clone()).collect();
    write_safetensors(&dir.join(file), lister.out, None)?;
    Ok(names)
}

/// Writes `model.safetensors.index.json` (`weight_map`: each tensor name with the file that
/// holds it, as [`save_tensors`] wrote them) and `config.json` of `model` into `dir`.
///
/// # Errors
/// [`LoadError::Io`] when the index cannot be written; [`ConfigError::Io`] for `config.json`.
pub fn save_index<B: DsBackend>(
    model: &DeepseekV3<B>,
    dir: &Path,
    dtype: SaveDtype,
    weight_map: &[(String, String)],
) -> Result<(), ModelError> {
    let map: serde_json::Map<String, serde_json::Value> = weight_map
        .iter()
        .map(|(n, f)| (n.clone(), serde_json::Value::String(f.clone())))
        .collect();
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    let path = dir.join(crate::checkpoint::INDEX_FILE);
    std::fs::write(&path, serde_json::to_vec_pretty(&index).expect("json"))
        .map_err(|e| ModelError::from(LoadError::Io { path, source: e }))?;
    write_config(model, dir, dtype)
}

/// `config.json` of a saved model (no quantization; `torch_dtype` as saved).
fn write_config<B: DsBackend>(
    model: &DeepseekV3<B>,
    dir: &Path,
    dtype: SaveDtype,
) -> Result<(), ModelError> {
    let mut cfg = model.config.clone();
    cfg.quantization_config = None;
    cfg.torch_dtype = Some(
        if dtype == SaveDtype::BF16 {
            "bfloat16"
        } else {
            "float32"
        }
        .into(),
    );
    let cfg_path = dir.join("config.json");
    let tmp = dir.join("config.json.tmp");
    std::fs::write(&tmp, cfg.to_json())
        .and_then(|_| std::fs::rename(&tmp, &cfg_path))
        .map_err(|e| ConfigError::Io {
            path: cfg_path,
            source: e,
        })?;
    Ok(())
}

/// Saves an expert-parallel model ([`DeepseekV3::set_expert_parallel`]) as a sharded
/// checkpoint in the Hugging Face layout, without gathering the experts anywhere: rank `r` of
/// the group writes `model-{r+1:05}-of-{N:05}.safetensors` with the routed experts it holds
/// (rank 0 also every other tensor), and rank 0 writes `model.safetensors.index.json` and
/// `config.json`. [`load`] reads the result like any sharded checkpoint (with
/// [`LoadOptions::expert_shard`] each rank reads only its own experts). Collective: every rank
/// of the group calls it with the same `dir` (a shared file system); it returns once every
/// shard is written (the ranks agree after each step, so a failure anywhere is an error on
/// every rank). Without expert parallelism it is [`save`].
///
/// # Errors
/// As [`save`]; [`ModelError::Invalid`] when the group's collectives fail.
pub fn save_expert_parallel<B: DsBackend>(
    model: &DeepseekV3<B>,
    dir: &Path,
    dtype: SaveDtype,
) -> Result<(), ModelError> {
    let Some(ep) = model.expert_parallel() else {
        return save(model, dir, dtype);
    };
    let comm = ep.comm().clone();
    let (rank, size) = (comm.rank(), comm.size());
    // Every step that can fail on one rank is agreed on before the next collective, so a
    // failure is an error on every rank instead of a rank waiting forever.
    let agree = |result: Result<(), ModelError>, point: &str| -> Result<(), ModelError> {
        let all_ok = comm
            .agree_at(result.is_ok(), point)
            .map_err(|e| ModelError::Invalid(e.to_string()))?;
        result?;
        if !all_ok {
            return Err(ModelError::Invalid(format!(
                "another rank failed {point} in {} (see its message)",
                dir.display()
            )));
        }
        Ok(())
    };
    let created = std::fs::create_dir_all(dir).map_err(|e| {
        LoadError::Io {
            path: dir.to_path_buf(),
            source: e,
        }
        .into()
    });
    agree(created, "creating the directory")?;
    let lister = list_tensors(
        model,
        dtype,
        Some((rank, size, model.config.n_routed_experts)),
    );
    let file = |r: usize| format!("model-{:05}-of-{size:05}.safetensors", r + 1);
    let written = write_safetensors(&dir.join(file(rank)), lister.out, None).map_err(Into::into);
    agree(written, "writing its shard")?;
    let indexed = if rank == 0 {
        let weight_map: serde_json::Map<String, serde_json::Value> = lister
            .names
            .iter()
            .map(|(n, r)| (n.clone(), serde_json::Value::String(file(*r))))
            .collect();
        let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
        let path = dir.join(crate::checkpoint::INDEX_FILE);
        std::fs::write(&path, serde_json::to_vec_pretty(&index).expect("json"))
            .map_err(|e| LoadError::Io { path, source: e }.into())
            .and_then(|()| write_config(model, dir, dtype))
    } else {
        Ok(())
    };
    agree(indexed, "writing the index and config.json")
}
