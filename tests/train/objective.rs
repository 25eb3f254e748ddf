//! The training objective: the model's forward, losses, and gradients against finite differences.

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor, TensorData};
use dsv3_backends::Cpu;
use dsv3_model::{AttentionMode, ForwardOptions};
use dsv3_train::data::Dataset;
use dsv3_train::forward::{self, RouterTrace};
use dsv3_train::trainer::{make_batch, objective, Trainer};
use dsv3_train::{loss, TrainConfig, TrainError};

use crate::common::*;

use super::*;

#[test]
fn train_forward_equals_model_forward() {
    let mut t = trainer(tiny_cfg(), 6);
    t.train_step().unwrap(); // a trained, non-zero router bias
    let m = t.model.valid();
    let data = &t.data;
    let batch = make_batch::<Cpu>(data, &data.train[..2], 1, &device());
    for mode in [AttentionMode::Naive, AttentionMode::Absorbed] {
        let ours = forward::forward(&m, batch.inputs.clone(), mode, 1, false);
        let opts = ForwardOptions {
            attention: mode,
            ..Default::default()
        };
        let theirs = m.forward(batch.inputs.clone(), 0, None, &opts);
        assert_eq!(
            to_vec(ours.logits.clone()),
            to_vec(theirs.logits.clone()),
            "{mode:?}"
        );
        let mtp = m
            .mtp_logits(batch.inputs.clone(), &theirs, 0, &opts)
            .unwrap();
        assert_eq!(
            to_vec(ours.mtp_logits[0].clone()),
            to_vec(mtp.logits),
            "{mode:?} MTP"
        );
        // One trace per MoE layer (2 main + the MTP module), expert choices as the model made them.
        let layers: Vec<usize> = ours.routers.iter().map(|r| r.layer).collect();
        assert_eq!(layers, vec![1, 2, 3]);
        let opts_r = ForwardOptions {
            record_routing: true,
            ..opts
        };
        let rec = m.forward(batch.inputs.clone(), 0, None, &opts_r);
        for (r, theirs) in ours.routers.iter().zip(&rec.routing) {
            assert_eq!(r.experts, theirs.routing.experts);
        }
    }
}

#[test]
fn loss_decreases_on_a_fixed_batch() {
    // Two training windows and batch 2: every step sees the same batch.
    let cfg = TrainConfig {
        steps: 12,
        ..tiny_cfg()
    };
    let data = Dataset::pack(&docs(1)[..1], 16, 3).unwrap();
    let data = Dataset {
        train: data.train[..2].to_vec(),
        ..data
    };
    let mut t = Trainer::<AD>::new(&tiny_model(), cfg, data, &device()).unwrap();
    let first = t.train_step().unwrap();
    let mut last = first.clone();
    for _ in 1..12 {
        last = t.train_step().unwrap();
    }
    assert!(
        last.ce < 0.7 * first.ce,
        "CE {} -> {} after 12 steps",
        first.ce,
        last.ce
    );
    assert!(last.mtp_loss.unwrap() < first.mtp_loss.unwrap());
    assert!(first.grad_norm.is_finite() && first.grad_norm > 0.0);
}

#[test]
fn sequence_balance_loss_equals_hand_computation() {
    // 2 sequences × 3 tokens, 4 experts, top-2.
    let s: Vec<f32> = vec![
        0.9, 0.2, 0.6, 0.1, //
        0.3, 0.8, 0.5, 0.4, //
        0.7, 0.6, 0.2, 0.3, //
        0.1, 0.2, 0.9, 0.8, //
        0.5, 0.5, 0.6, 0.2, //
        0.4, 0.9, 0.3, 0.7,
    ];
    let experts: Vec<Vec<u32>> = vec![
        vec![0, 2],
        vec![1, 2],
        vec![0, 1],
        vec![2, 3],
        vec![2, 0],
        vec![1, 3],
    ];
    let alpha = 0.01;
    // By hand, in f64: f_i = E/(K·T)·count_i, P_i = mean_t s_it/Σ_j s_jt, L = α·mean_seq Σ f·P.
    let (e, k, t) = (4usize, 2usize, 3usize);
    let mut hand = 0.0f64;
    for seq in 0..2 {
        let mut f = [0.0f64; 4];
        let mut p = [0.0f64; 4];
        for tok in 0..t {
            let row = &s[(seq * t + tok) * e..(seq * t + tok + 1) * e];
            let sum: f64 = row.iter().map(|&v| v as f64).sum();
            for i in 0..e {
                p[i] += row[i] as f64 / sum / t as f64;
            }
            for &x in &experts[seq * t + tok] {
                f[x as usize] += e as f64 / (k * t) as f64;
            }
        }
        hand += alpha * (0..e).map(|i| f[i] * p[i]).sum::<f64>() / 2.0;
    }
    let scores =
        Tensor::<AD, 2>::from_data(TensorData::new(s.clone(), [6, 4]), &device()).require_grad();
    let trace = RouterTrace {
        layer: 1,
        mtp: false,
        rows: 2,
        len: 3,
        scores: scores.clone(),
        experts: experts.clone(),
    };
    let l = loss::sequence_balance_loss(&trace, alpha);
    let got: f64 = l.clone().into_scalar().elem();
    assert!((got - hand).abs() < 1e-7, "{got} vs {hand}");
    // Gradient: dL/ds_it = α/(rows·T) · (f_i − Σ_j f_j s'_jt) / S_t (f is a count: no gradient).
    let g = to_vec(scores.grad(&l.backward()).unwrap());
    for row in 0..6 {
        let seq = row / t;
        let mut f = [0.0f64; 4];
        for tok in 0..t {
            for &x in &experts[seq * t + tok] {
                f[x as usize] += e as f64 / (k * t) as f64;
            }
        }
        let r = &s[row * e..(row + 1) * e];
        let sum: f64 = r.iter().map(|&v| v as f64).sum();
        let fs: f64 = (0..e).map(|j| f[j] * r[j] as f64 / sum).sum();
        for i in 0..e {
            let want = alpha / (2.0 * t as f64) * (f[i] - fs) / sum;
            assert!(
                (g[row * e + i] as f64 - want).abs() < 1e-8,
                "grad [{row},{i}]"
            );
        }
    }
}

#[test]
fn mtp_targets_are_shifted_by_two() {
    let data = Dataset::pack(&docs(4), 16, 4).unwrap();
    let starts = &data.train[..2];
    let b = make_batch::<Cpu>(&data, starts, 1, &device());
    let ints = |t: Tensor<Cpu, 2, burn::tensor::Int>| -> Vec<i64> {
        t.into_data().convert::<i64>().to_vec().unwrap()
    };
    let (inp, tgt, mtp) = (
        ints(b.inputs.clone()),
        ints(b.targets.clone()),
        ints(b.mtp_targets[0].clone()),
    );
    assert_eq!(b.mtp_targets[0].dims(), [2, 15]);
    for (r, &s) in starts.iter().enumerate() {
        let w: Vec<i64> = data.window(s).iter().map(|&x| x as i64).collect();
        assert_eq!(&inp[r * 16..(r + 1) * 16], &w[0..16]);
        assert_eq!(&tgt[r * 16..(r + 1) * 16], &w[1..17]);
        assert_eq!(
            &mtp[r * 15..(r + 1) * 15],
            &w[2..17],
            "row {r}: input i → token i+2"
        );
    }
    // The objective's MTP term is the CE of the model's MTP module (fed h_i and token i+1)
    // against token i+2.
    let t = trainer(tiny_cfg(), 6);
    let m = t.model.valid();
    let fwd = forward::forward(&m, b.inputs.clone(), AttentionMode::Naive, 1, false);
    let parts = objective(&fwd, &b, &t.cfg);
    let opts = ForwardOptions {
        attention: AttentionMode::Naive,
        ..Default::default()
    };
    let out = m.forward(b.inputs.clone(), 0, None, &opts);
    let h = out.hidden.clone().narrow(1, 0, 15);
    let next = b.inputs.clone().narrow(1, 1, 15);
    let mtp_logits = m
        .forward_mtp(0, h, next, 0, None, &opts)
        .expect("the model has an MTP module")
        .logits;
    let want: f32 =
        loss::cross_entropy(mtp_logits, b.targets.clone().narrow(1, 1, 15)).into_scalar();
    let got: f32 = parts.mtp.unwrap().into_scalar();
    assert_eq!(got, want);
}

/// `θ + h·v` for a deterministic direction `v` (uniform ±scale per entry) restricted to
/// parameters whose path starts with `prefix`; the router bias is never moved.
pub(crate) struct Perturb<'a> {
    prefix: &'a str,
    h: f32,
    paths: Vec<String>,
    index: usize,
}

pub(crate) fn direction(index: usize, n: usize) -> Vec<f32> {
    let mut rng = SplitMix64::new(1000 + index as u64);
    (0..n)
        .map(|_| ((rng.next_u64() >> 11) as f32 / (1u64 << 53) as f32 - 0.5) * 0.04)
        .collect()
}

pub(crate) fn selected(path: &str, prefix: &str) -> bool {
    path.starts_with(prefix) && !path.ends_with("e_score_correction_bias")
}

impl<B: Backend> ModuleMapper<B> for Perturb<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let path = self.paths[self.index].clone();
        self.index += 1;
        if !selected(&path, self.prefix) {
            return param;
        }
        let (id, t, mapper) = param.consume();
        let shape = t.shape();
        let v = direction(self.index - 1, shape.num_elements());
        let dv = Tensor::<B, 1>::from_data(TensorData::new(v, [shape.num_elements()]), &t.device())
            .reshape(shape);
        Param::from_mapped_value(id, t + dv.mul_scalar(self.h), mapper)
    }
}

pub(crate) struct Dot<'a> {
    prefix: &'a str,
    grads: &'a GradientsParams,
    paths: Vec<String>,
    index: usize,
    sum: f64,
}

impl ModuleVisitor<AD> for Dot<'_> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<AD, D>>) {
        let i = self.index;
        self.index += 1;
        if !selected(&self.paths[i], self.prefix) {
            return;
        }
        // Experts no token was routed to get no gradient: their derivative is zero.
        let Some(g) = self.grads.get::<Cpu, D>(p.id) else {
            return;
        };
        let g = to_vec(g);
        let v = direction(i, g.len());
        self.sum += g
            .iter()
            .zip(&v)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum::<f64>();
    }
}

#[test]
fn gradients_match_finite_differences() {
    // Tolerance: Flex computes in f32. Central differences along a random direction v
    // (entries ±0.02, every parameter of a block at once) with step h = 0.05; the f32 loss
    // (~5.6 nats, ulp 5e-7) carries rounding noise below ~1e-6 per evaluation, so the quotient
    // carries up to ~1e-6/h (2e-5), plus O(h²) truncation. Allowed: 2% relative + 1e-6/h
    // (measured: 0.03%–1.5%). A wrong gradient term (a dropped MTP or balance term, a wrong
    // sign or scale) is off by O(1) relative. The router gate and the final norm have small
    // derivatives, so they get h = 0.5 (their effect is smooth at that scale).
    //
    // Routing is piecewise constant: a difference across an expert switch means nothing. The
    // router bias (which only steers selection) is set far apart per expert so that every
    // token's choice is fixed inside ±h, and the test asserts the choices did not change.
    let cfg = TrainConfig {
        balance_alpha: 0.05, // make the balance term's gradient visible
        mtp_lambda: 0.3,
        ..tiny_cfg()
    };
    let mut t = trainer(cfg.clone(), 6);
    // 0.3 apart, and no two groups with the same top-2 sum.
    let order: [fn(usize) -> usize; 3] = [|e| e, |e| 15 - e, |e| (e + 8) % 16];
    for (l, o) in [1usize, 2, 3].into_iter().zip(order) {
        let b: Vec<f32> = (0..16).map(|e| 0.3 * o(e) as f32).collect();
        set_bias(&mut t.model, l, &b);
    }
    let batch = make_batch::<AD>(&t.data, &t.data.train[..2], 1, &device());
    let fwd = forward::forward(
        &t.model,
        batch.inputs.clone(),
        AttentionMode::Naive,
        1,
        false,
    );
    let total = objective(&fwd, &batch, &cfg).total;
    let grads = GradientsParams::from_grads(total.backward(), &t.model);
    let paths: Vec<String> = t.model.param_names().into_iter().map(|(_, p)| p).collect();
    let inner = t.model.valid();
    let batch_i = make_batch::<Cpu>(&t.data, &t.data.train[..2], 1, &device());
    let loss_at = |prefix: &str, h: f32| -> (f64, Vec<Vec<Vec<u32>>>) {
        let m = inner.clone().map(&mut Perturb {
            prefix,
            h,
            paths: paths.clone(),
            index: 0,
        });
        let f = forward::forward(&m, batch_i.inputs.clone(), AttentionMode::Naive, 1, false);
        let l: f64 = objective(&f, &batch_i, &cfg).total.into_scalar().elem();
        (l, f.routers.iter().map(|r| r.experts.clone()).collect())
    };
    for prefix in [
        "", // the whole model at once
        "model.embed_tokens",
        "model.layers.0",
        "model.layers.1.self_attn",
        "model.layers.1.mlp.gate",
        "model.layers.1.mlp",
        "model.layers.2",
        "model.norm",
        "lm_head",
        "model.layers.3.", // the MTP module (checkpoint layer num_hidden_layers + 0)
    ] {
        let mut dot = Dot {
            prefix,
            grads: &grads,
            paths: paths.clone(),
            index: 0,
            sum: 0.0,
        };
        t.model.visit(&mut dot);
        let h = if prefix.ends_with("gate") || prefix == "model.norm" {
            0.5f32
        } else {
            0.05
        };
        let noise = 1e-6 / h as f64;
        let (lp, rp) = loss_at(prefix, h);
        let (lm, rm) = loss_at(prefix, -h);
        assert_eq!(rp, rm, "{prefix:?}: routing changed inside ±h");
        let fd = (lp - lm) / (2.0 * h as f64);
        let err = (fd - dot.sum).abs();
        println!(
            "{prefix:>28}: autodiff {:+.6e}  finite difference {fd:+.6e}",
            dot.sum
        );
        assert!(
            err < 0.02 * dot.sum.abs() + noise,
            "{prefix:?}: autodiff {} vs finite difference {fd}",
            dot.sum
        );
        assert!(
            dot.sum.abs() > 10.0 * noise,
            "{prefix:?}: a derivative within the noise tests nothing ({})",
            dot.sum
        );
    }
}

#[test]
fn non_finite_loss_stops_with_step_and_layer() {
    let mut t = trainer(tiny_cfg(), 6);
    t.train_step().unwrap();
    // Poison one weight of layer 2's attention output projection.
    let w = &mut t.model.model.layers[2].self_attn.o_proj.weight;
    let (id, v, mapper) = w.clone().consume();
    let mut data = to_vec(v.clone().inner());
    data[5] = f32::NAN;
    let poisoned =
        Tensor::<AD, 2>::from_data(TensorData::new(data, v.shape()), &device()).require_grad();
    *w = Param::from_mapped_value(id, poisoned, mapper);
    let before = params(&t.model);
    let e = t.train_step().unwrap_err();
    assert!(matches!(e, TrainError::NonFinite { step: 2, .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("step 2") && msg.contains("model.layers.2"),
        "{msg}"
    );
    assert_eq!(t.step, 1, "the failed step is not counted");
    let after = params(&t.model);
    for ((n, a), (_, b)) in before.iter().zip(&after) {
        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{n} was changed by the failed step");
    }
}
