//! Applying the rotary embedding: the interleaved-pair rotation of spec §3.3, shared by the
//! positions of a forward (which build the pair-swap matrix once) and attention (which rotates
//! queries and the shared rope key). The frequencies and tables are `rope.rs`'s.

use burn::tensor::{Tensor, TensorData};
use dsv3_backends::DsBackend;

/// Rotates interleaved pairs `(x[2i], x[2i+1])` of the last dim of `x: [.., B, T, dr]` (any
/// leading axes, e.g. heads) by the angles of `cos`/`sin: [B or 1, T, dr]` from
/// `RotaryEmbedding::cos_sin_at` (the checkpoint's layout; spec §3.3):
/// `y = x·cos + swap_pairs(x)·sin`.
///
/// The pair swap is a product with the permutation matrix `swap` from [`pair_swap`] (built once
/// per forward, in the span of `positions.rs`), and the tables broadcast as one contiguous row over the leading
/// axes, the broadcast CPU backends run fastest.
pub(crate) fn apply_rope<B: DsBackend, const D: usize>(
    x: Tensor<B, D>,
    cos: &Tensor<B, 3>,
    sin: &Tensor<B, 3>,
    swap: &Tensor<B, 2>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let [bc, t, dr] = cos.dims();
    debug_assert!(D >= 3 && dims[D - 2] == t && dims[D - 1] == dr);
    let lead: usize = dims[..D - 2].iter().product();
    let x = x.reshape([lead * t, dr]);
    let swapped = x.clone().matmul(swap.clone());
    // Rows of the table repeat every `bc·t` rows of x (bc = 1, or the batch axis right before T).
    let row = bc * t * dr;
    let outer = lead * t * dr / row;
    let flat = |v: Tensor<B, 2>| v.reshape([outer, row]);
    let y = flat(x) * cos.clone().reshape([1, row]) + flat(swapped) * sin.clone().reshape([1, row]);
    y.reshape(dims)
}

/// The `dr × dr` permutation matrix [`apply_rope`] multiplies by to swap each pair
/// `(x[2i], x[2i+1])` (exact: one 1 per column).
pub(crate) fn pair_swap<B: DsBackend>(dr: usize, device: &B::Device) -> Tensor<B, 2> {
    let mut swap = vec![0f32; dr * dr];
    for i in 0..dr {
        // Column i of the product takes x[i ^ 1].
        swap[(i ^ 1) * dr + i] = 1.0;
    }
    Tensor::from_data(TensorData::new(swap, [dr, dr]), device)
}
