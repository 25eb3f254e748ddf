//! The Flex (CPU) side of [`DsBackend`]: decode's thin products and independent jobs on the
//! thread pool. Everything else uses the plain-tensor defaults.

use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// `x [1, K] · w [K, N]` reading `w` once, row by row (`y += x[k] · w[k, :]`), with the columns
/// split over the thread pool for large weights. Flex's general matmul runs products under ~7M
/// multiply-adds on one thread and streams a one-row product below memory speed; decode is
/// nothing but such products. `None` when the operands are not f32 with unit column stride.
pub(crate) fn row_times_matrix(
    x: &Tensor<Flex, 2>,
    w: &Tensor<Flex, 2>,
) -> Option<Tensor<Flex, 2>> {
    let xt: FlexTensor = x.clone().into_primitive().tensor();
    let wt: FlexTensor = w.clone().into_primitive().tensor();
    if xt.dtype() != DType::F32 || wt.dtype() != DType::F32 {
        return None;
    }
    let (xl, wl) = (xt.layout(), wt.layout());
    let (k, n) = (wl.shape()[0], wl.shape()[1]);
    let (x_col, w_row, w_col) = (xl.strides()[1], wl.strides()[0], wl.strides()[1]);
    if xl.shape()[0] != 1 || w_col != 1 || w_row < n as isize || x_col <= 0 {
        return None;
    }
    let xs = xt.storage::<f32>();
    let x0 = xl.start_offset();
    let xv: Vec<f32> = (0..k).map(|i| xs[x0 + i * x_col as usize]).collect();
    let ws = wt.storage::<f32>();
    let (w0, w_row) = (wl.start_offset(), w_row as usize);
    // Output columns `c0..c0 + out.len()`: eight weight rows per pass over the partial sums
    // (fewer loads and stores of them), each pass adding its eight products in k order.
    let block = |c0: usize, out: &mut [f32]| {
        let len = out.len();
        let rows: Vec<&[f32]> = (0..k)
            .map(|i| &ws[w0 + i * w_row + c0..w0 + i * w_row + c0 + len])
            .collect();
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features the function is compiled for.
            unsafe { accumulate_fma(&xv, &rows, out) };
            return;
        }
        accumulate(&xv, &rows, out, |a, b, c| c + a * b);
    };
    let mut out = vec![0f32; n];
    let threads = rayon::current_num_threads();
    // Below ~512K weights the pool's wake-up costs more than a second core saves.
    if threads < 2 || k * n < 1 << 19 {
        // Column blocks that keep the partial sums in L1.
        for (j, chunk) in out.chunks_mut(1024).enumerate() {
            block(j * 1024, chunk);
        }
    } else {
        let per = n.div_ceil(threads).next_multiple_of(16).min(4096);
        out.par_chunks_mut(per)
            .enumerate()
            .for_each(|(j, chunk)| block(j * per, chunk));
    }
    let t = FlexTensor::from_data(TensorData::new(out, [1, n]));
    Some(Tensor::from_primitive(TensorPrimitive::Float(t)))
}

/// `out[c] = Σ_i x[i] · rows[i][c]`, eight rows per pass, `madd(a, b, acc)` = `acc + a·b`.
#[inline(always)]
fn accumulate(x: &[f32], rows: &[&[f32]], out: &mut [f32], madd: impl Fn(f32, f32, f32) -> f32) {
    out.fill(0.0);
    let (k, len) = (x.len(), out.len());
    let mut i = 0;
    while i + 8 <= k {
        let r: [&[f32]; 8] = std::array::from_fn(|j| &rows[i + j][..len]);
        let a: [f32; 8] = std::array::from_fn(|j| x[i + j]);
        for c in 0..len {
            let mut acc = out[c];
            for j in 0..8 {
                acc = madd(a[j], r[j][c], acc);
            }
            out[c] = acc;
        }
        i += 8;
    }
    for (&xi, row) in x.iter().zip(rows).skip(i) {
        for (o, &wv) in out.iter_mut().zip(&row[..len]) {
            *o = madd(xi, wv, *o);
        }
    }
}

/// [`accumulate`] compiled for AVX2 with fused multiply-adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn accumulate_fma(x: &[f32], rows: &[&[f32]], out: &mut [f32]) {
    accumulate(x, rows, out, f32::mul_add)
}
