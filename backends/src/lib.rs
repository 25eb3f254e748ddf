//! Backends for DeepSeek-V3 on Burn.
//!
//! [`DsBackend`] holds the operations that deserve their own kernels (FP8 block-scaled matmul,
//! FP8 activation quantization, MoE dispatch / grouped expert matmul / combine). Each has a
//! plain-tensor default body, which Flex and `Autodiff<B>` run; Burn's CubeCL backends
//! (`CubeBackend<WgpuRuntime | CudaRuntime, ..>`, features `wgpu` / `cuda`) run CubeCL kernels,
//! one source for both. [`BackendKind`] and [`on_backend`] select a backend at run time for
//! `--backend` flags, with a probe that reports a missing GPU as one error line.

pub mod e4m3;
mod kind;
mod ops;

#[cfg(feature = "cubecl")]
pub mod cube;

pub use kind::{on_backend, BackendError, BackendKind, FloatDtype, OnBackend, UnknownBackend};
pub use ops::{DsBackend, Fp8Activations, Fp8Weight, GroupedWeight, MoeDispatch, ShapeError};

/// The CPU backend used by default (pure Rust, the fastest CPU backend of Burn 0.21 here).
pub type Cpu = burn::backend::Flex;
/// The CPU backend with autodiff, for training.
pub type CpuAutodiff = burn::backend::Autodiff<Cpu>;

/// wgpu through CubeCL, without Fusion (so the custom kernels run).
#[cfg(feature = "wgpu")]
pub type Wgpu = burn_cubecl::CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>;

/// CUDA through CubeCL, without Fusion; `F` is the float dtype (f32, bf16 or f16).
#[cfg(feature = "cuda")]
pub type Cuda<F = f32> = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, F, i32, u8>;

/// Flex runs the plain-tensor defaults.
impl DsBackend for burn::backend::Flex {}

/// Under autodiff the defaults are differentiated through; the inner backend's kernels are not
/// used (no backward is written for them).
impl<B: DsBackend, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy> DsBackend
    for burn::backend::Autodiff<B, C>
{
}

/// An autodiff backend whose inner backend is also a [`DsBackend`] (what training needs:
/// `B::InnerBackend` runs evaluation and sampling).
pub trait DsAutodiffBackend:
    DsBackend + burn::tensor::backend::AutodiffBackend<InnerBackend: DsBackend>
{
}

impl<B> DsAutodiffBackend for B where
    B: DsBackend + burn::tensor::backend::AutodiffBackend<InnerBackend: DsBackend>
{
}
