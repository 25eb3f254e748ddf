//! A task the project generates itself (no download, fixed by the seed) for post-training:
//! multi-digit addition written as chat turns, the assistant answering with a short worked
//! solution (column by column, carries named) that ends in `Answer: N`.
//!
//! [`addition`] draws distinct problems and splits them into a training set and a held-out set
//! that shares no problem with it (`a + b` and `b + a` count as the same problem). [`write()`] saves
//! them as the commands read them:
//!
//! - `train.jsonl`: `{"messages": [{"role": "user", ..}, {"role": "assistant", ..}]}` for `dsv3 sft`;
//! - `train_prompts.jsonl` and `test.jsonl`: `{"prompt", "answer"}` for `dsv3 eval --task gen`
//!   (and for reinforcement learning with a rule-based reward on the answer).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use dsv3_backends::SplitMix64;
use serde::{Deserialize, Serialize};

use crate::error::TrainError;

/// One chat message of a training line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// One generated problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub a: u64,
    pub b: u64,
}

impl Problem {
    /// The user's turn: `What is 347 + 285?`.
    pub fn prompt(&self) -> String {
        format!("What is {} + {}?", self.a, self.b)
    }

    /// The exact answer (`632`).
    pub fn answer(&self) -> String {
        (self.a + self.b).to_string()
    }

    /// The assistant's turn: each column from the right as `d1+d2(+carry)=s`, then the answer,
    /// e.g. `7+5=12, 4+8+1=13, 3+2+1=6. Answer: 632`.
    pub fn worked_answer(&self) -> String {
        let (mut a, mut b, mut carry) = (self.a, self.b, 0);
        let mut steps = Vec::new();
        while a > 0 || b > 0 || carry > 0 {
            let (x, y) = (a % 10, b % 10);
            let s = x + y + carry;
            steps.push(if carry > 0 {
                format!("{x}+{y}+{carry}={s}")
            } else {
                format!("{x}+{y}={s}")
            });
            carry = s / 10;
            a /= 10;
            b /= 10;
        }
        if steps.is_empty() {
            steps.push("0+0=0".into());
        }
        format!("{}. Answer: {}", steps.join(", "), self.answer())
    }

    /// The training conversation: user question, worked assistant answer.
    pub fn messages(&self) -> Vec<ChatMessage> {
        vec![
            ChatMessage {
                role: "user".into(),
                content: self.prompt(),
            },
            ChatMessage {
                role: "assistant".into(),
                content: self.worked_answer(),
            },
        ]
    }
}

/// A generated task: training and held-out problems, disjoint.
#[derive(Debug, Clone)]
pub struct Task {
    pub train: Vec<Problem>,
    pub test: Vec<Problem>,
}

/// Names accepted by `dsv3 make-task --task`.
pub const TASKS: &[&str] = &["addition"];

/// `train + test` distinct addition problems with operands of 1 to `digits` digits (each operand's
/// digit count drawn uniformly, then the number uniformly among those of that many digits), from
/// `seed`. `test` of the distinct problems drawn, chosen uniformly at random, are held out, so
/// both sets follow the same distribution.
///
/// # Errors
/// [`TrainError::Invalid`]: `digits` is 0 or above 9, `train` or `test` is 0, or there are fewer
/// distinct problems than asked for.
pub fn addition(seed: u64, digits: u32, train: usize, test: usize) -> Result<Task, TrainError> {
    if !(1..=9).contains(&digits) {
        return Err(TrainError::Invalid(format!(
            "digits = {digits} must be in 1..=9"
        )));
    }
    if train == 0 || test == 0 {
        return Err(TrainError::Invalid(
            "the task needs at least one training and one held-out problem".into(),
        ));
    }
    let max = 10u64.pow(digits);
    // Unordered pairs of numbers below 10^digits.
    let distinct = (max as u128) * (max as u128 + 1) / 2;
    if ((train + test) as u128) > distinct {
        return Err(TrainError::Invalid(format!(
            "{} problems asked for, but numbers of up to {digits} digit(s) make only {distinct} distinct sums",
            train + test
        )));
    }
    let mut rng = SplitMix64::new(seed ^ 0xADD1_7105_0000_0000);
    let number = |rng: &mut SplitMix64| {
        let d = 1 + rng.below(digits as usize) as u32;
        let lo = if d == 1 { 0 } else { 10u64.pow(d - 1) };
        lo + rng.below((10u64.pow(d) - lo) as usize) as u64
    };
    let mut seen = BTreeSet::new();
    let mut all = Vec::with_capacity(train + test);
    // Rejection of repeats; the retry bound only guards against a pathological near-full draw.
    let mut tries = 0usize;
    while all.len() < train + test {
        tries += 1;
        if tries > 1000 * (train + test) {
            return Err(TrainError::Invalid(format!(
                "could not draw {} distinct problems of up to {digits} digit(s); ask for fewer",
                train + test
            )));
        }
        let (a, b) = (number(&mut rng), number(&mut rng));
        if seen.insert((a.min(b), a.max(b))) {
            all.push(Problem { a, b });
        }
    }
    // The held-out problems are a seeded uniform sample of the distinct ones, not the first
    // drawn: repeats are rejected, so the few short sums (55 with one-digit operands) fill up
    // early and the first draws hold far more of them than the rest (with 2,000 + 300 problems of
    // up to two digits: 13% of the first 300 against 0.8% of the others).
    for i in 0..test {
        let j = i + rng.below(all.len() - i);
        all.swap(i, j);
    }
    let train_set = all.split_off(test);
    Ok(Task {
        train: train_set,
        test: all,
    })
}

/// A line of `train_prompts.jsonl` / `test.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenLine {
    pub prompt: String,
    pub answer: String,
}

/// A line of `train.jsonl` / `test_chat.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatLine {
    pub messages: Vec<ChatMessage>,
}

/// Writes `train.jsonl`, `train_prompts.jsonl`, `test.jsonl` and `test_chat.jsonl` (the
/// held-out problems as conversations with their worked answers: `sft --val-data`'s held-out
/// loss) into `dir` (created). Returns their paths in that order.
///
/// # Errors
/// [`TrainError::Io`] when `dir` or a file cannot be written.
pub fn write(task: &Task, dir: &Path) -> Result<[PathBuf; 4], TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io("create", dir, e))?;
    let lines = |items: Vec<String>| items.join("\n") + "\n";
    let chat = |ps: &[Problem]| -> Vec<String> {
        ps.iter()
            .map(|p| {
                json(&ChatLine {
                    messages: p.messages(),
                })
            })
            .collect()
    };
    let gen = |ps: &[Problem]| -> Vec<String> {
        ps.iter()
            .map(|p| {
                json(&GenLine {
                    prompt: p.prompt(),
                    answer: p.answer(),
                })
            })
            .collect()
    };
    let paths = [
        dir.join("train.jsonl"),
        dir.join("train_prompts.jsonl"),
        dir.join("test.jsonl"),
        dir.join("test_chat.jsonl"),
    ];
    for (path, body) in paths.iter().zip([
        lines(chat(&task.train)),
        lines(gen(&task.train)),
        lines(gen(&task.test)),
        lines(chat(&task.test)),
    ]) {
        std::fs::write(path, body).map_err(|e| TrainError::io("write", path, e))?;
    }
    Ok(paths)
}

/// One JSON line.
fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain strings serialise")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worked_answers_by_hand() {
        let p = Problem { a: 347, b: 285 };
        assert_eq!(p.prompt(), "What is 347 + 285?");
        assert_eq!(p.worked_answer(), "7+5=12, 4+8+1=13, 3+2+1=6. Answer: 632");
        // A final carry becomes its own column; operands of different lengths.
        let p = Problem { a: 95, b: 7 };
        assert_eq!(p.worked_answer(), "5+7=12, 9+0+1=10, 0+0+1=1. Answer: 102");
        assert_eq!(Problem { a: 0, b: 0 }.worked_answer(), "0+0=0. Answer: 0");
    }

    #[test]
    fn seeded_disjoint_split() {
        let t = addition(5, 3, 300, 50).unwrap();
        assert_eq!((t.train.len(), t.test.len()), (300, 50));
        let key = |p: &Problem| (p.a.min(p.b), p.a.max(p.b));
        let test: BTreeSet<_> = t.test.iter().map(key).collect();
        assert_eq!(test.len(), 50);
        assert!(t.train.iter().all(|p| !test.contains(&key(p))));
        assert!(t
            .train
            .iter()
            .chain(&t.test)
            .all(|p| p.a < 1000 && p.b < 1000));
        // Same seed, same problems; another seed, others.
        assert_eq!(addition(5, 3, 300, 50).unwrap().test, t.test);
        assert_ne!(addition(6, 3, 300, 50).unwrap().test, t.test);
        // One digit: 55 unordered pairs exist.
        assert!(addition(0, 1, 50, 5).is_ok());
        let e = addition(0, 1, 50, 6).unwrap_err().to_string();
        assert!(e.contains("55 distinct"), "{e}");
    }

    /// The held-out set follows the training set's distribution: the share of one-digit sums
    /// (at most 55 of 2,300 distinct problems, ~2.4%) is the same in both within 5 points (the
    /// held-out share's standard error at 300 problems is ~0.9 points). Holding out the first
    /// draws instead put 13% of the held-out set there and 0.8% of the training set.
    #[test]
    fn held_out_set_is_representative() {
        let t = addition(0, 2, 2000, 300).unwrap();
        let short = |ps: &[Problem]| {
            ps.iter().filter(|p| p.a < 10 && p.b < 10).count() as f64 / ps.len() as f64
        };
        let (train, test) = (short(&t.train), short(&t.test));
        assert!(
            (train - test).abs() < 0.05,
            "one-digit sums: {train:.3} of training, {test:.3} of held-out"
        );
    }
}
