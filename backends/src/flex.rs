//! The Flex (CPU) side of [`DsBackend`]: decode's thin products and independent jobs on the
//! thread pool. Everything else uses the plain-tensor defaults.

use burn::backend::Flex;
use burn::tensor::{bf16, DType, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// Most rows [`rows_times_matrix`] takes: decode batches and MTP verification. Above this the
/// general matmul's packing pays for itself.
pub(crate) const MAX_ROWS: usize = 16;

/// Most rows for which the kernel beats Flex's matmul on f32 weights (`bash
/// scripts/bench-kernels.sh few-rows`: at 8 and 16 rows the `gemm` crate's register tiles win on
/// this machine). With bf16 weights the kernel takes up to [`MAX_ROWS`]: the general path
/// would widen the whole weight on every call.
pub(crate) const MAX_ROWS_F32: usize = 4;

/// `x [M, K] · w [K, N]` for `M ≤ MAX_ROWS`, reading `w` once, eight weight rows at a time, each
/// loaded vector used for all `M` rows (`y[r] += x[r, k] · w[k, :]`), with the columns split over
/// the thread pool for large weights. Flex's general matmul runs products under ~7M
/// multiply-adds on one thread and streams a few-row product below memory speed; decode is
/// nothing but such products. Each output row is computed in the same order whatever `M` is, so
/// a row of a batch equals the same row multiplied alone, bit for bit. `w` may be f32 or bf16
/// (widened as it is read). `None` when the operands are not f32 (`x`) / f32 or bf16 (`w`) with
/// unit column stride, or `M` is 0 or above [`MAX_ROWS`].
pub(crate) fn rows_times_matrix(
    x: &Tensor<Flex, 2>,
    w: &Tensor<Flex, 2>,
) -> Option<Tensor<Flex, 2>> {
    let xt: FlexTensor = x.clone().into_primitive().tensor();
    let wt: FlexTensor = w.clone().into_primitive().tensor();
    if xt.dtype() != DType::F32 {
        return None;
    }
    let (xl, wl) = (xt.layout(), wt.layout());
    let (m, k, n) = (xl.shape()[0], wl.shape()[0], wl.shape()[1]);
    let (x_row, x_col) = (xl.strides()[0], xl.strides()[1]);
    let (w_row, w_col) = (wl.strides()[0], wl.strides()[1]);
    if m == 0 || m > MAX_ROWS || x_col <= 0 || x_row < 0 {
        return None;
    }
    // `[K, N]` rows (unit column stride), or `[N, K]` rows viewed transposed (unit row stride).
    let transposed = transposed_layout(wl);
    if !transposed && (w_col != 1 || w_row < n as isize) {
        return None;
    }
    let xs = xt.storage::<f32>();
    let x0 = xl.start_offset();
    let xv: Vec<f32> = (0..m)
        .flat_map(|r| (0..k).map(move |i| (r, i)))
        .map(|(r, i)| xs[x0 + r * x_row as usize + i * x_col as usize])
        .collect();
    let w0 = wl.start_offset();
    let out = if transposed {
        let rows = WeightRows {
            w0,
            ld: w_col as usize,
            k,
            n,
        };
        match wt.dtype() {
            DType::F32 => dots(&xv, m, wt.storage::<f32>(), rows, |v| v),
            DType::BF16 => dots(&xv, m, wt.storage::<bf16>(), rows, bf16::to_f32),
            _ => return None,
        }
    } else {
        let weights = Weights {
            w0,
            w_row: w_row as usize,
            n,
        };
        match wt.dtype() {
            DType::F32 => product(&xv, m, wt.storage::<f32>(), weights, |v| v),
            DType::BF16 => product(&xv, m, wt.storage::<bf16>(), weights, bf16::to_f32),
            _ => return None,
        }
    };
    let t = FlexTensor::from_data(TensorData::new(out, [m, n]));
    Some(Tensor::from_primitive(TensorPrimitive::Float(t)))
}

/// Whether a `[K, N]` product runs on the calling thread: below ~512K weights the pool's
/// wake-up costs more than a second core saves (and with one thread there is nothing to split).
fn on_one_thread(k: usize, n: usize) -> bool {
    crate::flex_pool::threads() < 2 || k * n < 1 << 19
}

/// Whether `w [K, N]` is a transposed view of `[N, K]` rows (unit row stride): a BF16 Linear
/// weight used where it lies in the checkpoint's memory map.
pub(crate) fn is_transposed(w: &Tensor<Flex, 2>) -> bool {
    let wt: FlexTensor = w.clone().into_primitive().tensor();
    transposed_layout(wt.layout())
}

/// A `[K, N]` layout (N > 1) whose columns are contiguous rows of at least K values.
fn transposed_layout(l: &burn_flex::Layout) -> bool {
    l.strides()[0] == 1 && l.strides()[1] >= l.shape()[0] as isize && l.shape()[1] > 1
}

/// Where a transposed weight's `[N, K]` rows sit: output column `c` reads `w0 + c · ld ..+ K`.
#[derive(Clone, Copy)]
struct WeightRows {
    w0: usize,
    ld: usize,
    k: usize,
    n: usize,
}

/// `y[r, c] = Σ_i x[r, i] · w[c, i]` for a weight held as `[N, K]` rows: each weight row is read
/// once and dotted with all `m` input rows. Every output's sum runs in the same order whatever
/// `m` is (eight lanes in k order, the lanes summed pairwise, the tail last), so a row of a
/// batch equals the same row multiplied alone, bit for bit. Columns split over the pool for
/// large weights.
fn dots<T: Wide>(
    xv: &[f32],
    m: usize,
    ws: &[T],
    WeightRows { w0, ld, k, n }: WeightRows,
    widen: impl Fn(T) -> f32 + Copy + Sync,
) -> Vec<f32> {
    // Columns from `c0` into `out [len, m]` (column-major: one weight row's m outputs).
    let row = |c: usize| &ws[w0 + c * ld..w0 + c * ld + k];
    let block = |c0: usize, out: &mut [f32]| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // Up to four rows: four weight rows per pass, so that at least four independent
            // sums are in flight (one sum is bound by the multiply-add's latency, not by memory).
            let group = if m <= 4 { 4 } else { 1 };
            for (j, o) in out.chunks_mut(group * m).enumerate() {
                let c = c0 + j * group;
                let cols = o.len() / m;
                let w: [&[T]; 4] = std::array::from_fn(|q| row(c + q.min(cols - 1)));
                // SAFETY: the CPU has the features; `xv` holds `m · k` values, each weight row
                // `k`, and `o` `cols · m` (cols ≤ 4 and m ≤ 4, or cols = 1).
                unsafe { T::dots_avx2(xv, &w[..cols], o) };
            }
            return;
        }
        for (j, o) in out.chunks_exact_mut(m).enumerate() {
            let row = row(c0 + j);
            for (r, y) in o.iter_mut().enumerate() {
                let x = &xv[r * k..(r + 1) * k];
                *y = x
                    .iter()
                    .zip(row)
                    .fold(0f32, |acc, (&a, &w)| a.mul_add(widen(w), acc));
            }
        }
    };
    let per = if on_one_thread(k, n) {
        n
    } else {
        n.div_ceil(crate::flex_pool::threads())
            .next_multiple_of(16)
            .min(2048)
    };
    let mut cols = vec![0f32; n * m];
    if per == n {
        block(0, &mut cols);
    } else {
        cols.par_chunks_mut(per * m)
            .enumerate()
            .for_each(|(j, chunk)| block(j * per, chunk));
    }
    if m == 1 {
        return cols;
    }
    let mut out = vec![0f32; m * n];
    for (c, ys) in cols.chunks_exact(m).enumerate() {
        for (r, &y) in ys.iter().enumerate() {
            out[r * n + c] = y;
        }
    }
    out
}

/// Where the `[K, N]` weight sits in its storage: row `i` starts at `w0 + i · w_row`.
#[derive(Clone, Copy)]
struct Weights {
    w0: usize,
    w_row: usize,
    n: usize,
}

/// `y[r, c] = Σ_i x[r, i] · w[w0 + i·w_row + c]` for `r < m`, `c < n`, by column blocks.
fn product<T: Wide>(
    xv: &[f32],
    m: usize,
    ws: &[T],
    Weights { w0, w_row, n }: Weights,
    widen: impl Fn(T) -> f32 + Copy + Sync,
) -> Vec<f32> {
    let k = xv.len() / m;
    // Columns `c0..c0 + len` of every row into `out [m, len]`.
    let block = |c0: usize, len: usize, out: &mut [f32]| {
        let rows: Vec<&[T]> = (0..k)
            .map(|i| &ws[w0 + i * w_row + c0..w0 + i * w_row + c0 + len])
            .collect();
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features the function is compiled for, every row holds
            // `len` values, `xv` holds `m · k` and `out` `m · len`.
            unsafe { T::accumulate_avx2(xv, m, &rows, out) };
            return;
        }
        accumulate(xv, m, &rows, out, widen);
    };
    // Column blocks whose partial sums (m × len, ~4 KiB) stay in L1 (the one-row kernel took
    // 1024 columns before it took several rows).
    let width = (1024 / m).next_multiple_of(16);
    let (alone, threads) = (on_one_thread(k, n), crate::flex_pool::threads());
    if m == 1 {
        // One row: the blocks write straight into the output.
        let mut out = vec![0f32; n];
        if alone {
            for (j, chunk) in out.chunks_mut(width).enumerate() {
                block(j * width, chunk.len(), chunk);
            }
        } else {
            let per = n.div_ceil(threads).next_multiple_of(16).min(4096);
            out.par_chunks_mut(per)
                .enumerate()
                .for_each(|(j, chunk)| block(j * per, chunk.len(), chunk));
        }
        return out;
    }
    // Several rows: each block fills its own `[m, len]` buffer, copied into place after.
    let per = if alone {
        width
    } else {
        n.div_ceil(threads).next_multiple_of(16).min(width)
    };
    let starts: Vec<usize> = (0..n).step_by(per).collect();
    let run = |&c0: &usize| {
        let len = per.min(n - c0);
        let mut buf = vec![0f32; m * len];
        block(c0, len, &mut buf);
        (c0, len, buf)
    };
    let parts: Vec<_> = if alone {
        starts.iter().map(run).collect()
    } else {
        starts.par_iter().map(run).collect()
    };
    let mut out = vec![0f32; m * n];
    for (c0, len, buf) in parts {
        for (r, src) in buf.chunks_exact(len).enumerate() {
            out[r * n + c0..r * n + c0 + len].copy_from_slice(src);
        }
    }
    out
}

/// `out[r, c] = Σ_i x[r, i] · widen(rows[i][c])` (`out [m, len]`), eight weight rows per pass,
/// each pass adding its eight products in k order with fused multiply-adds.
#[inline(always)]
fn accumulate<T: Copy>(
    x: &[f32],
    m: usize,
    rows: &[&[T]],
    out: &mut [f32],
    widen: impl Fn(T) -> f32,
) {
    out.fill(0.0);
    let k = rows.len();
    let len = out.len() / m;
    let mut i = 0;
    while i < k {
        let g = (k - i).min(8);
        for (r, o) in out.chunks_exact_mut(len).enumerate() {
            let a = &x[r * k + i..r * k + i + g];
            for (c, oc) in o.iter_mut().enumerate() {
                let mut acc = *oc;
                for (j, &aj) in a.iter().enumerate() {
                    acc = aj.mul_add(widen(rows[i + j][c]), acc);
                }
                *oc = acc;
            }
        }
        i += g;
    }
}

/// A weight element type the few-row kernel reads (f32, or bf16 widened as it is loaded).
trait Wide: Copy + Sync {
    /// `accumulate` with AVX2 vectors of eight columns and fused multiply-adds (the same
    /// operations in the same order per output as the scalar form).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA, `x` must hold `m · rows.len()` values, `out` `m · len`
    /// and every row at least `len`, where `len = out.len() / m`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn accumulate_avx2(x: &[f32], m: usize, rows: &[&[Self]], out: &mut [f32]);

    /// `out[q·m + r] = x[r, :] · w[q]` for the `m = out.len() / w.len()` rows of `x [m, k]`
    /// and each weight row `w[q]` (`k` values), every output in eight AVX2 lanes with fused
    /// multiply-adds over k, the lanes summed pairwise, the tail added last in k order.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `w.len() · m ≤ 16` or `w.len() = 1` with `m ≤ 16`;
    /// every `w[q]` holds `k` values and `x` `m · k`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn dots_avx2(x: &[f32], w: &[&[Self]], out: &mut [f32]);
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
    unsafe fn dots_avx2(x: &[f32], w: &[&[T]], out: &mut [f32]) {
        // SAFETY: forwarded from the caller.
        unsafe { <T as DotAvx2>::dots(x, w, out) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn accumulate_avx2(x: &[f32], m: usize, rows: &[&[T]], out: &mut [f32]) {
        use std::arch::x86_64::*;
        out.fill(0.0);
        let k = rows.len();
        let len = out.len() / m;
        let o = out.as_mut_ptr();
        let xp = x.as_ptr();
        let mut i = 0;
        while i < k {
            let g = (k - i).min(8); // weight rows in this pass
            let p: [*const T; 8] = std::array::from_fn(|j| rows[i + j.min(g - 1)].as_ptr());
            let mut c = 0;
            if m == 1 && g == 8 {
                // One row (decode): the pass's eight inputs are broadcast once, not reloaded
                // per column (the compiler cannot hoist them past the stores through `o`), and
                // each weight vector goes straight into its multiply-add. Same operations in
                // the same order per output as the general loop below.
                // SAFETY: as below, with m = 1.
                unsafe {
                    let xs: [__m256; 8] = std::array::from_fn(|j| _mm256_set1_ps(*xp.add(i + j)));
                    while c + 8 <= len {
                        let dst = o.add(c);
                        let mut acc = _mm256_loadu_ps(dst);
                        for (j, &xj) in xs.iter().enumerate() {
                            acc = _mm256_fmadd_ps(xj, T::load8(p[j].add(c)), acc);
                        }
                        _mm256_storeu_ps(dst, acc);
                        c += 8;
                    }
                }
            }
            // SAFETY: c + 8 <= len and every row holds `len` values; `o` points at `m · len`
            // and `xp` at `m · k` values, of which row r's pass reads `r·k + i .. r·k + i + g`.
            unsafe {
                while c + 8 <= len {
                    // The eight weight vectors are loaded once and used for every row.
                    let wv: [__m256; 8] = std::array::from_fn(|j| {
                        if j < g {
                            T::load8(p[j].add(c))
                        } else {
                            _mm256_setzero_ps()
                        }
                    });
                    for r in 0..m {
                        let a = xp.add(r * k + i);
                        let dst = o.add(r * len + c);
                        let mut acc = _mm256_loadu_ps(dst);
                        for (j, &wj) in wv.iter().enumerate().take(g) {
                            acc = _mm256_fmadd_ps(_mm256_set1_ps(*a.add(j)), wj, acc);
                        }
                        _mm256_storeu_ps(dst, acc);
                    }
                    c += 8;
                }
                while c < len {
                    for r in 0..m {
                        let a = xp.add(r * k + i);
                        let dst = o.add(r * len + c);
                        let mut acc = *dst;
                        for (j, &pj) in p.iter().enumerate().take(g) {
                            acc = (*a.add(j)).mul_add((*pj.add(c)).widen(), acc);
                        }
                        *dst = acc;
                    }
                    c += 1;
                }
            }
            i += g;
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl<T: Load8 + Sync> DotAvx2 for T {}

/// The body of [`Wide::dots_avx2`] (a provided method cannot carry `target_feature` on a
/// trait's default here, so it lives on a helper trait).
#[cfg(target_arch = "x86_64")]
trait DotAvx2: Load8 {
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dots(x: &[f32], w: &[&[Self]], out: &mut [f32]) {
        use std::arch::x86_64::*;
        let cols = w.len();
        let (m, k) = (out.len() / cols, w[0].len());
        // One accumulator per output, `q·m + r`.
        let mut acc = [_mm256_setzero_ps(); MAX_ROWS];
        let xp = x.as_ptr();
        let mut i = 0;
        // SAFETY: i + 8 <= k; row r of `x` holds k values from r·k, each w[q] k values;
        // cols · m <= MAX_ROWS.
        unsafe {
            while i + 8 <= k {
                for (q, wq) in w.iter().enumerate() {
                    let wv = Self::load8(wq.as_ptr().add(i));
                    for r in 0..m {
                        let a = &mut acc[q * m + r];
                        *a = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(r * k + i)), wv, *a);
                    }
                }
                i += 8;
            }
        }
        for (o, (y, a)) in out.iter_mut().zip(acc).enumerate() {
            let (q, r) = (o / m, o % m);
            let mut l = [0f32; 8];
            // SAFETY: `l` holds eight f32.
            unsafe { _mm256_storeu_ps(l.as_mut_ptr(), a) };
            let mut s = ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
            for j in i..k {
                s = x[r * k + j].mul_add(w[q][j].widen(), s);
            }
            *y = s;
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
impl<T: Copy + Sync> Wide for T {}
