//! Evaluation metrics, with the definitions of EleutherAI's lm-evaluation-harness:
//!
//! - perplexity = `exp(Σ NLL / predicted tokens)` and bits per byte = `Σ NLL / ln 2 / UTF-8
//!   bytes of the text` (its `bits_per_byte`; comparable across tokenizers);
//! - multiple choice: `acc` picks the choice whose continuation has the highest summed
//!   log-likelihood, `acc_norm` the highest log-likelihood divided by the choice's length in
//!   characters (the harness's `len(choice)`); ties go to the first choice (`numpy.argmax`);
//! - generation: `exact_match` after answer extraction (the last number in the generated text,
//!   as the harness's "flexible-extract" filter does for GSM8K), or the trimmed text when the
//!   reference answer is not a number.
//!
//! Running the model is the caller's part (`dsv3 eval`); this module only scores.

/// Totals of a perplexity run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PerplexityTotals {
    /// Σ −log p (nats) over the predicted tokens.
    pub nll: f64,
    /// Tokens predicted.
    pub tokens: usize,
    /// UTF-8 bytes of the text scored.
    pub bytes: usize,
}

impl PerplexityTotals {
    pub fn add(&mut self, other: PerplexityTotals) {
        self.nll += other.nll;
        self.tokens += other.tokens;
        self.bytes += other.bytes;
    }

    /// Mean NLL per token (nats).
    pub fn mean_nll(&self) -> f64 {
        self.nll / self.tokens.max(1) as f64
    }

    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }

    pub fn bits_per_byte(&self) -> f64 {
        self.nll / std::f64::consts::LN_2 / self.bytes.max(1) as f64
    }
}

/// `numpy.argmax`: the index of the largest value, the first one on ties (`None` when empty).
fn argmax(v: impl IntoIterator<Item = f64>) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, x) in v.into_iter().enumerate() {
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map(|(i, _)| i)
}

/// The `acc` and `acc_norm` predictions of one multiple-choice item from each choice's summed
/// continuation log-likelihood and the choice's length in characters (a zero length counts
/// as 1). `None` when there is no choice.
pub fn mc_predictions(logliks: &[f64], choice_chars: &[usize]) -> Option<(usize, usize)> {
    debug_assert_eq!(logliks.len(), choice_chars.len());
    let acc = argmax(logliks.iter().copied())?;
    let norm = argmax(
        logliks
            .iter()
            .zip(choice_chars)
            .map(|(l, &c)| l / c.max(1) as f64),
    )?;
    Some((acc, norm))
}

/// The last number in `text` (`-`, digits with `,` group separators, an optional decimal
/// part), normalised: separators dropped, a trailing `.` or `.0…` removed. `None` when the
/// text holds no digit.
pub fn extract_number(text: &str) -> Option<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut end = chars.len();
    // The last digit.
    while end > 0 && !chars[end - 1].is_ascii_digit() {
        end -= 1;
    }
    if end == 0 {
        return None;
    }
    let mut start = end;
    while start > 0 {
        let c = chars[start - 1];
        let digit_before = start >= 2 && chars[start - 2].is_ascii_digit();
        if c.is_ascii_digit() || ((c == ',' || c == '.') && digit_before) {
            start -= 1;
        } else {
            break;
        }
    }
    let negative = start > 0 && chars[start - 1] == '-';
    Some(normalise_number(
        &chars[start..end].iter().collect::<String>(),
        negative,
    ))
}

fn normalise_number(s: &str, negative: bool) -> String {
    let s: String = s.chars().filter(|&c| c != ',').collect();
    let s = match s.split_once('.') {
        Some((int, frac)) if frac.chars().all(|c| c == '0') => int.to_string(),
        _ => s,
    };
    let s = s.trim_start_matches('0');
    let s = if s.is_empty() || s.starts_with('.') {
        format!("0{s}")
    } else {
        s.to_string()
    };
    if negative && s != "0" {
        format!("-{s}")
    } else {
        s
    }
}

/// What exact match compares for a generated `text`: its last number when `answer` is a
/// number, else the trimmed text.
pub fn extracted_answer(text: &str, answer: &str) -> Option<String> {
    if answer_is_number(answer) {
        extract_number(text)
    } else {
        Some(text.trim().to_string())
    }
}

fn answer_is_number(answer: &str) -> bool {
    let a = answer.trim();
    let a = a.strip_prefix('-').unwrap_or(a);
    !a.is_empty()
        && a.chars().any(|c| c.is_ascii_digit())
        && a.chars()
            .all(|c| c.is_ascii_digit() || c == ',' || c == '.')
}

/// Whether `text` answers `answer` exactly (after [`extracted_answer`]).
pub fn exact_match(text: &str, answer: &str) -> bool {
    let want = if answer_is_number(answer) {
        extract_number(answer)
    } else {
        Some(answer.trim().to_string())
    };
    let got = extracted_answer(text, answer);
    got.is_some() && got == want
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acc_and_acc_norm_by_hand() {
        // Choice 0: -6 over 1 char (-6 per char); choice 1: -8 over 4 chars (-2 per char).
        assert_eq!(mc_predictions(&[-6.0, -8.0], &[1, 4]), Some((0, 1)));
        // Ties go to the first choice, as numpy.argmax.
        assert_eq!(mc_predictions(&[-2.0, -2.0], &[3, 3]), Some((0, 0)));
        assert_eq!(mc_predictions(&[], &[]), None);
    }

    #[test]
    fn number_extraction() {
        assert_eq!(
            extract_number("7+5=12, 4+8+1=13. Answer: 632").as_deref(),
            Some("632")
        );
        assert_eq!(extract_number("it is 1,234.").as_deref(), Some("1234"));
        assert_eq!(extract_number("x = -3.50 m").as_deref(), Some("-3.50"));
        assert_eq!(extract_number("2.0").as_deref(), Some("2"));
        assert_eq!(extract_number("007").as_deref(), Some("7"));
        assert_eq!(extract_number("no digits"), None);
        assert!(exact_match("... Answer: 1,000", "1000"));
        assert!(!exact_match("... Answer: 100", "1000"));
        assert!(!exact_match("nothing", "5"));
        assert!(exact_match("  Paris ", "Paris"));
        assert!(!exact_match("Paris is", "Paris"));
    }

    #[test]
    fn perplexity_units() {
        let t = PerplexityTotals {
            nll: 4.0 * std::f64::consts::LN_2,
            tokens: 2,
            bytes: 8,
        };
        assert!((t.perplexity() - 4.0).abs() < 1e-12);
        assert!((t.bits_per_byte() - 0.5).abs() < 1e-12);
    }
}
