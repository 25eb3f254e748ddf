//! Aux-loss-free balancing: the bias moves against load and nothing else moves it.

use dsv3_train::{balance, TrainConfig};

use crate::common::*;

use super::*;

#[test]
fn bias_is_untouched_by_the_optimiser_and_moves_against_load() {
    let layers = [1usize, 2, 3];
    let start: Vec<f32> = (0..16).map(|i| 0.01 * (i as f32 - 7.5)).collect();

    // γ = 0: AdamW (lr 3e-3, weight decay 0.1) must leave the bias bit-identical.
    let mut t = trainer(
        TrainConfig {
            bias_gamma: 0.0,
            ..tiny_cfg()
        },
        6,
    );
    for &l in &layers {
        set_bias(&mut t.model, l, &start);
    }
    let before_w = t.model.moe(1).unwrap().gate.weight.val();
    let before_w = to_vec(before_w.inner());
    t.train_step().unwrap();
    t.train_step().unwrap();
    for &l in &layers {
        assert_eq!(
            balance::bias_values(&t.model, l).unwrap(),
            start,
            "layer {l}"
        );
    }
    let after_w = to_vec(t.model.moe(1).unwrap().gate.weight.val().inner());
    assert_ne!(before_w, after_w, "the gate weight itself does train");

    // γ = 1e-3: each expert moves by exactly +γ (under-loaded), −γ (over-loaded) or 0.
    let gamma = 1e-3f32;
    let mut t = trainer(tiny_cfg(), 6);
    for &l in &layers {
        set_bias(&mut t.model, l, &start);
    }
    let s = t.train_step().unwrap();
    let (mut up, mut down) = (0, 0);
    for (l, loads) in &s.loads {
        let mean = loads.iter().sum::<u64>() as f64 / loads.len() as f64;
        let after = balance::bias_values(&t.model, *l).unwrap();
        for e in 0..16 {
            let expected = if (loads[e] as f64) < mean {
                up += 1;
                start[e] + gamma
            } else if loads[e] as f64 > mean {
                down += 1;
                start[e] - gamma
            } else {
                start[e]
            };
            assert_eq!(
                after[e], expected,
                "layer {l} expert {e} load {} mean {mean}",
                loads[e]
            );
        }
        assert_eq!(
            loads.iter().sum::<u64>() as usize,
            2 * if *l == 3 { 15 } else { 16 } * 4,
            "tokens × k routed in layer {l}"
        );
    }
    assert!(
        up > 0 && down > 0,
        "both directions exercised ({up} up, {down} down)"
    );
}
