//! CubeCL kernel bodies: one source compiled for wgpu (WGSL/SPIR-V) and CUDA.
//!
//! First versions, correct before fast: f32 accumulation; the matmuls are 32×32-tiled through
//! shared memory with FP8 decoded while a weight tile is loaded; dispatch and combine are one
//! thread per expert / per output. Inputs are contiguous (the launchers make them so) and indexed
//! linearly.

use cubecl::prelude::*;

/// e4m3 code (low 8 bits of `c`) → f32, exactly as the host table.
#[cube]
pub fn decode_e4m3(c: u32) -> f32 {
    let sign = (c & 0x80u32) << 24u32;
    let e = (c >> 3u32) & 0xFu32;
    let m = c & 7u32;
    let mut v = f32::from_bits(sign | ((e + 120u32) << 23u32) | (m << 20u32));
    if e == 0u32 {
        let sub = f32::cast_from(m) * 0.001953125f32;
        v = select(sign != 0u32, -sub, sub);
    }
    if e == 15u32 && m == 7u32 {
        v = f32::from_bits(sign | 0x7FF0_0000u32);
    }
    v
}

/// f32 → e4m3 code, round to nearest even, saturating at ±448: the function `e4m3::encode`
/// computes (the sign bit carries over, so −0.0 → 0x80), by float steps instead of bit ones.
#[cube]
pub fn encode_e4m3(x: f32) -> u32 {
    let a = f32::min(f32::abs(x), 448.0f32);
    let sign = (x.to_bits() >> 24u32) & 0x80u32;
    let biased = i32::cast_from(a.to_bits() >> 23u32);
    let e = i32::max(biased - 127i32, -6i32);
    let q = a * f32::from_bits(u32::cast_from(130i32 - e) << 23u32);
    let f = f32::floor(q);
    let d = q - f;
    let fi = u32::cast_from(f);
    let mut r = fi;
    if d > 0.5f32 || (d == 0.5f32 && (fi & 1u32) == 1u32) {
        r = fi + 1u32;
    }
    (u32::cast_from((e + 7i32) * 8i32 - 8i32) + r) | sign
}

/// Rows of `x` and columns of `out` per cube (32×32 outputs, 16×16 threads, 2×2 each).
pub const TILE: usize = 32;

/// `out[m, n] = Σ_k x[m, k] · W_e[k, n]`, tiled through shared memory, with `e` the row's expert
/// (`row_expert[m]`, rows sorted by expert) when `grouped`, else 0. `W_e` is FP8 (`codes [E, N,
/// ceil(K/4)]` + `scales [E, ceil(N/b), ceil(K/b)]`, decoded and scaled while loading the tile:
/// exactly `f32(e4m3) · scale`) when `fp8`, else float `w [E, K, N]`. A cube whose rows span several
/// experts runs once per expert present, each row accumulating only its own expert's pass; the
/// sum over `k` is in ascending order, one accumulator per output, as the default computes.
#[allow(clippy::too_many_arguments)]
#[cube(launch)]
pub fn tiled_matmul_kernel<F: Float, I: Int>(
    x: &Tensor<F>,
    codes: &Tensor<I>,
    scales: &Tensor<F>,
    w: &Tensor<F>,
    row_expert: &Tensor<I>,
    out: &mut Tensor<F>,
    #[comptime] block: usize,
    #[comptime] fp8: bool,
    #[comptime] grouped: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let m_len = out.shape(0);
    let n_len = out.shape(1);
    let k_len = x.shape(1);
    let kw = codes.shape(2);
    let nb = scales.shape(1);
    let kb = scales.shape(2);
    let tx = UNIT_POS_X as usize;
    let ty = UNIT_POS_Y as usize;
    let tid = ty * 16 + tx;
    let m0 = CUBE_POS_Y as usize * 32;
    let n0 = CUBE_POS_X as usize * 32;
    let mut xs = SharedMemory::<f32>::new(1024usize);
    let mut ws = SharedMemory::<f32>::new(1024usize);
    let ra = m0 + ty;
    let rb = m0 + ty + 16;
    // Rows past the end get an expert id no pass matches.
    let mut ea = 1073741824usize;
    let mut eb = 1073741824usize;
    let mut e = 0usize;
    let mut e_last = 0usize;
    if grouped {
        if ra < m_len {
            ea = usize::cast_from(row_expert[ra]);
        }
        if rb < m_len {
            eb = usize::cast_from(row_expert[rb]);
        }
        e = usize::cast_from(row_expert[m0]);
        e_last = usize::cast_from(row_expert[usize::min(m0 + 31, m_len - 1)]);
    }
    let mut acc00 = 0.0f32;
    let mut acc01 = 0.0f32;
    let mut acc10 = 0.0f32;
    let mut acc11 = 0.0f32;
    loop {
        let mut k0 = 0usize;
        while k0 < k_len {
            for q in 0..4usize {
                let idx = tid + 256 * q;
                let gm = m0 + idx / 32;
                let gk = k0 + idx % 32;
                let mut v = 0.0f32;
                if gm < m_len && gk < k_len {
                    v = f32::cast_from(x[gm * k_len + gk]);
                }
                xs[idx] = v;
            }
            if fp8 {
                let nn = tid / 8;
                let wq = tid % 8;
                let gn = n0 + nn;
                let word_idx = k0 / 4 + wq;
                let mut word = 0u32;
                let mut s = 0.0f32;
                if gn < n_len && word_idx < kw {
                    word = u32::cast_from(codes[(e * n_len + gn) * kw + word_idx]);
                    s = f32::cast_from(scales[(e * nb + gn / block) * kb + (word_idx * 4) / block]);
                }
                #[unroll]
                for j in 0..4u32 {
                    let c = (word >> (8u32 * j)) & 0xFFu32;
                    ws[(wq * 4 + j as usize) * 32 + nn] = decode_e4m3(c) * s;
                }
            } else {
                for q in 0..4usize {
                    let idx = tid + 256 * q;
                    let gk = k0 + idx / 32;
                    let gn = n0 + idx % 32;
                    let mut v = 0.0f32;
                    if gk < k_len && gn < n_len {
                        v = f32::cast_from(w[(e * k_len + gk) * n_len + gn]);
                    }
                    ws[idx] = v;
                }
            }
            sync_cube();
            if !grouped || ea == e {
                for kk in 0..32usize {
                    let a = xs[ty * 32 + kk];
                    acc00 += a * ws[kk * 32 + tx];
                    acc01 += a * ws[kk * 32 + tx + 16];
                }
            }
            if !grouped || eb == e {
                for kk in 0..32usize {
                    let a = xs[(ty + 16) * 32 + kk];
                    acc10 += a * ws[kk * 32 + tx];
                    acc11 += a * ws[kk * 32 + tx + 16];
                }
            }
            sync_cube();
            k0 += 32;
        }
        if !grouped || e >= e_last {
            break;
        }
        // The next expert present in this cube's rows (the same scan in every thread).
        let mut next = e_last;
        for r in 0..32usize {
            let gm = m0 + r;
            if gm < m_len {
                let er = usize::cast_from(row_expert[gm]);
                if er > e && er < next {
                    next = er;
                }
            }
        }
        e = next;
    }
    let ca = n0 + tx;
    let cb = n0 + tx + 16;
    if ra < m_len {
        if ca < n_len {
            out[ra * n_len + ca] = F::cast_from(acc00);
        }
        if cb < n_len {
            out[ra * n_len + cb] = F::cast_from(acc01);
        }
    }
    if rb < m_len {
        if ca < n_len {
            out[rb * n_len + ca] = F::cast_from(acc10);
        }
        if cb < n_len {
            out[rb * n_len + cb] = F::cast_from(acc11);
        }
    }
}

/// One thread per output: `out[m, n] = Σ_k x[m, k] · W_e[k, n]`, with the weights and `e` as in
/// [`tiled_matmul_kernel()`] (FP8 codes + scales decoded in registers when `fp8`, else float
/// `w [E, K, N]`). Used for grouped matmuls with few rows per expert, where the tiled kernel
/// would run one pass per expert present in a tile.
#[allow(clippy::too_many_arguments)]
#[cube(launch)]
pub fn rows_matmul_kernel<F: Float, I: Int>(
    x: &Tensor<F>,
    codes: &Tensor<I>,
    scales: &Tensor<F>,
    w: &Tensor<F>,
    row_expert: &Tensor<I>,
    out: &mut Tensor<F>,
    #[comptime] block: usize,
    #[comptime] fp8: bool,
    #[comptime] grouped: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let n = ABSOLUTE_POS_X as usize;
    let m = ABSOLUTE_POS_Y as usize;
    let rows_n = out.shape(1);
    if n >= rows_n || m >= out.shape(0) {
        terminate!();
    }
    let k_len = x.shape(1);
    let mut e = 0usize;
    if grouped {
        e = usize::cast_from(row_expert[m]);
    }
    let x_row = m * k_len;
    let mut acc = 0.0f32;
    if fp8 {
        let kw = codes.shape(2);
        let nb = scales.shape(1);
        let kb = scales.shape(2);
        let code_row = (e * rows_n + n) * kw;
        let scale_row = (e * nb + n / block) * kb;
        for wi in 0..kw {
            let word = u32::cast_from(codes[code_row + wi]);
            let s = f32::cast_from(scales[scale_row + (wi * 4) / block]);
            #[unroll]
            for j in 0..4u32 {
                let k = wi * 4 + j as usize;
                if k < k_len {
                    let c = (word >> (8u32 * j)) & 0xFFu32;
                    acc += f32::cast_from(x[x_row + k]) * (decode_e4m3(c) * s);
                }
            }
        }
    } else {
        let w_base = e * k_len * rows_n + n;
        for k in 0..k_len {
            acc += f32::cast_from(x[x_row + k]) * f32::cast_from(w[w_base + k * rows_n]);
        }
    }
    out[m * rows_n + n] = F::cast_from(acc);
}

/// One thread per (row `m`, tile `t`): the tile's scale, then its codes packed four per word.
#[allow(clippy::manual_div_ceil)] // `div_ceil` has no CubeCL expansion
#[cube(launch)]
pub fn fp8_quantize_kernel<F: Float, I: Int>(
    x: &Tensor<F>,
    codes: &mut Tensor<I>,
    scales: &mut Tensor<F>,
    #[comptime] block: usize,
    #[comptime] ue8m0: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let t = ABSOLUTE_POS_X as usize;
    let m = ABSOLUTE_POS_Y as usize;
    let tiles = scales.shape(1);
    if t >= tiles || m >= x.shape(0) {
        terminate!();
    }
    let k_len = x.shape(1);
    let start = t * block;
    let end = usize::min(start + block, k_len);
    let x_row = m * k_len;
    let mut amax = 0.0f32;
    for k in start..end {
        amax = f32::max(amax, f32::abs(f32::cast_from(x[x_row + k])));
    }
    amax = f32::max(amax, 0.0001f32);
    let mut s = amax / 448.0f32;
    if ue8m0 {
        let b = s.to_bits();
        if (b & 0x7F_FFFFu32) != 0u32 {
            s = f32::from_bits((b & 0x7F80_0000u32) + 0x80_0000u32);
        }
    }
    scales[m * tiles + t] = F::cast_from(s);
    let kw = codes.shape(1);
    for w in start / 4..(end + 3) / 4 {
        let mut word = 0u32;
        #[unroll]
        for j in 0..4u32 {
            let k = w * 4 + j as usize;
            if k < end {
                word |= encode_e4m3(f32::cast_from(x[x_row + k]) / s) << (8u32 * j);
            }
        }
        codes[m * kw + w] = I::cast_from(word);
    }
}

/// One thread per expert `e`: its offset is the number of slots routed to lower experts; then
/// its slots, in slot order, are placed from there. Deterministic (a stable counting sort).
#[cube(launch)]
pub fn moe_dispatch_kernel<I: Int>(
    ids: &Tensor<I>,
    order: &mut Tensor<I>,
    tokens: &mut Tensor<I>,
    experts: &mut Tensor<I>,
    position: &mut Tensor<I>,
    offsets: &mut Tensor<I>,
    k: usize,
    #[define(I)] _dtype: StorageType,
) {
    let e = ABSOLUTE_POS_X as usize;
    let num_experts = offsets.shape(0) - 1;
    if e >= num_experts {
        terminate!();
    }
    let s_len = ids.shape(0);
    let mut off = 0usize;
    for s in 0..s_len {
        if usize::cast_from(ids[s]) < e {
            off += 1;
        }
    }
    offsets[e] = I::cast_from(off);
    if e == num_experts - 1 {
        offsets[num_experts] = I::cast_from(s_len);
    }
    let mut p = off;
    for s in 0..s_len {
        if usize::cast_from(ids[s]) == e {
            order[p] = I::cast_from(s);
            tokens[p] = I::cast_from(s / k);
            experts[p] = I::cast_from(e);
            position[s] = I::cast_from(p);
            p += 1;
        }
    }
}

/// `out[t, h] = base[t, h] + Σ_j weights[t, j] · y[position[t·k + j], h]`.
#[cube(launch)]
pub fn moe_combine_kernel<F: Float, I: Int>(
    y: &Tensor<F>,
    position: &Tensor<I>,
    weights: &Tensor<F>,
    base: &Tensor<F>,
    out: &mut Tensor<F>,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let h = ABSOLUTE_POS_X as usize;
    let t = ABSOLUTE_POS_Y as usize;
    let hidden = out.shape(1);
    if h >= hidden || t >= out.shape(0) {
        terminate!();
    }
    let k = weights.shape(1);
    let mut acc = 0.0f32;
    for j in 0..k {
        let p = usize::cast_from(position[t * k + j]);
        acc += f32::cast_from(weights[t * k + j]) * f32::cast_from(y[p * hidden + h]);
    }
    out[t * hidden + h] = F::cast_from(f32::cast_from(base[t * hidden + h]) + acc);
}
