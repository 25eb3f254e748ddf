//! Backends for DeepSeek-V3 on Burn.
//!
//! [`DsBackend`] is the extension point for operations that deserve their own kernels (FP8
//! block-scaled matmul, MoE dispatch/combine). Today every method has a plain-tensor default, so
//! any Burn backend runs the model; CubeCL kernels plug in here without touching the model.
//! [`BackendKind`] names the backends this build can run, for `--backend` flags.

use burn::tensor::backend::Backend;

/// A Burn backend the model runs on. Blanket-implemented; kernels override per backend.
pub trait DsBackend: Backend {}

impl<B: Backend> DsBackend for B {}

/// The CPU backend used by default (pure Rust, the fastest CPU backend of Burn 0.21 here).
pub type Cpu = burn::backend::Flex;
/// The CPU backend with autodiff, for training.
pub type CpuAutodiff = burn::backend::Autodiff<Cpu>;

/// Backends selectable at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Flex,
}

/// A `--backend` value this build cannot run.
#[derive(Debug, thiserror::Error)]
#[error("backend {name:?} is not available in this build (available: {available})")]
pub struct UnknownBackend {
    pub name: String,
    pub available: String,
}

impl BackendKind {
    pub const ALL: &'static [(&'static str, BackendKind)] =
        &[("flex", BackendKind::Flex), ("cpu", BackendKind::Flex)];

    pub fn parse(name: &str) -> Result<Self, UnknownBackend> {
        Self::ALL
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, k)| *k)
            .ok_or_else(|| UnknownBackend {
                name: name.to_string(),
                available: "flex (alias cpu)".to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_backends() {
        assert_eq!(BackendKind::parse("flex").unwrap(), BackendKind::Flex);
        assert_eq!(BackendKind::parse("CPU").unwrap(), BackendKind::Flex);
        let e = BackendKind::parse("cuda").unwrap_err().to_string();
        assert!(e.contains("cuda") && e.contains("not available"), "{e}");
    }
}
