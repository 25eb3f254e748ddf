//! Event-driven simulation of a [`Schedule`]: each rank runs its list in order; a compute
//! action starts when the rank is free and its inputs are there, a send is non-blocking and
//! its tensor arrives `comm` later, a receive waits for its tensor. Reports the makespan, each
//! rank's bubble and peak activations, detects deadlocks, and checks that every chunk's F, B
//! (or B-input and W) run exactly once on the rank that owns it.
//!
//! The precedent is PyTorch's `_simulate_comms_compute` (torch.distributed.pipelining), a
//! dry run of per-rank action lists that flags deadlocks and bubbles.

use std::collections::{HashMap, HashSet};
use std::fmt;

use super::schedule::{Action, Chunk, Schedule};
use super::PipelineError;
use super::ScheduleKind;

/// Per-action costs, in any time unit (the report's F, B, W, F&B).
///
/// `backward` is the full backward B (input + weight gradients), as in the report's Table 2;
/// a B-input action costs `backward − weight`, a W action `weight`, an F&B action
/// `forward_backward`, and a transfer arrives `comm` after its send.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Costs {
    /// F: forward of one chunk.
    pub forward: f64,
    /// B: full backward of one chunk (input and weight gradients).
    pub backward: f64,
    /// W: weight gradient of one chunk (part of B).
    pub weight: f64,
    /// F&B: one forward and one full backward overlapped.
    pub forward_backward: f64,
    /// Point-to-point latency of one activation or gradient transfer.
    pub comm: f64,
}

impl Default for Costs {
    /// F = 1, B = 2, W = 1, F&B = F + B = 3, no transfer time.
    fn default() -> Self {
        Costs {
            forward: 1.0,
            backward: 2.0,
            weight: 1.0,
            forward_backward: 3.0,
            comm: 0.0,
        }
    }
}

impl Costs {
    /// Parses `F,B,W,FB,COMM` (five numbers; `FB` and `COMM` may be left off: F&B = F + B,
    /// no transfer time).
    ///
    /// # Errors
    /// [`PipelineError::BadCosts`] for a wrong count, a non-number, a negative or non-finite
    /// value, or `W > B`.
    pub fn parse(text: &str) -> Result<Self, PipelineError> {
        let bad = |why: String| PipelineError::BadCosts(format!("{text:?}: {why}"));
        let v: Vec<f64> = text
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<f64>()
                    .map_err(|_| bad(format!("{:?} is not a number", s.trim())))
            })
            .collect::<Result<_, _>>()?;
        if !(3..=5).contains(&v.len()) {
            return Err(bad(format!(
                "expected F,B,W[,FB[,COMM]] (3 to 5 numbers), got {}",
                v.len()
            )));
        }
        let c = Costs {
            forward: v[0],
            backward: v[1],
            weight: v[2],
            forward_backward: v.get(3).copied().unwrap_or(v[0] + v[1]),
            comm: v.get(4).copied().unwrap_or(0.0),
        };
        c.check()?;
        Ok(c)
    }

    /// # Errors
    /// [`PipelineError::BadCosts`] for a negative or non-finite cost, or `W > B`.
    pub fn check(&self) -> Result<(), PipelineError> {
        let all = [
            self.forward,
            self.backward,
            self.weight,
            self.forward_backward,
            self.comm,
        ];
        if all.iter().any(|x| !x.is_finite() || *x < 0.0) {
            return Err(PipelineError::BadCosts(format!(
                "each must be finite and ≥ 0, got {self}"
            )));
        }
        if self.weight > self.backward {
            return Err(PipelineError::BadCosts(format!(
                "W ({}) is part of B ({}) and cannot exceed it",
                self.weight, self.backward
            )));
        }
        Ok(())
    }

    /// The cost of one action (transfers cost nothing on the rank that posts them).
    pub fn of(&self, a: &Action) -> f64 {
        match a {
            Action::Forward(_) => self.forward,
            Action::Backward(_) => self.backward,
            Action::BackwardInput(_) => self.backward - self.weight,
            Action::Weight(_) => self.weight,
            Action::ForwardBackward { .. } => self.forward_backward,
            _ => 0.0,
        }
    }

    /// The report's Table 2 bubble for `kind` on `ranks` pipeline ranks:
    /// 1F1B `(PP−1)(F+B)`, ZB1P `(PP−1)(F+B−2W)`, DualPipe `(PP/2−1)(F&B+B−3W)`, and DualPipeV
    /// the same with the table's PP = 2·ranks (its "devices PP/2"), i.e. `(ranks−1)(F&B+B−3W)`.
    ///
    /// What [`simulate`] measures equals these with no transfer time and micro-batches ≥ PP
    /// under the conventions the expressions assume: 1F1B always; ZB1P when W ≤ F (else
    /// `(PP−1)(B−W)`); DualPipe / DualPipeV when F&B = F + B, B − W = F and W ≤ F (with
    /// F&B < F + B it measures less, with W > F more: `(PP/2−1)(F&B+B−2W−F)`).
    pub fn report_bubble(&self, kind: ScheduleKind, ranks: usize) -> f64 {
        let p = ranks as f64;
        let (f, b, w, fb) = (
            self.forward,
            self.backward,
            self.weight,
            self.forward_backward,
        );
        match kind {
            ScheduleKind::OneFOneB => (p - 1.0) * (f + b),
            ScheduleKind::ZeroBubble => (p - 1.0) * (f + b - 2.0 * w),
            ScheduleKind::DualPipe => (p / 2.0 - 1.0) * (fb + b - 3.0 * w),
            ScheduleKind::DualPipeV => (p - 1.0) * (fb + b - 3.0 * w),
        }
    }
}

impl fmt::Display for Costs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "F={} B={} W={} F&B={} comm={}",
            self.forward, self.backward, self.weight, self.forward_backward, self.comm
        )
    }
}

/// The report's Table 2 activation count for `kind` on `ranks` pipeline ranks, in chunks
/// held per rank: `PP` (1F1B, ZB1P), `PP+1` (DualPipe), and for DualPipeV `2·ranks+1` chunks
/// of half the size (the table's PP+1 with PP = 2·ranks).
pub fn report_activations(kind: ScheduleKind, ranks: usize) -> usize {
    match kind {
        ScheduleKind::OneFOneB | ScheduleKind::ZeroBubble => ranks,
        ScheduleKind::DualPipe => ranks + 1,
        ScheduleKind::DualPipeV => 2 * ranks + 1,
    }
}

/// One compute action as it ran.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Span {
    /// The rank that ran it.
    pub rank: usize,
    /// Start time.
    pub start: f64,
    /// End time.
    pub end: f64,
    /// The action (compute only).
    pub action: Action,
}

/// What a simulated step measured.
#[derive(Clone, Debug, PartialEq)]
pub struct SimReport {
    /// Time from the first action's start (0) to the last action's end.
    pub makespan: f64,
    /// Per rank: idle time between its first compute's start and its last compute's end.
    pub bubble_per_rank: Vec<f64>,
    /// Per rank: time spent computing.
    pub busy_per_rank: Vec<f64>,
    /// Per rank: the most chunks whose activations were held at once. A chunk's activations
    /// are held from its forward's start to the end of its backward (full B, or B-input: W
    /// then needs only the saved layer inputs, as the report counts it).
    pub activations: Vec<usize>,
    /// Every compute action, per rank in order.
    pub timeline: Vec<Vec<Span>>,
}

impl SimReport {
    /// The largest per-rank bubble (the report's "bubble").
    pub fn bubble(&self) -> f64 {
        self.bubble_per_rank.iter().copied().fold(0.0, f64::max)
    }

    /// The largest per-rank activation peak.
    pub fn peak_activations(&self) -> usize {
        self.activations.iter().copied().max().unwrap_or(0)
    }
}

/// Which kind of tensor a transfer carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Carries {
    Activation,
    Gradient,
}

/// A rank's progress.
#[derive(Default)]
struct RankState {
    next: usize,
    clock: f64,
    first: Option<f64>,
    busy: f64,
    held: usize,
    peak: usize,
    /// Chunks whose input activation is here (received or produced by the previous stage on
    /// this rank).
    inputs: HashSet<Chunk>,
    /// Chunks whose output gradient is here.
    output_grads: HashSet<Chunk>,
    /// Chunks forwarded here and not yet backwarded.
    forwarded: HashSet<Chunk>,
    /// Chunks backwarded here (their input gradient exists).
    backwarded: HashSet<Chunk>,
    /// Chunks whose weight gradient is queued.
    queued: HashSet<Chunk>,
    spans: Vec<Span>,
}

/// Runs `schedule` with `costs`.
///
/// # Errors
/// - [`PipelineError::BadCosts`] for invalid costs;
/// - [`PipelineError::Deadlock`] when no rank can go on while actions remain (naming each
///   stuck rank and what it waits for);
/// - [`PipelineError::InvalidSchedule`] when an action runs on a rank that does not own its
///   chunk, lacks an input its list never provides, sends a tensor not produced yet, or a
///   chunk's F / B / W is missing or repeated.
pub fn simulate(schedule: &Schedule, costs: &Costs) -> Result<SimReport, PipelineError> {
    costs.check()?;
    let n = schedule.ranks;
    let last_stage = schedule.stages - 1;
    let mut ranks: Vec<RankState> = (0..n).map(|_| RankState::default()).collect();
    // Posted transfers: (what, chunk, from, to) → arrival time.
    let mut posted: HashMap<(Carries, Chunk, usize, usize), f64> = HashMap::new();
    let mut counts: HashMap<(char, Chunk), usize> = HashMap::new();
    let invalid = |rank: usize, at: usize, a: &Action, why: &str| {
        PipelineError::InvalidSchedule(format!("rank {rank}, action {at} ({a}): {why}"))
    };

    loop {
        let mut progressed = false;
        for (r, (st, list)) in ranks.iter_mut().zip(&schedule.actions).enumerate() {
            while let Some(&a) = list.get(st.next) {
                let at = st.next;
                // Ownership of compute chunks.
                let own = |c: Chunk| -> Result<(), PipelineError> {
                    let o = schedule.owner(c);
                    if o != r {
                        return Err(invalid(
                            r,
                            at,
                            &a,
                            &format!("chunk {c} belongs to rank {o}"),
                        ));
                    }
                    Ok(())
                };
                match a {
                    Action::RecvForward { chunk, from } | Action::RecvBackward { chunk, from } => {
                        let carries = if matches!(a, Action::RecvForward { .. }) {
                            Carries::Activation
                        } else {
                            Carries::Gradient
                        };
                        let Some(&arrival) = posted.get(&(carries, chunk, from, r)) else {
                            break; // waits for the sender
                        };
                        st.clock = st.clock.max(arrival);
                        match carries {
                            Carries::Activation => st.inputs.insert(Chunk {
                                stage: chunk.stage + 1,
                                ..chunk
                            }),
                            Carries::Gradient => st.output_grads.insert(Chunk {
                                stage: chunk.stage.wrapping_sub(1),
                                ..chunk
                            }),
                        };
                    }
                    Action::SendForward { chunk, to } => {
                        if !st.forwarded.contains(&chunk) && !st.backwarded.contains(&chunk) {
                            return Err(invalid(
                                r,
                                at,
                                &a,
                                "sends a forward output not computed yet",
                            ));
                        }
                        posted.insert((Carries::Activation, chunk, r, to), st.clock + costs.comm);
                    }
                    Action::SendBackward { chunk, to } => {
                        if !st.backwarded.contains(&chunk) {
                            return Err(invalid(
                                r,
                                at,
                                &a,
                                "sends an input gradient not computed yet",
                            ));
                        }
                        posted.insert((Carries::Gradient, chunk, r, to), st.clock + costs.comm);
                    }
                    _ => {
                        // Compute: check inputs, run, record.
                        let need_forward = |c: Chunk, st: &mut RankState| {
                            own(c)?;
                            if c.stage > 0 && !st.inputs.contains(&c) {
                                return Err(invalid(
                                    r,
                                    at,
                                    &a,
                                    "its input activation never reached this rank before it",
                                ));
                            }
                            Ok::<(), PipelineError>(())
                        };
                        let need_backward = |c: Chunk, st: &RankState| {
                            own(c)?;
                            if !st.forwarded.contains(&c) {
                                return Err(invalid(r, at, &a, "runs before the chunk's forward"));
                            }
                            if c.stage < last_stage && !st.output_grads.contains(&c) {
                                return Err(invalid(
                                    r,
                                    at,
                                    &a,
                                    "its output gradient never reached this rank before it",
                                ));
                            }
                            Ok(())
                        };
                        match a {
                            Action::Forward(c) => need_forward(c, st)?,
                            Action::Backward(c) | Action::BackwardInput(c) => need_backward(c, st)?,
                            Action::ForwardBackward { forward, backward } => {
                                need_forward(forward, st)?;
                                need_backward(backward, st)?;
                            }
                            Action::Weight(c) => {
                                own(c)?;
                                if !st.queued.contains(&c) {
                                    return Err(invalid(
                                        r,
                                        at,
                                        &a,
                                        "no queued weight gradient for this chunk",
                                    ));
                                }
                            }
                            _ => unreachable!("transfers handled above"),
                        }
                        let start = st.clock;
                        let end = start + costs.of(&a);
                        st.first.get_or_insert(start);
                        st.busy += end - start;
                        st.clock = end;
                        match a {
                            Action::Forward(c) => forward_done(schedule, r, c, st, &mut counts),
                            Action::Backward(c) => {
                                backward_done(schedule, r, c, 'B', st, &mut counts)
                            }
                            Action::BackwardInput(c) => {
                                backward_done(schedule, r, c, 'I', st, &mut counts)
                            }
                            Action::ForwardBackward { forward, backward } => {
                                // Both are held while the pair runs.
                                forward_done(schedule, r, forward, st, &mut counts);
                                backward_done(schedule, r, backward, 'B', st, &mut counts);
                            }
                            Action::Weight(c) => {
                                *counts.entry(('W', c)).or_default() += 1;
                                st.queued.remove(&c);
                            }
                            _ => {}
                        }
                        st.spans.push(Span {
                            rank: r,
                            start,
                            end,
                            action: a,
                        });
                    }
                }
                st.next += 1;
                progressed = true;
            }
        }
        if ranks
            .iter()
            .zip(&schedule.actions)
            .all(|(s, l)| s.next == l.len())
        {
            break;
        }
        if !progressed {
            let stuck: Vec<String> = ranks
                .iter()
                .zip(&schedule.actions)
                .enumerate()
                .filter(|(_, (s, l))| s.next < l.len())
                .map(|(r, (s, l))| format!("rank {r} at action {} ({})", s.next, l[s.next]))
                .collect();
            return Err(PipelineError::Deadlock(stuck.join("; ")));
        }
    }

    // Every chunk's F once, and either B once or B-input and W once each.
    for stage in 0..schedule.stages {
        for micro_batch in 0..schedule.micro_batches {
            let c = Chunk { stage, micro_batch };
            let get = |k| counts.get(&(k, c)).copied().unwrap_or(0);
            let (f, b, i, w) = (get('F'), get('B'), get('I'), get('W'));
            let ok = f == 1 && ((b == 1 && i == 0 && w == 0) || (b == 0 && i == 1 && w == 1));
            if !ok {
                return Err(PipelineError::InvalidSchedule(format!(
                    "chunk {c} ran F {f}×, B {b}×, B-input {i}×, W {w}× (expected F once and B, or B-input and W, once)"
                )));
            }
        }
    }

    let makespan = ranks.iter().map(|s| s.clock).fold(0.0, f64::max);
    let bubble_per_rank = ranks
        .iter()
        .map(|s| {
            let first = s.first.unwrap_or(0.0);
            let last = s.spans.last().map_or(first, |x| x.end);
            (last - first - s.busy).max(0.0)
        })
        .collect();
    Ok(SimReport {
        makespan,
        bubble_per_rank,
        busy_per_rank: ranks.iter().map(|s| s.busy).collect(),
        activations: ranks.iter().map(|s| s.peak).collect(),
        timeline: ranks.into_iter().map(|s| s.spans).collect(),
    })
}

/// Records a forward of `c` on rank `r`: its activations are held, and its output is this
/// rank's input of the next stage (or the loss's gradient on the last stage).
fn forward_done(
    schedule: &Schedule,
    r: usize,
    c: Chunk,
    st: &mut RankState,
    counts: &mut HashMap<(char, Chunk), usize>,
) {
    *counts.entry(('F', c)).or_default() += 1;
    st.forwarded.insert(c);
    st.held += 1;
    st.peak = st.peak.max(st.held);
    let next = Chunk {
        stage: c.stage + 1,
        ..c
    };
    if c.stage + 1 == schedule.stages {
        st.output_grads.insert(c);
    } else if schedule.owner(next) == r {
        st.inputs.insert(next);
    }
}

/// Records a backward (`kind` 'B' full, 'I' input only) of `c` on rank `r`: its activations
/// are released, its input gradient is this rank's output gradient of the previous stage when
/// that stage is here too, and with 'I' its weight gradient is queued.
fn backward_done(
    schedule: &Schedule,
    r: usize,
    c: Chunk,
    kind: char,
    st: &mut RankState,
    counts: &mut HashMap<(char, Chunk), usize>,
) {
    *counts.entry((kind, c)).or_default() += 1;
    st.forwarded.remove(&c);
    st.backwarded.insert(c);
    st.held -= 1;
    if kind == 'I' {
        st.queued.insert(c);
    }
    if c.stage > 0 {
        let prev = Chunk {
            stage: c.stage - 1,
            ..c
        };
        if schedule.owner(prev) == r {
            st.output_grads.insert(prev);
        }
    }
}
