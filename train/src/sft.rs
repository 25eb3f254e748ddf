//! Supervised fine-tuning data: tokenised conversations with their assistant masks, laid out
//! for the pre-training loop ([`crate::fine_tune`]).
//!
//! **Padded, not packed**: each conversation fills one window of `seq_len + 1` tokens on its own,
//! padded at the end with the pad id (mask 0) and cut at the end when longer (counted in
//! [`SftReport::truncated`]). So no example attends to another without any attention mask
//! beyond the causal one, at the price of the padding's compute. The loss counts only the
//! targets whose mask is 1 ([`crate::loss::masked_cross_entropy`]): the assistant's tokens.
//!
//! **Where rendering happens**: this crate does not depend on the inference crate (`model ←
//! infer`, `model ← train`). The caller renders each conversation with the model directory's
//! own chat template through `dsv3_infer::Tokenizer::encode_chat_with_assistant_mask` — the
//! renderer `dsv3 generate --chat` and `dsv3 chat` use, so training and generation see the
//! same token sequences — and hands over ids and mask ([`Example`]). `dsv3 sft` does this.

use crate::data::Dataset;
use crate::error::TrainError;

/// One rendered conversation: its ids and, per id, whether it is a training target (an
/// assistant token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub mask: Vec<bool>,
}

/// What laying out the examples did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SftReport {
    pub examples: usize,
    /// Examples longer than `seq_len + 1` tokens, cut at the end.
    pub truncated: usize,
    /// Longest example, in tokens.
    pub longest: usize,
    /// Assistant tokens that count as targets (after truncation).
    pub target_tokens: usize,
}

/// Which conversations validate.
#[derive(Debug, Clone, Copy)]
pub enum HeldOut<'a> {
    /// Example `e` of the training file when `e % n == n − 1` (at least one is).
    EveryNth(usize),
    /// These, from a file of their own (TRL's `eval_dataset`); every training example trains.
    Given(&'a [Example]),
}

/// One window per example (`seq_len + 1` tokens: the example, then `pad` up to the end, masked
/// out); the held-out windows as `held_out` says.
///
/// # Errors
/// [`TrainError::Invalid`]: `seq_len` or the `EveryNth` period below 2, fewer than 2 examples
/// (with `EveryNth`: one of them is held out) or none (`Given`: training or held-out), an
/// example whose mask length differs from its ids', or no assistant token left in the
/// training or the held-out examples (after truncation).
pub fn dataset(
    examples: &[Example],
    seq_len: usize,
    held_out: HeldOut<'_>,
    pad: u32,
) -> Result<(Dataset, SftReport), TrainError> {
    let bad = |m: String| Err(TrainError::Invalid(m));
    if seq_len < 2 {
        return bad(format!("seq_len = {seq_len} must be >= 2"));
    }
    let given: &[Example] = match held_out {
        HeldOut::EveryNth(n) if n < 2 => {
            return bad(format!("val_every = {n} must be >= 2"));
        }
        HeldOut::EveryNth(_) if examples.len() < 2 => {
            return bad(format!(
                "{} conversation(s): fine-tuning needs at least 2 (one is held out)",
                examples.len()
            ));
        }
        HeldOut::EveryNth(_) => &[],
        HeldOut::Given(v) if v.is_empty() || examples.is_empty() => {
            return bad(
                "fine-tuning needs at least one training and one held-out conversation".into(),
            );
        }
        HeldOut::Given(v) => v,
    };
    let is_val = |e: usize| match held_out {
        HeldOut::EveryNth(n) => e % n == n - 1,
        HeldOut::Given(_) => e >= examples.len(),
    };
    let all = examples.len() + given.len();
    let w = seq_len + 1;
    let (mut tokens, mut mask) = (Vec::with_capacity(w * all), Vec::with_capacity(w * all));
    let (mut train, mut val) = (Vec::new(), Vec::new());
    let mut report = SftReport {
        examples: all,
        truncated: 0,
        longest: 0,
        target_tokens: 0,
    };
    let (mut train_targets, mut val_targets) = (0, 0);
    for (e, ex) in examples.iter().chain(given).enumerate() {
        if ex.ids.len() != ex.mask.len() {
            return bad(format!(
                "example {e}: {} ids but {} mask entries",
                ex.ids.len(),
                ex.mask.len()
            ));
        }
        report.longest = report.longest.max(ex.ids.len());
        report.truncated += usize::from(ex.ids.len() > w);
        let n = ex.ids.len().min(w);
        let start = tokens.len();
        tokens.extend_from_slice(&ex.ids[..n]);
        tokens.resize(start + w, pad);
        mask.extend_from_slice(&ex.mask[..n]);
        mask.resize(start + w, false);
        // The window's first token is an input only.
        let targets = mask[start + 1..start + w].iter().filter(|&&m| m).count();
        if is_val(e) {
            val.push(start);
            val_targets += targets;
        } else {
            train.push(start);
            train_targets += targets;
        }
    }
    if val.is_empty() {
        let last = train.pop().expect("two examples");
        let t = mask[last + 1..last + w].iter().filter(|&&m| m).count();
        train_targets -= t;
        val_targets += t;
        val.push(last);
    }
    if train_targets == 0 || val_targets == 0 {
        return bad(format!(
            "no assistant token to train on in the {} examples (after cutting to {w} tokens)",
            if train_targets == 0 {
                "training"
            } else {
                "held-out"
            }
        ));
    }
    report.target_tokens = train_targets + val_targets;
    let bytes = tokens
        .iter()
        .zip(&mask)
        .filter(|(&t, &m)| m && t < 256)
        .count();
    Ok((
        Dataset {
            tokens,
            seq_len,
            train,
            val,
            documents: all,
            bytes,
            mask: Some(mask),
        },
        report,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[u32], mask: &[u8]) -> Example {
        Example {
            ids: ids.to_vec(),
            mask: mask.iter().map(|&m| m == 1).collect(),
        }
    }

    #[test]
    fn one_padded_window_per_example() {
        let exs = [
            ex(&[1, 2, 3], &[0, 1, 1]),
            ex(&[4, 5, 6, 7, 8, 9], &[0, 0, 1, 1, 1, 1]),
            ex(&[10, 11], &[0, 1]),
        ];
        let (d, r) = dataset(&exs, 4, HeldOut::EveryNth(2), 99).unwrap();
        assert_eq!(
            d.tokens,
            vec![1, 2, 3, 99, 99, 4, 5, 6, 7, 8, 10, 11, 99, 99, 99]
        );
        let m: Vec<u8> = d.mask.as_ref().unwrap().iter().map(|&b| b as u8).collect();
        assert_eq!(m, vec![0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0]);
        assert_eq!((d.train.clone(), d.val.clone()), (vec![0, 10], vec![5]));
        assert_eq!(d.window(5), &[4, 5, 6, 7, 8]);
        assert_eq!(r.truncated, 1);
        assert_eq!(r.longest, 6);
        assert_eq!(r.target_tokens, 2 + 3 + 1);
    }

    #[test]
    fn bad_inputs() {
        let every2 = HeldOut::EveryNth(2);
        let e = dataset(&[ex(&[1, 2], &[0, 1])], 4, every2, 0).unwrap_err();
        assert!(e.to_string().contains("at least 2"), "{e}");
        let e = dataset(&[ex(&[1, 2], &[0, 0]), ex(&[1, 2], &[0, 1])], 4, every2, 0).unwrap_err();
        assert!(e.to_string().contains("training"), "{e}");
        let e = dataset(&[ex(&[1, 2], &[0, 1])], 4, HeldOut::Given(&[]), 0).unwrap_err();
        assert!(e.to_string().contains("one held-out"), "{e}");
        let e = dataset(
            &[ex(&[1, 2], &[0, 1])],
            4,
            HeldOut::Given(&[ex(&[1, 2], &[0, 0])]),
            0,
        )
        .unwrap_err();
        assert!(e.to_string().contains("held-out"), "{e}");
    }

    /// With a held-out file every training example trains, and the held-out windows follow
    /// them in the file's order.
    #[test]
    fn given_held_out_examples() {
        let exs = [ex(&[1, 2, 3], &[0, 1, 1]), ex(&[4, 5], &[0, 1])];
        let held = [ex(&[6, 7, 8, 9], &[0, 0, 1, 1])];
        let (d, r) = dataset(&exs, 3, HeldOut::Given(&held), 0).unwrap();
        assert_eq!(d.tokens, vec![1, 2, 3, 0, 4, 5, 0, 0, 6, 7, 8, 9]);
        assert_eq!((d.train.clone(), d.val.clone()), (vec![0, 4], vec![8]));
        assert_eq!(
            (r.examples, r.target_tokens, d.documents),
            (3, 2 + 1 + 2, 3)
        );
    }
}
