//! Seeded initialisation independent of the backend's global RNG: every weight matrix and
//! embedding is drawn from N(0, std) (DeepSeek's `initializer_range`) by this crate's own
//! SplitMix64 (`dsv3_backends::SplitMix64`) in module order, RMSNorm weights are 1 and the router bias 0 (as
//! `DeepseekV3::init` makes them). The same seed gives the same model on any backend, in any
//! thread, whatever else the process draws — what bit-identical resume tests and same-seed
//! comparisons need.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{backend::Backend, Tensor, TensorData};
use dsv3_backends::DsBackend;
use dsv3_model::DeepseekV3;

use dsv3_backends::SplitMix64;

struct Seeded {
    rng: SplitMix64,
    /// Elements of every parameter of the whole model, in module order ([`numels`] before any
    /// placeholder was made), and the index of the next one: a parameter smaller than its
    /// whole size is a placeholder whose draws are skipped.
    whole: Option<(Vec<usize>, usize)>,
    std: f64,
    /// Elements of one routed expert matrix: what a placeholder (an expert held by another
    /// rank) would have drawn, skipped so every held weight gets the single-process value.
    expert_numel: usize,
    containers: Vec<String>,
    names: Vec<String>,
}

impl<B: Backend> ModuleMapper<B> for Seeded {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.containers.push(container_type.to_string());
        self.names.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.containers.pop();
        self.names.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let in_norm = self
            .containers
            .last()
            .is_some_and(|c| c == "Struct:RmsNorm");
        let is_bias = self
            .names
            .last()
            .is_some_and(|n| n == "e_score_correction_bias");
        let whole = self.whole.as_mut().map(|(v, at)| {
            *at += 1;
            v.get(*at - 1).copied().unwrap_or(0)
        });
        let (id, t, mapper) = param.consume();
        if in_norm || is_bias {
            return Param::from_mapped_value(id, t, mapper);
        }
        let shape = t.shape();
        if let Some(n) = whole.filter(|&n| n > shape.num_elements()) {
            // Another stage's (or rank's) weight: its draws are skipped.
            self.rng.skip(2 * n as u64);
            return Param::from_mapped_value(id, t, mapper);
        }
        if shape.num_elements() == 1 && self.names.iter().any(|n| n == "experts") {
            // `normal` takes two draws per value.
            self.rng.skip(2 * self.expert_numel as u64);
            return Param::from_mapped_value(id, t, mapper);
        }
        let values: Vec<f32> = (0..shape.num_elements())
            .map(|_| (self.rng.normal() * self.std) as f32)
            .collect();
        let new = Tensor::<B, D>::from_data(TensorData::new(values, shape), &t.device())
            .set_require_grad(t.is_require_grad());
        Param::from_mapped_value(id, new, mapper)
    }
}

/// Re-draws the model's random weights from `seed` (norms and bias untouched). Under expert
/// parallelism (after [`DeepseekV3::set_expert_parallel`]) the held experts get the values
/// the whole model would give them, and the others are never materialised.
pub fn seeded<B: DsBackend>(model: DeepseekV3<B>, seed: u64) -> DeepseekV3<B> {
    seeded_part(model, seed, None)
}

/// The number of elements of every float parameter, in module order (without materialising
/// any): what [`seeded_part`] needs of the whole model.
pub fn numels<B: DsBackend>(model: &DeepseekV3<B>) -> Vec<usize> {
    struct Numels(Vec<usize>);
    impl<B: Backend> burn::module::ModuleVisitor<B> for Numels {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.push(param.lazy_shape().num_elements());
        }
    }
    let mut v = Numels(Vec::new());
    model.visit(&mut v);
    v.0
}

/// [`seeded`] for a model of which this rank holds a part ([`DeepseekV3::hold_only`] after
/// [`numels`] gave `whole`): each placeholder's draws are skipped, so every held weight gets
/// the value the whole model of the same seed gives it, and the others are never made.
pub fn seeded_part<B: DsBackend>(
    model: DeepseekV3<B>,
    seed: u64,
    whole: Option<Vec<usize>>,
) -> DeepseekV3<B> {
    let std = model.config.initializer_range;
    let expert_numel = model.config.hidden_size * model.config.moe_intermediate_size;
    model.map(&mut Seeded {
        whole: whole.map(|v| (v, 0)),
        rng: SplitMix64::new(seed ^ 0x1A17_5EED_0000_0000),
        std,
        expert_numel,
        containers: Vec::new(),
        names: Vec::new(),
    })
}
