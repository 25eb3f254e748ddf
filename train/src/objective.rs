//! The training objective of one forward pass — `CE + λ·MTP + balance` over a micro-batch of
//! windows ([`make_batch`]) — shared by the trainer's step and the pipeline executor's last
//! stage.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::config::TrainConfig;
use crate::data::Dataset;
use crate::forward::TrainForward;
use crate::loss;

/// A micro-batch as tensors.
#[derive(Debug, Clone)]
pub struct Batch<B: Backend> {
    /// `[b, T]` tokens 0..T of each window.
    pub inputs: Tensor<B, 2, Int>,
    /// `[b, T]` tokens 1..=T.
    pub targets: Tensor<B, 2, Int>,
    /// Per MTP depth k: `[b, T−1−k]` tokens k+2..=T (two or more ahead of each input).
    pub mtp_targets: Vec<Tensor<B, 2, Int>>,
    /// Text bytes among the targets (for bits per byte; only the counted ones when masked).
    pub target_bytes: usize,
    /// With a [`Dataset::mask`]: `[b, T]` 1 where the target counts, else 0, and the same per
    /// MTP depth (`[b, T−1−k]`).
    pub target_mask: Option<(Tensor<B, 2>, Vec<Tensor<B, 2>>)>,
}

/// Builds the tensors of the windows starting at `starts`.
pub fn make_batch<B: Backend>(
    data: &Dataset,
    starts: &[usize],
    mtp_depths: usize,
    device: &B::Device,
) -> Batch<B> {
    let (b, t) = (starts.len(), data.seq_len);
    let tensor = |cols: std::ops::Range<usize>| {
        let w = cols.len();
        let v: Vec<i64> = starts
            .iter()
            .flat_map(|&s| data.window(s)[cols.clone()].iter().map(|&x| x as i64))
            .collect();
        Tensor::<B, 2, Int>::from_data(TensorData::new(v, [b, w]), device)
    };
    let counts = |s: usize, i: usize| data.window_mask(s).is_none_or(|m| m[i]);
    let target_bytes = starts
        .iter()
        .map(|&s| {
            (1..=t)
                .filter(|&i| data.window(s)[i] < 256 && counts(s, i))
                .count()
        })
        .sum();
    let depths: Vec<usize> = (0..mtp_depths).filter(|k| t >= k + 2).collect();
    let target_mask = data.mask.as_ref().map(|_| {
        let mask = |cols: std::ops::Range<usize>| {
            let w = cols.len();
            let v: Vec<f32> = starts
                .iter()
                .flat_map(|&s| {
                    cols.clone()
                        .map(move |i| if counts(s, i) { 1.0 } else { 0.0 })
                })
                .collect();
            Tensor::<B, 2>::from_data(TensorData::new(v, [b, w]), device)
        };
        (
            mask(1..t + 1),
            depths.iter().map(|k| mask(k + 2..t + 1)).collect(),
        )
    });
    Batch {
        inputs: tensor(0..t),
        targets: tensor(1..t + 1),
        mtp_targets: depths.iter().map(|k| tensor(k + 2..t + 1)).collect(),
        target_bytes,
        target_mask,
    }
}

/// The objective's parts for one forward pass (one-element tensors).
pub struct Losses<B: Backend> {
    pub total: Tensor<B, 1>,
    pub ce: Tensor<B, 1>,
    pub mtp: Option<Tensor<B, 1>>,
    pub balance: Option<Tensor<B, 1>>,
}

/// `CE + λ · mean_k CE_mtp_k + Σ_layers α Σ_i f_i P_i`.
pub fn objective<B: dsv3_backends::DsBackend>(
    fwd: &TrainForward<B>,
    batch: &Batch<B>,
    cfg: &TrainConfig,
) -> Losses<B> {
    // Fine-tuning counts only the masked-in targets (the assistant's tokens).
    let ce_of = |l: &Tensor<B, 3>, t: &Tensor<B, 2, Int>, m: Option<&Tensor<B, 2>>| match m {
        Some(m) => loss::masked_cross_entropy(l.clone(), t.clone(), m.clone()),
        None => loss::cross_entropy(l.clone(), t.clone()),
    };
    let masks = batch.target_mask.as_ref();
    let ce = ce_of(&fwd.logits, &batch.targets, masks.map(|m| &m.0));
    let mut total = ce.clone();
    let mtp = (!fwd.mtp_logits.is_empty()).then(|| {
        let d = fwd.mtp_logits.len() as f64;
        fwd.mtp_logits
            .iter()
            .zip(&batch.mtp_targets)
            .enumerate()
            .map(|(k, (l, t))| ce_of(l, t, masks.map(|m| &m.1[k])))
            .reduce(|a, b| a + b)
            .expect("one depth")
            .div_scalar(d)
    });
    if let Some(m) = &mtp {
        total = total + m.clone().mul_scalar(cfg.mtp_lambda);
    }
    let balance = (cfg.balance_alpha > 0.0 && !fwd.routers.is_empty()).then(|| {
        fwd.routers
            .iter()
            .map(|r| loss::sequence_balance_loss(r, cfg.balance_alpha))
            .reduce(|a, b| a + b)
            .expect("one layer")
    });
    if let Some(b) = &balance {
        total = total + b.clone();
    }
    Losses {
        total,
        ce,
        mtp,
        balance,
    }
}
