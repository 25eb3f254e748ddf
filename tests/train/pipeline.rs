//! Pipeline schedules and their simulator against the DeepSeek-V3 report's Table 2.
//!
//! Cost conventions (what the simulator measures is piecewise linear in the costs; the
//! report's expressions are the branch below):
//! - 1F1B `(PP−1)(F+B)`: exact for any F, B with no transfer time and micro-batches ≥ PP.
//! - ZB1P `(PP−1)(F+B−2W)`: exact when W ≤ F (a deferred W fits where the forward would
//!   wait); in general the simulator measures `(PP−1)(F+B−W−min(W,F))`.
//! - DualPipe `(PP/2−1)(F&B+B−3W)` and DualPipeV (with the table's PP = 2·ranks): exact when
//!   F&B = F + B (no overlap gain), the input backward costs a forward (B − W = F), W ≤ F, and no
//!   transfer time. With W > F the measured bubble is `(PP/2−1)(F&B+B−2W−F)`; with F&B < F+B it
//!   is below the formula. Both are asserted below so a change of the simulator shows.

use dsv3_train::pipeline::{
    report_activations, simulate, Action, Chunk, Costs, PipelineError, Schedule, ScheduleKind,
};

const PAIRS_1F1B: [(usize, usize); 6] = [(1, 3), (2, 4), (4, 8), (4, 10), (6, 14), (8, 20)];
const PAIRS_DUAL: [(usize, usize); 6] = [(2, 4), (4, 8), (4, 12), (6, 14), (8, 20), (16, 40)];

fn costs(f: f64, b: f64, w: f64, fb: f64) -> Costs {
    Costs {
        forward: f,
        backward: b,
        weight: w,
        forward_backward: fb,
        comm: 0.0,
    }
}

fn run(kind: ScheduleKind, pp: usize, m: usize, c: &Costs) -> dsv3_train::pipeline::SimReport {
    let s = Schedule::new(kind, pp, m).unwrap_or_else(|e| panic!("{kind} {pp} {m}: {e}"));
    simulate(&s, c).unwrap_or_else(|e| panic!("{kind} {pp} {m}: {e}"))
}

#[test]
fn pipeline_one_f_one_b_and_zb1p_bubbles_equal_table_2() {
    for c in [
        costs(1.0, 2.0, 1.0, 3.0),
        costs(2.0, 3.0, 1.0, 5.0),
        costs(1.0, 1.0, 0.5, 2.0),
        costs(3.0, 5.0, 2.0, 8.0),
    ] {
        for (pp, m) in PAIRS_1F1B {
            let p = pp as f64;
            let r = run(ScheduleKind::OneFOneB, pp, m, &c);
            let want = (p - 1.0) * (c.forward + c.backward);
            assert_eq!(r.bubble(), want, "1f1b pp={pp} m={m} {c}");
            assert_eq!(want, c.report_bubble(ScheduleKind::OneFOneB, pp));
            // The ideal makespan plus the first rank's wait.
            assert_eq!(r.makespan, m as f64 * (c.forward + c.backward) + want);
            let r = run(ScheduleKind::ZeroBubble, pp, m, &c);
            let want = (p - 1.0) * (c.forward + c.backward - 2.0 * c.weight);
            assert_eq!(r.bubble(), want, "zb1p pp={pp} m={m} {c}");
            assert_eq!(want, c.report_bubble(ScheduleKind::ZeroBubble, pp));
        }
    }
}

#[test]
fn pipeline_zb1p_bubble_when_w_exceeds_f() {
    for c in [costs(1.0, 3.0, 2.0, 4.0), costs(1.0, 2.5, 1.5, 3.5)] {
        for (pp, m) in PAIRS_1F1B {
            let r = run(ScheduleKind::ZeroBubble, pp, m, &c);
            let want = (pp as f64 - 1.0) * (c.backward - c.weight);
            assert_eq!(r.bubble(), want, "zb1p pp={pp} m={m} {c}");
        }
    }
}

#[test]
fn pipeline_dualpipe_bubbles_equal_table_2_when_fb_is_f_plus_b_and_b_input_is_f() {
    // F&B = F + B, B − W = F, W ≤ F.
    for c in [
        costs(1.0, 2.0, 1.0, 3.0),
        costs(2.0, 3.0, 1.0, 5.0),
        costs(3.0, 5.0, 2.0, 8.0),
        costs(1.0, 1.5, 0.5, 2.5),
    ] {
        for (pp, m) in PAIRS_DUAL {
            let p = pp as f64;
            let r = run(ScheduleKind::DualPipe, pp, m, &c);
            let want = (p / 2.0 - 1.0) * (c.forward_backward + c.backward - 3.0 * c.weight);
            assert_eq!(r.bubble(), want, "dualpipe pp={pp} m={m} {c}");
            assert_eq!(want, c.report_bubble(ScheduleKind::DualPipe, pp));
            // DualPipeV on pp ranks = Table 2's PP = 2·pp.
            let r = run(ScheduleKind::DualPipeV, pp, m, &c);
            let want = (p - 1.0) * (c.forward_backward + c.backward - 3.0 * c.weight);
            assert_eq!(r.bubble(), want, "dualpipev pp={pp} m={m} {c}");
            assert_eq!(want, c.report_bubble(ScheduleKind::DualPipeV, pp));
        }
    }
}

#[test]
fn pipeline_dualpipe_bubble_off_the_formulas_convention() {
    // W > F: the third W no longer fits, the bubble is (PP/2−1)(F&B+B−2W−F).
    let c = costs(2.0, 5.0, 3.0, 7.0);
    for (pp, m) in PAIRS_DUAL {
        let r = run(ScheduleKind::DualPipe, pp, m, &c);
        let want = (pp as f64 / 2.0 - 1.0) * (7.0 + 5.0 - 6.0 - 2.0);
        assert_eq!(r.bubble(), want, "pp={pp} m={m}");
        assert!(r.bubble() >= c.report_bubble(ScheduleKind::DualPipe, pp));
    }
    // F&B < F + B (the overlap pays): never more than the formula.
    let c = costs(2.0, 3.0, 1.0, 4.0);
    for (pp, m) in PAIRS_DUAL {
        let r = run(ScheduleKind::DualPipe, pp, m, &c);
        assert!(
            r.bubble() <= c.report_bubble(ScheduleKind::DualPipe, pp),
            "pp={pp} m={m}"
        );
    }
}

#[test]
fn pipeline_activation_peaks_are_pp_and_pp_plus_one() {
    let c = Costs::default();
    for (pp, m) in PAIRS_DUAL {
        let r = run(ScheduleKind::OneFOneB, pp, m, &c);
        assert_eq!(r.activations[0], pp, "1f1b first rank holds PP");
        assert_eq!(r.peak_activations(), pp);
        assert_eq!(r.activations, (1..=pp).rev().collect::<Vec<_>>());
        let r = run(ScheduleKind::ZeroBubble, pp, m, &c);
        assert_eq!(
            r.peak_activations(),
            report_activations(ScheduleKind::ZeroBubble, pp)
        );
        let r = run(ScheduleKind::DualPipe, pp, m, &c);
        assert!(
            r.activations.iter().all(|&a| a == pp + 1),
            "{:?}",
            r.activations
        );
        assert_eq!(pp + 1, report_activations(ScheduleKind::DualPipe, pp));
        // DualPipeV: 2·pp + 1 chunks of half a rank's layers, Table 2's PP+1 with PP = 2·pp.
        let r = run(ScheduleKind::DualPipeV, pp, m, &c);
        assert!(
            r.activations.iter().all(|&a| a == 2 * pp + 1),
            "{:?}",
            r.activations
        );
    }
}

#[test]
fn pipeline_no_schedule_deadlocks_and_every_chunk_runs_once() {
    // The simulator itself checks F once and B (or B-input + W) once per chunk on its owner.
    for kind in ScheduleKind::ALL {
        for pp in 1..=8 {
            for m in [2 * pp, 2 * pp + 2, 3 * pp + 2, 24] {
                let Ok(s) = Schedule::new(kind, pp, m) else {
                    assert!(
                        kind == ScheduleKind::DualPipe && (pp % 2 == 1 || m % 2 == 1),
                        "{kind} {pp} {m}"
                    );
                    continue;
                };
                for c in [
                    Costs::default(),
                    Costs {
                        comm: 0.7,
                        ..Costs::default()
                    },
                    costs(1.0, 3.0, 0.0, 2.5),
                ] {
                    let r = simulate(&s, &c).unwrap_or_else(|e| panic!("{kind} {pp} {m}: {e}"));
                    // Each rank computes every one of its chunks' work.
                    let total: f64 = r.busy_per_rank.iter().sum();
                    let chunks = (s.stages * m) as f64;
                    let expected = chunks * (c.forward + c.backward);
                    let fb_saving = r
                        .timeline
                        .iter()
                        .flatten()
                        .filter(|x| matches!(x.action, Action::ForwardBackward { .. }))
                        .count() as f64
                        * (c.forward + c.backward - c.forward_backward);
                    assert!(
                        (total + fb_saving - expected).abs() < 1e-9,
                        "{kind} {pp} {m}: busy {total}"
                    );
                }
            }
        }
    }
}

#[test]
fn pipeline_dualpipe_lists_follow_the_repositorys_phases() {
    // PP = 2, 4 micro-batches (mb 0-1 enter at rank 0, mb 2-3 at rank 1).
    let s = Schedule::new(ScheduleKind::DualPipe, 2, 4).unwrap();
    let compute: Vec<String> = s.actions[0]
        .iter()
        .filter(|a| a.is_compute())
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        compute,
        [
            "F s0/mb0",
            "F s1/mb2",
            "F s0/mb1",
            "B s1/mb2",
            "F&B s1/mb3 + s0/mb0",
            "B s1/mb3",
            "Bi s0/mb1",
            "W s0/mb1"
        ]
    );
    // Rank 0 sends F s0/mb0 to rank 1 right after computing it and receives F s0/mb2 first.
    assert_eq!(
        s.actions[0][1],
        Action::SendForward {
            chunk: Chunk {
                stage: 0,
                micro_batch: 0
            },
            to: 1
        }
    );
    assert_eq!(s.stages_of(0), vec![0, 1]);
    assert_eq!(
        s.copy_of(Chunk {
            stage: 1,
            micro_batch: 3
        }),
        1
    );
    // DualPipeV: the turn of the V (stage PP-1 to PP) stays on the last rank, no transfer.
    let v = Schedule::new(ScheduleKind::DualPipeV, 4, 8).unwrap();
    assert_eq!(v.stages, 8);
    assert_eq!(v.stages_of(3), vec![3, 4]);
    assert!(!v.actions[3].iter().any(|a| matches!(
        a,
        Action::SendForward { chunk, .. } if chunk.stage == 3
    )));
}

#[test]
fn pipeline_bad_inputs_are_clear_errors() {
    let e = Schedule::new(ScheduleKind::DualPipe, 3, 12).unwrap_err();
    assert!(matches!(e, PipelineError::OddRanks { ranks: 3, .. }), "{e}");
    assert!(
        e.to_string().contains("even number of pipeline ranks"),
        "{e}"
    );
    let e = Schedule::new(ScheduleKind::DualPipe, 4, 6).unwrap_err();
    assert!(
        matches!(
            e,
            PipelineError::TooFewMicroBatches {
                needed: 8,
                micro_batches: 6,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("at least 2·PP = 8"), "{e}");
    let e = Schedule::new(ScheduleKind::DualPipe, 4, 9).unwrap_err();
    assert!(matches!(e, PipelineError::OddMicroBatches { .. }), "{e}");
    let e = Schedule::new(ScheduleKind::DualPipeV, 4, 7).unwrap_err();
    assert!(matches!(e, PipelineError::TooFewMicroBatches { .. }), "{e}");
    assert!(matches!(
        Schedule::new(ScheduleKind::OneFOneB, 0, 4),
        Err(PipelineError::NoRanks)
    ));
    assert!(matches!(
        Schedule::new(ScheduleKind::ZeroBubble, 2, 0),
        Err(PipelineError::NoMicroBatches)
    ));
    let e = ScheduleKind::parse("gpipe").unwrap_err();
    assert!(e.to_string().contains("dualpipev"), "{e}");
    for bad in ["1,2", "1,x,1", "1,2,3", "-1,2,1", "1,2,1,3,0,9", "1,inf,1"] {
        assert!(
            matches!(Costs::parse(bad), Err(PipelineError::BadCosts(_))),
            "{bad}"
        );
    }
    assert_eq!(Costs::parse("1,2,1").unwrap().forward_backward, 3.0);
}

#[test]
fn pipeline_simulator_detects_deadlock_and_broken_lists() {
    let c = Costs::default();
    let chunk = |stage, micro_batch| Chunk { stage, micro_batch };
    // Both ranks start by waiting for the other: rank 0 for a gradient it needs no earlier
    // than after its forward, rank 1 for the activation rank 0 never got to send.
    let mut s = Schedule::new(ScheduleKind::OneFOneB, 2, 2).unwrap();
    let first_recv = s.actions[0]
        .iter()
        .position(|a| matches!(a, Action::RecvBackward { .. }))
        .unwrap();
    let recv = s.actions[0].remove(first_recv);
    s.actions[0].insert(0, recv);
    let e = simulate(&s, &c).unwrap_err();
    let PipelineError::Deadlock(msg) = &e else {
        panic!("{e}")
    };
    assert!(
        msg.contains("rank 0 at action 0 (recv B s1/mb0 from 1)"),
        "{msg}"
    );
    assert!(
        msg.contains("rank 1 at action 0 (recv F s0/mb0 from 0)"),
        "{msg}"
    );
    // A missing W: the chunk's weight gradient never runs.
    let mut s = Schedule::new(ScheduleKind::ZeroBubble, 2, 4).unwrap();
    let w = s.actions[1]
        .iter()
        .position(|a| matches!(a, Action::Weight(_)))
        .unwrap();
    s.actions[1].remove(w);
    let e = simulate(&s, &c).unwrap_err();
    assert!(matches!(e, PipelineError::InvalidSchedule(_)), "{e}");
    assert!(e.to_string().contains("W 0×"), "{e}");
    // A chunk on the wrong rank.
    let mut s = Schedule::new(ScheduleKind::OneFOneB, 2, 2).unwrap();
    s.actions[0].insert(0, Action::Forward(chunk(1, 1)));
    let e = simulate(&s, &c).unwrap_err();
    assert!(e.to_string().contains("belongs to rank 1"), "{e}");
}

#[test]
fn pipeline_stage_cut_is_even_and_covers_every_layer() {
    use dsv3_train::pipeline::exec::StageCut;
    assert_eq!(
        StageCut::even(8, 4).unwrap().layers,
        vec![0..2, 2..4, 4..6, 6..8]
    );
    assert_eq!(StageCut::even(7, 3).unwrap().layers, vec![0..3, 3..5, 5..7]);
    // More stages than layers (DualPipeV's 2·PP on a small model): the last pass through.
    assert_eq!(
        StageCut::even(3, 4).unwrap().layers,
        vec![0..1, 1..2, 2..3, 3..3]
    );
    assert!(matches!(StageCut::even(3, 0), Err(PipelineError::NoRanks)));
}
