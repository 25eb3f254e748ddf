//! Pipeline schedules as per-rank action lists: 1F1B, ZB1P (zero-bubble ZB-H1), DualPipe and
//! DualPipeV (DeepSeek-V3 report §3.2.1, Table 2; the phases of `DualPipe.step` /
//! `DualPipeV.step` in DeepSeek's DualPipe repository).
//!
//! A schedule is data: for each pipeline rank, the ordered [`Action`]s it runs. Compute
//! actions name a [`Chunk`] (one micro-batch through one stage); the point-to-point transfers
//! between ranks are explicit [`Action::SendForward`] / [`Action::RecvForward`] (a forward
//! output) and [`Action::SendBackward`] / [`Action::RecvBackward`] (an input gradient). A send
//! follows the compute that produced its tensor and is non-blocking; a receive comes right
//! before the compute that needs it and blocks until the tensor is there. (DeepSeek's code
//! batches its sends with the next receive and waits for both; sending at once is never later.)
//!
//! Stage placement:
//! - 1F1B, ZB1P: `S = PP` stages, stage `s` on rank `s`.
//! - DualPipe: `S = PP` stages, each held twice: rank `r` holds stage `r` for the first half
//!   of the micro-batches (entering at rank 0) and stage `PP-1-r` for the second half
//!   (entering at rank `PP-1`). Parameters are stored 2×; their gradients are summed over the
//!   two copies.
//! - DualPipeV: `S = 2·PP` stages, rank `r` holds stages `r` and `2·PP-1-r` (the "V": down
//!   from rank 0 to rank `PP-1`, back up to rank 0, where the loss is).

use std::collections::VecDeque;
use std::fmt;

use super::{PipelineError, ScheduleKind};

/// One micro-batch through one stage: the unit of work a compute action runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Chunk {
    /// Model stage, `0..S` (stage 0 holds the embedding, stage `S-1` the head and the loss).
    pub stage: usize,
    /// Micro-batch index, `0..micro_batches`.
    pub micro_batch: usize,
}

impl fmt::Display for Chunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}/mb{}", self.stage, self.micro_batch)
    }
}

/// One step of a rank's list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// F: the forward of a chunk (on the last stage, also the loss).
    Forward(Chunk),
    /// B (full): input and weight gradients of a chunk together.
    Backward(Chunk),
    /// B (input only): the input gradient now; the weight gradient is queued for a later
    /// [`Action::Weight`] of the same chunk.
    BackwardInput(Chunk),
    /// W: the queued weight gradient of a chunk.
    Weight(Chunk),
    /// F&B: the forward of one chunk and the full backward of another, overlapped (DualPipe's
    /// `_forward_backward_chunk`; on a GPU the two hide each other's all-to-all).
    ForwardBackward {
        /// The chunk run forward.
        forward: Chunk,
        /// The chunk run backward (full).
        backward: Chunk,
    },
    /// Send the forward output of `chunk` to `to` (which holds stage `chunk.stage + 1`).
    SendForward { chunk: Chunk, to: usize },
    /// Receive the forward output of `chunk` from `from` (the input of stage `chunk.stage + 1`).
    RecvForward { chunk: Chunk, from: usize },
    /// Send the input gradient of `chunk` to `to` (which holds stage `chunk.stage - 1`).
    SendBackward { chunk: Chunk, to: usize },
    /// Receive the input gradient of `chunk` from `from` (the output gradient of stage
    /// `chunk.stage - 1`).
    RecvBackward { chunk: Chunk, from: usize },
}

impl Action {
    /// Whether this is computation (F, B, W, F&B) rather than a transfer.
    pub fn is_compute(&self) -> bool {
        matches!(
            self,
            Action::Forward(_)
                | Action::Backward(_)
                | Action::BackwardInput(_)
                | Action::Weight(_)
                | Action::ForwardBackward { .. }
        )
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Forward(c) => write!(f, "F {c}"),
            Action::Backward(c) => write!(f, "B {c}"),
            Action::BackwardInput(c) => write!(f, "Bi {c}"),
            Action::Weight(c) => write!(f, "W {c}"),
            Action::ForwardBackward { forward, backward } => {
                write!(f, "F&B {forward} + {backward}")
            }
            Action::SendForward { chunk, to } => write!(f, "send F {chunk} to {to}"),
            Action::RecvForward { chunk, from } => write!(f, "recv F {chunk} from {from}"),
            Action::SendBackward { chunk, to } => write!(f, "send B {chunk} to {to}"),
            Action::RecvBackward { chunk, from } => write!(f, "recv B {chunk} from {from}"),
        }
    }
}

/// Every rank's ordered actions for one training step of `micro_batches` micro-batches.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    /// Which schedule generated the lists.
    pub kind: ScheduleKind,
    /// Pipeline ranks (PP).
    pub ranks: usize,
    /// Micro-batches per step.
    pub micro_batches: usize,
    /// Model stages (`PP`, or `2·PP` for DualPipeV).
    pub stages: usize,
    /// `actions[r]`: rank `r`'s list, compute and transfers, in order.
    pub actions: Vec<Vec<Action>>,
}

impl Schedule {
    /// Generates `kind` for `ranks` pipeline ranks and `micro_batches` micro-batches.
    ///
    /// Preconditions (else an error naming them):
    /// - all: `ranks ≥ 1`, `micro_batches ≥ 1`;
    /// - DualPipe: `ranks` even, `micro_batches` even and `≥ 2·ranks` (the asserts of
    ///   `DualPipe.step`);
    /// - DualPipeV: `micro_batches ≥ 2·ranks` (`DualPipeV.step`).
    ///
    /// # Errors
    /// [`PipelineError::NoRanks`], [`PipelineError::NoMicroBatches`],
    /// [`PipelineError::OddRanks`], [`PipelineError::OddMicroBatches`],
    /// [`PipelineError::TooFewMicroBatches`].
    pub fn new(
        kind: ScheduleKind,
        ranks: usize,
        micro_batches: usize,
    ) -> Result<Self, PipelineError> {
        if ranks == 0 {
            return Err(PipelineError::NoRanks);
        }
        if micro_batches == 0 {
            return Err(PipelineError::NoMicroBatches);
        }
        let compute: Vec<Vec<Action>> = match kind {
            ScheduleKind::OneFOneB => (0..ranks)
                .map(|r| one_f_one_b(r, ranks, micro_batches, false))
                .collect(),
            ScheduleKind::ZeroBubble => (0..ranks)
                .map(|r| one_f_one_b(r, ranks, micro_batches, true))
                .collect(),
            ScheduleKind::DualPipe => {
                if !ranks.is_multiple_of(2) {
                    return Err(PipelineError::OddRanks { kind, ranks });
                }
                if !micro_batches.is_multiple_of(2) {
                    return Err(PipelineError::OddMicroBatches {
                        kind,
                        micro_batches,
                    });
                }
                check_enough(kind, ranks, micro_batches)?;
                (0..ranks)
                    .map(|r| dual(kind, r, ranks, micro_batches))
                    .collect()
            }
            ScheduleKind::DualPipeV => {
                check_enough(kind, ranks, micro_batches)?;
                (0..ranks)
                    .map(|r| dual(kind, r, ranks, micro_batches))
                    .collect()
            }
        };
        let mut s = Schedule {
            kind,
            ranks,
            micro_batches,
            stages: kind.stages(ranks),
            actions: Vec::new(),
        };
        s.actions = compute
            .iter()
            .enumerate()
            .map(|(r, list)| s.with_transfers(r, list))
            .collect();
        Ok(s)
    }

    /// The rank that runs `chunk` (see the module docs for each schedule's placement).
    pub fn owner(&self, chunk: Chunk) -> usize {
        owner(self.kind, self.ranks, self.micro_batches, chunk)
    }

    /// Which of a rank's two stage copies runs `chunk`: 0 for the first half of the
    /// micro-batches, 1 for the second half (DualPipe); always 0 otherwise.
    pub fn copy_of(&self, chunk: Chunk) -> usize {
        match self.kind {
            ScheduleKind::DualPipe => usize::from(chunk.micro_batch >= self.micro_batches / 2),
            _ => 0,
        }
    }

    /// The stages rank `rank` holds parameters for, in ascending order.
    pub fn stages_of(&self, rank: usize) -> Vec<usize> {
        self.kind.stages_of(self.ranks, rank)
    }

    /// A rank's compute list with its transfers: a receive before each compute whose input
    /// comes from another rank, a send after each compute whose output goes to another rank.
    fn with_transfers(&self, rank: usize, compute: &[Action]) -> Vec<Action> {
        let mut out = Vec::with_capacity(compute.len() * 3);
        let last = self.stages - 1;
        let recv_f = |c: Chunk, out: &mut Vec<Action>| {
            if c.stage > 0 {
                let prev = Chunk {
                    stage: c.stage - 1,
                    ..c
                };
                let from = self.owner(prev);
                if from != rank {
                    out.push(Action::RecvForward { chunk: prev, from });
                }
            }
        };
        let recv_b = |c: Chunk, out: &mut Vec<Action>| {
            if c.stage < last {
                let next = Chunk {
                    stage: c.stage + 1,
                    ..c
                };
                let from = self.owner(next);
                if from != rank {
                    out.push(Action::RecvBackward { chunk: next, from });
                }
            }
        };
        let send_f = |c: Chunk, out: &mut Vec<Action>| {
            if c.stage < last {
                let to = self.owner(Chunk {
                    stage: c.stage + 1,
                    ..c
                });
                if to != rank {
                    out.push(Action::SendForward { chunk: c, to });
                }
            }
        };
        let send_b = |c: Chunk, out: &mut Vec<Action>| {
            if c.stage > 0 {
                let to = self.owner(Chunk {
                    stage: c.stage - 1,
                    ..c
                });
                if to != rank {
                    out.push(Action::SendBackward { chunk: c, to });
                }
            }
        };
        for &a in compute {
            match a {
                Action::Forward(c) => {
                    recv_f(c, &mut out);
                    out.push(a);
                    send_f(c, &mut out);
                }
                Action::Backward(c) | Action::BackwardInput(c) => {
                    recv_b(c, &mut out);
                    out.push(a);
                    send_b(c, &mut out);
                }
                Action::ForwardBackward { forward, backward } => {
                    recv_f(forward, &mut out);
                    recv_b(backward, &mut out);
                    out.push(a);
                    send_f(forward, &mut out);
                    send_b(backward, &mut out);
                }
                _ => out.push(a),
            }
        }
        out
    }
}

/// The rank running `chunk` under `kind` (see the module docs).
fn owner(kind: ScheduleKind, ranks: usize, micro_batches: usize, chunk: Chunk) -> usize {
    match kind {
        ScheduleKind::OneFOneB | ScheduleKind::ZeroBubble => chunk.stage,
        ScheduleKind::DualPipe => {
            if chunk.micro_batch < micro_batches / 2 {
                chunk.stage
            } else {
                ranks - 1 - chunk.stage
            }
        }
        ScheduleKind::DualPipeV => {
            if chunk.stage < ranks {
                chunk.stage
            } else {
                2 * ranks - 1 - chunk.stage
            }
        }
    }
}

fn check_enough(
    kind: ScheduleKind,
    ranks: usize,
    micro_batches: usize,
) -> Result<(), PipelineError> {
    if micro_batches < 2 * ranks {
        return Err(PipelineError::TooFewMicroBatches {
            kind,
            micro_batches,
            needed: 2 * ranks,
        });
    }
    Ok(())
}

/// 1F1B on rank `r` of `p` (stage `r`): `min(p-1-r, m)` warm-up forwards, then forward and
/// backward alternate, then the remaining backwards. With `split` (ZB-H1), each backward is
/// B (input) and its W is queued; after each B the oldest queued W runs once more than `r`
/// are queued, and the last `r` run at the end, so stage `s` lags `s` weight gradients.
fn one_f_one_b(r: usize, p: usize, m: usize, split: bool) -> Vec<Action> {
    let chunk = |mb| Chunk {
        stage: r,
        micro_batch: mb,
    };
    let warm = (p - 1 - r).min(m);
    let mut out = Vec::with_capacity(3 * m);
    let mut pending: VecDeque<usize> = VecDeque::new();
    let mut backward = |mb: usize, out: &mut Vec<Action>| {
        if split {
            out.push(Action::BackwardInput(chunk(mb)));
            pending.push_back(mb);
            if pending.len() > r {
                let w = pending.pop_front().unwrap_or(mb);
                out.push(Action::Weight(chunk(w)));
            }
        } else {
            out.push(Action::Backward(chunk(mb)));
        }
    };
    for mb in 0..warm {
        out.push(Action::Forward(chunk(mb)));
    }
    for i in 0..m - warm {
        out.push(Action::Forward(chunk(warm + i)));
        backward(i, &mut out);
    }
    for mb in m - warm..m {
        backward(mb, &mut out);
    }
    out.extend(pending.into_iter().map(|mb| Action::Weight(chunk(mb))));
    out
}

/// The two chunk sequences ("phases") of one DualPipe / DualPipeV rank, with the queue of
/// deferred weight gradients (DualPipe's `WeightGradStore`, FIFO).
struct DualRank {
    kind: ScheduleKind,
    rank: usize,
    ranks: usize,
    micro_batches: usize,
    next_forward: [usize; 2],
    next_backward: [usize; 2],
    queued_weights: VecDeque<Chunk>,
    out: Vec<Action>,
}

impl DualRank {
    /// The chunk number `k` of `phase` on this rank.
    ///
    /// DualPipe: phase 0 is the direction in which this rank is in the first half of the
    /// pipeline (the repository's `phase ^= is_in_second_half`): for ranks `< PP/2` the
    /// micro-batches entering at rank 0 through stage `r`, for the others those entering at
    /// rank `PP-1` through stage `PP-1-r`; phase 1 is the other direction.
    /// DualPipeV: phase 0 is stage `r`, phase 1 stage `2·PP-1-r`, every micro-batch through both.
    fn chunk(&self, phase: usize, k: usize) -> Chunk {
        let (r, p) = (self.rank, self.ranks);
        match self.kind {
            ScheduleKind::DualPipe => {
                let direction = phase ^ usize::from(r >= p / 2);
                let half = self.micro_batches / 2;
                if direction == 0 {
                    Chunk {
                        stage: r,
                        micro_batch: k,
                    }
                } else {
                    Chunk {
                        stage: p - 1 - r,
                        micro_batch: half + k,
                    }
                }
            }
            _ => Chunk {
                stage: if phase == 0 { r } else { 2 * p - 1 - r },
                micro_batch: k,
            },
        }
    }

    fn take_forward(&mut self, phase: usize) -> Chunk {
        let c = self.chunk(phase, self.next_forward[phase]);
        self.next_forward[phase] += 1;
        c
    }

    fn take_backward(&mut self, phase: usize) -> Chunk {
        let c = self.chunk(phase, self.next_backward[phase]);
        self.next_backward[phase] += 1;
        c
    }

    fn forward(&mut self, phase: usize) {
        let c = self.take_forward(phase);
        self.out.push(Action::Forward(c));
    }

    fn backward(&mut self, phase: usize, zero_bubble: bool) {
        let c = self.take_backward(phase);
        if zero_bubble {
            self.out.push(Action::BackwardInput(c));
            self.queued_weights.push_back(c);
        } else {
            self.out.push(Action::Backward(c));
        }
    }

    fn forward_backward(&mut self, forward_phase: usize, backward_phase: usize) {
        let forward = self.take_forward(forward_phase);
        let backward = self.take_backward(backward_phase);
        self.out.push(Action::ForwardBackward { forward, backward });
    }

    fn weight(&mut self) {
        if let Some(c) = self.queued_weights.pop_front() {
            self.out.push(Action::Weight(c));
        }
    }
}

/// DualPipe / DualPipeV on one rank: the eight phases of `DualPipe.step` (with `half_rank =
/// min(r, PP-1-r)` and `PP/2` as the number of half ranks) or `DualPipeV.step` (with `r` and
/// `PP`). The "middle" rank (DualPipe: `PP/2-1` and `PP/2`; DualPipeV: the last rank) runs its
/// first step-4 pair as a separate F and B so the forward output leaves before the backward.
fn dual(kind: ScheduleKind, rank: usize, ranks: usize, micro_batches: usize) -> Vec<Action> {
    let (pos, half_ranks, chunks_per_phase, middle) = if kind == ScheduleKind::DualPipe {
        let half_rank = rank.min(ranks - 1 - rank);
        (
            half_rank,
            ranks / 2,
            micro_batches / 2,
            rank + 1 == ranks / 2 || rank == ranks / 2,
        )
    } else {
        (rank, ranks, micro_batches, rank == ranks - 1)
    };
    let mut d = DualRank {
        kind,
        rank,
        ranks,
        micro_batches,
        next_forward: [0; 2],
        next_backward: [0; 2],
        queued_weights: VecDeque::new(),
        out: Vec::new(),
    };
    // 1: nF0.
    for _ in 0..(half_ranks - pos - 1) * 2 {
        d.forward(0);
    }
    // 2: nF0F1.
    for _ in 0..pos + 1 {
        d.forward(0);
        d.forward(1);
    }
    // 3: nB1W1F1, zero-bubble backwards.
    for _ in 0..half_ranks - pos - 1 {
        d.backward(1, true);
        d.weight();
        d.forward(1);
    }
    // 4: the main loop, nF0B1F1B0 (F&B pairs). chunks_per_phase ≥ 2·half_ranks... holds by the
    // preconditions: DualPipe m/2 ≥ PP, DualPipeV m ≥ 2·PP.
    let main = chunks_per_phase + pos + 1 - 2 * half_ranks;
    for i in 0..main {
        if i == 0 && middle {
            d.forward(0);
            d.backward(1, false);
        } else {
            d.forward_backward(0, 1);
        }
        d.forward_backward(1, 0);
    }
    // 5: nB1F1B0.
    for _ in 0..half_ranks - pos - 1 {
        d.backward(1, false);
        d.forward_backward(1, 0);
    }
    // 6: nB1B0, the second half with zero-bubble backwards.
    let n6 = pos + 1;
    let mut zb = false;
    for i in 0..n6 {
        if i == n6 / 2 && pos % 2 == 1 {
            zb = true;
        }
        d.backward(1, zb);
        if i == n6 / 2 && pos % 2 == 0 {
            zb = true;
        }
        d.backward(0, zb);
    }
    // 7: nWB0.
    for _ in 0..half_ranks - pos - 1 {
        d.weight();
        d.backward(0, true);
    }
    // 8: nW, the remaining queued weight gradients.
    while !d.queued_weights.is_empty() {
        d.weight();
    }
    d.out
}
