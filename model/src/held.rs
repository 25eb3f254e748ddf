//! The part of the model one pipeline-parallel rank holds (DeepSeek-V3 report §3.2.1: each
//! rank keeps only its stages' parameters): some decoder layers, and the embedding (first
//! stage) and final norm + `lm_head` (last stage) when it runs those. Every other weight is a
//! 1-element placeholder, never materialised ([`DeepseekV3::hold_only`], or
//! [`crate::LoadOptions::held`] when loading); the 1-dimensional parameters (RMSNorm weights,
//! the router bias) stay whole everywhere: they are small, and the bias update runs on every
//! MoE layer from the loads of all stages.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::Tensor;
use dsv3_backends::DsBackend;

use crate::model::DeepseekV3;
use crate::names::PathTracker;

/// Which part of the model a rank holds: decoder layers by index, the embedding, the final
/// norm and `lm_head`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeldLayers {
    /// Decoder layer indices held (`model.layers.{i}.*`).
    pub layers: Vec<usize>,
    /// `model.embed_tokens` (the first stage).
    pub embed: bool,
    /// `model.norm` and `lm_head` (the last stage).
    pub head: bool,
}

impl HeldLayers {
    /// Whether checkpoint tensor `name` lies in the held part: a decoder layer's by its index,
    /// the embedding's and the head's by [`Self::embed`] and [`Self::head`] (anything else,
    /// which a DeepseekV3 checkpoint does not have, counts as held).
    pub fn contains(&self, name: &str) -> bool {
        if let Some(rest) = name.strip_prefix("model.layers.") {
            return rest
                .split('.')
                .next()
                .and_then(|l| l.parse::<usize>().ok())
                .is_some_and(|l| self.layers.contains(&l));
        }
        if name.starts_with("model.embed_tokens.") {
            return self.embed;
        }
        if name.starts_with("model.norm.") || name.starts_with("lm_head.") {
            return self.head;
        }
        true
    }

    /// Whether a rank holding this part materialises tensor `name` of `dims` dimensions: the
    /// held tensors, and every 1-dimensional one.
    pub fn materialises(&self, name: &str, dims: usize) -> bool {
        dims <= 1 || self.contains(name)
    }
}

struct HoldOnly<'a> {
    held: &'a HeldLayers,
    path: PathTracker,
}

impl<B: DsBackend> ModuleMapper<B> for HoldOnly<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (name, _) = self.path.name();
        if self.held.materialises(&name, D) {
            return param;
        }
        // A placeholder, like `Linear::clear`: a weight not yet materialised (a fresh `init`)
        // is never drawn.
        let device = param.lazy_device();
        Param::initialized(param.id, Tensor::<B, D>::zeros([1; D], &device))
    }
}

impl<B: DsBackend> DeepseekV3<B> {
    /// Keeps only the part `held` of the weights: every other tensor of 2 or more dimensions
    /// becomes a 1-element placeholder (its id kept; its memory freed, or never allocated on a
    /// fresh [`DeepseekV3::init`]). The forward of a layer not held must not run.
    pub fn hold_only(self, held: &HeldLayers) -> Self {
        let path = PathTracker::new(&self.config);
        self.map(&mut HoldOnly { held, path })
    }
}
