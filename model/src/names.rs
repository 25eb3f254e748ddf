//! Checkpoint names of parameters: the one place that knows how the module tree maps onto the
//! Hugging Face tensor names.
//!
//! The path of a parameter in the module tree *is* its checkpoint name
//! (`model.layers.0.self_attn.kv_b_proj.weight`), with three rules:
//! - enum variants (`FeedForward::Moe`) add nothing to the path;
//! - MTP module `k` lives in `model.mtp.k` and is stored as `model.layers.{num_hidden_layers + k}`
//!   ([`DeepseekV3Config::mtp_layer`]);
//! - the MTP module's `block` field adds nothing: its decoder block's tensors sit directly under
//!   the module's prefix, as in the released checkpoints.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;
use dsv3_backends::DsBackend;

use crate::config::DeepseekV3Config;
use crate::model::DeepseekV3;

/// Follows a module visitor or mapper through the tree and names the parameter being visited.
#[derive(Debug, Clone)]
pub(crate) struct PathTracker {
    stack: Vec<(String, String)>,
    cfg: DeepseekV3Config,
}

impl PathTracker {
    pub(crate) fn new(cfg: &DeepseekV3Config) -> Self {
        Self {
            stack: Vec::new(),
            cfg: cfg.clone(),
        }
    }

    pub(crate) fn enter(&mut self, name: &str, container: &str) {
        self.stack.push((name.to_string(), container.to_string()));
    }

    pub(crate) fn exit(&mut self) {
        self.stack.pop();
    }

    /// Checkpoint name of the parameter being visited, and whether it is a Linear weight (stored
    /// transposed, `[out, in]`, on disk).
    pub(crate) fn name(&self) -> (String, bool) {
        let parts: Vec<&str> = self
            .stack
            .iter()
            .filter(|(n, c)| {
                let variant = c.starts_with("Enum:");
                let mtp_block = n == "block" && c == "Struct:MtpLayer";
                !(variant || mtp_block)
            })
            .map(|(n, _)| n.as_str())
            .collect();
        let mut name = parts.join(".");
        if let Some(rest) = name.strip_prefix("model.mtp.") {
            let (k, tail) = rest.split_once('.').unwrap_or((rest, ""));
            let k: usize = k.parse().unwrap_or(0);
            name = format!("model.layers.{}.{tail}", self.cfg.mtp_layer(k));
        }
        let linear = self
            .stack
            .last()
            .is_some_and(|(n, c)| n == "weight" && c == "Struct:Linear");
        (name, linear)
    }
}

struct Names {
    path: PathTracker,
    out: Vec<(ParamId, String)>,
}

impl<B: DsBackend> ModuleVisitor<B> for Names {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.out.push((param.id, self.path.name().0));
    }
}

impl<B: DsBackend> DeepseekV3<B> {
    /// Every float parameter's id and checkpoint name, in module order (for reports that name
    /// a parameter, e.g. a non-finite gradient).
    pub fn param_names(&self) -> Vec<(ParamId, String)> {
        let mut v = Names {
            path: PathTracker::new(&self.config),
            out: Vec::new(),
        };
        self.visit(&mut v);
        v.out
    }
}
