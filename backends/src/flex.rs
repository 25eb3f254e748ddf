//! The Flex (CPU) side of [`DsBackend`]: decode's thin products and independent jobs on the
//! thread pool. Everything else uses the plain-tensor defaults.

use burn::backend::Flex;
use burn::tensor::{bf16, DType, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// `x [1, K] · w [K, N]` reading `w` once, row by row (`y += x[k] · w[k, :]`), with the columns
/// split over the thread pool for large weights. Flex's general matmul runs products under ~7M
/// multiply-adds on one thread and streams a one-row product below memory speed; decode is
/// nothing but such products. `w` may be f32 or bf16 (widened as it is read). `None` when the
/// operands are not f32 (`x`) / f32 or bf16 (`w`) with unit column stride.
pub(crate) fn row_times_matrix(
    x: &Tensor<Flex, 2>,
    w: &Tensor<Flex, 2>,
) -> Option<Tensor<Flex, 2>> {
    let xt: FlexTensor = x.clone().into_primitive().tensor();
    let wt: FlexTensor = w.clone().into_primitive().tensor();
    if xt.dtype() != DType::F32 {
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
    let (w0, w_row) = (wl.start_offset(), w_row as usize);
    let out = match wt.dtype() {
        DType::F32 => product(&xv, wt.storage::<f32>(), w0, w_row, n, |v| v),
        DType::BF16 => product(&xv, wt.storage::<bf16>(), w0, w_row, n, bf16::to_f32),
        _ => return None,
    };
    let t = FlexTensor::from_data(TensorData::new(out, [1, n]));
    Some(Tensor::from_primitive(TensorPrimitive::Float(t)))
}

/// `y[c] = Σ_i x[i] · w[w0 + i·w_row + c]` for `c < n`, by column blocks.
fn product<T: Wide>(
    xv: &[f32],
    ws: &[T],
    w0: usize,
    w_row: usize,
    n: usize,
    widen: impl Fn(T) -> f32 + Copy + Sync,
) -> Vec<f32> {
    let k = xv.len();
    // Output columns `c0..c0 + out.len()`: eight weight rows per pass over the partial sums
    // (fewer loads and stores of them), each pass adding its eight products in k order.
    let block = |c0: usize, out: &mut [f32]| {
        let len = out.len();
        let rows: Vec<&[T]> = (0..k)
            .map(|i| &ws[w0 + i * w_row + c0..w0 + i * w_row + c0 + len])
            .collect();
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features the function is compiled for, and every row
            // holds `out.len()` values.
            unsafe { T::accumulate_avx2(xv, &rows, out) };
            return;
        }
        accumulate(xv, &rows, out, widen, |a, b, c| c + a * b);
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
    out
}

/// `out[c] = Σ_i x[i] · widen(rows[i][c])`, eight rows per pass, `madd(a, b, acc)` = `acc + a·b`.
#[inline(always)]
fn accumulate<T: Copy>(
    x: &[f32],
    rows: &[&[T]],
    out: &mut [f32],
    widen: impl Fn(T) -> f32,
    madd: impl Fn(f32, f32, f32) -> f32,
) {
    out.fill(0.0);
    let (k, len) = (x.len(), out.len());
    let mut i = 0;
    while i + 8 <= k {
        let r: [&[T]; 8] = std::array::from_fn(|j| &rows[i + j][..len]);
        let a: [f32; 8] = std::array::from_fn(|j| x[i + j]);
        for c in 0..len {
            let mut acc = out[c];
            for j in 0..8 {
                acc = madd(a[j], widen(r[j][c]), acc);
            }
            out[c] = acc;
        }
        i += 8;
    }
    for (&xi, row) in x.iter().zip(rows).skip(i) {
        for (o, &wv) in out.iter_mut().zip(&row[..len]) {
            *o = madd(xi, widen(wv), *o);
        }
    }
}

/// A weight element type the one-row kernel reads (f32, or bf16 widened as it is loaded).
trait Wide: Copy + Sync {
    /// `accumulate` with AVX2 vectors of eight columns and fused multiply-adds (the same
    /// operations in the same order per column as the scalar form with `f32::mul_add`).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA, and every row must hold at least `out.len()` values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn accumulate_avx2(x: &[f32], rows: &[&[Self]], out: &mut [f32]);
}

/// Eight consecutive weights as f32 lanes.
#[cfg(target_arch = "x86_64")]
trait Load8: Copy {
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    fn widen(self) -> f32;
}

#[cfg(target_arch = "x86_64")]
impl Load8 for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees eight readable values at `p`.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

#[cfg(target_arch = "x86_64")]
impl Load8 for bf16 {
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees eight readable values at `p`; bf16 is the high half
        // of an f32, so widening is a zero-extend and a 16-bit shift.
        unsafe {
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

#[cfg(target_arch = "x86_64")]
impl<T: Load8 + Sync> Wide for T {
    #[target_feature(enable = "avx2,fma")]
    unsafe fn accumulate_avx2(x: &[f32], rows: &[&[T]], out: &mut [f32]) {
        use std::arch::x86_64::*;
        out.fill(0.0);
        let (k, len) = (x.len(), out.len());
        let o = out.as_mut_ptr();
        let mut i = 0;
        while i < k {
            let g = (k - i).min(8); // rows in this pass
            let a: [f32; 8] = std::array::from_fn(|j| if j < g { x[i + j] } else { 0.0 });
            let p: [*const T; 8] = std::array::from_fn(|j| rows[i + j.min(g - 1)].as_ptr());
            let mut c = 0;
            // SAFETY: c + 8 <= len and every row holds `len` values; `o` points at `len`.
            unsafe {
                while c + 8 <= len {
                    let mut acc = _mm256_loadu_ps(o.add(c));
                    for j in 0..g {
                        acc = _mm256_fmadd_ps(_mm256_set1_ps(a[j]), T::load8(p[j].add(c)), acc);
                    }
                    _mm256_storeu_ps(o.add(c), acc);
                    c += 8;
                }
                while c < len {
                    let mut acc = *o.add(c);
                    for j in 0..g {
                        acc = a[j].mul_add((*p[j].add(c)).widen(), acc);
                    }
                    *o.add(c) = acc;
                    c += 1;
                }
            }
            i += g;
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
impl<T: Copy + Sync> Wide for T {}
