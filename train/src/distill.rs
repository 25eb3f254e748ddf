//! Logit distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural
//! Network"): the student matches the teacher's next-token distribution softened by a
//! temperature τ, mixed with the hard-label cross-entropy:
//!
//! `L = (1 − α) · CE(student, labels) + α · τ² · KL(p_teacher^τ ‖ p_student^τ)`,
//! `p^τ = softmax(logits / τ)`.
//!
//! The τ² keeps the soft term's gradient on the scale of the hard one as τ grows (the paper's
//! §2). The KL is the forward one (teacher first), as in the paper and TRL's GKD with β = 0.
//! A [`Teacher`] set on the trainer (its `teacher` field) turns its next-token term into this mix (the
//! MTP and balance terms stay); the teacher runs without autodiff, on the same inputs, and the
//! average counts the same targets (the assistant mask when fine-tuning).

use burn::tensor::{backend::Backend, Int, Tensor};
use dsv3_backends::fused::log_softmax;
use dsv3_backends::{DsAutodiffBackend, DsBackend};
use dsv3_model::{AttentionMode, DeepseekV3};

use crate::error::TrainError;

/// A frozen teacher: its model (no autodiff), τ and α.
#[derive(Clone)]
pub struct Teacher<B: DsBackend> {
    pub model: DeepseekV3<B>,
    /// Where it was loaded from (recorded in checkpoints: a resume checks it is the same).
    pub dir: std::path::PathBuf,
    pub temperature: f64,
    /// α, the soft term's weight (0: hard labels only).
    pub alpha: f64,
}

impl<B: DsBackend> Teacher<B> {
    /// The distillation term for a student's `logits` on `inputs`: the teacher's forward, then
    /// [`kl_loss`] over the positions `mask` marks.
    pub fn kl<AB: DsAutodiffBackend<InnerBackend = B>>(
        &self,
        logits: Tensor<AB, 3>,
        inputs: Tensor<AB, 2, Int>,
        mask: Option<Tensor<AB, 2>>,
        attention: AttentionMode,
    ) -> Tensor<AB, 1> {
        let t = crate::forward::forward(&self.model, inputs.inner(), attention, 0, false).logits;
        kl_loss(logits, Tensor::from_inner(t), self.temperature, mask)
    }
}

/// `τ² · KL(p_teacher^τ ‖ p_student^τ)` at each position, averaged over the positions whose
/// `mask` (`[B, L]`, 1 or 0) is 1, or over all of them without a mask. `student`, `teacher`:
/// `[B, L, V]` logits over the same vocabulary. The teacher's side carries no gradient when
/// its tensor does not (give it detached).
///
/// # Panics
/// When the shapes differ (a caller's bug: [`check_vocab`] checks the models first).
pub fn kl_loss<B: DsBackend>(
    student: Tensor<B, 3>,
    teacher: Tensor<B, 3>,
    temperature: f64,
    mask: Option<Tensor<B, 2>>,
) -> Tensor<B, 1> {
    let [b, l, _] = student.dims();
    assert_eq!(student.dims(), teacher.dims(), "student and teacher logits");
    let ls = log_softmax(student.div_scalar(temperature));
    let lt = log_softmax(teacher.div_scalar(temperature));
    let kl = (lt.clone().exp() * (lt - ls))
        .sum_dim(2)
        .reshape([b, l])
        .mul_scalar(temperature * temperature);
    match mask {
        Some(m) => {
            let count = m.clone().sum().clamp_min(1.0);
            (kl * m).sum() / count
        }
        None => kl.mean(),
    }
}

/// `(1 − α) · hard + α · soft`.
pub fn mix<B: Backend>(hard: Tensor<B, 1>, soft: Tensor<B, 1>, alpha: f64) -> Tensor<B, 1> {
    hard.mul_scalar(1.0 - alpha) + soft.mul_scalar(alpha)
}

/// Teacher and student must share the vocabulary (the same ids mean the same tokens).
///
/// # Errors
/// [`TrainError::Invalid`] naming both sizes when they differ, or `temperature` is not a
/// positive finite number, or `alpha` is outside [0, 1].
pub fn check_vocab(
    teacher_vocab: usize,
    student_vocab: usize,
    temperature: f64,
    alpha: f64,
) -> Result<(), TrainError> {
    if teacher_vocab != student_vocab {
        return Err(TrainError::Invalid(format!(
            "teacher and student vocabularies differ ({teacher_vocab} vs {student_vocab} ids): \
             distillation needs one tokenizer"
        )));
    }
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(TrainError::Invalid(format!(
            "temperature = {temperature} must be a finite number > 0"
        )));
    }
    if !(0.0..=1.0).contains(&alpha) {
        return Err(TrainError::Invalid(format!(
            "the soft-loss weight {alpha} must be in [0, 1]"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    type B = dsv3_backends::Cpu;

    fn logits(v: &[f32], l: usize) -> Tensor<B, 3> {
        Tensor::from_data(TensorData::new(v.to_vec(), [1, l, 2]), &Default::default())
    }

    fn value(t: Tensor<B, 1>) -> f64 {
        t.into_scalar() as f64
    }

    /// Student uniform (1/2, 1/2), teacher (1/4, 3/4) from logits [0, ln 3]:
    /// KL = 1/4 ln(1/2) + 3/4 ln(3/2) at τ = 1; at τ = 2 the teacher's logits halve, so
    /// p_t = (1, √3) / (1 + √3), and the KL is scaled by τ² = 4.
    #[test]
    fn kl_by_hand() {
        let l3 = 3f32.ln();
        let s = logits(&[0.0, 0.0], 1);
        let t = logits(&[0.0, l3], 1);
        let want1 = 0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln();
        let got1 = value(kl_loss(s.clone(), t.clone(), 1.0, None));
        let r3 = 3f64.sqrt();
        let (p0, p1) = (1.0 / (1.0 + r3), r3 / (1.0 + r3));
        let want2 = 4.0 * (p0 * (p0 / 0.5).ln() + p1 * (p1 / 0.5).ln());
        let got2 = value(kl_loss(s, t, 2.0, None));
        // f32 log-softmax of two values: a few ulps.
        assert!((got1 - want1).abs() < 1e-6, "{got1} vs {want1}");
        assert!((got2 - want2).abs() < 1e-6, "{got2} vs {want2}");
        // Mixed with a hard loss of 2: (1 − 0.25)·2 + 0.25·KL.
        let m = value(mix(
            Tensor::from_data([2.0f32], &Default::default()),
            Tensor::from_data([got1 as f32], &Default::default()),
            0.25,
        ));
        assert!((m - (1.5 + 0.25 * want1)).abs() < 1e-6);
    }

    /// Teacher = student at τ = 1 with no hard-label weight: the loss is 0. A mask keeps only
    /// the positions it marks (here the one where the two differ).
    #[test]
    fn zero_for_the_same_model_and_masked_mean() {
        let v = [0.3f32, -1.2, 2.0, 0.5];
        let same = value(mix(
            Tensor::from_data([5.0f32], &Default::default()),
            kl_loss(logits(&v, 2), logits(&v, 2), 1.0, None),
            1.0,
        ));
        assert_eq!(same, 0.0);
        let l3 = 3f32.ln();
        let s = logits(&[0.0, 0.0, 0.0, 0.0], 2);
        let t = logits(&[0.0, 0.0, 0.0, l3], 2);
        let mask = Tensor::<B, 2>::from_data(
            TensorData::new(vec![0f32, 1.0], [1, 2]),
            &Default::default(),
        );
        let got = value(kl_loss(s, t, 1.0, Some(mask)));
        let want = 0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln();
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn mismatched_vocabularies_are_refused() {
        let e = check_vocab(317, 258, 1.0, 0.5).unwrap_err().to_string();
        assert!(e.contains("317 vs 258"), "{e}");
        assert!(check_vocab(258, 258, 0.0, 0.5).is_err());
        assert!(check_vocab(258, 258, 2.0, 1.5).is_err());
        assert!(check_vocab(258, 258, 2.0, 1.0).is_ok());
    }
}
