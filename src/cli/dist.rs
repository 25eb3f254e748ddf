//! The processes of a distributed run (`mpirun -n W dsv3 ...`): the world communicator, and
//! `dsv3 dist-check`, the self-checks of the communicator, the expert exchange and the
//! distributed training step against single-process references computed in the same process.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};
use clap::Args;
use dsv3_backends::comm::{Buf, BufMut, CommExt, Communicator, LocalComm, Owned, ReduceOp};
use dsv3_backends::{Cpu, CpuAutodiff, DsBackend, SplitMix64};
use dsv3_model::{DeepseekV3, DeepseekV3Config, ExpertParallel, Holding};

use super::CliError;

/// The world of this process: MPI's when started by `mpirun` (or when `ranks > 1` is asked
/// for), else a world of one. Fields drop in order: communicators before MPI is finalised.
pub struct World {
    pub comm: Arc<dyn Communicator>,
    #[cfg(feature = "mpi")]
    _mpi: Option<dsv3_backends::comm::MpiRuntime>,
}

/// Whether a launcher (OpenMPI, MPICH/PMI) started this process.
fn under_launcher() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// The world for a command asking for `ranks` processes (`--ep`, `--dp`).
///
/// # Errors
/// [`CliError::Usage`] when more than one process is asked for in a build without MPI, or
/// MPI fails to start.
pub fn world(ranks: usize) -> Result<World, CliError> {
    if ranks <= 1 && !under_launcher() {
        return Ok(World {
            comm: LocalComm::new(),
            #[cfg(feature = "mpi")]
            _mpi: None,
        });
    }
    #[cfg(feature = "mpi")]
    {
        let (rt, comm) = dsv3_backends::comm::MpiRuntime::init()
            .map_err(|e| CliError::Usage(format!("cannot start MPI: {e}")))?;
        if comm.size() > 1 {
            // A panic on one rank (a broken invariant, a failed exchange) would otherwise leave
            // the others waiting in their next collective: end the whole job instead.
            let hook = std::panic::take_hook();
            let abort: Arc<dyn Communicator> = comm.clone();
            std::panic::set_hook(Box::new(move |info| {
                hook(info);
                abort.abort(101);
            }));
        }
        Ok(World {
            comm,
            _mpi: Some(rt),
        })
    }
    #[cfg(not(feature = "mpi"))]
    Err(CliError::Usage(
        "distributed runs need a build with MPI: `cargo build --release --features mpi`, then \
         `mpirun -n W target/release/dsv3 ...`"
            .into(),
    ))
}

/// Writes `error: MSG` (or `error (rank R): MSG`) to stderr in one write, so mpirun's merged
/// output cannot split the line.
pub fn print_error(rank: Option<usize>, msg: &str) {
    let line = match rank {
        Some(r) if r > 0 => format!("error (rank {r}): {msg}\n"),
        _ => format!("error: {msg}\n"),
    };
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// Ends a distributed command whose ranks all stopped at the same point, some or all with an
/// error: rank 0 prints its error (or that another rank failed), a rank whose message differs
/// from rank 0's prints its own, and every rank passes a barrier before returning
/// [`CliError::Reported`], so mpirun stops no rank before it printed. Collective.
fn report(comm: &Arc<dyn Communicator>, mine: Option<CliError>) -> CliError {
    let (rank, msg) = (comm.rank(), mine.as_ref().map(|e| e.to_string()));
    // Rank 0's message, to compare (its length first, then its bytes).
    let bytes = msg.clone().unwrap_or_default().into_bytes();
    let mut len = [bytes.len() as i32];
    let _ = comm.broadcast(BufMut::I32(&mut len), 0);
    let mut lead = if rank == 0 {
        bytes.clone()
    } else {
        vec![0u8; len[0].max(0) as usize]
    };
    let _ = comm.broadcast(BufMut::U8(&mut lead), 0);
    match (&msg, rank) {
        (Some(m), 0) => print_error(None, m),
        (None, 0) => print_error(None, "another rank failed (see its message)"),
        (Some(m), r) if m.as_bytes() != lead.as_slice() => print_error(Some(r), m),
        _ => {}
    }
    let _ = comm.barrier();
    CliError::Reported
}

/// The point (named `point`) where the ranks of a distributed command agree that every one of
/// them got this far: `result` unchanged when all succeeded (or in a single process); otherwise each rank
/// returns [`CliError::Reported`] after the errors were printed once. Collective:
/// every rank must call it at the same point.
///
/// # Errors
/// `result`'s error (single process), or [`CliError::Reported`].
pub fn agree<T>(
    comm: &Arc<dyn Communicator>,
    result: Result<T, CliError>,
    point: &str,
) -> Result<T, CliError> {
    if comm.size() <= 1 {
        return result;
    }
    let all_ok = match comm.agree_at(result.is_ok(), point) {
        Ok(all) => all,
        Err(e) => return Err(CliError::Usage(format!("ranks could not agree: {e}"))),
    };
    match result {
        Ok(v) if all_ok => Ok(v),
        Ok(_) => Err(report(comm, None)),
        Err(e) => Err(report(comm, Some(e))),
    }
}

/// The layout flags must fit the processes mpirun started: `--ep` alone (score, generate: every
/// process holds a share of the experts) must equal their number; with data parallelism
/// (train) `--ep` × `--dp` must, `--dp` defaulting to the number ÷ `--ep`.
///
/// # Errors
/// [`CliError::Usage`] in one line naming both (printed by rank 0 alone, via [`agree`]).
pub fn check_world(
    comm: &Arc<dyn Communicator>,
    ep: usize,
    dp: Option<usize>,
    data_parallel: bool,
) -> Result<(), CliError> {
    let w = comm.size();
    let fits = ep > 0
        && if data_parallel {
            w.is_multiple_of(ep) && dp.is_none_or(|d| d * ep == w)
        } else {
            ep == w
        };
    let res = if fits {
        Ok(())
    } else {
        let (asked, hint) = match dp {
            Some(d) => (
                format!("--ep {ep} --dp {d} (= {} processes)", ep * d),
                String::new(),
            ),
            None if data_parallel => (
                format!("--ep {ep}"),
                " (--ep must divide the number of processes)".to_string(),
            ),
            None => (
                format!("--ep {ep}"),
                format!(": pass --ep {w}, or start {ep} with `mpirun -n {ep}`"),
            ),
        };
        Err(CliError::Usage(format!(
            "{asked} does not fit the {w} process(es) started{hint}"
        )))
    };
    agree(comm, res, "layout")
}

/// `peak RSS per rank: …` (each rank's `VmHWM`, gathered; collective), for rank 0 to print.
///
/// # Errors
/// [`CliError::Usage`] when the gather fails.
pub fn peak_rss_line(comm: &Arc<dyn Communicator>) -> Result<String, CliError> {
    let mine = super::peak_rss_bytes().unwrap_or(0) as f64;
    let all = c(comm.all_gather_vec(&[mine]))?;
    let list: Vec<String> = all.iter().map(|&b| super::gib(b)).collect();
    Ok(format!("peak RSS per rank: {}", list.join(", ")))
}

/// The processes of an expert-parallel `score` or `generate`: the world, whose size must equal
/// `ep` (every process holds a share of the experts), and the communicator to split the experts
/// over when there are several.
///
/// # Errors
/// As [`world`] and [`check_world`].
pub fn ep_world(ep: usize) -> Result<(World, Option<Arc<dyn Communicator>>), CliError> {
    let world = world(ep)?;
    check_world(&world.comm, ep, None, false)?;
    let comm = (world.comm.size() > 1).then(|| world.comm.clone());
    Ok((world, comm))
}

/// `out` on rank 0; the others write to `sink` (they stay silent).
pub fn lead_output<'a>(
    comm: &Arc<dyn Communicator>,
    out: &'a mut dyn Write,
    sink: &'a mut std::io::Sink,
) -> &'a mut dyn Write {
    if comm.rank() == 0 {
        out
    } else {
        sink
    }
}

#[derive(Args, Debug)]
pub struct DistCheckArgs {
    /// Seed of the checks' random data.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Run only the pipeline checks: every schedule (1f1b, zb1p, dualpipe, dualpipev) over all
    /// the processes as pipeline ranks, loss and gradients against the sequential run.
    #[arg(long)]
    pub pipeline: bool,
}

/// Runs every check on every rank; rank 0 prints one `ok …` line per check. A failure prints one
/// line (`error (rank r): FAILED …`) and ends the whole job with a non-zero exit (`MPI_Abort`).
pub fn dist_check(a: &DistCheckArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let world = world(2)?;
    let comm = world.comm.clone();
    let lead = comm.rank() == 0;
    let mut say = |line: String| {
        if lead {
            let _ = writeln!(out, "ok {line}");
        }
    };
    // A check that fails on one rank may leave the others inside its collectives: the failing
    // rank prints and ends the whole job.
    let rank = comm.rank();
    let mut run = |check: Result<String, CliError>| match check {
        Ok(line) => say(line),
        Err(e) if comm.size() > 1 => {
            print_error(Some(rank), &e.to_string());
            comm.abort(1)
        }
        Err(e) => {
            print_error(None, &e.to_string());
            std::process::exit(1)
        }
    };
    if a.pipeline {
        for kind in dsv3_train::pipeline::ScheduleKind::ALL {
            if kind == dsv3_train::pipeline::ScheduleKind::DualPipe && comm.size() % 2 == 1 {
                continue; // DualPipe needs an even number of ranks.
            }
            run(pipeline_check(&comm, kind, a.seed));
        }
        return Ok(());
    }
    run(collectives(&comm));
    run(exchange(&comm, a.seed));
    run(gradients(&comm, a.seed));
    let w = comm.size();
    let mut layouts = vec![(w, 1), (1, w)];
    if w == 4 {
        layouts.push((2, 2));
    }
    layouts.dedup();
    for (ep, dp) in layouts {
        run(train_steps(&comm, ep, dp, a.seed));
    }
    Ok(())
}

fn fail(what: &str, detail: String) -> CliError {
    CliError::Usage(format!("FAILED {what}: {detail}"))
}

fn c<T>(r: Result<T, dsv3_backends::comm::CommError>) -> Result<T, CliError> {
    r.map_err(|e| fail("collective", e.to_string()))
}

/// Every collective against values each rank can compute on its own.
fn collectives(comm: &Arc<dyn Communicator>) -> Result<String, CliError> {
    let (r, n) = (comm.rank(), comm.size());
    let check = |ok: bool, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(fail(
                "collectives",
                format!("{what} gave a wrong result on rank {r}"),
            ))
        }
    };
    let mut v = vec![r as f32 + 0.5, 1.0];
    c(comm.all_reduce_in_place(&mut v, ReduceOp::Sum))?;
    let sum: f32 = (0..n).map(|q| q as f32 + 0.5).sum();
    check(v == vec![sum, n as f32], "all_reduce")?;
    let mut mx = [r as i32];
    c(comm.all_reduce_in_place(&mut mx, ReduceOp::Max))?;
    check(mx[0] == n as i32 - 1, "all_reduce max")?;
    let g = c(comm.all_gather_vec(&[r as u16, 7]))?;
    check(
        g == (0..n).flat_map(|q| [q as u16, 7]).collect::<Vec<_>>(),
        "all_gather (bf16 bits)",
    )?;
    // Block q of every rank's send is q·10 + rank: the reduced block is Σ_ranks.
    let send: Vec<f64> = (0..n).map(|q| (q * 10 + r) as f64).collect();
    let mut recv = [0f64];
    c(comm.reduce_scatter(Buf::F64(&send), BufMut::F64(&mut recv), ReduceOp::Sum))?;
    let want = (0..n).map(|q| (r * 10 + q) as f64).sum::<f64>();
    check(recv[0] == want, "reduce_scatter")?;
    // Rank r sends p+1 bytes of value r to each p; receives r+1 bytes of value q from each q.
    let counts: Vec<usize> = (0..n).map(|p| p + 1).collect();
    let send: Vec<u8> = (0..n).flat_map(|p| vec![r as u8; p + 1]).collect();
    let recv_counts = c(comm.exchange_counts(&counts, 99))?;
    check(recv_counts == vec![r + 1; n], "exchange_counts")?;
    let got = c(comm.all_to_all_v_vec(&send, &counts, &recv_counts))?;
    let want: Vec<u8> = (0..n).flat_map(|q| vec![q as u8; r + 1]).collect();
    check(got == want, "all_to_all_v (e4m3 bytes)")?;
    let mut b = [if r == 0 { 42i32 } else { 0 }];
    c(comm.broadcast(BufMut::I32(&mut b), 0))?;
    check(b[0] == 42, "broadcast")?;
    // A ring: blocking and non-blocking point-to-point.
    let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
    let rq = c(comm.irecv(Owned::F32(vec![0.0; 3]), prev, 5))?;
    let sq = c(comm.isend(Owned::F32(vec![r as f32; 3]), next, 5))?;
    let got = c(rq.wait())?;
    c(sq.wait())?;
    check(got == Owned::F32(vec![prev as f32; 3]), "isend/irecv")?;
    if n > 1 {
        // Even ranks send first; blocking calls pair up without deadlock.
        let mut got = [0i32; 2];
        if r % 2 == 0 {
            c(comm.send(Buf::I32(&[r as i32, 1]), next, 6))?;
            c(comm.recv(BufMut::I32(&mut got), prev, 6))?;
        } else {
            c(comm.recv(BufMut::I32(&mut got), prev, 6))?;
            c(comm.send(Buf::I32(&[r as i32, 1]), next, 6))?;
        }
        check(got == [prev as i32, 1], "send/recv")?;
    }
    let sub = c(comm.split(r % 2, r))?;
    let mut s = [1i32];
    c(sub.all_reduce_in_place(&mut s, ReduceOp::Sum))?;
    check(
        s[0] as usize == (0..n).filter(|q| q % 2 == r % 2).count(),
        "split",
    )?;
    c(comm.barrier())?;
    Ok(format!(
        "collectives on {n} {} rank(s): all_reduce, all_gather, reduce_scatter, all_to_all_v, \
         broadcast, send/recv, isend/irecv, split",
        comm.engine()
    ))
}

/// Dispatch → identity experts → combine returns `x · Σ weights`; rows tagged with their
/// source reach exactly the owners of the experts that chose them.
fn exchange(comm: &Arc<dyn Communicator>, seed: u64) -> Result<String, CliError> {
    type B = Cpu;
    let (r, n) = (comm.rank(), comm.size());
    let (e_total, k, tokens, h) = (4 * n + 3, 3, 11 + r, 37);
    let ep = ExpertParallel::new(comm.clone(), e_total, 0)
        .map_err(|e| fail("exchange", e.to_string()))?;
    let mut rng = SplitMix64::new(seed ^ ((r as u64 + 1) * 0x9E37));
    let mut ids = Vec::new();
    for _ in 0..tokens {
        let mut row: Vec<i64> = Vec::new();
        while row.len() < k {
            let e = (rng.next_u64() % e_total as u64) as i64;
            if !row.contains(&e) {
                row.push(e);
            }
        }
        ids.extend(row);
    }
    let w: Vec<f32> = (0..tokens * k).map(|_| rng.uniform() as f32).collect();
    // Columns 0 and 1 tag the row (source rank, token); the rest are random.
    let mut x = vec![0f32; tokens * h];
    for t in 0..tokens {
        x[t * h] = r as f32;
        x[t * h + 1] = t as f32;
        for j in 2..h {
            x[t * h + j] = (rng.uniform() as f32) - 0.5;
        }
    }
    let device = Default::default();
    let xt = Tensor::<B, 2>::from_data(TensorData::new(x.clone(), [tokens, h]), &device);
    let wt = Tensor::<B, 2>::from_data(TensorData::new(w.clone(), [tokens, k]), &device);
    let base = Tensor::<B, 2>::zeros([tokens, h], &device);
    let seen: Mutex<Vec<(usize, usize, usize)>> = Mutex::new(Vec::new());
    let y = ep.dispatch_combine(xt, &ids, wt, base, |e, rows| {
        let v: Vec<f32> = rows.clone().into_data().to_vec().expect("f32");
        let mut s = seen.lock().expect("lock");
        for row in v.chunks(h) {
            s.push((e, row[0] as usize, row[1] as usize));
        }
        rows
    });
    let y: Vec<f32> = y.into_data().to_vec().expect("f32");
    let mut err = 0f32;
    for t in 0..tokens {
        let ws: f32 = w[t * k..(t + 1) * k].iter().sum();
        for j in 0..h {
            err = err.max((y[t * h + j] - x[t * h + j] * ws).abs());
        }
    }
    // f32: a sum of k products of values below 1.
    if err > 1e-5 {
        return Err(fail(
            "exchange",
            format!("combine(identity(dispatch(x))) differs from x·Σw by {err:e} on rank {r}"),
        ));
    }
    // What each rank should have received: every (expert, source, token) whose expert it holds.
    let all_ids = c(comm.all_gather_vec(&pad_ids(&ids, (11 + n) * k)))?;
    let per = all_ids.len() / n;
    let owned = ep.owned();
    let mut want: Vec<(usize, usize, usize)> = Vec::new();
    for src in 0..n {
        let theirs = &all_ids[src * per..(src + 1) * per];
        for (pos, &e) in theirs.iter().enumerate().filter(|(_, &e)| e >= 0) {
            if owned.contains(&(e as usize)) {
                want.push((e as usize, src, pos / k));
            }
        }
    }
    let mut got = seen.into_inner().expect("lock");
    got.sort_unstable();
    want.sort_unstable();
    if got != want {
        return Err(fail(
            "exchange",
            format!(
                "rank {r} received {} rows, expected {} (experts {owned:?})",
                got.len(),
                want.len()
            ),
        ));
    }
    Ok(format!(
        "expert exchange on {n} rank(s) ({e_total} experts, k {k}, hidden {h}): identity experts \
         return x·Σw (max err {err:.1e}); every row reached exactly the owner of its expert"
    ))
}

/// Ids padded with -1 to a common length (for an equal-count all-gather).
fn pad_ids(ids: &[i64], len: usize) -> Vec<i32> {
    let mut v: Vec<i32> = ids.iter().map(|&e| e as i32).collect();
    v.resize(len.max(ids.len()), -1);
    v
}

/// Gradients by checkpoint name (parameters without one, and other ranks' experts, left out).
fn grads_by_name<B: burn::tensor::backend::AutodiffBackend + DsBackend>(
    m: &DeepseekV3<B>,
    grads: &burn::optim::GradientsParams,
) -> Vec<(String, bool, Vec<f32>)> {
    struct Read<'a>(&'a burn::optim::GradientsParams, Vec<Option<Vec<f32>>>);
    impl<B: burn::tensor::backend::AutodiffBackend> ModuleVisitor<B> for Read<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let g = self.0.get::<B::InnerBackend, D>(p.id);
            self.1
                .push(g.map(|g| g.into_data().convert::<f32>().to_vec().expect("f32")));
        }
    }
    let mut r = Read(grads, Vec::new());
    m.visit(&mut r);
    m.param_holdings()
        .into_iter()
        .zip(r.1)
        .filter_map(|((_, name, holding), g)| match holding {
            Holding::OtherExpert => None,
            h => Some((name, h == Holding::HeldExpert, g?)),
        })
        .collect()
}

/// The gradients of a tiny model split over every rank (expert parallelism, each rank with its
/// own share of the global batch, dense gradients all-reduced) against the single-process
/// gradients of the whole global batch, computed here too.
fn gradients(world: &Arc<dyn Communicator>, seed: u64) -> Result<String, CliError> {
    type AD = CpuAutodiff;
    let (r, w) = (world.rank(), world.size());
    let preset = dsv3_train::preset("tiny").expect("tiny preset");
    let mut cfg = preset.train;
    cfg.seq_len = 20;
    let model_cfg = dsv3_train::for_bytes(preset.model, cfg.seq_len);
    let device = Default::default();
    let merr = |e: dsv3_model::ModelError| fail("gradients", e.to_string());
    let full = dsv3_train::init::seeded(
        DeepseekV3::<AD>::init(&model_cfg, &device).map_err(merr)?,
        seed,
    );
    let mut split = full.clone();
    split.set_expert_parallel(world.clone()).map_err(merr)?;
    let docs = dsv3_train::data::embedded_documents();
    let data = dsv3_train::data::Dataset::pack(&docs, cfg.seq_len, cfg.val_every)
        .map_err(|e| fail("gradients", e.to_string()))?;
    let depths = full.model.mtp.len();
    let starts: Vec<usize> = data.train.iter().step_by(7).take(2 * w).copied().collect();
    let run = |m: &DeepseekV3<AD>, starts: &[usize], scale: f64| {
        use dsv3_train::trainer::{make_batch, objective};
        let batch = make_batch::<AD>(&data, starts, depths, &device);
        let fwd =
            dsv3_train::forward::forward(m, batch.inputs.clone(), cfg.attention, depths, false);
        let loss = objective(&fwd, &batch, &cfg).total.div_scalar(scale);
        burn::optim::GradientsParams::from_grads(loss.backward(), m)
    };
    let reference = grads_by_name(&full, &run(&full, &starts, 1.0));
    let mine = grads_by_name(&split, &run(&split, &starts[2 * r..2 * r + 2], w as f64));
    // Dense gradients are summed over the ranks (each holds every dense parameter).
    let mut dense: Vec<f32> = mine
        .iter()
        .filter(|(_, expert, _)| !expert)
        .flat_map(|(_, _, g)| g.iter().copied())
        .collect();
    c(world.all_reduce_in_place(&mut dense, ReduceOp::Sum))?;
    let mut at = 0;
    let (mut worst, mut compared) = (0f64, 0usize);
    for (name, expert, g) in &mine {
        let g: &[f32] = if *expert {
            g
        } else {
            at += g.len();
            &dense[at - g.len()..at]
        };
        let want = &reference
            .iter()
            .find(|(n, _, _)| n == name)
            .ok_or_else(|| fail("gradients", format!("{name} has no reference gradient")))?
            .2;
        let scale = want.iter().fold(0f32, |a, &x| a.max(x.abs())).max(1e-12);
        let diff = g
            .iter()
            .zip(want)
            .fold(0f32, |a, (&x, &y)| a.max((x - y).abs()));
        worst = worst.max((diff / scale) as f64);
        compared += 1;
    }
    let expected = reference
        .iter()
        .filter(|(n, expert, _)| !expert || mine.iter().any(|(m, _, _)| m == n))
        .count();
    if compared != expected {
        return Err(fail(
            "gradients",
            format!("rank {r} has {compared} gradients, the reference {expected}"),
        ));
    }
    // f32 sums in another order (the batch split, the exchange): relative 1e-4 of each
    // tensor's largest gradient.
    let mut all = [worst];
    c(world.all_reduce_in_place(&mut all, ReduceOp::Max))?;
    if all[0] > 1e-4 {
        return Err(fail(
            "gradients",
            format!(
                "max relative difference {:.1e} from the single-process gradients",
                all[0]
            ),
        ));
    }
    Ok(format!(
        "gradients under EP {w} (experts split, batch split, dense all-reduced) = single-process \
         gradients of the global batch: max relative difference {:.1e} ({compared} tensors on \
         rank 0)",
        all[0]
    ))
}

/// Parameter values by checkpoint name (placeholders of other ranks' experts left out).
fn params_by_name<B: DsBackend>(m: &DeepseekV3<B>) -> HashMap<String, Vec<f32>> {
    struct Read(Vec<Vec<f32>>);
    impl<B: DsBackend> ModuleVisitor<B> for Read {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            self.0
                .push(p.val().into_data().convert::<f32>().to_vec().expect("f32"));
        }
    }
    let mut r = Read(Vec::new());
    m.visit(&mut r);
    m.param_holdings()
        .into_iter()
        .zip(r.0)
        .filter(|((_, _, holding), _)| *holding != Holding::OtherExpert)
        .map(|((_, name, _), v)| (name, v))
        .collect()
}

/// Four distributed training steps with `ep` × `dp` = W ranks against the single-process steps
/// of the same global batches: losses, gradient norms and every parameter this rank holds.
fn train_steps(
    world: &Arc<dyn Communicator>,
    ep: usize,
    dp: usize,
    seed: u64,
) -> Result<String, CliError> {
    type AD = CpuAutodiff;
    let w = world.size();
    let preset = dsv3_train::preset("tiny").expect("tiny preset");
    let mut cfg = preset.train;
    // One sequence per rank: sparse routing, so experts go without tokens on some steps (the
    // ZeRO-1 partition must not move with them).
    cfg.batch_size = w;
    cfg.seq_len = 24;
    cfg.seed = seed;
    cfg.workers = 1;
    cfg.mtp_lambda = 0.3;
    cfg.warmup_steps = 1;
    cfg.steps = 4;
    let model_cfg: DeepseekV3Config = dsv3_train::for_bytes(preset.model, cfg.seq_len);
    let docs = dsv3_train::data::embedded_documents();
    let data = dsv3_train::data::Dataset::pack(&docs, cfg.seq_len, cfg.val_every)
        .map_err(|e| fail("train", e.to_string()))?;
    let device = Default::default();
    let terr = |e: dsv3_train::TrainError| fail("train", e.to_string());
    let (cfg_steps, lr) = (cfg.steps, cfg.lr);
    let mut single = dsv3_train::Trainer::<AD>::new(&model_cfg, cfg.clone(), data.clone(), &device)
        .map_err(terr)?;
    // Each rank draws only the experts it holds (the others' draws are skipped).
    let par = dsv3_train::Parallel::new(world.clone(), ep).map_err(terr)?;
    let mut dist = dsv3_train::Trainer::<AD>::new_distributed(&model_cfg, cfg, data, &device, par)
        .map_err(terr)?;
    let mut worst = (0f64, 0f64, 0f32);
    for _ in 0..cfg_steps {
        let a = single.train_step().map_err(terr)?;
        let b = dist.train_step().map_err(terr)?;
        let rel = |x: f64, y: f64| (x - y).abs() / x.abs().max(1e-12);
        worst.0 = worst.0.max(rel(a.loss, b.loss));
        worst.1 = worst.1.max(rel(a.grad_norm, b.grad_norm));
    }
    let reference = params_by_name(&single.model);
    let mine = params_by_name(&dist.model);
    for (name, v) in &mine {
        let r = reference
            .get(name)
            .ok_or_else(|| fail("train", format!("{name} missing from the reference")))?;
        for (x, y) in v.iter().zip(r) {
            worst.2 = worst.2.max((x - y).abs());
        }
    }
    // f32 sums in another order: relative 1e-5 on the loss, 1e-4 on the norm. AdamW moves an
    // element by up to lr per step whatever its gradient's size, so an element whose gradient
    // is at rounding level can move differently: allow 2% of lr per step (seen: under 1%; a
    // wrong optimizer state or gradient moves elements by a good part of lr).
    let param_tol = 0.02 * lr * cfg_steps as f64;
    if worst.0 > 1e-5 || worst.1 > 1e-4 || worst.2 as f64 > param_tol {
        return Err(fail(
            "train",
            format!(
                "EP {ep} × DP {dp} on rank {}: loss rel {:.1e}, grad norm rel {:.1e}, params \
                 max |Δ| {:.1e} against the single-process steps",
                world.rank(),
                worst.0,
                worst.1,
                worst.2
            ),
        ));
    }
    let mut worst_all = [worst.0, worst.1, worst.2 as f64];
    c(world.all_reduce_in_place(&mut worst_all, ReduceOp::Max))?;
    Ok(format!(
        "training EP {ep} × DP {dp} (ZeRO-1) = 4 steps of the single-process run: loss rel \
         {:.1e}, grad norm rel {:.1e}, parameters max |Δ| {:.1e} ({} held here)",
        worst_all[0],
        worst_all[1],
        worst_all[2],
        mine.len()
    ))
}

/// One training step of `kind` over every rank of `world` as a pipeline (a tiny model without
/// MTP, `2·PP` layers, `2·PP` micro-batches of 2 sequences) against the sequential step computed
/// here too: each micro-batch's loss, and the gradients summed over the pipeline ranks (for
/// DualPipe: the two copies of each stage), by DualPipe's measure `1 − 2⟨x,y⟩/(|x|²+|y|²)` per
/// tensor.
fn pipeline_check(
    world: &Arc<dyn Communicator>,
    kind: dsv3_train::pipeline::ScheduleKind,
    seed: u64,
) -> Result<String, CliError> {
    use dsv3_train::pipeline::exec::{run_step, StageCut};
    use dsv3_train::pipeline::Schedule;
    use dsv3_train::trainer::{make_batch, objective};
    type AD = CpuAutodiff;
    let what = format!("pipeline {kind}");
    let pp = world.size();
    let preset = dsv3_train::preset("tiny").expect("tiny preset");
    let mut cfg = preset.train;
    cfg.seq_len = 16;
    let mut model_cfg = dsv3_train::for_bytes(preset.model, cfg.seq_len);
    model_cfg.num_nextn_predict_layers = 0;
    model_cfg.num_hidden_layers = (2 * pp).max(3);
    let device = Default::default();
    let merr = |e: dsv3_model::ModelError| fail(&what, e.to_string());
    let model = dsv3_train::init::seeded(
        DeepseekV3::<AD>::init(&model_cfg, &device).map_err(merr)?,
        seed,
    );
    let docs = dsv3_train::data::embedded_documents();
    let data = dsv3_train::data::Dataset::pack(&docs, cfg.seq_len, cfg.val_every)
        .map_err(|e| fail(&what, e.to_string()))?;
    let m = 2 * pp;
    let starts: Vec<usize> = data.train.iter().step_by(5).take(2 * m).copied().collect();
    let batches: Vec<_> = starts
        .chunks(2)
        .map(|s| make_batch::<AD>(&data, s, 0, &device))
        .collect();
    // The sequential reference: one micro-batch after the other, gradients accumulated.
    let mut acc = burn::optim::GradientsAccumulator::<DeepseekV3<AD>>::new();
    let (mut want_loss, mut want_ce) = (Vec::new(), Vec::new());
    for b in &batches {
        let fwd = dsv3_train::forward::forward(&model, b.inputs.clone(), cfg.attention, 0, false);
        let parts = objective(&fwd, b, &cfg);
        want_ce.push(parts.ce.into_scalar() as f64);
        let total = parts.total;
        want_loss.push(total.clone().into_scalar() as f64);
        let g = total.div_scalar(m as f64).backward();
        acc.accumulate(&model, burn::optim::GradientsParams::from_grads(g, &model));
    }
    let reference = grads_by_name(&model, &acc.grads());
    let schedule = Schedule::new(kind, pp, m).map_err(|e| fail(&what, e.to_string()))?;
    let cut = StageCut::even(model_cfg.num_hidden_layers, schedule.stages)
        .map_err(|e| fail(&what, e.to_string()))?;
    let step = run_step(&model, &schedule, &cut, world, &batches, &cfg)
        .map_err(|e| fail(&what, e.to_string()))?;
    let mine = grads_by_name(&model, &step.grads);
    for (name, _, _) in &mine {
        if !reference.iter().any(|(n, _, _)| n == name) {
            return Err(fail(
                &what,
                format!("{name} has a gradient the sequential run has not"),
            ));
        }
    }
    // Every rank lays the reference's tensors out in the same order; the ranks' gradients sum.
    let mut flat: Vec<f32> = Vec::new();
    for (name, _, want) in &reference {
        match mine.iter().find(|(n, _, _)| n == name) {
            Some((_, _, g)) => flat.extend_from_slice(g),
            None => flat.extend(std::iter::repeat_n(0.0, want.len())),
        }
    }
    c(world.all_reduce_in_place(&mut flat, ReduceOp::Sum))?;
    let (mut worst, mut at) = (0f64, 0);
    for (name, _, want) in &reference {
        let got = &flat[at..at + want.len()];
        at += want.len();
        let (mut xy, mut xx, mut yy) = (0f64, 0f64, 0f64);
        for (&x, &y) in got.iter().zip(want) {
            let (x, y) = (f64::from(x), f64::from(y));
            xy += x * y;
            xx += x * x;
            yy += y * y;
        }
        let diff = if xx + yy == 0.0 {
            0.0
        } else {
            1.0 - 2.0 * xy / (xx + yy)
        };
        if diff.is_nan() || diff >= 1e-10 {
            return Err(fail(
                &what,
                format!("{name}: cosine difference {diff:.2e} from the sequential gradient"),
            ));
        }
        worst = worst.max(diff);
    }
    // The CE comes from the same logits: bit for bit. The objective adds the balance losses
    // of every stage, summed per stage then over the ranks (f64) instead of in one f32 sum.
    if step.ce != want_ce {
        return Err(fail(
            &what,
            format!("CE {:?} is not the sequential {want_ce:?}", step.ce),
        ));
    }
    let mut rel = 0f64;
    for (g, w) in step.total.iter().zip(&want_loss) {
        rel = rel.max((g - w).abs() / w.abs().max(1e-30));
    }
    if rel > 1e-6 {
        return Err(fail(
            &what,
            format!(
                "losses {:?} differ from the sequential {want_loss:?}",
                step.total
            ),
        ));
    }
    Ok(format!(
        "pipeline {kind} on {pp} ranks ({} stages, {m} micro-batches): CE bit-identical to the \
         sequential run, objective within {rel:.1e} (relative), gradients cosine difference \
         ≤ {worst:.1e} over {} tensors",
        schedule.stages,
        reference.len()
    ))
}
