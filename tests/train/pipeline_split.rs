//! The B/W backward split ([`split_matmul`] + [`WeightGradStore`]) against Burn's plain
//! backward: the same gradients, bit for bit, also with two micro-batches' graphs alive and
//! back-propagated in the other order (as DualPipe does).

use burn::module::Param;
use burn::optim::GradientsParams;
use burn::tensor::activation::gelu;
use burn::tensor::{Tensor, TensorData};
use dsv3_backends::Cpu;
use dsv3_train::pipeline::split::{split_matmul, WeightGradStore};

use super::AD;
use crate::common::*;

fn tensor(rng: &mut SplitMix64, shape: [usize; 2]) -> Tensor<AD, 2> {
    let v: Vec<f32> = (0..shape[0] * shape[1])
        .map(|_| symmetric(rng) as f32)
        .collect();
    Tensor::from_data(TensorData::new(v, shape), &device())
}

/// A Linear-GELU-Linear stage (DualPipe's example stage) with a squared-sum loss.
struct Mlp {
    w1: Param<Tensor<AD, 2>>,
    w2: Param<Tensor<AD, 2>>,
}

impl Mlp {
    fn new(seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        Mlp {
            w1: Param::from_tensor(tensor(&mut rng, [6, 8])),
            w2: Param::from_tensor(tensor(&mut rng, [8, 5])),
        }
    }
    fn plain(&self, x: Tensor<AD, 2>) -> Tensor<AD, 1> {
        let h = gelu(x.matmul(self.w1.val()));
        h.matmul(self.w2.val()).powi_scalar(2).sum()
    }
    fn split(&self, x: Tensor<AD, 2>, store: &WeightGradStore<Cpu>) -> Tensor<AD, 1> {
        let h = gelu(split_matmul(x, &self.w1, store));
        split_matmul(h, &self.w2, store).powi_scalar(2).sum()
    }
}

fn data(t: Tensor<Cpu, 2>) -> Vec<f32> {
    t.into_data().to_vec().unwrap()
}

#[test]
fn pipeline_split_backward_equals_plain_backward_bitwise() {
    let m = Mlp::new(3);
    let mut rng = SplitMix64::new(11);
    let x = tensor(&mut rng, [4, 6]);

    // Plain: Burn's backward, both gradients at once.
    let xp = x.clone().require_grad();
    let g = m.plain(xp.clone()).backward();
    let (gx, gw1, gw2) = (
        data(xp.grad(&g).unwrap()),
        data(m.w1.val().grad(&g).unwrap()),
        data(m.w2.val().grad(&g).unwrap()),
    );

    // Split, not deferring: the same as plain (full B).
    let store = WeightGradStore::<Cpu>::new();
    let xs = x.clone().require_grad();
    let g = m.split(xs.clone(), &store).backward();
    assert_eq!(data(xs.grad(&g).unwrap()), gx);
    assert_eq!(data(m.w1.val().grad(&g).unwrap()), gw1);
    assert_eq!(data(m.w2.val().grad(&g).unwrap()), gw2);

    // Split, deferring: B gives the input gradient only; W later gives the weights'.
    store.set_deferring(true);
    let xs = x.clone().require_grad();
    let g = m.split(xs.clone(), &store).backward();
    store.set_deferring(false);
    assert_eq!(
        data(xs.grad(&g).unwrap()),
        gx,
        "input gradient from B alone"
    );
    assert!(m.w1.val().grad(&g).is_none(), "dw1 must wait for W");
    assert!(m.w2.val().grad(&g).is_none(), "dw2 must wait for W");
    let mut params = GradientsParams::new();
    assert!(store.merge_into(&mut params).is_err(), "W not run yet");
    store.flush();
    assert_eq!(store.queued(), 1);
    assert_eq!(store.pop().unwrap(), 2, "one W chunk holds both matmuls");
    assert!(store.pop().is_err(), "nothing left to pop");
    store.merge_into(&mut params).unwrap();
    assert_eq!(data(params.get::<Cpu, 2>(m.w1.id).unwrap()), gw1);
    assert_eq!(data(params.get::<Cpu, 2>(m.w2.id).unwrap()), gw2);
}

#[test]
fn pipeline_split_two_live_graphs_backward_in_other_order() {
    let m = Mlp::new(5);
    let mut rng = SplitMix64::new(17);
    let (x1, x2) = (tensor(&mut rng, [3, 6]), tensor(&mut rng, [3, 6]));

    // Sequential plain reference: one micro-batch at a time; weight gradients summed.
    let grads = |x: &Tensor<AD, 2>| {
        let xp = x.clone().require_grad();
        let g = m.plain(xp.clone()).backward();
        (
            data(xp.grad(&g).unwrap()),
            m.w1.val().grad(&g).unwrap(),
            m.w2.val().grad(&g).unwrap(),
        )
    };
    let (gx1, a1, a2) = grads(&x1);
    let (gx2, b1, b2) = grads(&x2);
    let (gw1, gw2) = (data(a1 + b1), data(a2 + b2));

    // Both forwards first, then B of micro-batch 2, B of 1, then the two W chunks.
    let store = WeightGradStore::<Cpu>::new();
    let (xs1, xs2) = (x1.require_grad(), x2.require_grad());
    let l1 = m.split(xs1.clone(), &store);
    let l2 = m.split(xs2.clone(), &store);
    store.set_deferring(true);
    let g2 = l2.backward();
    store.flush();
    let g1 = l1.backward();
    store.flush();
    store.set_deferring(false);
    assert_eq!(data(xs2.grad(&g2).unwrap()), gx2);
    assert_eq!(data(xs1.grad(&g1).unwrap()), gx1);
    assert_eq!(store.queued(), 2);
    store.pop().unwrap();
    store.pop().unwrap();
    let mut params = GradientsParams::new();
    store.merge_into(&mut params).unwrap();
    // Two-term sums are exact whatever the order.
    assert_eq!(data(params.get::<Cpu, 2>(m.w1.id).unwrap()), gw1);
    assert_eq!(data(params.get::<Cpu, 2>(m.w2.id).unwrap()), gw2);
}
