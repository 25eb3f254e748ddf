//! Training (`dsv3-train`, `dsv3 train`): the objective against hand computations and finite
//! differences, the aux-loss-free bias, checkpoints (bit-identical resume, crash safety, HF
//! layout that `dsv3 score` loads), and every bad input's one-line error.

use std::path::Path;

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor, TensorData};
use dsv3_backends::{Cpu, CpuAutodiff};
use dsv3_model::{AttentionMode, DeepseekV3, ForwardOptions};
use dsv3_train::checkpoint;
use dsv3_train::data::{Dataset, Document};
use dsv3_train::forward::{self, RouterTrace};
use dsv3_train::trainer::{make_batch, objective, Trainer};
use dsv3_train::{balance, loss, TrainConfig, TrainError};

use crate::common::*;

type AD = CpuAutodiff;

/// Deterministic pseudo-English documents (enough for several windows).
fn docs(n: usize) -> Vec<Document> {
    let words = [
        "the",
        "router",
        "picks",
        "experts",
        "for",
        "each",
        "token",
        "and",
        "latent",
        "cache",
        "holds",
        "keys",
        "of",
        "attention",
    ];
    let mut rng = SplitMix64::new(11);
    (0..n)
        .map(|i| Document {
            name: format!("doc{i}"),
            text: (0..40)
                .map(|_| words[rng.below(words.len())])
                .collect::<Vec<_>>()
                .join(" "),
        })
        .collect()
}

fn tiny_cfg() -> TrainConfig {
    TrainConfig {
        steps: 30,
        seq_len: 16,
        batch_size: 2,
        grad_accum: 1,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 2,
        val_every: 4,
        eval_windows: 4,
        ..TrainConfig::default()
    }
}

fn tiny_model() -> dsv3_model::DeepseekV3Config {
    dsv3_train::preset("tiny").unwrap().model
}

fn trainer(cfg: TrainConfig, n_docs: usize) -> Trainer<AD> {
    let data = Dataset::pack(&docs(n_docs), cfg.seq_len, cfg.val_every).unwrap();
    Trainer::<AD>::new(&tiny_model(), cfg, data, &device()).unwrap()
}

/// Every parameter's values, in module order, with its path.
fn params<B: dsv3_backends::DsBackend>(m: &DeepseekV3<B>) -> Vec<(String, Vec<f32>)> {
    struct V(Vec<Vec<f32>>);
    impl<B: Backend> ModuleVisitor<B> for V {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            self.0
                .push(p.val().into_data().convert::<f32>().to_vec().unwrap());
        }
    }
    let mut v = V(Vec::new());
    m.visit(&mut v);
    let paths = m.param_names();
    paths.into_iter().map(|(_, p)| p).zip(v.0).collect()
}

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

fn set_bias(m: &mut DeepseekV3<AD>, layer: usize, values: &[f32]) {
    let moe = m
        .moe_mut(layer)
        .unwrap_or_else(|| panic!("layer {layer} is not a MoE layer"));
    let id = moe.gate.e_score_correction_bias.id;
    let t = Tensor::<AD, 1>::from_data(TensorData::new(values.to_vec(), [values.len()]), &device())
        .require_grad();
    moe.gate.e_score_correction_bias = Param::initialized(id, t);
}

#[test]
fn bias_is_untouched_by_the_optimiser_and_moves_against_load() {
    let layers = [1usize, 2, 3];
    let start: Vec<f32> = (0..16).map(|i| 0.01 * (i as f32 - 7.5)).collect();

    // γ = 0: AdamW (lr 3e-3, weight decay 0.1) must leave the bias bit-identical.
    let mut t = trainer(
        TrainConfig {
            bias_gamma: 0.0,
            ..tiny_cfg()
        },
        6,
    );
    for &l in &layers {
        set_bias(&mut t.model, l, &start);
    }
    let before_w = t.model.moe(1).unwrap().gate.weight.val();
    let before_w = to_vec(before_w.inner());
    t.train_step().unwrap();
    t.train_step().unwrap();
    for &l in &layers {
        assert_eq!(
            balance::bias_values(&t.model, l).unwrap(),
            start,
            "layer {l}"
        );
    }
    let after_w = to_vec(t.model.moe(1).unwrap().gate.weight.val().inner());
    assert_ne!(before_w, after_w, "the gate weight itself does train");

    // γ = 1e-3: each expert moves by exactly +γ (under-loaded), −γ (over-loaded) or 0.
    let gamma = 1e-3f32;
    let mut t = trainer(tiny_cfg(), 6);
    for &l in &layers {
        set_bias(&mut t.model, l, &start);
    }
    let s = t.train_step().unwrap();
    let (mut up, mut down) = (0, 0);
    for (l, loads) in &s.loads {
        let mean = loads.iter().sum::<u64>() as f64 / loads.len() as f64;
        let after = balance::bias_values(&t.model, *l).unwrap();
        for e in 0..16 {
            let expected = if (loads[e] as f64) < mean {
                up += 1;
                start[e] + gamma
            } else if loads[e] as f64 > mean {
                down += 1;
                start[e] - gamma
            } else {
                start[e]
            };
            assert_eq!(
                after[e], expected,
                "layer {l} expert {e} load {} mean {mean}",
                loads[e]
            );
        }
        assert_eq!(
            loads.iter().sum::<u64>() as usize,
            2 * if *l == 3 { 15 } else { 16 } * 4,
            "tokens × k routed in layer {l}"
        );
    }
    assert!(
        up > 0 && down > 0,
        "both directions exercised ({up} up, {down} down)"
    );
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
    let mtp_logits = m.forward_mtp(0, h, next, 0, None, &opts).logits;
    let want: f32 =
        loss::cross_entropy(mtp_logits, b.targets.clone().narrow(1, 1, 15)).into_scalar();
    let got: f32 = parts.mtp.unwrap().into_scalar();
    assert_eq!(got, want);
}

/// `θ + h·v` for a deterministic direction `v` (uniform ±scale per entry) restricted to
/// parameters whose path starts with `prefix`; the router bias is never moved.
struct Perturb<'a> {
    prefix: &'a str,
    h: f32,
    paths: Vec<String>,
    index: usize,
}

fn direction(index: usize, n: usize) -> Vec<f32> {
    let mut rng = SplitMix64::new(1000 + index as u64);
    (0..n)
        .map(|_| ((rng.next_u64() >> 11) as f32 / (1u64 << 53) as f32 - 0.5) * 0.04)
        .collect()
}

fn selected(path: &str, prefix: &str) -> bool {
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

struct Dot<'a> {
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

fn assert_same_params(a: &DeepseekV3<AD>, b: &DeepseekV3<AD>) {
    let (pa, pb) = (params(a), params(b));
    assert_eq!(pa.len(), pb.len());
    for ((na, va), (nb, vb)) in pa.iter().zip(&pb) {
        assert_eq!(na, nb);
        let same = va.iter().zip(vb).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{na} differs");
    }
}

#[test]
fn resume_is_bit_identical_to_an_uninterrupted_run() {
    let cfg = TrainConfig {
        grad_accum: 2,
        ..tiny_cfg()
    };
    let mut a = trainer(cfg.clone(), 6);
    for _ in 0..4 {
        a.train_step().unwrap();
    }
    let mut b = trainer(cfg.clone(), 6);
    for _ in 0..2 {
        b.train_step().unwrap();
    }
    let out = scratch("resume");
    let dir = checkpoint::save(&b, &out, "test-docs", 0.0).unwrap();
    assert_eq!(dir, out.join("step-2"));
    drop(b);
    let data = Dataset::pack(&docs(6), cfg.seq_len, cfg.val_every).unwrap();
    let mut c = checkpoint::load::<AD>(&dir, data, None, &device()).unwrap();
    assert_eq!(c.step, 2);
    for _ in 0..2 {
        c.train_step().unwrap();
    }
    assert_same_params(&a.model, &c.model);
    // A run on other data refuses the checkpoint.
    let other = Dataset::pack(&docs(7), cfg.seq_len, cfg.val_every).unwrap();
    let e = checkpoint::load::<AD>(&dir, other, None, &device())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("different data"), "{e}");
}

#[test]
fn parallel_micro_batches_equal_sequential_accumulation() {
    let cfg = TrainConfig {
        grad_accum: 3,
        ..tiny_cfg()
    };
    let mut one = trainer(
        TrainConfig {
            workers: 1,
            ..cfg.clone()
        },
        6,
    );
    let mut two = trainer(TrainConfig { workers: 2, ..cfg }, 6);
    for _ in 0..2 {
        let (a, b) = (one.train_step().unwrap(), two.train_step().unwrap());
        assert_eq!(a.loss.to_bits(), b.loss.to_bits());
        assert_eq!(a.loads, b.loads);
    }
    assert_same_params(&one.model, &two.model);
}

#[test]
fn interrupted_writes_leave_the_previous_checkpoint_loadable() {
    let cfg = TrainConfig {
        keep_checkpoints: 2,
        ..tiny_cfg()
    };
    let mut t = trainer(cfg.clone(), 6);
    t.train_step().unwrap();
    t.train_step().unwrap();
    let out = scratch("crash");
    let good = checkpoint::save(&t, &out, "test-docs", 0.0).unwrap();
    let want = params(&t.model);
    // A kill while writing step 4: its temporary directory holds a torn safetensors file.
    let tmp = out.join(".step-4.tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let full = std::fs::read(good.join("model.safetensors")).unwrap();
    std::fs::write(tmp.join("model.safetensors"), &full[..full.len() / 2]).unwrap();
    std::fs::copy(good.join("config.json"), tmp.join("config.json")).unwrap();
    // A step dir without train_state.json (not complete) and one with torn weights (as a
    // non-atomic writer would leave): both must be passed over.
    let partial = out.join("step-6");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::copy(good.join("config.json"), partial.join("config.json")).unwrap();
    let torn = out.join("step-5");
    std::fs::create_dir_all(&torn).unwrap();
    for f in ["config.json", "optimizer.mpk", "train_state.json"] {
        std::fs::copy(good.join(f), torn.join(f)).unwrap();
    }
    std::fs::write(torn.join("model.safetensors"), &full[..100]).unwrap();

    let data = Dataset::pack(&docs(6), cfg.seq_len, cfg.val_every).unwrap();
    let (r, dir, _, warnings) = checkpoint::resume::<AD>(&out, &data, None, &device()).unwrap();
    assert_eq!(dir, good);
    assert_eq!(r.step, 2);
    assert!(
        warnings.len() == 1 && warnings[0].contains("step-5"),
        "{warnings:?}"
    );
    let got = params(&r.model);
    assert_eq!(got, want);
    // The previous checkpoint also loads as a model, as `dsv3 score` would.
    dsv3_model::load::<Cpu>(&good, &device(), &Default::default()).unwrap();
    // The next save replaces the stale temporary directory.
    std::fs::remove_dir_all(&torn).unwrap();
    let mut r = r;
    r.train_step().unwrap();
    r.train_step().unwrap();
    checkpoint::save(&r, &out, "test-docs", 0.0).unwrap();
    assert!(!tmp.exists());
    assert!(out.join("step-4/train_state.json").is_file());
}

#[test]
fn checkpoint_loads_in_score_with_the_same_logits() {
    let mut t = trainer(tiny_cfg(), 6);
    for _ in 0..3 {
        t.train_step().unwrap();
    }
    let out = scratch("score-ckpt");
    let dir = checkpoint::save(&t, &out, "test-docs", 0.0).unwrap();
    let ids: Vec<u32> = t.data.window(t.data.val[0])[..12].to_vec();
    let m = t.model.valid();
    let want = to_vec(
        m.forward(
            m.tokens_tensor(&ids).unwrap(),
            0,
            None,
            &ForwardOptions::default(),
        )
        .logits,
    );
    let o = out.join("logits.safetensors");
    let ids_s: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let s = dsv3(&[
        "score",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        &ids_s.join(","),
        "--out",
        o.to_str().unwrap(),
        "--strict",
    ])
    .unwrap();
    assert!(s.contains("perplexity"), "{s}");
    let got = Golden::read(&o);
    let (shape, logits) = got.f("logits");
    assert_eq!(shape, &vec![12, 258]);
    let exact = logits.iter().zip(&want).all(|(a, b)| *a == *b as f64);
    assert!(exact, "logits differ by {}", max_abs_diff(&want, logits));
    // The trained (non-zero) router bias is in the checkpoint.
    let st = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    let bias = st
        .tensor("model.layers.1.mlp.gate.e_score_correction_bias")
        .unwrap();
    assert_eq!(bias.dtype(), safetensors::Dtype::F32);
    assert!(bias.data().iter().any(|&b| b != 0));
}

#[test]
fn tokenizer_json_loads_in_the_inference_engine() {
    let dir = scratch("tokenizer");
    dsv3_train::ByteTokenizer.save(&dir).unwrap();
    let tok = dsv3_infer::Tokenizer::from_dir(&dir).unwrap().unwrap();
    let text = "fn main() {\n    println!(\"héllo — λ=0.3\");\n}\t ☃";
    let ids = tok.encode(text).unwrap();
    let bytes: Vec<u32> = text.bytes().map(u32::from).collect();
    assert_eq!(ids, bytes);
    assert_eq!(tok.decode(&ids, true).unwrap(), text);
    assert_eq!(tok.encode_prompt("a").unwrap(), vec![256, 97]);
    assert_eq!(tok.bos_id(), Some(256));
    assert_eq!(tok.eos_id(), Some(257));
    assert_eq!(tok.vocab_size(), 258);
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

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[test]
fn cli_train_tiny_writes_metrics_checkpoints_plot_and_resumes() {
    let out = scratch("cli-train");
    let run_dir = out.join("run");
    let s = dsv3(&[
        "train",
        "--preset",
        "tiny",
        "--steps",
        "6",
        "--checkpoint-every",
        "3",
        "--log-every",
        "2",
        "--eval-every",
        "3",
        "--out",
        run_dir.to_str().unwrap(),
        "--samples",
        "1",
        "--sample-tokens",
        "6",
    ])
    .unwrap();
    assert!(s.contains("bits/byte"), "{s}");
    assert!(s.contains("(temperature 0.7, top-p 0.9, seed 0)"), "{s}");
    assert!(s.contains("(greedy, MTP drafts accepted: "), "{s}");
    for d in ["step-3", "step-6", "final"] {
        assert!(run_dir.join(d).join("model.safetensors").is_file(), "{d}");
        assert!(run_dir.join(d).join("tokenizer.json").is_file(), "{d}");
    }
    assert!(run_dir.join("training.png").is_file());
    let recs = dsv3_train::metrics::read(&run_dir.join("metrics.jsonl")).unwrap();
    let steps: Vec<usize> = recs.iter().map(|r| r.step).collect();
    assert_eq!(steps, vec![2, 4, 6]);
    let line = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    for key in [
        "step",
        "loss",
        "mtp_loss",
        "lr",
        "imbalance",
        "grad_norm",
        "val_loss",
    ] {
        assert!(first.get(key).is_some(), "{key} missing in {first}");
    }
    assert_eq!(first["imbalance"].as_array().unwrap().len(), 3);
    assert!(recs[2].val_bits_per_byte.unwrap() > 0.0);
    // The final model scores.
    let s = dsv3(&[
        "score",
        "--model",
        run_dir.join("final").to_str().unwrap(),
        "--tokens",
        "256,97,98",
    ])
    .unwrap();
    assert!(s.contains("perplexity"), "{s}");
    // A second fresh run into the same directory is refused; --resume continues to 8.
    let e = dsv3(&[
        "train",
        "--preset",
        "tiny",
        "--out",
        run_dir.to_str().unwrap(),
    ])
    .unwrap_err();
    assert!(
        e.contains("already holds checkpoints") && e.contains("--resume"),
        "{e}"
    );
    let s = dsv3(&[
        "train",
        "--resume",
        "--steps",
        "8",
        "--checkpoint-every",
        "0",
        "--log-every",
        "2",
        "--out",
        run_dir.to_str().unwrap(),
        "--samples",
        "0",
    ])
    .unwrap();
    assert!(s.contains("resumed from") && s.contains("step-6"), "{s}");
    assert!(s.contains("trained steps 6..8"), "{s}");
    let steps: Vec<usize> = dsv3_train::metrics::read(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|r| r.step)
        .collect();
    assert_eq!(steps, vec![2, 4, 6, 8]);
    assert!(run_dir.join("step-8/train_state.json").is_file());
}

#[test]
fn cli_train_bad_inputs_give_one_line_errors() {
    let dir = scratch("cli-bad");
    let out = dir.join("run");
    let o = out.to_str().unwrap();
    let check = |args: &[&str], want: &str| {
        let mut all = vec!["train", "--preset", "tiny", "--samples", "0"];
        all.extend_from_slice(args);
        let e = dsv3(&all).unwrap_err();
        assert!(e.contains(want), "{args:?}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "{args:?}: not one line: {e}");
    };
    let missing = dir.join("nope.txt");
    check(
        &["--data", missing.to_str().unwrap(), "--out", o],
        "does not exist",
    );
    check(&["--workers", "0", "--out", o], "workers");
    let empty = dir.join("empty.txt");
    write(&empty, "");
    check(
        &["--data", empty.to_str().unwrap(), "--out", o],
        "no text found",
    );
    let empty_dir = dir.join("empty-dir");
    std::fs::create_dir_all(&empty_dir).unwrap();
    check(
        &["--data", empty_dir.to_str().unwrap(), "--out", o],
        "no text found",
    );
    let small = dir.join("small.txt");
    write(&small, "too short for a window");
    check(
        &["--data", small.to_str().unwrap(), "--out", o],
        "corpus too small",
    );
    let jsonl = dir.join("bad.jsonl");
    write(&jsonl, "{\"text\": \"ok\"}\n{\"txt\": 1}\n");
    check(
        &["--data", jsonl.to_str().unwrap(), "--out", o],
        "bad.jsonl:2: no \"text\" field",
    );
    let cfg = dir.join("config.json");
    let mut c = tiny_model();
    c.n_group = 3;
    write(&cfg, &c.to_json());
    let e = dsv3(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        o,
        "--samples",
        "0",
    ])
    .unwrap_err();
    assert!(e.contains("not divisible by n_group"), "{e}");
    check(&["--resume", "--out", o], "no complete checkpoint");
    check(&["--lr", "nan", "--out", o], "lr = NaN");
    check(&["--backend", "cuda", "--out", o], "not available");
    let e = dsv3(&["train", "--preset", "huge", "--out", o]).unwrap_err();
    assert!(e.contains("unknown training preset"), "{e}");
    assert!(!out.join("final").exists(), "no run happened");
}

#[test]
fn data_reading_text_dirs_and_jsonl() {
    let dir = scratch("data");
    write(&dir.join("b/two.txt"), "second");
    write(&dir.join("a.txt"), "first");
    write(&dir.join(".hidden"), "ignored");
    write(
        &dir.join("c.jsonl"),
        "{\"text\": \"third\"}\n\n{\"text\": \"fourth\"}\n",
    );
    std::fs::write(dir.join("d.bin"), [0xffu8, 0xfe, 0x00]).unwrap();
    let (docs, report) = dsv3_train::data::read_documents(&dir).unwrap();
    let texts: Vec<&str> = docs.iter().map(|d| d.text.as_str()).collect();
    assert_eq!(texts, vec!["first", "second", "third", "fourth"]);
    assert_eq!(report.skipped, vec![dir.join("d.bin")]);
    let e = dsv3_train::data::read_documents(&dir.join("d.bin"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not UTF-8"), "{e}");
    // The embedded corpus packs into enough windows for the default run.
    let d = Dataset::pack(&dsv3_train::data::embedded_documents(), 128, 20).unwrap();
    assert!(
        d.train.len() > 1500 && d.val.len() > 80,
        "{} / {}",
        d.train.len(),
        d.val.len()
    );
    let total: usize = dsv3_train::data::embedded_documents()
        .iter()
        .map(|doc| doc.text.len())
        .sum();
    assert_eq!(d.bytes, total);
}

#[test]
fn validation_bits_per_byte_is_nll_over_bytes() {
    let t = trainer(tiny_cfg(), 6);
    let ev = t.evaluate();
    let m = t.model.valid();
    let (mut nll, mut bytes) = (0.0f64, 0usize);
    for &s in &t.data.val[..4] {
        let w = t.data.window(s);
        let out = m.forward(
            m.tokens_tensor(&w[..16]).unwrap(),
            0,
            None,
            &ForwardOptions {
                attention: AttentionMode::Naive,
                ..Default::default()
            },
        );
        let tgt = Tensor::<Cpu, 1, burn::tensor::Int>::from_data(
            TensorData::new(w[1..].iter().map(|&x| x as i64).collect::<Vec<_>>(), [16]),
            &device(),
        )
        .reshape([1, 16]);
        nll += loss::token_nll(out.logits, tgt)
            .sum()
            .into_scalar()
            .elem::<f64>();
        bytes += w[1..].iter().filter(|&&x| x < 256).count();
    }
    assert_eq!(ev.tokens, 64);
    assert!(
        (ev.loss - nll / 64.0).abs() < 1e-5,
        "{} vs {}",
        ev.loss,
        nll / 64.0
    );
    let bpb = nll / std::f64::consts::LN_2 / bytes as f64;
    assert!((ev.bits_per_byte - bpb).abs() < 1e-5);
}
