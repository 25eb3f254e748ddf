//! The latent state attention keeps for earlier positions (spec §4: MLA caches only the
//! normed latent `c` and the shared rope key `k_pe`), and the trait through which a forward pass
//! stores and reads it. The inference engine's preallocated cache implements [`LatentStore`].

use burn::tensor::Tensor;
use dsv3_backends::DsBackend;

/// The per-token state MLA needs from earlier positions: normed latent `c: [B, S, r]` and the
/// roped shared key `k_pe: [B, S, dr]`.
#[derive(Debug, Clone)]
pub struct LatentKv<B: DsBackend> {
    pub c: Tensor<B, 3>,
    pub k_pe: Tensor<B, 3>,
}

impl<B: DsBackend> LatentKv<B> {
    pub fn len(&self) -> usize {
        self.c.dims()[1]
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Appends `next` along the sequence.
    pub fn cat(&self, next: &LatentKv<B>) -> LatentKv<B> {
        LatentKv {
            c: Tensor::cat(vec![self.c.clone(), next.c.clone()], 1),
            k_pe: Tensor::cat(vec![self.k_pe.clone(), next.k_pe.clone()], 1),
        }
    }
}

/// The main layers' latent history during a forward pass: `store_layer(l, new)` keeps layer
/// `l`'s new entries and returns all of its entries (earlier positions first) for attention.
/// Implemented by inference caches; [`crate::DeepseekV3::forward_span`] uses a concatenating one.
pub trait LatentStore<B: DsBackend> {
    fn store_layer(&mut self, layer: usize, new: &LatentKv<B>) -> LatentKv<B>;
}

/// History given as per-layer tensors: the new entries are appended by concatenation.
pub(crate) struct Concat<'a, B: DsBackend>(pub(crate) Option<&'a [LatentKv<B>]>);

impl<B: DsBackend> LatentStore<B> for Concat<'_, B> {
    fn store_layer(&mut self, layer: usize, new: &LatentKv<B>) -> LatentKv<B> {
        match self.0.map(|p| &p[layer]) {
            Some(p) if !p.is_empty() => p.cat(new),
            _ => new.clone(),
        }
    }
}
