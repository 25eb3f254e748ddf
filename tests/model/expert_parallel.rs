//! Expert parallelism in one process: the communicator's contract on a world of one, the expert
//! partition, and the expert-parallel MoE path (dispatch → experts → combine through a
//! `LocalComm`) against the plain path, with its sharded save. Several processes: `tests/dist.rs`.

use dsv3_backends::comm::{
    Buf, BufMut, CommError, CommExt, Communicator, LocalComm, Owned, ReduceOp,
};
use dsv3_model::{
    expert_owner, load, owned_experts, save_expert_parallel, ForwardOptions, LoadOptions, SaveDtype,
};

use crate::common::*;

/// Every expert has exactly one owner, owners never decrease with the expert id, and the
/// ranks' ranges tile `0..E` (so a group's experts are contiguous: node-limited routing).
#[test]
fn expert_partition_tiles_the_experts() {
    for e in [1usize, 5, 12, 16, 256] {
        for n in (1..=e.min(9)).chain([e]) {
            let mut next = 0;
            for r in 0..n {
                let own = owned_experts(r, e, n);
                assert_eq!(own.start, next, "E {e}, N {n}, rank {r}");
                assert!(own.clone().all(|x| expert_owner(x, e, n) == r));
                assert!(!own.is_empty(), "E {e} ≥ N {n}: every rank holds one");
                next = own.end;
            }
            assert_eq!(next, e, "E {e}, N {n}");
        }
    }
}

/// The contract on a world of one: results, and clear errors (never a hang) for what cannot work.
#[test]
fn local_comm_contract() {
    let c = LocalComm::new();
    let mut v = [1.5f32, -2.0];
    c.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
    assert_eq!(v, [1.5, -2.0]);
    assert_eq!(c.all_gather_vec(&[3u16, 4]).unwrap(), vec![3, 4]);
    assert_eq!(c.exchange_counts(&[5], 7).unwrap(), vec![5]);
    assert_eq!(
        c.all_to_all_v_vec(&[1u8, 2, 3], &[3], &[3]).unwrap(),
        vec![1, 2, 3]
    );
    // Counts that do not describe the buffers.
    let err = c.all_to_all_v_vec(&[1i32, 2, 3], &[2], &[3]).unwrap_err();
    assert!(matches!(err, CommError::Invalid { .. }), "{err}");
    let err = c.all_to_all_v_vec(&[1i32], &[1, 0], &[1, 0]).unwrap_err();
    assert!(matches!(err, CommError::Invalid { .. }), "{err}");
    // A sum of bf16 bit patterns means nothing.
    let err = c
        .all_reduce(BufMut::U16(&mut [1, 2]), ReduceOp::Sum)
        .unwrap_err();
    assert!(matches!(err, CommError::Unsupported { .. }), "{err}");
    // Mismatched types.
    let err = c
        .all_gather(Buf::F32(&[1.0]), BufMut::I32(&mut [0]))
        .unwrap_err();
    assert!(
        err.to_string().contains("f32") && err.to_string().contains("i32"),
        "{err}"
    );
    // Point-to-point to self pairs by tag; a receive nothing was sent for is an error.
    c.send(Buf::F64(&[2.5]), 0, 4).unwrap();
    let rq = c.isend(Owned::I32(vec![9, 8]), 0, 5).unwrap();
    assert_eq!(rq.wait().unwrap(), Owned::I32(vec![9, 8]));
    let got = c
        .irecv(Owned::I32(vec![0, 0]), 0, 5)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(got, Owned::I32(vec![9, 8]));
    let mut x = [0f64];
    c.recv(BufMut::F64(&mut x), 0, 4).unwrap();
    assert_eq!(x, [2.5]);
    let err = c.recv(BufMut::F64(&mut x), 0, 4).unwrap_err();
    assert!(err.to_string().contains("wait forever"), "{err}");
    assert!(
        c.send(Buf::F64(&[1.0]), 1, 0).is_err(),
        "rank 1 of a world of one"
    );
}

/// With every expert on the one rank, the expert-parallel path (host-staged exchange, experts
/// on the received rows, weighted combine) computes what the plain path computes: the same
/// rows through the same experts, summed in the same order, so the logits are bit-identical;
/// and its sharded save loads back as the same model.
#[test]
fn expert_parallel_path_on_one_rank_equals_plain_path() {
    for name in ["tiny-qlora", "released/deepseek-v3"] {
        let (plain, _) = load::<B>(&fixture(name), &device(), &LoadOptions::default()).unwrap();
        let mut ep = plain.clone();
        ep.set_expert_parallel(LocalComm::new()).unwrap();
        assert!(ep.expert_parallel().is_some());
        let ids: Vec<u32> = (0..9).map(|i| (i * 7 + 3) % 100).collect();
        let opts = ForwardOptions {
            record_routing: true,
            ..Default::default()
        };
        let a = plain.forward(plain.tokens_tensor(&ids).unwrap(), 0, None, &opts);
        let b = ep.forward(ep.tokens_tensor(&ids).unwrap(), 0, None, &opts);
        assert_eq!(
            to_vec(a.logits.clone()),
            to_vec(b.logits.clone()),
            "{name}: logits"
        );
        assert_eq!(a.routing, b.routing, "{name}: routing");
        let stats = ep.expert_parallel().unwrap().take_stats();
        assert_eq!(stats.remote_rows, 0, "one rank: every row stays");
        assert!((stats.ranks_per_token() - 1.0).abs() < 1e-12);

        let dir = scratch("ep-save");
        save_expert_parallel(&ep, &dir, SaveDtype::F32).unwrap();
        assert!(dir.join("model-00001-of-00001.safetensors").is_file());
        assert!(dir.join("model.safetensors.index.json").is_file());
        let (back, report) = load::<B>(
            &dir,
            &device(),
            &LoadOptions {
                strict: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(report.unexpected.is_empty());
        let c = back.forward(back.tokens_tensor(&ids).unwrap(), 0, None, &opts);
        assert_eq!(
            to_vec(a.logits),
            to_vec(c.logits),
            "{name}: saved and loaded"
        );
    }
}

/// Loading with `expert_shard` reads only the rank's experts: the others are 1-element
/// placeholders, and the load reports no unused tensors.
#[test]
fn expert_shard_loads_only_the_ranks_experts() {
    let (m, report) = load::<B>(
        &fixture("tiny-qlora"),
        &device(),
        &LoadOptions {
            strict: true,
            expert_shard: Some((1, 3)),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(report.unexpected.is_empty());
    let e = m.config.n_routed_experts;
    let own = owned_experts(1, e, 3);
    for layer in m.moe_layers() {
        for (i, expert) in m.moe(layer).unwrap().experts.iter().enumerate() {
            let n = expert.up_proj.weight.val().shape().num_elements();
            assert_eq!(
                n == 1,
                !own.contains(&i),
                "layer {layer} expert {i}: {n} elements"
            );
        }
    }
}
