//! Sampling: reproducible seeds, frequencies against the processed softmax, penalties.

use burn::tensor::{Tensor, TensorData};
use dsv3_infer::{generate, GenerateOptions, Sampler, SamplingOptions};

use crate::common::*;

use super::*;

/// A fixed seed reproduces a sampled run exactly; another seed gives another run.
#[test]
fn seeded_sampling_is_reproducible() {
    let model = load("tiny-direct");
    let ids = Golden::read(&fixture("tiny-direct").join("golden.safetensors")).ids();
    let opts = |seed| GenerateOptions {
        sampling: SamplingOptions {
            temperature: 1.2,
            top_p: Some(0.95),
            min_p: Some(0.01),
            repetition_penalty: Some(1.1),
            seed,
            ..Default::default()
        },
        ..greedy(30)
    };
    let a = generate(&model, None, &ids[..5], &opts(5), |_| {}).unwrap();
    let b = generate(&model, None, &ids[..5], &opts(5), |_| {}).unwrap();
    let c = generate(&model, None, &ids[..5], &opts(6), |_| {}).unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert_ne!(a.tokens, c.tokens);
}

/// The processing chain computed independently in float64 on the host.
pub(crate) fn expected_probs(logits: &[f64], hist: &[u32], o: &SamplingOptions) -> Vec<f64> {
    let mut x: Vec<f64> = logits.to_vec();
    if let Some(p) = o.repetition_penalty {
        // Once per distinct token, however often it occurs (as HF's gather/scatter).
        let mut seen = hist.to_vec();
        seen.sort();
        seen.dedup();
        for &h in &seen {
            let v = &mut x[h as usize];
            *v = if *v > 0.0 {
                *v / p as f64
            } else {
                *v * p as f64
            };
        }
    }
    for v in &mut x {
        *v /= o.temperature as f64;
    }
    let softmax = |x: &[f64]| {
        let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|v| v / s).collect::<Vec<_>>()
    };
    if let Some(k) = o.top_k {
        let mut s = x.clone();
        s.sort_by(|a, b| b.partial_cmp(a).unwrap());
        let kth = s[k - 1];
        x.iter_mut()
            .filter(|v| **v < kth)
            .for_each(|v| *v = f64::NEG_INFINITY);
    }
    if let Some(p) = o.top_p {
        let probs = softmax(&x);
        let mut order: Vec<usize> = (0..x.len()).collect();
        order.sort_by(|&a, &b| probs[b].partial_cmp(&probs[a]).unwrap());
        let mut cum = 0.0;
        for &i in &order {
            if cum >= p as f64 {
                x[i] = f64::NEG_INFINITY;
            }
            cum += probs[i];
        }
    }
    if let Some(m) = o.min_p {
        let probs = softmax(&x);
        let top = probs.iter().cloned().fold(0.0, f64::max);
        for (i, pr) in probs.iter().enumerate() {
            if *pr < m as f64 * top {
                x[i] = f64::NEG_INFINITY;
            }
        }
    }
    softmax(&x)
}

/// Token frequencies of 40000 seeded draws match the softmax of the processed logits: every
/// filtered token is never drawn, and each kept token's frequency lies within 5 standard
/// deviations (`5·sqrt(p(1-p)/N)`) of its probability — a correct sampler fails this with
/// probability < 1e-5 over all tokens; a wrong order of filters or temperature misses by far more.
#[test]
fn sampling_frequencies_match_processed_softmax() {
    let logits = [
        2.0, 1.5, -0.3, 0.9, 1.2, -2.0, 0.0, 0.4, 1.9, -1.0, 0.7, 1.1, -0.5, 0.2,
    ];
    let hist: Vec<u32> = vec![0, 5, 8, 8];
    let cases = [
        SamplingOptions {
            temperature: 0.8,
            top_k: Some(9),
            top_p: Some(0.9),
            min_p: Some(0.05),
            repetition_penalty: Some(1.3),
            seed: 3,
        },
        SamplingOptions {
            temperature: 1.5,
            seed: 4,
            ..Default::default()
        },
        SamplingOptions {
            temperature: 1.0,
            top_p: Some(0.6),
            seed: 5,
            ..Default::default()
        },
    ];
    let n = 40_000;
    let v = logits.len();
    for o in cases {
        let want = expected_probs(&logits.map(|x| x as f64), &hist, &o);
        let mut sampler = Sampler::new(&o).unwrap();
        let data: Vec<f32> = (0..n).flat_map(|_| logits).collect();
        let t = Tensor::<B, 2>::from_data(TensorData::new(data, [n, v]), &device());
        let hists: Vec<&[u32]> = vec![&hist; n];
        let rows: Vec<usize> = (0..n).collect();
        let picks = sampler.sample(t, &hists, &rows).unwrap();
        let mut count = vec![0usize; v];
        for p in picks {
            count[p as usize] += 1;
        }
        // The device's processed logits give the same distribution.
        let one = Tensor::<B, 2>::from_data(TensorData::new(logits.to_vec(), [1, v]), &device());
        let processed = to_vec(sampler.process(one, &[&hist]));
        for i in 0..v {
            let f = count[i] as f64 / n as f64;
            if want[i] == 0.0 {
                assert_eq!(count[i], 0, "{o:?}: filtered token {i} drawn");
                assert_eq!(processed[i], f32::NEG_INFINITY);
            } else {
                let sigma = (want[i] * (1.0 - want[i]) / n as f64).sqrt();
                assert!(
                    (f - want[i]).abs() <= 5.0 * sigma,
                    "{o:?}: token {i}: frequency {f} vs probability {}",
                    want[i]
                );
                assert!(processed[i].is_finite());
            }
        }
    }
}

/// Greedy applies the repetition penalty before the argmax (as HF does).
#[test]
fn greedy_with_repetition_penalty() {
    let l = Tensor::<B, 2>::from_data(TensorData::new(vec![3.0f32, 2.9, -1.0], [1, 3]), &device());
    let mut plain = Sampler::new(&SamplingOptions::default()).unwrap();
    assert_eq!(plain.sample(l.clone(), &[&[]], &[0]).unwrap(), vec![0]);
    let mut pen = Sampler::new(&SamplingOptions {
        repetition_penalty: Some(1.5),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(pen.sample(l, &[&[0]], &[0]).unwrap(), vec![1]);
}
