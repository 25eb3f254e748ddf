//! Expert parallelism (DeepSeek-V3 report §3.2, §3.2.2): the routed experts of every MoE layer
//! are split over the members of a communicator — expert `e` of `E` lives on rank
//! `⌊e·N/E⌋` — and each rank keeps attention, the router and the shared experts for its own
//! tokens. A MoE layer routes its tokens as usual, **dispatches** each (token, slot) row to the
//! rank holding its expert (counts first, then the rows, sorted so each peer's rows are
//! contiguous), runs the experts it holds on what it received, and **combines**: the results go
//! back the same way and are weighted and summed onto the shared experts' output.
//!
//! When each expert group (`n_group`) lies on one rank, group-limited routing is the report's
//! node-limited routing: a token reaches at most `topk_group` ranks. [`EpStats`] counts how many
//! it reached.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};
use dsv3_backends::comm::{CommExt, Communicator, RowExchange};
use dsv3_backends::DsBackend;

use crate::error::ModelError;
use crate::mlp::Mlp;

/// The rank that holds expert `e` of `n_experts` in a group of `size`.
pub fn expert_owner(e: usize, n_experts: usize, size: usize) -> usize {
    e * size / n_experts
}

/// The experts rank `rank` of `size` holds.
pub fn owned_experts(rank: usize, n_experts: usize, size: usize) -> Range<usize> {
    let first = (0..n_experts)
        .find(|&e| expert_owner(e, n_experts, size) >= rank)
        .unwrap_or(n_experts);
    let end = (first..n_experts)
        .find(|&e| expert_owner(e, n_experts, size) > rank)
        .unwrap_or(n_experts);
    first..end
}

/// The routed expert a checkpoint tensor belongs to (`…mlp.experts.{e}.…`), if any.
pub fn expert_of(name: &str) -> Option<usize> {
    let (_, rest) = name.split_once(".mlp.experts.")?;
    rest.split('.').next()?.parse().ok()
}

/// How this rank holds a parameter ([`crate::DeepseekV3::param_holdings`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// Every rank holds it (attention, norms, router, shared experts, embeddings...).
    Replicated,
    /// A routed expert this rank holds (all of them without expert parallelism).
    HeldExpert,
    /// A routed expert another rank holds: a 1-element placeholder here.
    OtherExpert,
}

/// What the exchanges of a rank did since the last [`ExpertParallel::take_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EpStats {
    /// Tokens routed (summed over MoE layers and forward passes).
    pub tokens: u64,
    /// Σ over those tokens of the number of ranks holding one of its experts.
    pub token_ranks: u64,
    /// Dispatched rows that stayed on this rank.
    pub local_rows: u64,
    /// Dispatched rows sent to other ranks (each comes back once, combined).
    pub remote_rows: u64,
    /// Rows received from other ranks for this rank's experts (each goes back in the combine).
    pub served_rows: u64,
    /// Hidden size (for byte counts: a row is `hidden × 4` bytes in f32).
    pub hidden: u64,
    /// Bytes the forward exchanges (counts, expert ids, dispatch and combine rows) sent to
    /// other ranks, as the communicator counted them.
    pub sent_bytes: u64,
}

impl EpStats {
    /// Mean number of ranks each token reached.
    pub fn ranks_per_token(&self) -> f64 {
        self.token_ranks as f64 / self.tokens.max(1) as f64
    }
    /// The analytic bytes this rank sends in the forward dispatch and combine (f32 rows): its
    /// `tokens·k` rows minus those that stay local (dispatch), plus the rows its experts
    /// computed for other ranks (combine), `hidden × 4` bytes each. A backward pass moves the
    /// same again (each exchange's gradient is the reverse exchange).
    pub fn analytic_bytes(&self) -> u64 {
        (self.remote_rows + self.served_rows) * self.hidden * 4
    }
}

/// One MoE layer's place in an expert-parallel group (cheap to clone: the communicator and the
/// statistics are shared by every layer).
#[derive(Clone, Debug)]
pub struct ExpertParallel {
    comm: Arc<dyn Communicator>,
    n_experts: usize,
    /// Checkpoint index of the layer: names each exchange, so ranks that fall out of step
    /// fail with [`dsv3_backends::comm::CommError::Mismatch`] instead of mixing layers.
    layer: usize,
    stats: Arc<Mutex<EpStats>>,
}

impl ExpertParallel {
    /// Layer `layer` (it names the layer's exchanges) of `n_experts` routed experts split over
    /// `comm`, with statistics of its own.
    ///
    /// # Errors
    /// [`ModelError::Invalid`] when the group has more ranks than there are experts.
    pub fn new(
        comm: Arc<dyn Communicator>,
        n_experts: usize,
        layer: usize,
    ) -> Result<Self, ModelError> {
        Self::with_stats(comm, n_experts, layer, Default::default())
    }

    pub(crate) fn with_stats(
        comm: Arc<dyn Communicator>,
        n_experts: usize,
        layer: usize,
        stats: Arc<Mutex<EpStats>>,
    ) -> Result<Self, ModelError> {
        if comm.size() > n_experts {
            return Err(ModelError::Invalid(format!(
                "expert parallelism over {} ranks needs at least as many routed experts (the \
                 model has {n_experts})",
                comm.size()
            )));
        }
        Ok(Self {
            comm,
            n_experts,
            layer,
            stats,
        })
    }

    pub fn comm(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    /// The experts this rank holds.
    pub fn owned(&self) -> Range<usize> {
        owned_experts(self.comm.rank(), self.n_experts, self.comm.size())
    }

    fn owner(&self, e: usize) -> usize {
        expert_owner(e, self.n_experts, self.comm.size())
    }

    /// The statistics since the last call (shared by all layers), reset to zero.
    pub fn take_stats(&self) -> EpStats {
        std::mem::take(&mut *self.stats.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The routed experts' output for `x: [n, h]` with the chosen `ids` (`[n·k]`, row-major,
    /// on the host) and their `weights: [n, k]`, summed onto `base: [n, h]` (the shared
    /// experts' output). Collective over the group: every rank calls it for the same layer.
    ///
    /// # Panics
    /// When the communicator fails or ranks disagree about the exchange (a forward pass has
    /// no error path; a collective failure ends a distributed run anyway).
    pub(crate) fn routed<B: DsBackend>(
        &self,
        experts: &[Mlp<B>],
        x: Tensor<B, 2>,
        ids: &[i64],
        weights: Tensor<B, 2>,
        base: Tensor<B, 2>,
    ) -> Tensor<B, 2> {
        self.dispatch_combine(x, ids, weights, base, |e, rows| experts[e].forward(rows))
    }

    /// Dispatch → `expert(e, rows)` on the rows each held expert `e` received → combine:
    /// `base + Σ_slots weight · expert(x)` for every row of `x: [n, h]`, with the experts
    /// `ids` (`[n·k]` row-major on the host) and `weights: [n, k]`. What a MoE layer runs
    /// (the expert is its SwiGLU MLP); tests run it with identity or tagging experts.
    ///
    /// # Panics
    /// As the MoE layer: when the communicator fails or ranks disagree about the exchange.
    pub fn dispatch_combine<B: DsBackend>(
        &self,
        x: Tensor<B, 2>,
        ids: &[i64],
        weights: Tensor<B, 2>,
        base: Tensor<B, 2>,
        expert: impl Fn(usize, Tensor<B, 2>) -> Tensor<B, 2> + Sync + Send,
    ) -> Tensor<B, 2> {
        let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
            panic!(
                "expert-parallel layer {} (rank {}): {what}: {e}",
                self.layer,
                self.comm.rank()
            )
        };
        let [n, h] = x.dims();
        let k = ids.len() / n.max(1);
        let size = self.comm.size();
        let device = x.device();
        let traffic = self.comm.traffic();
        // (token, slot) pairs in expert order: each destination's rows are contiguous.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&p| ids[p]);
        let mut send_rows = vec![0usize; size];
        for &p in &order {
            send_rows[self.owner(ids[p] as usize)] += 1;
        }
        self.record(ids, k, &send_rows, h);
        let recv_rows = self
            .comm
            .exchange_counts(&send_rows, self.layer as u64)
            .unwrap_or_else(|e| fail("counts", &e));
        let sent_experts: Vec<i32> = order.iter().map(|&p| ids[p] as i32).collect();
        let recv_experts = self
            .comm
            .all_to_all_v_vec(&sent_experts, &send_rows, &recv_rows)
            .unwrap_or_else(|e| fail("expert ids", &e));
        let ex = RowExchange {
            comm: self.comm.clone(),
            send_rows,
            recv_rows,
        };
        let s = order.len();
        let tokens: Vec<i64> = order.iter().map(|&p| (p / k) as i64).collect();
        let slots: Vec<i64> = order.iter().map(|&p| p as i64).collect();
        let tokens = Tensor::<B, 1, Int>::from_data(TensorData::new(tokens, [s]), &device);
        let slots = Tensor::<B, 1, Int>::from_data(TensorData::new(slots, [s]), &device);
        let received = B::all_to_all_rows(x.select(0, tokens.clone()), &ex)
            .unwrap_or_else(|e| fail("dispatch", &e));
        let r = recv_experts.len();
        let owned = self.owned();
        let y = if r == 0 {
            // Nothing to compute; the (empty) received rows keep the exchange in the graph,
            // so this rank's backward takes part in the reverse exchange like everyone else's.
            received
        } else {
            let mut rows: Vec<Vec<i64>> = vec![Vec::new(); self.n_experts];
            for (i, &e) in recv_experts.iter().enumerate() {
                let e = e as usize;
                if !owned.contains(&e) {
                    fail(
                        "dispatch",
                        &format!("received a row for expert {e}, held elsewhere"),
                    );
                }
                rows[e].push(i as i64);
            }
            let jobs: Vec<(usize, Vec<i64>)> = rows
                .into_iter()
                .enumerate()
                .filter(|(_, v)| !v.is_empty())
                .collect();
            let outs = B::par_map(jobs, |(e, rows)| {
                let m = rows.len();
                let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [m]), &device);
                let y = expert(e, received.clone().select(0, idx.clone()));
                (idx, y)
            });
            let mut y = Tensor::zeros([r, h], &device);
            for (idx, ye) in outs {
                y = y.select_assign(0, idx, ye, IndexingUpdateOp::Add);
            }
            y
        };
        let back = B::all_to_all_rows(y, &ex.reversed()).unwrap_or_else(|e| fail("combine", &e));
        let sent = self.comm.traffic().sent_bytes - traffic.sent_bytes;
        {
            let mut st = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            st.sent_bytes += sent;
            st.served_rows += ex.remote_rows().1 as u64;
        }
        let w = weights.reshape([s]).select(0, slots).reshape([s, 1]);
        base.select_assign(0, tokens, back * w, IndexingUpdateOp::Add)
    }

    fn record(&self, ids: &[i64], k: usize, send_rows: &[usize], hidden: usize) {
        let me = self.comm.rank();
        let mut token_ranks = 0u64;
        for row in ids.chunks(k.max(1)) {
            let mut ranks: Vec<usize> = row.iter().map(|&e| self.owner(e as usize)).collect();
            ranks.sort_unstable();
            ranks.dedup();
            token_ranks += ranks.len() as u64;
        }
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        s.tokens += (ids.len() / k.max(1)) as u64;
        s.token_ranks += token_ranks;
        s.local_rows += send_rows[me] as u64;
        s.remote_rows += (send_rows.iter().sum::<usize>() - send_rows[me]) as u64;
        s.hidden = hidden as u64;
    }
}
