//! The latent cache: cached prefill and decode equal full forwards and the goldens.

use dsv3_infer::{
    continue_session, generate, GenerateOptions, Session, SessionOptions, Speculative, StopReason,
};

use crate::common::*;

use super::*;

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
