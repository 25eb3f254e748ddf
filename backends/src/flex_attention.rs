//! Flex (CPU) body of [`crate::DsBackend::mla_attention`] and its backward: one job per
//! (sequence, head) on the pool, each a few single-threaded `gemm` calls that read the
//! operands in place through their strides (no concatenation, no head transposes) and write
//! its own rows of the outputs, with the mask, softmax and softmax backward done row by row in
//! between (the fused softmax's row bodies, `flex_fused.rs`). The score matrix of a job is
//! `T × S` floats; the probabilities of all jobs are kept for the backward (training) or
//! dropped (inference). Each job's arithmetic is independent of the thread count, so results
//! do not depend on the pool; `∂k_pe` (shared by the heads) adds the heads' parts in head order.
//! `None` (the caller falls back to the plain form) for non-f32 operands or shapes that do
//! not match.

use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;

use crate::attention::{MlaAttention, MlaAttentionGrads};
use crate::flex_fused::{softmax_backward_in_place, softmax_in_place};
use crate::flex_gemm::{product, Mat};
use crate::flex_pool;

/// An f32 operand read in place: its storage with its start offset and strides.
struct Operand {
    t: FlexTensor,
    start: usize,
    strides: Vec<isize>,
}

impl Operand {
    fn new<const D: usize>(x: &Tensor<Flex, D>) -> Option<Self> {
        let t: FlexTensor = x.clone().into_primitive().tensor();
        if t.dtype() != DType::F32 {
            return None;
        }
        let (start, strides) = (t.layout().start_offset(), t.layout().strides().to_vec());
        Some(Self { t, start, strides })
    }

    /// The address of the element at `index` on the leading axes (0 on the others).
    fn at(&self, index: &[usize]) -> *const f32 {
        let off: isize = index
            .iter()
            .zip(&self.strides)
            .map(|(&i, &s)| i as isize * s)
            .sum();
        self.t
            .storage::<f32>()
            .as_ptr()
            .wrapping_add(self.start)
            .wrapping_offset(off)
    }

    /// The matrix whose rows run along axis `rows` and columns along axis `cols`, from `at`.
    fn mat(&self, index: &[usize], rows: usize, cols: usize) -> Mat {
        Mat {
            ptr: self.at(index),
            rs: self.strides[rows],
            cs: self.strides[cols],
        }
    }
}

/// A destination shared by the jobs, each writing elements no other job writes.
struct Out(*mut f32);

// SAFETY: the jobs write disjoint elements through it (see each use) and nothing reads them
// until every job has finished.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

fn tensor<const D: usize>(v: Vec<f32>, dims: [usize; D]) -> Tensor<Flex, D> {
    Tensor::from_primitive(TensorPrimitive::Float(FlexTensor::from_data(
        TensorData::new(v, dims),
    )))
}

/// The four operands, if all f32 and of matching shapes, with `(B, T, S, H, dn, dr, dv)`.
fn operands(x: &MlaAttention<Flex>) -> Option<([Operand; 4], [usize; 7])> {
    let (b, t, s, h, dn, dr, dv) = x.dims();
    let d = [b, t, s, h, dn, dr, dv];
    if d.contains(&0)
        || x.q_pe.dims() != [b, t, h, dr]
        || x.kv.dims() != [b, s, h, dn + dv]
        || x.k_pe.dims() != [b, s, dr]
    {
        return None;
    }
    let ops = [
        Operand::new(&x.q_nope)?,
        Operand::new(&x.q_pe)?,
        Operand::new(&x.kv)?,
        Operand::new(&x.k_pe)?,
    ];
    Some((ops, d))
}

/// Queries per block of rows, and keys per block of columns in the backward. A block of rows
/// multiplies only the keys up to the last one any of its rows sees, and a block of keys only
/// the rows from the first that sees any of them: the causal mask's upper triangle (about half
/// of a prompt's attention) is skipped, not computed and then zeroed.
const BLOCK: usize = 32;

/// The row blocks of `t` rows: `(first row, rows)`.
fn blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t).step_by(BLOCK).map(move |i| (i, BLOCK.min(t - i)))
}

/// 1 + the index of the last key each row sees (its last entry not `hidden`), at least 1.
fn row_ends(rows: &[f32], s: usize, hidden: f32) -> Vec<usize> {
    rows.chunks(s)
        .map(|r| r.iter().rposition(|&v| v != hidden).map_or(1, |j| j + 1))
        .collect()
}

/// The forward: the output `[B, T, H, dv]` and, with `keep_probs`, `P: [B, H, T, S]`.
pub(crate) fn mla_attention(
    x: &MlaAttention<Flex>,
    mask: Option<&Tensor<Flex, 4>>,
    keep_probs: bool,
) -> Option<(Tensor<Flex, 4>, Option<Tensor<Flex, 4>>)> {
    let ([qn, qp, kv, kp], [b, t, s, h, dn, dr, dv]) = operands(x)?;
    let mask = match mask {
        Some(m) => {
            let [mb, one, mt, ms] = m.dims();
            let m: FlexTensor = m.clone().into_primitive().tensor();
            if one != 1 || mt != t || ms != s || (mb != 1 && mb != b) || m.dtype() != DType::F32 {
                return None;
            }
            Some((m.to_contiguous(), mb))
        }
        None => None,
    };
    let mask = mask.as_ref().map(|(m, mb)| (m.storage::<f32>(), *mb));
    // Per row of the mask (sequence-major when it has one per sequence), the keys it sees.
    let ends = match mask {
        Some((m, _)) => row_ends(m, s, f32::NEG_INFINITY),
        None => vec![s; t],
    };
    let scale = x.scale as f32;
    let mut out = vec![0f32; b * t * h * dv];
    let dst = Out(out.as_mut_ptr());
    // One (sequence, head): `p` holds the probabilities of its rows (all `T × S` of them when
    // kept, else one block's, reused), row stride `S`.
    let job = |job: usize, p: &mut [f32]| {
        let (bi, hi) = (job / h, job % h);
        let mrow = mask.map_or(0, |(_, mb)| if mb == 1 { 0 } else { bi });
        let ends = &ends[mrow * t..(mrow + 1) * t];
        let k_nope = kv.mat(&[bi, 0, hi], 1, 3);
        for (i0, rows) in blocks(t) {
            let end = ends[i0..i0 + rows].iter().copied().max().unwrap_or(s);
            // Kept: this block's rows of the job's `T × S`; else the one block's buffer.
            let at = if keep_probs { i0 * s } else { 0 };
            let p = &mut p[at..at + rows * s];
            // SAFETY: the operands address `[bi, ·, hi, ·]` slices of their tensors through
            // their own layouts; `p` is `rows × S`. Scores of keys `..end` in two products
            // (the non-rotary and rotary parts), the second added to the first.
            unsafe {
                let q_nope = qn.mat(&[bi, i0, hi], 1, 3);
                product(
                    [rows, end, dn],
                    p.as_mut_ptr(),
                    s,
                    q_nope,
                    k_nope.t(),
                    scale,
                    false,
                );
                let (q_pe, k_pe) = (qp.mat(&[bi, i0, hi], 1, 3), kp.mat(&[bi], 1, 2));
                product(
                    [rows, end, dr],
                    p.as_mut_ptr(),
                    s,
                    q_pe,
                    k_pe.t(),
                    scale,
                    true,
                );
            }
            for (r, row) in p.chunks_mut(s).enumerate() {
                let m = mask.map(|(m, _)| {
                    let at = (mrow * t + i0 + r) * s;
                    &m[at..at + end]
                });
                softmax_in_place(&mut row[..end], m);
            }
            // SAFETY: rows `[bi, i0.., hi, ·]` of `out` ([B, T, H, dv], row stride H·dv) are
            // this job's alone.
            unsafe {
                let o = dst.at(((bi * t + i0) * h + hi) * dv);
                product(
                    [rows, dv, end],
                    o,
                    h * dv,
                    Mat::dense(p, s),
                    k_nope.skip_cols(dn),
                    1.0,
                    false,
                );
            }
        }
    };
    let probs = if keep_probs {
        let mut probs = vec![0f32; b * h * t * s];
        flex_pool::for_each_chunk(&mut probs, t * s, job);
        Some(tensor(probs, [b, h, t, s]))
    } else {
        flex_pool::map((0..b * h).collect(), |j| {
            job(j, &mut vec![0f32; BLOCK.min(t) * s])
        });
        None
    };
    Some((tensor(out, [b, t, h, dv]), probs))
}

/// The backward from the probabilities `[B, H, T, S]` and the output gradient `[B, T, H, dv]`.
/// Where a probability is exactly 0 (masked keys) its gradient terms are 0, so the blocks past
/// each row's last nonzero probability are skipped as in the forward.
pub(crate) fn mla_attention_backward(
    x: &MlaAttention<Flex>,
    probs: Tensor<Flex, 4>,
    grad: Tensor<Flex, 4>,
) -> Option<MlaAttentionGrads<Flex>> {
    let ([qn, qp, kv, kp], [b, t, s, h, dn, dr, dv]) = operands(x)?;
    if probs.dims() != [b, h, t, s] || grad.dims() != [b, t, h, dv] {
        return None;
    }
    let p: FlexTensor = probs.into_primitive().tensor();
    let g = Operand::new(&grad)?;
    if p.dtype() != DType::F32 {
        return None;
    }
    let p = p.to_contiguous();
    let ps = p.storage::<f32>();
    let (scale, w) = (x.scale as f32, dn + dv);
    let mut dq_nope = vec![0f32; b * t * h * dn];
    let mut dq_pe = vec![0f32; b * t * h * dr];
    let mut dkv = vec![0f32; b * s * h * w];
    let mut dk_pe_parts = vec![0f32; b * h * s * dr];
    let (oqn, oqp, okv) = (
        Out(dq_nope.as_mut_ptr()),
        Out(dq_pe.as_mut_ptr()),
        Out(dkv.as_mut_ptr()),
    );
    flex_pool::for_each_chunk(&mut dk_pe_parts, s * dr, |job, dkp| {
        let (bi, hi) = (job / h, job % h);
        let pj = &ps[job * t * s..(job + 1) * t * s];
        let ends = row_ends(pj, s, 0.0);
        let k_nope = kv.mat(&[bi, 0, hi], 1, 3);
        let v = k_nope.skip_cols(dn);
        let mut ds = vec![0f32; t * s];
        // By blocks of rows: dP = grad · vᵀ, dS = P ⊙ (dP − Σ P ⊙ dP), ∂q = scale · dS · k.
        for (i0, rows) in blocks(t) {
            let end = ends[i0..i0 + rows].iter().copied().max().unwrap_or(s);
            let d = &mut ds[i0 * s..(i0 + rows) * s];
            // SAFETY: operands as in the forward; `d` is `rows × S`; rows
            // `[bi, i0.., hi, ·]` of `∂q_nope`, `∂q_pe` (row strides H·dn, H·dr) are this
            // job's alone.
            unsafe {
                let gm = g.mat(&[bi, i0, hi], 1, 3);
                product([rows, end, dv], d.as_mut_ptr(), s, gm, v.t(), 1.0, false);
            }
            for (y, g) in pj[i0 * s..].chunks(s).zip(d.chunks_mut(s)) {
                softmax_backward_in_place(&y[..end], &mut g[..end]);
            }
            let dsm = Mat::dense(d, s);
            unsafe {
                let (at_n, at_r) = (((bi * t + i0) * h + hi) * dn, ((bi * t + i0) * h + hi) * dr);
                product(
                    [rows, dn, end],
                    oqn.at(at_n),
                    h * dn,
                    dsm,
                    k_nope,
                    scale,
                    false,
                );
                product(
                    [rows, dr, end],
                    oqp.at(at_r),
                    h * dr,
                    dsm,
                    kp.mat(&[bi], 1, 2),
                    scale,
                    false,
                );
            }
        }
        // By blocks of keys, from the first row that sees any of them: ∂v = Pᵀ · grad,
        // ∂k_nope = scale · dSᵀ · q_nope, this head's part of ∂k_pe = scale · dSᵀ · q_pe.
        for (j0, cols) in blocks(s) {
            let i0 = ends.iter().position(|&e| e > j0).unwrap_or(t);
            if i0 == t {
                continue;
            }
            let rows = t - i0;
            let pm = Mat::dense(&pj[i0 * s + j0..], s).t();
            let dsm = Mat::dense(&ds[i0 * s + j0..], s).t();
            // SAFETY: rows `[bi, j0.., hi, ·]` of `∂kv` (row stride H·(dn+dv)) are this
            // job's alone, `dkp` its own part of `∂k_pe`.
            unsafe {
                let at = ((bi * s + j0) * h + hi) * w;
                let gm = g.mat(&[bi, i0, hi], 1, 3);
                product([cols, dv, rows], okv.at(at + dn), h * w, pm, gm, 1.0, false);
                let q_nope = qn.mat(&[bi, i0, hi], 1, 3);
                product(
                    [cols, dn, rows],
                    okv.at(at),
                    h * w,
                    dsm,
                    q_nope,
                    scale,
                    false,
                );
                let q_pe = qp.mat(&[bi, i0, hi], 1, 3);
                product(
                    [cols, dr, rows],
                    dkp[j0 * dr..].as_mut_ptr(),
                    dr,
                    dsm,
                    q_pe,
                    scale,
                    false,
                );
            }
        }
    });
    // ∂k_pe: each sequence's head parts added in head order.
    let mut dk_pe = vec![0f32; b * s * dr];
    for (bi, acc) in dk_pe.chunks_mut(s * dr).enumerate() {
        for hi in 0..h {
            let part = &dk_pe_parts[(bi * h + hi) * s * dr..][..s * dr];
            acc.iter_mut().zip(part).for_each(|(a, &v)| *a += v);
        }
    }
    Some(MlaAttentionGrads {
        q_nope: tensor(dq_nope, [b, t, h, dn]),
        q_pe: tensor(dq_pe, [b, t, h, dr]),
        kv: tensor(dkv, [b, s, h, w]),
        k_pe: tensor(dk_pe, [b, s, dr]),
    })
}
