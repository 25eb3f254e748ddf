//! The fused element-wise operations (RMSNorm, SwiGLU, softmax, log-softmax; `fused.rs` in the
//! backends crate): Flex's one-pass forms and the plain-tensor defaults against float64 host
//! formulas, forward and backward; under `Autodiff<Flex>` the fused nodes' gradients against
//! autodiff through the plain forms; Flex's results the same on any number of threads.
//!
//! Shapes: 37 rows (not a multiple of Flex's 32-row chunks) × 67 features (not a multiple of a
//! SIMD width), values ~N(0, 1). Tolerance: each output is a few f32 operations on sums of at
//! most 67 terms, accumulated in f64 by the fused forms and in f32 by the plain ones: error
//! ≲ 67 · 2⁻²⁴ ≈ 4e-6 relative to the magnitudes summed; the bound is 2e-5 × (1 + max |ref|).
//! A wrong formula term (a missing `r³`, the sign of `1 − s`) is off by 1e-1 or more.

use burn::backend::{Autodiff, Flex};
use burn::tensor::{Tensor, TensorData};
use dsv3_backends::{fused, DsBackend};

use crate::common::*;

type A = Autodiff<Flex>;
const N: usize = 37;
const D: usize = 67;
const EPS: f64 = 1e-6;

fn t2<Bk: burn::tensor::backend::Backend>(v: &[f64], shape: [usize; 2]) -> Tensor<Bk, 2> {
    let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    Tensor::from_data(TensorData::new(v, shape), &Default::default())
}

fn t1<Bk: burn::tensor::backend::Backend>(v: &[f64]) -> Tensor<Bk, 1> {
    let n = v.len();
    let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    Tensor::from_data(TensorData::new(v, [n]), &Default::default())
}

fn host<Bk: burn::tensor::backend::Backend, const R: usize>(t: Tensor<Bk, R>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

/// Inputs rounded to f32 first, so the f64 reference sees exactly what the backends see.
fn draw(rng: &mut Rng, n: usize) -> Vec<f64> {
    rng.normal_vec(n, 1.0).into_iter().map(f64::from).collect()
}

fn check(what: &str, got: &[f32], want: &[f64]) {
    let err = max_abs_diff(got, want);
    let bound = 2e-5 * (1.0 + max_abs(want));
    assert!(
        err <= bound,
        "{what}: max |error| {err:.3e} > bound {bound:.3e}"
    );
}

fn rows(v: &[f64]) -> impl Iterator<Item = &[f64]> {
    v.chunks(D)
}

/// Float64 formulas: forward outputs and the gradients of `Σ c · y` (`c` = `grad`).
struct Reference {
    rms: Vec<f64>,
    rms_dx: Vec<f64>,
    rms_dw: Vec<f64>,
    swiglu: Vec<f64>,
    swiglu_dgate: Vec<f64>,
    swiglu_dup: Vec<f64>,
    softmax: Vec<f64>,
    softmax_dx: Vec<f64>,
    log_softmax: Vec<f64>,
    log_softmax_dx: Vec<f64>,
}

fn reference(x: &[f64], w: &[f64], u: &[f64], g: &[f64]) -> Reference {
    let mut r = Reference {
        rms: vec![],
        rms_dx: vec![],
        rms_dw: vec![0.0; D],
        swiglu: vec![],
        swiglu_dgate: vec![],
        swiglu_dup: vec![],
        softmax: vec![],
        softmax_dx: vec![],
        log_softmax: vec![],
        log_softmax_dx: vec![],
    };
    for (xr, gr) in rows(x).zip(rows(g)) {
        // RMSNorm: y = x · w · s, s = (mean x² + ε)^(-1/2).
        let s = 1.0 / (xr.iter().map(|v| v * v).sum::<f64>() / D as f64 + EPS).sqrt();
        let gw: Vec<f64> = gr.iter().zip(w).map(|(g, w)| g * w).collect();
        let dot: f64 = gw.iter().zip(xr).map(|(a, b)| a * b).sum::<f64>() / D as f64;
        for j in 0..D {
            r.rms.push(xr[j] * w[j] * s);
            r.rms_dx.push(gw[j] * s - xr[j] * s.powi(3) * dot);
            r.rms_dw[j] += gr[j] * xr[j] * s;
        }
        // Softmax and log-softmax.
        let max = xr.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = xr.iter().map(|v| (v - max).exp()).sum();
        let p: Vec<f64> = xr.iter().map(|v| (v - max).exp() / z).collect();
        let gp: f64 = gr.iter().zip(&p).map(|(a, b)| a * b).sum();
        let gsum: f64 = gr.iter().sum();
        for j in 0..D {
            r.softmax.push(p[j]);
            r.softmax_dx.push(p[j] * (gr[j] - gp));
            r.log_softmax.push(xr[j] - max - z.ln());
            r.log_softmax_dx.push(gr[j] - p[j] * gsum);
        }
    }
    for ((&a, &b), &c) in x.iter().zip(u).zip(g) {
        // SwiGLU with gate = x: y = a σ(a) b.
        let s = 1.0 / (1.0 + (-a).exp());
        r.swiglu.push(a * s * b);
        r.swiglu_dup.push(c * a * s);
        r.swiglu_dgate.push(c * b * s * (1.0 + a * (1.0 - s)));
    }
    r
}

fn inputs(seed: u64) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut rng = Rng::new(seed);
    let x = draw(&mut rng, N * D);
    let w = draw(&mut rng, D);
    let u = draw(&mut rng, N * D);
    let g = draw(&mut rng, N * D);
    (x, w, u, g)
}

/// Forward and backward operations of a backend `Bk` (Flex's fused forms, or the plain
/// defaults through `plain = true`) against the float64 formulas.
fn ops_match_reference<Bk: DsBackend>(plain: bool) {
    let (x, w, u, g) = inputs(7);
    let want = reference(&x, &w, &u, &g);
    let (xt, wt, ut, gt) = (
        t2::<Bk>(&x, [N, D]),
        t1::<Bk>(&w),
        t2::<Bk>(&u, [N, D]),
        t2::<Bk>(&g, [N, D]),
    );
    let tag = if plain { "plain" } else { "fused" };
    let (rms, (rdx, rdw), sw, (sdg, sdu), sm, lsm) = if plain {
        (
            fused::default_rms_norm(xt.clone(), wt.clone(), EPS),
            fused::default_rms_norm_backward(xt.clone(), wt.clone(), EPS, gt.clone()),
            fused::default_swiglu(xt.clone(), ut.clone()),
            fused::default_swiglu_backward(xt.clone(), ut.clone(), gt.clone()),
            fused::default_softmax_rows(xt.clone()),
            fused::default_log_softmax_rows(xt.clone()),
        )
    } else {
        (
            Bk::rms_norm(xt.clone(), wt.clone(), EPS),
            Bk::rms_norm_backward(xt.clone(), wt.clone(), EPS, gt.clone()),
            Bk::swiglu(xt.clone(), ut.clone()),
            Bk::swiglu_backward(xt.clone(), ut.clone(), gt.clone()),
            Bk::softmax_rows(xt.clone()),
            Bk::log_softmax_rows(xt.clone()),
        )
    };
    let (smdx, lsmdx) = if plain {
        (
            fused::default_softmax_rows_backward(sm.clone(), gt.clone()),
            fused::default_log_softmax_rows_backward(lsm.clone(), gt.clone()),
        )
    } else {
        (
            Bk::softmax_rows_backward(sm.clone(), gt.clone()),
            Bk::log_softmax_rows_backward(lsm.clone(), gt),
        )
    };
    check(&format!("{tag} rms_norm"), &host(rms), &want.rms);
    check(&format!("{tag} rms_norm ∂x"), &host(rdx), &want.rms_dx);
    check(&format!("{tag} rms_norm ∂w"), &host(rdw), &want.rms_dw);
    check(&format!("{tag} swiglu"), &host(sw), &want.swiglu);
    check(
        &format!("{tag} swiglu ∂gate"),
        &host(sdg),
        &want.swiglu_dgate,
    );
    check(&format!("{tag} swiglu ∂up"), &host(sdu), &want.swiglu_dup);
    check(&format!("{tag} softmax"), &host(sm), &want.softmax);
    check(&format!("{tag} softmax ∂x"), &host(smdx), &want.softmax_dx);
    check(&format!("{tag} log_softmax"), &host(lsm), &want.log_softmax);
    check(
        &format!("{tag} log_softmax ∂x"),
        &host(lsmdx),
        &want.log_softmax_dx,
    );
}

#[test]
fn flex_fused_ops_equal_float64() {
    ops_match_reference::<Flex>(false);
}

#[test]
fn plain_defaults_equal_float64() {
    ops_match_reference::<Flex>(true);
}

/// Under `Autodiff<Flex>`: the loss `Σ c · op(x)` differentiated through the fused node equals
/// autodiff through the plain form, for every input of each operation, through the rank-3
/// wrappers the model calls.
#[test]
fn autodiff_fused_gradients_equal_plain() {
    let (x, w, u, g) = inputs(11);
    let shape3 = [1, N, D];
    let leaf = |v: &[f64]| t2::<A>(v, [N, D]).reshape(shape3).require_grad();
    let c = t2::<A>(&g, [N, D]).reshape(shape3);
    type Op = fn(Tensor<A, 3>, Tensor<A, 1>, Tensor<A, 3>, bool) -> Tensor<A, 3>;
    let ops: [(&str, Op); 4] = [
        ("rms_norm", |x, w, _, plain| {
            if plain {
                fused::default_rms_norm(x.reshape([N, D]), w, EPS).reshape([1, N, D])
            } else {
                fused::rms_norm(x, w, EPS)
            }
        }),
        ("swiglu", |x, _, u, plain| {
            if plain {
                fused::default_swiglu(x.reshape([N, D]), u.reshape([N, D])).reshape([1, N, D])
            } else {
                fused::swiglu(x, u)
            }
        }),
        ("softmax", |x, _, _, plain| {
            if plain {
                fused::default_softmax_rows(x.reshape([N, D])).reshape([1, N, D])
            } else {
                fused::softmax(x)
            }
        }),
        ("log_softmax", |x, _, _, plain| {
            if plain {
                fused::default_log_softmax_rows(x.reshape([N, D])).reshape([1, N, D])
            } else {
                fused::log_softmax(x)
            }
        }),
    ];
    for (name, op) in ops {
        let grads_of = |plain: bool| {
            let (xt, ut) = (leaf(&x), leaf(&u));
            let wt = t1::<A>(&w).require_grad();
            let y = op(xt.clone(), wt.clone(), ut.clone(), plain);
            let forward = host(y.clone());
            let grads = (y * c.clone()).sum().backward();
            let gx = host(xt.grad(&grads).expect("∂x"));
            let gu = ut.grad(&grads).map(host);
            let gw = wt.grad(&grads).map(host);
            (forward, gx, gu, gw)
        };
        let (fused_y, fused_x, fused_u, fused_w) = grads_of(false);
        let (plain_y, plain_x, plain_u, plain_w) = grads_of(true);
        let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        check(&format!("{name} forward"), &fused_y, &f64s(&plain_y));
        check(&format!("{name} ∂x"), &fused_x, &f64s(&plain_x));
        assert_eq!(fused_u.is_some(), plain_u.is_some(), "{name}: ∂up presence");
        if let (Some(a), Some(b)) = (fused_u, plain_u) {
            check(&format!("{name} ∂up"), &a, &f64s(&b));
        }
        assert_eq!(fused_w.is_some(), plain_w.is_some(), "{name}: ∂w presence");
        if let (Some(a), Some(b)) = (fused_w, plain_w) {
            check(&format!("{name} ∂w"), &a, &f64s(&b));
        }
    }
}

/// Flex's fused forms give the same bits on one thread and on three (row chunks are fixed and
/// the column sums of RMSNorm's `∂w` add chunk partials in chunk order), at a size that spans
/// several chunks.
#[test]
fn flex_fused_ops_do_not_depend_on_threads() {
    let n = 300;
    let mut rng = Rng::new(5);
    let v = |rng: &mut Rng, k| draw(rng, k);
    let (x, w, u, g) = (
        v(&mut rng, n * D),
        v(&mut rng, D),
        v(&mut rng, n * D),
        v(&mut rng, n * D),
    );
    let run = || {
        let (xt, wt, ut, gt) = (
            t2::<Flex>(&x, [n, D]),
            t1::<Flex>(&w),
            t2::<Flex>(&u, [n, D]),
            t2::<Flex>(&g, [n, D]),
        );
        let (dx, dw) = Flex::rms_norm_backward(xt.clone(), wt.clone(), EPS, gt.clone());
        let (dg, du) = Flex::swiglu_backward(xt.clone(), ut.clone(), gt.clone());
        let sm = Flex::softmax_rows(xt.clone());
        let lsm = Flex::log_softmax_rows(xt.clone());
        [
            host(Flex::rms_norm(xt.clone(), wt, EPS)),
            host(dx),
            host(dw),
            host(Flex::swiglu(xt, ut)),
            host(dg),
            host(du),
            host(Flex::softmax_rows_backward(sm, gt.clone())),
            host(Flex::log_softmax_rows_backward(lsm.clone(), gt)),
            host(lsm),
        ]
    };
    assert_same_bits_on_1_and_3_threads(run);
}

/// The cases the model's call sites produce besides plain rows: transposed (non-contiguous)
/// inputs, attention rows with masked (−∞) keys, which get probability 0 and gradient 0, and a
/// weight that only broadcasts (length 1), which Flex hands to the plain form. Each against the
/// plain form on the same inputs, same bound as above.
#[test]
fn flex_fused_ops_take_views_masks_and_fall_back() {
    let (x, w, u, g) = inputs(13);
    let view = |v: &[f64]| t2::<Flex>(v, [D, N]).transpose(); // [N, D], column-major
    let (xt, ut, gt, wt) = (view(&x), view(&u), view(&g), t1::<Flex>(&w));
    let f64s = |t: Tensor<Flex, 2>| host(t).into_iter().map(f64::from).collect::<Vec<_>>();
    let pairs = [
        (
            "rms_norm of a view",
            Flex::rms_norm(xt.clone(), wt.clone(), EPS),
            fused::default_rms_norm(xt.clone(), wt.clone(), EPS),
        ),
        (
            "rms_norm ∂x of views",
            Flex::rms_norm_backward(xt.clone(), wt.clone(), EPS, gt.clone()).0,
            fused::default_rms_norm_backward(xt.clone(), wt.clone(), EPS, gt.clone()).0,
        ),
        (
            "swiglu of views",
            Flex::swiglu(xt.clone(), ut.clone()),
            fused::default_swiglu(xt.clone(), ut.clone()),
        ),
        (
            "rms_norm with a broadcast weight",
            Flex::rms_norm(xt.clone(), t1::<Flex>(&w[..1]), EPS),
            fused::default_rms_norm(xt.clone(), t1::<Flex>(&w[..1]), EPS),
        ),
    ];
    for (what, got, want) in pairs {
        check(what, &host(got), &f64s(want));
    }
    // Causal-style masks: row r keeps its first r % D + 1 entries.
    let masked: Vec<f64> = x
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if i % D > (i / D) % D {
                f64::NEG_INFINITY
            } else {
                v
            }
        })
        .collect();
    let mt = t2::<Flex>(&masked, [N, D]);
    let y = Flex::softmax_rows(mt.clone());
    let dx = Flex::softmax_rows_backward(y.clone(), gt.clone());
    let (yv, dxv) = (host(y.clone()), host(dx));
    for (i, (&p, &d)) in yv.iter().zip(&dxv).enumerate() {
        if masked[i] == f64::NEG_INFINITY {
            assert!(p == 0.0 && d == 0.0, "masked entry {i}: p {p}, ∂x {d}");
        }
    }
    check(
        "masked softmax",
        &yv,
        &f64s(fused::default_softmax_rows(mt)),
    );
    check(
        "masked softmax ∂x",
        &dxv,
        &f64s(fused::default_softmax_rows_backward(y, gt)),
    );
}
