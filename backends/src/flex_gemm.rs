//! Many-row f32 products on Flex: the `gemm` crate's kernels, the output cut into fixed blocks
//! of rows run as independent jobs on the pool, each one single-threaded `gemm` call.
//!
//! Flex's matmul hands a product over ~7M multiply-adds to `gemm` with `Parallelism::Rayon`,
//! which on this project's shapes (K of a few hundred) scales to 1.3–1.4× of one core on two
//! (`bash scripts/bench-kernels.sh matmul`). Row blocks are independent: no synchronisation
//! inside the product, and the blocks balance over however many threads the pool has. Each
//! output's sum runs in the same order as in one unsplit call (`gemm` blocks the reduction by
//! K and the cache sizes only; no block has a single row, which `gemm` would multiply through its
//! matrix-vector path), so the blocks change the schedule, not the bits (`tests/kernels.rs`).
//! A training worker with a share of one thread (`flex_pool.rs`) runs the product as one call
//! on its own thread, where Flex's matmul would split it over the whole pool.

use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;

/// Rows per job. On two threads (`bench-kernels.sh matmul`, the `small` and `mini` presets'
/// shapes) 128 was fastest on three of four shapes; 256 won on `512×512×8000` (118 against 108
/// GFLOP/s), 64 on none.
const ROW_BLOCK: usize = 128;

/// A strided f32 matrix operand of a product: element `(i, j)` at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub(crate) ptr: *const f32,
    pub(crate) rs: isize,
    pub(crate) cs: isize,
}

impl Mat {
    /// A row-major `_ × cols` buffer.
    pub(crate) fn dense(v: &[f32], cols: usize) -> Self {
        Self {
            ptr: v.as_ptr(),
            rs: cols as isize,
            cs: 1,
        }
    }

    /// The transpose (a view).
    pub(crate) fn t(self) -> Self {
        Self {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// The same matrix from column `c` on.
    pub(crate) fn skip_cols(self, c: usize) -> Self {
        Self {
            ptr: self.ptr.wrapping_offset(c as isize * self.cs),
            ..self
        }
    }
}

/// `dst = beta · lhs · rhs`, or `dst += beta · lhs · rhs` with `accumulate` (`lhs: m × k`,
/// `rhs: k × n`; `dst` row-major with row stride `dst_rs`): one single-threaded `gemm` call.
///
/// # Safety
/// `lhs`, `rhs` must address `m × k` and `k × n` readable f32 values, `dst` `m × n` writable
/// ones no other thread touches meanwhile.
pub(crate) unsafe fn product(
    [m, n, k]: [usize; 3],
    dst: *mut f32,
    dst_rs: usize,
    lhs: Mat,
    rhs: Mat,
    beta: f32,
    accumulate: bool,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        if accumulate { 1.0f32 } else { 0.0f32 },
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// `x [M, K] · w [K, N]` for f32 operands of any strides, as row-block jobs, or as one call on
/// this thread with `one_job`; `None` for other dtypes, empty shapes, or (without `one_job`)
/// fewer than two blocks of rows (nothing to split).
pub(crate) fn row_blocked_product(
    x: &Tensor<Flex, 2>,
    w: &Tensor<Flex, 2>,
    one_job: bool,
) -> Option<Tensor<Flex, 2>> {
    let xt: FlexTensor = x.clone().into_primitive().tensor();
    let wt: FlexTensor = w.clone().into_primitive().tensor();
    if xt.dtype() != DType::F32 || wt.dtype() != DType::F32 {
        return None;
    }
    let (xl, wl) = (xt.layout(), wt.layout());
    let (m, k, n) = (xl.shape()[0], xl.shape()[1], wl.shape()[1]);
    if k == 0 || n == 0 || m == 0 || (!one_job && m < 2 * ROW_BLOCK) {
        return None;
    }
    let block = if one_job { m } else { ROW_BLOCK };
    let (x_rs, x_cs) = (xl.strides()[0], xl.strides()[1]);
    let (w_rs, w_cs) = (wl.strides()[0], wl.strides()[1]);
    let (x0, w0) = (xl.start_offset(), wl.start_offset());
    let (xs, ws) = (xt.storage::<f32>(), wt.storage::<f32>());
    // Blocks of `ROW_BLOCK` rows, the last one also taking the remainder: a block of one row
    // would go through `gemm`'s matrix-vector path, whose sums run in another order.
    let mut out = vec![0f32; m * n];
    let mut jobs = Vec::with_capacity(m / block);
    let mut rest = out.as_mut_slice();
    for b in 0..m / block {
        let rows = if b + 1 == m / block {
            rest.len() / n
        } else {
            block
        };
        let (dst, tail) = rest.split_at_mut(rows * n);
        jobs.push((b * block, dst));
        rest = tail;
    }
    crate::flex_pool::map(jobs, |(first, dst)| {
        let rows = dst.len() / n;
        // SAFETY: the pointers address `x`'s rows `first ..+ rows` and all of `w` through
        // their own layouts (in bounds of their storages), and `dst` is `rows × n`,
        // row-major, written only here.
        unsafe {
            let lhs = Mat {
                ptr: xs.as_ptr().add(x0).offset(first as isize * x_rs),
                rs: x_rs,
                cs: x_cs,
            };
            let rhs = Mat {
                ptr: ws.as_ptr().add(w0),
                rs: w_rs,
                cs: w_cs,
            };
            product([rows, n, k], dst.as_mut_ptr(), n, lhs, rhs, 1.0, false);
        }
    });
    let t = FlexTensor::from_data(burn::tensor::TensorData::new(out, [m, n]));
    Some(Tensor::from_primitive(TensorPrimitive::Float(t)))
}
