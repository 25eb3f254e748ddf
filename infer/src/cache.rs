//! The latent KV cache (spec §4.1): per layer and token only the normed kv latent `c`
//! (`kv_lora_rank` numbers) and the roped shared key `k_pe` (`qk_rope_head_dim` numbers).
//! Nothing per head is cached: decode attends over the latent in the absorbed form.
//!
//! Two storage modes. **Growing** appends by concatenation (memory follows the context).
//! **Preallocated** reserves `max_context` slots up front and writes new entries into them
//! (`slice_assign`, in place on backends that do so for a uniquely owned tensor), so a long
//! generation never reallocates and a context overflow is a typed error, not an OOM.
//! Either way [`LatentCache::truncate`] rolls back (speculative rejection, chat re-sync).

use burn::tensor::{Int, Tensor, TensorData};
use dsv3_backends::DsBackend;
use dsv3_model::{LatentKv, LatentStore};

use crate::error::InferError;

/// The latent KV cache of a batch: per layer `c [batch, len, kv_lora_rank]` and
/// `k_pe [batch, len, qk_rope_head_dim]`, growing or preallocated (see the module docs).
#[derive(Debug, Clone)]
pub struct LatentCache<B: DsBackend> {
    /// One entry per layer. Growing: exactly `len` slots (empty vector while `len == 0`);
    /// preallocated: `capacity` slots, the first `len` valid.
    layers: Vec<LatentKv<B>>,
    num_layers: usize,
    batch: usize,
    kv_lora_rank: usize,
    rope_dim: usize,
    len: usize,
    capacity: Option<usize>,
    device: B::Device,
    /// Stands in for a preallocated layer while its buffer is written (keeps it uniquely owned,
    /// so a backend may write in place).
    placeholder: LatentKv<B>,
}

impl<B: DsBackend> LatentCache<B> {
    /// An empty cache for `num_layers` layers and `batch` rows; `capacity` preallocates.
    pub fn new(
        num_layers: usize,
        batch: usize,
        kv_lora_rank: usize,
        rope_dim: usize,
        capacity: Option<usize>,
        device: &B::Device,
    ) -> Self {
        let layers = match capacity {
            Some(cap) => (0..num_layers)
                .map(|_| LatentKv {
                    c: Tensor::zeros([batch, cap, kv_lora_rank], device),
                    k_pe: Tensor::zeros([batch, cap, rope_dim], device),
                })
                .collect(),
            None => Vec::new(),
        };
        Self {
            layers,
            num_layers,
            batch,
            kv_lora_rank,
            rope_dim,
            len: 0,
            capacity,
            device: device.clone(),
            placeholder: LatentKv {
                c: Tensor::zeros([1, 1, 1], device),
                k_pe: Tensor::zeros([1, 1, 1], device),
            },
        }
    }

    /// Number of cached positions (slots, padding included).
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn batch(&self) -> usize {
        self.batch
    }
    pub fn capacity(&self) -> Option<usize> {
        self.capacity
    }
    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// Bytes of one position in one row, over all layers.
    pub fn bytes_per_token(&self) -> usize {
        self.num_layers * (self.kv_lora_rank + self.rope_dim) * self.elem_bytes()
    }

    /// Bytes held: allocated slots (preallocated) or used slots (growing), all rows.
    pub fn bytes(&self) -> usize {
        self.capacity.unwrap_or(self.len) * self.batch * self.bytes_per_token()
    }

    fn elem_bytes(&self) -> usize {
        self.layers
            .first()
            .map(|kv| kv.c.dtype().size())
            .unwrap_or(std::mem::size_of::<B::FloatElem>())
    }

    /// The valid entries per layer, as the model's `past` argument (`None` while empty).
    pub fn past(&self) -> Option<Vec<LatentKv<B>>> {
        if self.len == 0 {
            return None;
        }
        Some(match self.capacity {
            None => self.layers.clone(),
            Some(_) => self
                .layers
                .iter()
                .map(|kv| LatentKv {
                    c: kv.c.clone().narrow(1, 0, self.len),
                    k_pe: kv.k_pe.clone().narrow(1, 0, self.len),
                })
                .collect(),
        })
    }

    /// Appends the new positions' entries (one per layer, `[batch, t, ·]`).
    ///
    /// # Errors
    /// [`InferError::ContextFull`] when a preallocated cache has no room for `t` more positions
    /// ([`Self::reserve`]); nothing is written then.
    pub fn append(&mut self, new: Vec<LatentKv<B>>) -> Result<(), InferError> {
        debug_assert_eq!(new.len(), self.num_layers);
        let Some(t) = new.first().map(|kv| kv.len()) else {
            return Ok(());
        };
        self.reserve(t)?;
        for (layer, kv) in new.iter().enumerate() {
            self.store_layer(layer, kv);
        }
        self.commit(t);
        Ok(())
    }

    /// Forgets every position from `len` on (rollback).
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        if self.capacity.is_none() {
            if len == 0 {
                self.layers.clear();
            } else {
                for kv in &mut self.layers {
                    kv.c = kv.c.clone().narrow(1, 0, len);
                    kv.k_pe = kv.k_pe.clone().narrow(1, 0, len);
                }
            }
        }
        self.len = len;
    }

    /// Keeps only the given rows, in that order (finished rows leave a batch).
    pub fn select_rows(&mut self, rows: &[usize]) {
        let idx = Tensor::<B, 1, Int>::from_data(
            TensorData::new(rows.iter().map(|&r| r as i64).collect(), [rows.len()]),
            &self.device,
        );
        for kv in &mut self.layers {
            kv.c = kv.c.clone().select(0, idx.clone());
            kv.k_pe = kv.k_pe.clone().select(0, idx.clone());
        }
        self.batch = rows.len();
    }
}

impl<B: DsBackend> LatentCache<B> {
    /// Fails with [`InferError::ContextFull`] unless `t` more positions fit.
    ///
    /// # Errors
    /// [`InferError::ContextFull`] when the cache is preallocated and `len + t` exceeds its
    /// capacity; a growing cache always has room.
    pub fn reserve(&self, t: usize) -> Result<(), InferError> {
        match self.capacity {
            Some(cap) if self.len + t > cap => Err(InferError::ContextFull {
                needed: self.len + t,
                max_context: cap,
            }),
            _ => Ok(()),
        }
    }

    /// Counts the `t` positions every layer received through [`LatentStore::store_layer`].
    pub fn commit(&mut self, t: usize) {
        self.len += t;
    }
}

/// The cache as the model's history during a forward ([`dsv3_model::DeepseekV3::forward_store`]):
/// layer `l`'s new entries go after the `len` committed ones (written into the buffer when
/// preallocated; call [`LatentCache::reserve`] first) and attention reads a view of them all.
/// Call [`LatentCache::commit`] once the forward is done.
impl<B: DsBackend> LatentStore<B> for LatentCache<B> {
    fn store_layer(&mut self, layer: usize, new: &LatentKv<B>) -> LatentKv<B> {
        let (s, t, b) = (self.len, new.len(), self.batch);
        if self.capacity.is_none() {
            let all = match self.layers.get(layer) {
                Some(old) if s > 0 => old.cat(new),
                _ => new.clone(),
            };
            match self.layers.get_mut(layer) {
                Some(slot) => *slot = all.clone(),
                None => self.layers.push(all.clone()),
            }
            return all;
        }
        let slot = std::mem::replace(&mut self.layers[layer], self.placeholder.clone());
        let slot = LatentKv {
            c: slot
                .c
                .slice_assign([0..b, s..s + t, 0..self.kv_lora_rank], new.c.clone()),
            k_pe: slot
                .k_pe
                .slice_assign([0..b, s..s + t, 0..self.rope_dim], new.k_pe.clone()),
        };
        // With one row, the first `s + t` slots are a contiguous prefix: take them through a 2-D
        // view so the result is contiguous too (consumers may reshape it without a copy).
        let prefix = |x: &Tensor<B, 3>, d: usize| {
            if b == 1 {
                let cap = x.dims()[1];
                x.clone()
                    .reshape([cap, d])
                    .narrow(0, 0, s + t)
                    .reshape([1, s + t, d])
            } else {
                x.clone().narrow(1, 0, s + t)
            }
        };
        let view = LatentKv {
            c: prefix(&slot.c, self.kv_lora_rank),
            k_pe: prefix(&slot.k_pe, self.rope_dim),
        };
        self.layers[layer] = slot;
        view
    }
}
