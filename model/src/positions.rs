//! Where a forward pass's tokens sit: their absolute positions (the rotary tables of spec §3)
//! and which earlier key slots each query may attend to (the causal, left-padding-aware mask).

use burn::tensor::Tensor;
use dsv3_backends::DsBackend;

use crate::rope::RotaryEmbedding;

/// Where a forward pass's new tokens sit: the rotary angles of their absolute positions and the
/// additive attention mask over (cached + new) key slots.
#[derive(Debug, Clone)]
pub struct Span<B: DsBackend> {
    /// `[B or 1, T, dr]` rotation tables ([`RotaryEmbedding::cos_sin_at`]).
    pub cos: Tensor<B, 3>,
    pub sin: Tensor<B, 3>,
    /// `[B or 1, 1, T, past + T]`, 0 or −inf; `None` when nothing is masked (one new token per
    /// row, no padding: every decode step of an unpadded batch).
    pub mask: Option<Tensor<B, 4>>,
    /// The rope pair-swap matrix `[dr, dr]` (`rotation::pair_swap`), built once per span
    /// rather than per layer.
    pub swap: Tensor<B, 2>,
}

impl<B: DsBackend> Span<B> {
    /// `t` tokens at positions `offset..offset+t` after `past` cached ones, the same for every row.
    ///
    /// # Panics
    /// When `offset + t` exceeds [`MAX_POSITION`](crate::MAX_POSITION) (check input positions
    /// with [`check_positions`](crate::check_positions) first).
    pub fn contiguous(
        rope: &RotaryEmbedding,
        offset: usize,
        t: usize,
        past: usize,
        device: &B::Device,
    ) -> Self {
        Self::padded(rope, &[offset], t, past, &[0], device)
    }

    /// Left-padded rows: row `r`'s first `pad[r]` key slots (cache + new) are padding, and its new
    /// tokens sit at positions `offsets[r]..offsets[r]+t`.
    ///
    /// # Panics
    /// When an `offsets[r] + t` exceeds [`MAX_POSITION`](crate::MAX_POSITION).
    pub fn padded(
        rope: &RotaryEmbedding,
        offsets: &[usize],
        t: usize,
        past: usize,
        pad: &[usize],
        device: &B::Device,
    ) -> Self {
        for &o in offsets {
            if crate::rope::check_positions(o, t).is_err() {
                panic!(
                    "{}",
                    crate::rope::out_of_range(o.saturating_add(t.max(1) - 1))
                );
            }
        }
        let positions: Vec<usize> = offsets.iter().flat_map(|&o| o..o + t).collect();
        Self::at_positions(
            rope,
            &positions,
            offsets.len(),
            padded_causal_mask(t, past, pad, device),
            device,
        )
    }

    /// `rows` rows of `positions.len() / rows` new tokens at the given absolute positions
    /// (row-major), with an explicit additive mask `[rows or 1, 1, T, S]` (`None`: no masking).
    ///
    /// # Panics
    /// When a position is not below [`MAX_POSITION`](crate::MAX_POSITION).
    pub fn at_positions(
        rope: &RotaryEmbedding,
        positions: &[usize],
        rows: usize,
        mask: Option<Tensor<B, 4>>,
        device: &B::Device,
    ) -> Self {
        let (cos, sin) = rope.cos_sin_at::<B>(positions, device);
        let [_, n, dr] = cos.dims();
        Self {
            cos: cos.reshape([rows, n / rows, dr]),
            sin: sin.reshape([rows, n / rows, dr]),
            mask,
            swap: crate::rotation::pair_swap(dr, device),
        }
    }
}

/// Additive mask `[B, 1, T, past+T]` for rows whose first `pad[b]` key slots are padding: a real
/// query `t` of row `b` sees key slots `pad[b]..=past+t`. Padding queries see every earlier slot,
/// so no row of scores is all −inf (their outputs are ignored). For left-padded batches.
/// `None` when nothing is masked (one query per row and no padding).
pub fn padded_causal_mask<B: DsBackend>(
    t: usize,
    past: usize,
    pad: &[usize],
    device: &B::Device,
) -> Option<Tensor<B, 4>> {
    if t <= 1 && pad.iter().all(|&p| p == 0) {
        return None;
    }
    let s = past + t;
    let mut data = vec![0f32; pad.len() * t * s];
    for (r, &p) in pad.iter().enumerate() {
        for i in 0..t {
            for j in 0..s {
                if j > past + i || (j < p && p <= past + i) {
                    data[(r * t + i) * s + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Some(
        Tensor::<B, 2>::from_data(
            burn::tensor::TensorData::new(data, [pad.len() * t, s]),
            device,
        )
        .reshape([pad.len(), 1, t, s]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mask is built only when something is masked: several queries, or padding.
    #[test]
    fn mask_only_when_needed() {
        type B = burn::backend::Flex;
        let device = Default::default();
        assert!(padded_causal_mask::<B>(1, 9, &[0, 0], &device).is_none());
        assert!(padded_causal_mask::<B>(1, 9, &[0, 3], &device).is_some());
        let m = padded_causal_mask::<B>(3, 2, &[0], &device).expect("causal");
        assert_eq!(m.dims(), [1, 1, 3, 5]);
        let v: Vec<f32> = m.into_data().to_vec().unwrap();
        // Query 0 (position 2) sees keys 0..=2.
        assert_eq!(
            &v[..5],
            &[0.0, 0.0, 0.0, f32::NEG_INFINITY, f32::NEG_INFINITY]
        );
    }
}
