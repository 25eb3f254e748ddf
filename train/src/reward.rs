//! Rule-based rewards for reinforcement learning on verifiable answers, as DeepSeek-R1 (§2.2.2)
//! and the V3 report (§5.2.1, "rule-based RM") use them: no reward model, a deterministic check
//! of the completion's text against the reference answer, plus an optional format reward for a
//! `<think>…</think>` block before the answer.
//!
//! - [`RuleReward::Exact`]: 1 when the trimmed completion equals the trimmed answer;
//! - [`RuleReward::Number`]: 1 when the completion's last number equals the answer's
//!   ([`crate::eval::extract_number`], the same extraction `dsv3 eval --task gen` scores with);
//! - [`RuleReward::Regex`]: 1 when the pattern's first capture group (the whole match when the
//!   pattern has none), at its first match in the completion, equals the trimmed answer.

use crate::error::TrainError;
use crate::eval::extract_number;

/// Which rule scores a completion against its answer (each gives 0 or 1).
#[derive(Debug, Clone)]
pub enum RuleReward {
    Exact,
    Number,
    Regex(regex::Regex),
}

impl RuleReward {
    /// `exact`, `number`, or `regex` with its `pattern`.
    ///
    /// # Errors
    /// [`TrainError::Invalid`]: an unknown name, `regex` without a pattern (or a pattern
    /// given to another rule), or a pattern that does not compile.
    pub fn parse(name: &str, pattern: Option<&str>) -> Result<Self, TrainError> {
        let bad = |m: String| Err(TrainError::Invalid(m));
        match (name, pattern) {
            ("exact", None) => Ok(Self::Exact),
            ("number", None) => Ok(Self::Number),
            ("regex", Some(p)) => regex::Regex::new(p).map(Self::Regex).map_err(|e| {
                // The regex crate's message spans lines (the pattern, a caret, the reason).
                let why = e.to_string();
                let why = why
                    .lines()
                    .last()
                    .unwrap_or("")
                    .trim()
                    .trim_start_matches("error: ");
                TrainError::Invalid(format!("answer pattern {p:?} does not compile: {why}"))
            }),
            ("regex", None) => bad("the regex reward needs a pattern (--answer-regex)".into()),
            ("exact" | "number", Some(_)) => bad(format!(
                "an answer pattern is only used by the regex reward, not by {name}"
            )),
            _ => bad(format!("unknown reward {name:?} (exact, number or regex)")),
        }
    }

    /// The answer this rule reads from `completion` (`None` when it finds none).
    pub fn extract(&self, completion: &str) -> Option<String> {
        match self {
            Self::Exact => Some(completion.trim().to_string()),
            Self::Number => extract_number(completion),
            Self::Regex(re) => re.captures(completion).map(|c| {
                c.get(1)
                    .or_else(|| c.get(0))
                    .map_or("", |m| m.as_str())
                    .trim()
                    .to_string()
            }),
        }
    }

    /// 1 when the completion's answer is `answer`, else 0.
    pub fn score(&self, completion: &str, answer: &str) -> f64 {
        let want = match self {
            Self::Number => extract_number(answer).unwrap_or_else(|| answer.trim().to_string()),
            _ => answer.trim().to_string(),
        };
        f64::from(u8::from(
            self.extract(completion).is_some_and(|a| a == want),
        ))
    }
}

/// 1 when `completion` opens with one `<think>…</think>` block (leading whitespace allowed)
/// and something follows it; 0 otherwise (no block, a second one, or nothing after it). The
/// R1 recipe's format reward.
pub fn think_format(completion: &str) -> f64 {
    let Some(rest) = completion.trim_start().strip_prefix("<think>") else {
        return 0.0;
    };
    let Some((thought, answer)) = rest.split_once("</think>") else {
        return 0.0;
    };
    let ok = !thought.contains("<think>")
        && !answer.contains("<think>")
        && !answer.contains("</think>")
        && !answer.trim().is_empty();
    f64::from(u8::from(ok))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_by_example() {
        let exact = RuleReward::parse("exact", None).unwrap();
        assert_eq!(exact.score("  67 \n", "67"), 1.0);
        assert_eq!(exact.score("Answer: 67", "67"), 0.0);
        let number = RuleReward::parse("number", None).unwrap();
        assert_eq!(number.score("6+1=7, 6+0=6. Answer: 67", "67"), 1.0);
        assert_eq!(number.score("Answer: 1,067.0", "1067"), 1.0);
        assert_eq!(number.score("67 or 68", "67"), 0.0);
        assert_eq!(number.score("no digits", "67"), 0.0);
        let re = RuleReward::parse("regex", Some(r"Answer:\s*(\S+)")).unwrap();
        assert_eq!(re.score("x. Answer: 67 and more", "67"), 1.0);
        assert_eq!(re.score("x. answer: 67", "67"), 0.0);
        let whole = RuleReward::parse("regex", Some(r"\d+")).unwrap();
        assert_eq!(whole.extract("a 12 b 13").as_deref(), Some("12"));
    }

    #[test]
    fn bad_rules_are_refused() {
        for (n, p, want) in [
            ("regex", None, "needs a pattern"),
            ("regex", Some("("), "answer pattern \"(\""),
            ("number", Some("x"), "only used by the regex reward"),
            ("fuzzy", None, "unknown reward \"fuzzy\""),
        ] {
            let e = RuleReward::parse(n, p).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn think_format_by_example() {
        assert_eq!(think_format("<think>6+1=7</think> Answer: 67"), 1.0);
        assert_eq!(think_format("\n<think></think>67"), 1.0);
        assert_eq!(think_format("Answer: 67"), 0.0);
        assert_eq!(think_format("<think>no end"), 0.0);
        assert_eq!(think_format("<think>a</think>   "), 0.0);
        assert_eq!(think_format("<think>a</think>b<think>c</think>d"), 0.0);
    }
}
