//! Auxiliary-loss-free load balancing (paper §2.1.2): after each optimiser step, every MoE
//! layer's `e_score_correction_bias` moves by `γ · sign(mean load − load_i)` — up for
//! under-loaded experts, down for over-loaded ones. The bias only steers selection (the model
//! detaches it), gets no gradient, and is changed here and nowhere else.

use burn::module::Param;
use burn::tensor::{Tensor, TensorData};
use dsv3_backends::DsBackend;
use dsv3_model::DeepseekV3;

/// Tokens routed to each expert (`experts: [tokens][k]`), added into `loads`.
pub fn add_loads(loads: &mut [u64], experts: &[Vec<u32>]) {
    for token in experts {
        for &e in token {
            loads[e as usize] += 1;
        }
    }
}

/// Max load ÷ mean load (1 = perfectly balanced; E/k = every token on the same k experts).
pub fn imbalance(loads: &[u64]) -> f64 {
    let total: u64 = loads.iter().sum();
    if total == 0 {
        return 1.0;
    }
    let mean = total as f64 / loads.len() as f64;
    *loads.iter().max().unwrap_or(&0) as f64 / mean
}

/// `b_i + γ · sign(mean − load_i)`, computed in f32 exactly as stored.
pub fn updated_bias(bias: &[f32], loads: &[u64], gamma: f32) -> Vec<f32> {
    let mean = loads.iter().sum::<u64>() as f64 / loads.len() as f64;
    bias.iter()
        .zip(loads)
        .map(|(&b, &l)| {
            let l = l as f64;
            if l < mean {
                b + gamma
            } else if l > mean {
                b - gamma
            } else {
                b
            }
        })
        .collect()
}

/// The bias of MoE layer `layer` as host values.
pub fn bias_values<B: DsBackend>(model: &DeepseekV3<B>, layer: usize) -> Option<Vec<f32>> {
    let moe = model.moe(layer)?;
    moe.gate
        .e_score_correction_bias
        .val()
        .into_data()
        .convert::<f32>()
        .to_vec()
        .ok()
}

/// Applies one bias update per MoE layer from that step's loads (`(layer, loads)` pairs).
pub fn apply<B: DsBackend>(model: &mut DeepseekV3<B>, loads: &[(usize, Vec<u64>)], gamma: f32) {
    if gamma == 0.0 {
        return;
    }
    for (layer, l) in loads {
        let Some(old) = bias_values(model, *layer) else {
            continue;
        };
        let new = updated_bias(&old, l, gamma);
        let Some(moe) = model.moe_mut(*layer) else {
            continue;
        };
        let param = &moe.gate.e_score_correction_bias;
        let (id, device) = (param.id, param.device());
        let require_grad = param.val().is_require_grad();
        let n = new.len();
        let t = Tensor::<B, 1>::from_data(TensorData::new(new, [n]), &device)
            .set_require_grad(require_grad);
        moe.gate.e_score_correction_bias = Param::initialized(id, t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_moves_against_load() {
        let b = updated_bias(&[0.0, 0.5, -0.5, 0.0], &[10, 2, 4, 4], 0.25);
        // mean 5: expert 0 over-loaded, the others under-loaded.
        assert_eq!(b, vec![-0.25, 0.75, -0.25, 0.25]);
        assert_eq!(updated_bias(&[1.0, 1.0], &[3, 3], 0.1), vec![1.0, 1.0]);
        assert!((imbalance(&[10, 2, 4, 4]) - 2.0).abs() < 1e-12);
    }
}
