//! Generation: greedy against the goldens, batching, MTP speculative decoding, options, stops.

use dsv3_infer::{
    generate, generate_batch, GenerateOptions, SamplingOptions, Speculative, StopReason,
};

use crate::common::*;

use super::*;
use crate::files::byte_tokenizer;

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
    // The stats are the batch's: every row's tokens, 3 rows (the decode rate leaves out each
    // row's first token, which the prefill produced).
    let st = &batched[0].stats;
    assert_eq!(st.rows, 3);
    let total: usize = batched.iter().map(|g| g.tokens.len()).sum();
    assert_eq!(st.generated_tokens, total);
    let rate = (total - 3) as f64 / st.decode_secs;
    assert!(
        (st.decode_tokens_per_sec() - rate).abs() <= 1e-9 * rate,
        "{st:?}"
    );
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
