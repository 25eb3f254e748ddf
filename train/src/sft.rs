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

/// One window per example (`seq_len + 1` tokens: the example, then `pad` up to the end, masked
/// out). Example `e` is held out for validation when `e % val_every == val_every − 1`; at least
/// one is.
///
/// # Errors
/// [`TrainError::Invalid`]: `seq_len` or `val_every` below 2, fewer than 2 examples, an
/// example whose mask length differs from its ids', or no assistant token left in the
/// training or the held-out examples (after truncation).
pub fn dataset(
    examples: &[Example],
    seq_len: usize,
    val_every: usize,
    pad: u32,
) -> Result<(Dataset, SftReport), TrainError> {
    let bad = |m: String| Err(TrainError::Invalid(m));
    if seq_len < 2 || val_every < 2 {
        return bad(format!(
            "seq_len = {seq_len} and val_every = {val_every} must be >= 2"
        ));
    }
    if examples.len() < 2 {
        return bad(format!(
            "{} conversation(s): fine-tuning needs at least 2 (one is held out)",
            examples.len()
        ));
    }
    let w = seq_len + 1;
    let (mut tokens, mut mask) = (
        Vec::with_capacity(w * examples.len()),
        Vec::with_capacity(w * examples.len()),
    );
    let (mut train, mut val) = (Vec::new(), Vec::new());
    let mut report = SftReport {
        examples: examples.len(),
        truncated: 0,
        longest: 0,
        target_tokens: 0,
    };
    let (mut train_targets, mut val_targets) = (0, 0);
    for (e, ex) in examples.iter().enumerate() {
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
        if e % val_every == val_every - 1 {
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
            documents: examples.len(),
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
        let (d, r) = dataset(&exs, 4, 2, 99).unwrap();
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
        let e = dataset(&[ex(&[1, 2], &[0, 1])], 4, 2, 0).unwrap_err();
        assert!(e.to_string().contains("at least 2"), "{e}");
        let e = dataset(&[ex(&[1, 2], &[0, 0]), ex(&[1, 2], &[0, 1])], 4, 2, 0).unwrap_err();
        assert!(e.to_string().contains("training"), "{e}");
    }
}
