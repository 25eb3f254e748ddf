//! MLA's attention as one operation (`DsBackend::mla_attention`, `attention.rs` and
//! `flex_attention.rs` in the backends crate): Flex's per-(sequence, head) jobs and the
//! plain-tensor default against a float64 loop implementation, forward and backward; under
//! `Autodiff<Flex>` the node's gradients against autodiff through the plain form; Flex's
//! results the same on any number of threads.
//!
//! Shapes: 2 sequences, 45 queries after 32 earlier keys (77 keys), 3 heads, dn 11, dr 6, dv 7
//! (none a multiple of a SIMD width or a `gemm` tile; queries and keys span several of Flex's
//! 32-row blocks); operands as the model passes them (`q_nope` a narrowed view of the queries,
//! `q_pe` a heads-major tensor viewed tokens-major, `kv` `[B, S, H, dn+dv]`); masks: none,
//! causal shared by the sequences, and causal with sequence 1's first 2 and last 34 keys hidden
//! from every query (padding: a block of keys no query sees). Values ~N(0, 1), scale
//! 1/sqrt(17).
//!
//! Tolerance: each score is a sum of 17 products (|terms| ≲ 3), each output and gradient a sum
//! of at most 77 terms of probabilities times values; f32 rounding bounds the error by
//! ~77 · 2⁻²⁴ · Σ|terms| ≈ 5e-6 relative to the magnitudes summed (softmax turns an absolute
//! score error into the same relative probability error). Bound: 3e-5 × (1 + max |ref|). A
//! wrong term (a missing scale, the mask added to the wrong row, a head's `∂k_pe` dropped) is
//! off by 1e-2 or more.

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use dsv3_backends::attention::{
    default_mla_attention_backward, default_mla_attention_probs, MlaAttention,
};
use dsv3_backends::DsBackend;

use crate::common::*;

type A = Autodiff<Flex>;
const B: usize = 2;
const T: usize = 45;
const S: usize = 77;
const H: usize = 3;
const DN: usize = 11;
const DR: usize = 6;
const DV: usize = 7;

/// Host values of the operands and the output gradient, in row-major order of the shapes
/// `q: [B, T, H, dn+dr]` (rope part not used), `q_pe: [H, B, T, dr]`, `kv: [B, S, H, dn+dv]`,
/// `k_pe: [B, S, dr]`, `grad: [B, T, H, dv]`.
struct Inputs {
    q: Vec<f64>,
    q_pe: Vec<f64>,
    kv: Vec<f64>,
    k_pe: Vec<f64>,
    grad: Vec<f64>,
    scale: f64,
}

fn inputs(seed: u64) -> Inputs {
    let mut rng = Rng::new(seed);
    let mut draw = |n| {
        rng.normal_vec(n, 1.0)
            .into_iter()
            .map(f64::from)
            .collect::<Vec<_>>()
    };
    Inputs {
        q: draw(B * T * H * (DN + DR)),
        q_pe: draw(H * B * T * DR),
        kv: draw(B * S * H * (DN + DV)),
        k_pe: draw(B * S * DR),
        grad: draw(B * T * H * DV),
        scale: 1.0 / ((DN + DR) as f64).sqrt(),
    }
}

/// The masks: `None`, causal (query `i` sees keys `≤ S − T + i`) shared `[1, 1, T, S]`, and
/// per sequence `[B, 1, T, S]` with sequence 1's first 2 and last 34 keys hidden as well (its
/// last block of keys, 64..77, is seen by no query).
fn masks() -> Vec<Option<(usize, Vec<f64>)>> {
    let visible = |b: usize, i: usize, j: usize, pad: bool| {
        j <= S - T + i && !(pad && b == 1 && !(2..S - 34).contains(&j))
    };
    let mask = |rows: usize, pad: bool| {
        let mut m = vec![];
        for b in 0..rows {
            for i in 0..T {
                for j in 0..S {
                    m.push(if visible(b, i, j, pad) {
                        0.0
                    } else {
                        f64::NEG_INFINITY
                    });
                }
            }
        }
        (rows, m)
    };
    vec![None, Some(mask(1, false)), Some(mask(B, true))]
}

fn tensor<Bk: Backend, const D: usize>(v: &[f64], shape: [usize; D]) -> Tensor<Bk, D> {
    let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    Tensor::from_data(TensorData::new(v, shape), &Default::default())
}

fn host<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

/// The operands as the model builds them from the leaf tensors `q`, `q_pe` (heads-major),
/// `kv`, `k_pe`.
fn operands<Bk: Backend>(
    q: Tensor<Bk, 4>,
    q_pe: Tensor<Bk, 4>,
    kv: Tensor<Bk, 4>,
    k_pe: Tensor<Bk, 3>,
    scale: f64,
) -> MlaAttention<Bk> {
    MlaAttention {
        q_nope: q.narrow(3, 0, DN),
        q_pe: q_pe.permute([1, 2, 0, 3]),
        kv,
        k_pe,
        scale,
    }
}

fn leaves<Bk: Backend>(x: &Inputs) -> (Tensor<Bk, 4>, Tensor<Bk, 4>, Tensor<Bk, 4>, Tensor<Bk, 3>) {
    (
        tensor(&x.q, [B, T, H, DN + DR]),
        tensor(&x.q_pe, [H, B, T, DR]),
        tensor(&x.kv, [B, S, H, DN + DV]),
        tensor(&x.k_pe, [B, S, DR]),
    )
}

/// Float64 forward and backward: the output `[B, T, H, dv]` and the gradients of
/// `Σ grad · output` for `q_nope [B, T, H, dn]`, `q_pe [B, T, H, dr]`, `kv`, `k_pe`.
struct Reference {
    out: Vec<f64>,
    q_nope: Vec<f64>,
    q_pe: Vec<f64>,
    kv: Vec<f64>,
    k_pe: Vec<f64>,
}

fn reference(x: &Inputs, mask: Option<&(usize, Vec<f64>)>) -> Reference {
    let w = DN + DV;
    let qn = |b: usize, i: usize, h: usize, d: usize| x.q[((b * T + i) * H + h) * (DN + DR) + d];
    let qp = |b: usize, i: usize, h: usize, e: usize| x.q_pe[((h * B + b) * T + i) * DR + e];
    let kv = |b: usize, j: usize, h: usize, d: usize| x.kv[((b * S + j) * H + h) * w + d];
    let kp = |b: usize, j: usize, e: usize| x.k_pe[(b * S + j) * DR + e];
    let g = |b: usize, i: usize, h: usize, c: usize| x.grad[((b * T + i) * H + h) * DV + c];
    let mut r = Reference {
        out: vec![0.0; B * T * H * DV],
        q_nope: vec![0.0; B * T * H * DN],
        q_pe: vec![0.0; B * T * H * DR],
        kv: vec![0.0; B * S * H * w],
        k_pe: vec![0.0; B * S * DR],
    };
    for b in 0..B {
        for h in 0..H {
            let mut p = vec![[0f64; S]; T];
            for (i, row) in p.iter_mut().enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    let dot: f64 = (0..DN)
                        .map(|d| qn(b, i, h, d) * kv(b, j, h, d))
                        .sum::<f64>()
                        + (0..DR).map(|e| qp(b, i, h, e) * kp(b, j, e)).sum::<f64>();
                    let m = mask.map_or(0.0, |(rows, m)| {
                        m[((if *rows == 1 { 0 } else { b }) * T + i) * S + j]
                    });
                    *v = x.scale * dot + m;
                }
                let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = row.iter().map(|v| (v - max).exp()).sum();
                row.iter_mut().for_each(|v| *v = (*v - max).exp() / z);
            }
            for (i, pi) in p.iter().enumerate() {
                // Forward, ∂v, and the softmax backward of dP = grad · vᵀ.
                let dp: Vec<f64> = (0..S)
                    .map(|j| (0..DV).map(|c| g(b, i, h, c) * kv(b, j, h, DN + c)).sum())
                    .collect();
                let k: f64 = (0..S).map(|j| pi[j] * dp[j]).sum();
                for j in 0..S {
                    let ds = x.scale * pi[j] * (dp[j] - k);
                    for c in 0..DV {
                        r.out[((b * T + i) * H + h) * DV + c] += pi[j] * kv(b, j, h, DN + c);
                        r.kv[((b * S + j) * H + h) * w + DN + c] += pi[j] * g(b, i, h, c);
                    }
                    for d in 0..DN {
                        r.q_nope[((b * T + i) * H + h) * DN + d] += ds * kv(b, j, h, d);
                        r.kv[((b * S + j) * H + h) * w + d] += ds * qn(b, i, h, d);
                    }
                    for e in 0..DR {
                        r.q_pe[((b * T + i) * H + h) * DR + e] += ds * kp(b, j, e);
                        r.k_pe[(b * S + j) * DR + e] += ds * qp(b, i, h, e);
                    }
                }
            }
        }
    }
    r
}

fn check(what: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let err = max_abs_diff(got, want);
    let bound = 3e-5 * (1.0 + max_abs(want));
    assert!(
        err <= bound,
        "{what}: max |error| {err:.3e} > bound {bound:.3e}"
    );
}

/// Forward (with and without the probabilities) and backward of Flex's operation and of the
/// plain default, for each mask, against float64.
#[test]
fn flex_and_plain_attention_equal_float64() {
    let x = inputs(21);
    for mask in masks() {
        let want = reference(&x, mask.as_ref());
        let name = match &mask {
            None => "no mask".to_string(),
            Some((rows, _)) => format!("mask [{rows}, 1, T, S]"),
        };
        let m = mask
            .as_ref()
            .map(|(rows, m)| tensor::<Flex, 4>(m, [*rows, 1, T, S]));
        let (q, q_pe, kv, k_pe) = leaves::<Flex>(&x);
        let ops = operands(q, q_pe, kv, k_pe, x.scale);
        let grad = tensor::<Flex, 4>(&x.grad, [B, T, H, DV]);

        check(
            &format!("Flex forward, {name}"),
            &host(Flex::mla_attention(&ops, m.as_ref())),
            &want.out,
        );
        let (y, p) = Flex::mla_attention_probs(&ops, m.as_ref());
        check(&format!("Flex forward with P, {name}"), &host(y), &want.out);
        let g = Flex::mla_attention_backward(&ops, p, grad.clone());
        let (y, p) = default_mla_attention_probs(&ops, m.as_ref());
        check(&format!("plain forward, {name}"), &host(y), &want.out);
        let gp = default_mla_attention_backward(&ops, p, grad);
        for (form, g) in [("Flex", g), ("plain", gp)] {
            check(
                &format!("{form} ∂q_nope, {name}"),
                &host(g.q_nope),
                &want.q_nope,
            );
            check(&format!("{form} ∂q_pe, {name}"), &host(g.q_pe), &want.q_pe);
            check(&format!("{form} ∂kv, {name}"), &host(g.kv), &want.kv);
            check(&format!("{form} ∂k_pe, {name}"), &host(g.k_pe), &want.k_pe);
        }
    }
}

/// Under `Autodiff<Flex>`: `Σ grad · mla_attention(x)` differentiated through the one node
/// equals autodiff through the plain form, for the leaf tensors the operands are views of
/// (so the node's gradients reach the right parents through `narrow` and `permute`).
#[test]
fn autodiff_attention_node_equals_autodiff_through_plain() {
    let x = inputs(22);
    let masks = masks();
    let m = masks[2]
        .as_ref()
        .map(|(rows, m)| tensor::<A, 4>(m, [*rows, 1, T, S]));
    let grads_of = |node: bool| {
        let (q, q_pe, kv, k_pe) = leaves::<A>(&x);
        let (q, q_pe, kv, k_pe) = (
            q.require_grad(),
            q_pe.require_grad(),
            kv.require_grad(),
            k_pe.require_grad(),
        );
        let ops = operands(q.clone(), q_pe.clone(), kv.clone(), k_pe.clone(), x.scale);
        let y = if node {
            A::mla_attention(&ops, m.as_ref())
        } else {
            default_mla_attention_probs(&ops, m.as_ref()).0
        };
        let grads = (y.clone() * tensor::<A, 4>(&x.grad, [B, T, H, DV]))
            .sum()
            .backward();
        [
            host(y),
            host(q.grad(&grads).expect("∂q")),
            host(q_pe.grad(&grads).expect("∂q_pe")),
            host(kv.grad(&grads).expect("∂kv")),
            host(k_pe.grad(&grads).expect("∂k_pe")),
        ]
    };
    let (node, plain) = (grads_of(true), grads_of(false));
    for (what, (a, b)) in ["output", "∂q", "∂q_pe", "∂kv", "∂k_pe"]
        .iter()
        .zip(node.iter().zip(&plain))
    {
        let b: Vec<f64> = b.iter().map(|&v| v as f64).collect();
        check(what, a, &b);
    }
}

/// Flex's forward and backward give the same bits on one thread and on three (one job per
/// sequence and head; `∂k_pe` adds the heads' parts in head order).
#[test]
fn flex_attention_does_not_depend_on_threads() {
    let x = inputs(23);
    let masks = masks();
    let run = || {
        let m = masks[2]
            .as_ref()
            .map(|(rows, m)| tensor::<Flex, 4>(m, [*rows, 1, T, S]));
        let (q, q_pe, kv, k_pe) = leaves::<Flex>(&x);
        let ops = operands(q, q_pe, kv, k_pe, x.scale);
        let (y, p) = Flex::mla_attention_probs(&ops, m.as_ref());
        let g = Flex::mla_attention_backward(&ops, p, tensor(&x.grad, [B, T, H, DV]));
        [
            host(y),
            host(g.q_nope),
            host(g.q_pe),
            host(g.kv),
            host(g.k_pe),
        ]
    };
    assert_same_bits_on_1_and_3_threads(run);
}
