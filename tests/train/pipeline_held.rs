//! What a pipeline rank holds ([`held_layers`], [`DeepseekV3::hold_only`]) and that its part
//! initialises to the whole model's values ([`seeded_part`]), bit for bit.

use dsv3_model::{DeepseekV3, HeldLayers};
use dsv3_train::init::{numels, seeded, seeded_part};
use dsv3_train::pipeline::exec::held_layers;
use dsv3_train::pipeline::ScheduleKind;

use super::{params, tiny_model, AD};
use crate::common::*;

#[test]
fn pipeline_held_layers_follow_the_schedules_placement() {
    let h = |kind, pp, rank, layers| held_layers(kind, pp, rank, layers).unwrap();
    let part = |layers: &[usize], embed, head| HeldLayers {
        layers: layers.to_vec(),
        embed,
        head,
    };
    // 1F1B on 2 ranks, 5 layers: 3 + 2.
    assert_eq!(
        h(ScheduleKind::OneFOneB, 2, 0, 5),
        part(&[0, 1, 2], true, false)
    );
    assert_eq!(
        h(ScheduleKind::OneFOneB, 2, 1, 5),
        part(&[3, 4], false, true)
    );
    // DualPipe on 4 ranks, 8 layers: rank 1 holds stages 1 and 2; rank 0 stages 0 and 3 (both
    // ends of the model).
    assert_eq!(
        h(ScheduleKind::DualPipe, 4, 1, 8),
        part(&[2, 3, 4, 5], false, false)
    );
    assert_eq!(
        h(ScheduleKind::DualPipe, 4, 0, 8),
        part(&[0, 1, 6, 7], true, true)
    );
    // DualPipeV on 2 ranks: 4 stages in a V; rank 0 holds the first and the last.
    assert_eq!(
        h(ScheduleKind::DualPipeV, 2, 0, 4),
        part(&[0, 3], true, true)
    );
    assert_eq!(
        h(ScheduleKind::DualPipeV, 2, 1, 4),
        part(&[1, 2], false, false)
    );
}

/// A rank's part, drawn with the other stages' draws skipped, equals the whole model's values
/// for every tensor it holds; every other weight (2 or more dimensions) is a 1-element
/// placeholder, and the held part is the smaller.
#[test]
fn pipeline_held_part_initialises_to_the_whole_models_values() {
    let mut cfg = tiny_model();
    cfg.num_nextn_predict_layers = 0;
    cfg.num_hidden_layers = 4;
    let whole = seeded(DeepseekV3::<AD>::init(&cfg, &device()).unwrap(), 7);
    let want = params(&whole);
    for rank in 0..2 {
        let held = held_layers(ScheduleKind::OneFOneB, 2, rank, 4).unwrap();
        let model = DeepseekV3::<AD>::init(&cfg, &device()).unwrap();
        let sizes = numels(&model);
        let part = seeded_part(model.hold_only(&held), 7, Some(sizes));
        let got = params(&part);
        assert_eq!(got.len(), want.len());
        let (mut kept, mut all) = (0usize, 0usize);
        for ((name, g), (_, w)) in got.iter().zip(&want) {
            all += w.len();
            // RMSNorm weights and the router bias (1-dimensional) stay whole everywhere.
            let one_dim =
                name.ends_with("norm.weight") || name.ends_with("e_score_correction_bias");
            if held.contains(name) || one_dim {
                assert_eq!(g, w, "rank {rank}: {name}");
                kept += g.len();
            } else {
                assert_eq!(g.len(), 1, "rank {rank}: {name} is not a placeholder");
            }
        }
        assert!(
            kept * 10 < all * 7,
            "rank {rank} holds {kept} of {all} values"
        );
    }
}
