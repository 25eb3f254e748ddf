//! Supervised fine-tuning: the assistant mask of a rendered conversation and the masked loss.

use burn::tensor::{Int, Tensor, TensorData};
use dsv3_infer::{Message, Tokenizer};

use crate::common::*;

/// The assistant mask covers exactly the assistant turns of DeepSeek's template — each turn's
/// content and the EOS that closes it, not the `<｜Assistant｜>` marker the prompt supplies —
/// checked token by token on a multi-turn conversation with a system prompt, against the
/// sequence assembled here piece by piece.
#[test]
fn assistant_mask_covers_exactly_the_assistant_turns() {
    let dir = fixtures().join("tokenizer/byte-level");
    let tok = Tokenizer::from_dir(&dir).unwrap().unwrap();
    let msgs = [
        Message::new("system", "Be brief."),
        Message::new("user", "hi"),
        Message::new("assistant", "ok"),
        Message::new("user", "2+2?"),
        Message::new("assistant", "4"),
    ];
    let (ids, mask) = tok.encode_chat_with_assistant_mask(&msgs).unwrap();
    // The fixture's special ids: 0 BOS, 1 EOS, 2 <｜User｜>, 3 <｜Assistant｜>; text is bytes.
    let text = |t: &str| tok.encode(t).unwrap();
    let mut want: Vec<(u32, bool)> = vec![(0, false)];
    let mut push = |ids: Vec<u32>, m: bool| want.extend(ids.into_iter().map(|i| (i, m)));
    push(text("Be brief."), false);
    push(vec![2], false);
    push(text("hi"), false);
    push(vec![3], false);
    push(text("ok"), true);
    push(vec![1], true);
    push(vec![2], false);
    push(text("2+2?"), false);
    push(vec![3], false);
    push(text("4"), true);
    push(vec![1], true);
    let got: Vec<(u32, bool)> = ids.into_iter().zip(mask).collect();
    assert_eq!(got, want);
    // The ids are what generation renders for the same conversation.
    assert_eq!(
        got.iter().map(|x| x.0).collect::<Vec<_>>(),
        tok.encode_chat(&msgs, false).unwrap()
    );
    // No assistant turn: nothing to train on.
    let e = tok
        .encode_chat_with_assistant_mask(&msgs[..2])
        .unwrap_err()
        .to_string();
    assert!(e.contains("no assistant message"), "{e}");
}

/// The masked cross-entropy is the mean NLL over the masked-in targets only: every row's logits
/// are [0, ln 3] (p = 1/4, 3/4); targets 0, 1, 1 with mask 1, 0, 1 give (ln 4 + ln 4/3) / 2.
#[test]
fn masked_cross_entropy_by_hand() {
    type B = dsv3_backends::Cpu;
    let d = device();
    let l3 = 3f32.ln();
    let logits = Tensor::<B, 3>::from_data(
        TensorData::new(vec![0.0, l3, 0.0, l3, 0.0, l3], [1, 3, 2]),
        &d,
    );
    let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![0i64, 1, 1], [1, 3]), &d);
    let mask = Tensor::<B, 2>::from_data(TensorData::new(vec![1f32, 0.0, 1.0], [1, 3]), &d);
    let got: f32 = dsv3_train::loss::masked_cross_entropy(logits, targets, mask).into_scalar();
    let want = (4f64.ln() + (4.0f64 / 3.0).ln()) / 2.0;
    // f32 log-softmax of two values: a few ulps.
    assert!((got as f64 - want).abs() < 1e-6, "{got} vs {want}");
}
