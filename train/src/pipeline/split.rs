//! The backward split into B (input gradient) and W (weight gradient) that ZB1P and DualPipe
//! schedule separately (report §3.2.1: "backward for input and backward for weights, like in
//! ZeroBubble"; DualPipe's `WeightGradStore` and its `LinearFunc`).
//!
//! Burn 0.21's autodiff computes both gradients of a matmul in one backward. [`split_matmul`]
//! is `y = x · w` as a custom autodiff op (Burn's public `Backward` trait, gradients registered
//! with `Gradients::register`): its backward registers `dx = gy · wᵀ` at once and, while the
//! [`WeightGradStore`] defers, queues `(x, gy)` instead of registering `dw`. A later
//! [`WeightGradStore::pop`] runs one queued batch (one W chunk) and accumulates
//! `dw = xᵀ · gy` per parameter, to be merged into the step's [`GradientsParams`]. The
//! arithmetic is Burn's own matmul backward, so the split gives the plain backward's gradients
//! bit for bit.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::module::{Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use super::PipelineError;

/// One deferred weight gradient: `dw = xᵀ · gy` of parameter `param`.
struct Deferred<B: Backend> {
    param: ParamId,
    x: FloatTensor<B>,
    gy: FloatTensor<B>,
}

struct Store<B: Backend> {
    deferring: bool,
    current: Vec<Deferred<B>>,
    queue: VecDeque<Vec<Deferred<B>>>,
    grads: HashMap<ParamId, FloatTensor<B>>,
}

/// The queue of deferred weight gradients (DualPipe's `WeightGradStore`): while
/// [`deferring`](Self::set_deferring), every [`split_matmul`] backward pushes its weight
/// gradient into the current batch; [`flush`](Self::flush) closes the batch as one W chunk;
/// [`pop`](Self::pop) runs the oldest chunk (FIFO). `B` is the inner (non-autodiff) backend.
/// Clones share one queue.
pub struct WeightGradStore<B: Backend> {
    inner: Arc<Mutex<Store<B>>>,
}

impl<B: Backend> Clone for WeightGradStore<B> {
    fn clone(&self) -> Self {
        WeightGradStore {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<B: Backend> std::fmt::Debug for WeightGradStore<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("WeightGradStore")
            .field("deferring", &s.deferring)
            .field("current", &s.current.len())
            .field("queued_chunks", &s.queue.len())
            .field("params_with_grads", &s.grads.len())
            .finish()
    }
}

impl<B: Backend> Default for WeightGradStore<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: Backend> WeightGradStore<B> {
    /// An empty store that does not defer (backwards compute both gradients).
    pub fn new() -> Self {
        WeightGradStore {
            inner: Arc::new(Mutex::new(Store {
                deferring: false,
                current: Vec::new(),
                queue: VecDeque::new(),
                grads: HashMap::new(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Store<B>> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the next backwards defer their weight gradients (B-input) or compute them (full B).
    pub fn set_deferring(&self, on: bool) {
        self.lock().deferring = on;
    }

    /// Closes the weight gradients pushed since the last flush as one W chunk (nothing if
    /// none were pushed).
    pub fn flush(&self) {
        let mut s = self.lock();
        if !s.current.is_empty() {
            let batch = std::mem::take(&mut s.current);
            s.queue.push_back(batch);
        }
    }

    /// Number of W chunks waiting.
    pub fn queued(&self) -> usize {
        self.lock().queue.len()
    }

    /// Runs the oldest W chunk: `dw += xᵀ · gy` for each of its deferred matmuls. Returns how
    /// many weight gradients it computed.
    ///
    /// # Errors
    /// [`PipelineError::InvalidSchedule`] when no W chunk is queued (a W before its B).
    pub fn pop(&self) -> Result<usize, PipelineError> {
        let batch = self.lock().queue.pop_front().ok_or_else(|| {
            PipelineError::InvalidSchedule("a W ran with no queued weight gradient".into())
        })?;
        let n = batch.len();
        // Computed outside the lock; accumulated in push order.
        let done: Vec<(ParamId, FloatTensor<B>)> = batch
            .into_iter()
            .map(|d| (d.param, B::float_matmul(B::float_transpose(d.x), d.gy)))
            .collect();
        let mut s = self.lock();
        for (id, g) in done {
            let g = match s.grads.remove(&id) {
                Some(old) => B::float_add(g, old),
                None => g,
            };
            s.grads.insert(id, g);
        }
        Ok(n)
    }

    /// Adds the weight gradients computed by [`pop`](Self::pop) into `grads` (summing with a
    /// gradient already there) and empties the store's accumulators. `D = 2`.
    ///
    /// # Errors
    /// [`PipelineError::InvalidSchedule`] when deferred weight gradients were never run
    /// (a B-input without its W, or a batch not flushed).
    pub fn merge_into(&self, grads: &mut GradientsParams) -> Result<(), PipelineError> {
        let mut s = self.lock();
        if !s.current.is_empty() || !s.queue.is_empty() {
            return Err(PipelineError::InvalidSchedule(format!(
                "{} deferred weight gradients never ran (W missing)",
                s.current.len() + s.queue.iter().map(Vec::len).sum::<usize>()
            )));
        }
        for (id, g) in s.grads.drain() {
            let g = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(g));
            let g = match grads.remove::<B, 2>(id) {
                Some(old) => g + old,
                None => g,
            };
            grads.register::<B, 2>(id, g);
        }
        Ok(())
    }

    fn push(&self, d: Deferred<B>) -> bool {
        let mut s = self.lock();
        if s.deferring {
            s.current.push(d);
            true
        } else {
            false
        }
    }
}

/// Backward of `y = x · w` with the weight gradient deferred while the store defers.
struct SplitMatmul<B: Backend> {
    store: WeightGradStore<B>,
    param: ParamId,
}

impl<B: Backend> std::fmt::Debug for SplitMatmul<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitMatmul")
            .field("param", &self.param)
            .finish()
    }
}

impl<B: Backend> Backward<B, 2> for SplitMatmul<B> {
    /// `(x, w)` of the forward, inner tensors.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, w) = ops.state;
        let [x_node, w_node] = ops.parents;
        let gy = grads.consume::<B>(&ops.node);
        if let Some(node) = w_node {
            let deferred = Deferred {
                param: self.param,
                x: x.clone(),
                gy: gy.clone(),
            };
            if !self.store.push(deferred) {
                // Full backward: Burn's own matmul rhs gradient.
                let gw = B::float_matmul(B::float_transpose(x), gy.clone());
                grads.register::<B>(node.id, gw);
            }
        }
        if let Some(node) = x_node {
            let gx = B::float_matmul(gy, B::float_transpose(w));
            grads.register::<B>(node.id, gx);
        }
    }
}

/// `y = x · w` (x `[n, d_in]`, w `[d_in, d_out]`, Burn's Linear weight layout; y `[n, d_out]`)
/// whose backward computes the input gradient at once and, while `store` defers, queues the
/// weight gradient of parameter `w` for a later [`WeightGradStore::pop`] instead of putting it
/// in the backward's gradients.
pub fn split_matmul<B: Backend, C: CheckpointStrategy>(
    x: Tensor<Autodiff<B, C>, 2>,
    w: &Param<Tensor<Autodiff<B, C>, 2>>,
    store: &WeightGradStore<B>,
) -> Tensor<Autodiff<B, C>, 2> {
    let x = x.into_primitive().tensor();
    let wt = w.val().into_primitive().tensor();
    let y = B::float_matmul(x.primitive.clone(), wt.primitive.clone());
    let op = SplitMatmul {
        store: store.clone(),
        param: w.id,
    };
    let out = match op
        .prepare::<C>([x.node.clone(), wt.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((x.primitive, wt.primitive), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}
