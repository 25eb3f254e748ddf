//! Communication between the processes of a distributed run: one [`Communicator`] trait over
//! real engines — MPI through the `mpi` crate (feature `mpi`: CPU processes started by
//! `mpirun`, and the bootstrap of everything else) and NCCL through cudarc (feature `nccl`:
//! CUDA buffers, one rank per GPU) — plus [`LocalComm`], the world of one process, so a
//! single-process run goes through the same code.
//!
//! Buffers are host slices of f32, f64, i32, bf16 (as `u16` bits) or e4m3 (as `u8` codes);
//! reductions are defined on f32, f64 and i32 only (a sum of bf16 bit patterns means nothing:
//! widen to f32 first). [`Element`] gives typed forms of the calls ([`CommExt`]).
//!
//! [`RowExchange`] is the tensor-level all-to-all of expert parallelism (DeepSeek-V3 report
//! §3.2.2: dispatch and combine), run by [`crate::DsBackend::all_to_all_rows`] and
//! differentiated under `Autodiff` by the reverse exchange.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "mpi")]
pub use self::mpi::{MpiComm, MpiRuntime};

#[cfg(feature = "nccl")]
pub mod nccl;

/// What can go wrong in a collective.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommError {
    /// Arguments that cannot describe the operation (lengths, counts, ranks).
    #[error("{op}: {detail}")]
    Invalid { op: &'static str, detail: String },
    /// A reduction on a buffer type without arithmetic (bf16 bits, e4m3 codes).
    #[error("{op} cannot reduce {dtype} buffers (widen them to f32 first)")]
    Unsupported {
        op: &'static str,
        dtype: &'static str,
    },
    /// The engine reported an error.
    #[error("{engine}: {detail}")]
    Engine {
        engine: &'static str,
        detail: String,
    },
    /// Ranks issued different collectives (a program error that would otherwise hang or mix
    /// data): e.g. expert exchanges of different layers.
    #[error("ranks disagree: {0}")]
    Mismatch(String),
    /// The build lacks the engine (`--features mpi` / `nccl`).
    #[error("this build has no {0} support: rebuild with `--features {0}`")]
    NotBuilt(&'static str),
}

/// A reduction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
}

/// A read-only host buffer.
#[derive(Debug, Clone, Copy)]
pub enum Buf<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
    I32(&'a [i32]),
    /// bf16 bit patterns.
    U16(&'a [u16]),
    /// e4m3 codes (or any bytes).
    U8(&'a [u8]),
}

/// A writable host buffer.
#[derive(Debug)]
pub enum BufMut<'a> {
    F32(&'a mut [f32]),
    F64(&'a mut [f64]),
    I32(&'a mut [i32]),
    U16(&'a mut [u16]),
    U8(&'a mut [u8]),
}

/// An owned host buffer (what a non-blocking operation holds until it completes).
#[derive(Debug, Clone, PartialEq)]
pub enum Owned {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I32(Vec<i32>),
    U16(Vec<u16>),
    U8(Vec<u8>),
}

/// Runs `$body` with `$s` bound to the typed slice of a [`Buf`].
macro_rules! each_buf {
    ($v:expr, $s:ident => $body:expr) => {
        match $v {
            Buf::F32($s) => $body,
            Buf::F64($s) => $body,
            Buf::I32($s) => $body,
            Buf::U16($s) => $body,
            Buf::U8($s) => $body,
        }
    };
}

/// Runs `$body` with `$s` bound to the typed slice of a [`BufMut`].
#[cfg_attr(not(feature = "mpi"), allow(unused_macros))]
macro_rules! each_buf_mut {
    ($v:expr, $s:ident => $body:expr) => {
        match $v {
            BufMut::F32($s) => $body,
            BufMut::F64($s) => $body,
            BufMut::I32($s) => $body,
            BufMut::U16($s) => $body,
            BufMut::U8($s) => $body,
        }
    };
}
#[cfg_attr(not(feature = "mpi"), allow(unused_imports))]
pub(crate) use {each_buf, each_buf_mut};

impl Buf<'_> {
    pub fn len(&self) -> usize {
        each_buf!(self, s => s.len())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes per element.
    pub fn elem_bytes(&self) -> usize {
        match self {
            Buf::F64(_) => 8,
            Buf::F32(_) | Buf::I32(_) => 4,
            Buf::U16(_) => 2,
            Buf::U8(_) => 1,
        }
    }
    pub fn dtype(&self) -> &'static str {
        match self {
            Buf::F32(_) => "f32",
            Buf::F64(_) => "f64",
            Buf::I32(_) => "i32",
            Buf::U16(_) => "bf16",
            Buf::U8(_) => "u8",
        }
    }
}

impl<'a> BufMut<'a> {
    pub fn len(&self) -> usize {
        self.as_ref().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A read-only view of the same memory.
    pub fn as_ref(&self) -> Buf<'_> {
        match self {
            BufMut::F32(s) => Buf::F32(s),
            BufMut::F64(s) => Buf::F64(s),
            BufMut::I32(s) => Buf::I32(s),
            BufMut::U16(s) => Buf::U16(s),
            BufMut::U8(s) => Buf::U8(s),
        }
    }
    /// Copies `src` (same type and length) into this buffer.
    fn copy_from(&mut self, op: &'static str, src: Buf<'_>) -> Result<(), CommError> {
        if src.len() != self.len() {
            return Err(invalid(
                op,
                format!("{} values into {}", src.len(), self.len()),
            ));
        }
        match (self, src) {
            (BufMut::F32(d), Buf::F32(s)) => d.copy_from_slice(s),
            (BufMut::F64(d), Buf::F64(s)) => d.copy_from_slice(s),
            (BufMut::I32(d), Buf::I32(s)) => d.copy_from_slice(s),
            (BufMut::U16(d), Buf::U16(s)) => d.copy_from_slice(s),
            (BufMut::U8(d), Buf::U8(s)) => d.copy_from_slice(s),
            (d, s) => return Err(type_mismatch(op, s, d.as_ref())),
        }
        Ok(())
    }
}

impl Owned {
    pub fn as_buf(&self) -> Buf<'_> {
        match self {
            Owned::F32(v) => Buf::F32(v),
            Owned::F64(v) => Buf::F64(v),
            Owned::I32(v) => Buf::I32(v),
            Owned::U16(v) => Buf::U16(v),
            Owned::U8(v) => Buf::U8(v),
        }
    }
    pub fn as_buf_mut(&mut self) -> BufMut<'_> {
        match self {
            Owned::F32(v) => BufMut::F32(v),
            Owned::F64(v) => BufMut::F64(v),
            Owned::I32(v) => BufMut::I32(v),
            Owned::U16(v) => BufMut::U16(v),
            Owned::U8(v) => BufMut::U8(v),
        }
    }
}

pub(crate) fn invalid(op: &'static str, detail: String) -> CommError {
    CommError::Invalid { op, detail }
}

pub(crate) fn type_mismatch(op: &'static str, a: Buf<'_>, b: Buf<'_>) -> CommError {
    invalid(
        op,
        format!(
            "send buffer is {} but receive buffer is {}",
            a.dtype(),
            b.dtype()
        ),
    )
}

mod sealed {
    pub trait Sealed {}
}

/// A buffer element type the communicators carry.
pub trait Element: Copy + Default + Send + Sync + 'static + sealed::Sealed {
    fn buf(s: &[Self]) -> Buf<'_>;
    fn buf_mut(s: &mut [Self]) -> BufMut<'_>;
    fn owned(v: Vec<Self>) -> Owned;
    fn from_owned(o: Owned) -> Option<Vec<Self>>;
}

macro_rules! element {
    ($t:ty, $v:ident) => {
        impl sealed::Sealed for $t {}
        impl Element for $t {
            fn buf(s: &[Self]) -> Buf<'_> {
                Buf::$v(s)
            }
            fn buf_mut(s: &mut [Self]) -> BufMut<'_> {
                BufMut::$v(s)
            }
            fn owned(v: Vec<Self>) -> Owned {
                Owned::$v(v)
            }
            fn from_owned(o: Owned) -> Option<Vec<Self>> {
                match o {
                    Owned::$v(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
element!(f32, F32);
element!(f64, F64);
element!(i32, I32);
element!(u16, U16);
element!(u8, U8);

/// Bytes this rank put on the wire and took off it (to and from other ranks), counted as the
/// standard algorithms move them: all-to-all and point-to-point exactly (the rank's own part
/// excluded), ring all-reduce `2(n−1)/n` of the buffer, all-gather and reduce-scatter `(n−1)/n`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub sent_bytes: u64,
    pub recv_bytes: u64,
}

impl std::ops::Sub for Traffic {
    type Output = Traffic;
    fn sub(self, o: Traffic) -> Traffic {
        Traffic {
            sent_bytes: self.sent_bytes - o.sent_bytes,
            recv_bytes: self.recv_bytes - o.recv_bytes,
        }
    }
}

/// The counters behind [`Communicator::traffic`].
#[derive(Debug, Default)]
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub(crate) struct TrafficCounter {
    sent: AtomicU64,
    recv: AtomicU64,
}

#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
impl TrafficCounter {
    pub(crate) fn add(&self, sent: u64, recv: u64) {
        self.sent.fetch_add(sent, Ordering::Relaxed);
        self.recv.fetch_add(recv, Ordering::Relaxed);
    }
    /// Counts an all-to-all of `me`: the values it sends to and receives from the other
    /// members (its own block stays in memory), `elem_bytes` each.
    pub(crate) fn add_all_to_all(
        &self,
        me: usize,
        send_counts: &[usize],
        recv_counts: &[usize],
        elem_bytes: u64,
    ) {
        let (sent, recv) = (
            to_others(send_counts, me) as u64,
            to_others(recv_counts, me) as u64,
        );
        self.add(sent * elem_bytes, recv * elem_bytes);
    }

    pub(crate) fn get(&self) -> Traffic {
        Traffic {
            sent_bytes: self.sent.load(Ordering::Relaxed),
            recv_bytes: self.recv.load(Ordering::Relaxed),
        }
    }
}

/// A non-blocking operation in flight; it owns its buffer until it completes.
pub trait PendingOp: Send {
    /// Whether it has completed (never blocks).
    fn test(&mut self) -> Result<bool, CommError>;
    /// The buffer back (for a receive: the received values). Only after `test` said done.
    fn into_buffer(self: Box<Self>) -> Owned;
}

/// Handle of a non-blocking send or receive ([`Communicator::isend`], [`Communicator::irecv`]).
pub struct Request(Box<dyn PendingOp>);

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Request")
    }
}

impl Request {
    pub fn new(op: Box<dyn PendingOp>) -> Self {
        Self(op)
    }
    /// Whether the operation has completed (never blocks).
    ///
    /// # Errors
    /// What the engine reports.
    pub fn test(&mut self) -> Result<bool, CommError> {
        self.0.test()
    }
    /// Blocks until the operation completes and returns its buffer (a receive's values).
    ///
    /// # Errors
    /// What the engine reports.
    pub fn wait(mut self) -> Result<Owned, CommError> {
        while !self.0.test()? {
            std::thread::yield_now();
        }
        Ok(self.0.into_buffer())
    }
}

/// A group of processes (ranks `0..size`) and the collectives among them. Every member must
/// issue the same collectives in the same order; point-to-point calls pair by `(peer, tag)`.
///
/// Implementations: [`LocalComm`] (one process), `MpiComm` (feature `mpi`), `nccl::NcclComm`
/// (feature `nccl`).
pub trait Communicator: Send + Sync + std::fmt::Debug {
    /// This process's index in the group.
    fn rank(&self) -> usize;
    /// Number of processes in the group.
    fn size(&self) -> usize;
    /// The engine's name (`"local"`, `"mpi"`, `"nccl"`).
    fn engine(&self) -> &'static str;
    /// Splits the group: members with the same `color` form a new group, ranked by `key`
    /// (ties by the old rank). Collective over this group.
    ///
    /// # Errors
    /// What the engine reports.
    fn split(&self, color: usize, key: usize) -> Result<Arc<dyn Communicator>, CommError>;
    /// Waits until every member reaches it.
    ///
    /// # Errors
    /// What the engine reports.
    fn barrier(&self) -> Result<(), CommError>;
    /// Copies `root`'s buffer into everyone's.
    ///
    /// # Errors
    /// [`CommError::Invalid`] for `root >= size`; what the engine reports.
    fn broadcast(&self, buf: BufMut<'_>, root: usize) -> Result<(), CommError>;
    /// Element-wise reduction over all members, result in every member's `buf`.
    ///
    /// # Errors
    /// [`CommError::Unsupported`] on bf16/u8 buffers; what the engine reports.
    fn all_reduce(&self, buf: BufMut<'_>, op: ReduceOp) -> Result<(), CommError>;
    /// Every member's `send` (equal lengths), concatenated in rank order into `recv`
    /// (`size × send.len()`).
    ///
    /// # Errors
    /// [`CommError::Invalid`] for mismatched lengths or types; what the engine reports.
    fn all_gather(&self, send: Buf<'_>, recv: BufMut<'_>) -> Result<(), CommError>;
    /// `send` (`size × recv.len()`) reduced element-wise over members; member `r` receives
    /// block `r`.
    ///
    /// # Errors
    /// As [`Self::all_gather`] and [`Self::all_reduce`].
    fn reduce_scatter(
        &self,
        send: Buf<'_>,
        recv: BufMut<'_>,
        op: ReduceOp,
    ) -> Result<(), CommError>;
    /// Variable-count all-to-all: `send` holds `send_counts[p]` values for each member `p` in
    /// rank order; `recv` receives `recv_counts[p]` values from each `p` in rank order. The
    /// counts must agree pairwise (exchange them first, [`CommExt::exchange_counts`]).
    ///
    /// # Errors
    /// [`CommError::Invalid`] when counts do not have `size` entries or do not sum to the
    /// buffers' lengths; what the engine reports.
    fn all_to_all_v(
        &self,
        send: Buf<'_>,
        send_counts: &[usize],
        recv: BufMut<'_>,
        recv_counts: &[usize],
    ) -> Result<(), CommError>;
    /// Blocking send to `dest`.
    ///
    /// # Errors
    /// [`CommError::Invalid`] for `dest >= size`; what the engine reports.
    fn send(&self, buf: Buf<'_>, dest: usize, tag: u16) -> Result<(), CommError>;
    /// Blocking receive from `src` into `buf` (the message must have `buf.len()` values).
    ///
    /// # Errors
    /// As [`Self::send`].
    fn recv(&self, buf: BufMut<'_>, src: usize, tag: u16) -> Result<(), CommError>;
    /// Non-blocking send; the buffer comes back from [`Request::wait`]. The default completes
    /// before returning (a blocking [`Self::send`]), for engines with no progress of their own
    /// (a world of one, NCCL): two ranks that each `isend` to the other before posting their
    /// receive then wait forever; exchange with [`Self::all_to_all_v`] instead.
    ///
    /// # Errors
    /// As [`Self::send`].
    fn isend(&self, buf: Owned, dest: usize, tag: u16) -> Result<Request, CommError> {
        self.send(buf.as_buf(), dest, tag)?;
        Ok(Request::new(Box::new(Done(buf))))
    }
    /// Non-blocking receive into `buf` (its length is the message's); the values come back
    /// from [`Request::wait`]. The default completes before returning, as [`Self::isend`].
    ///
    /// # Errors
    /// As [`Self::send`].
    fn irecv(&self, mut buf: Owned, src: usize, tag: u16) -> Result<Request, CommError> {
        self.recv(buf.as_buf_mut(), src, tag)?;
        Ok(Request::new(Box::new(Done(buf))))
    }
    /// Bytes moved so far by this member (see [`Traffic`]).
    fn traffic(&self) -> Traffic;
    /// Ends every member's process with `code` (after an error on one rank the others would
    /// wait in their next collective forever).
    fn abort(&self, code: i32) -> !;
}

/// Typed forms of the [`Communicator`] calls.
pub trait CommExt {
    /// In-place all-reduce of a typed slice.
    ///
    /// # Errors
    /// As [`Communicator::all_reduce`].
    fn all_reduce_in_place<T: Element>(&self, v: &mut [T], op: ReduceOp) -> Result<(), CommError>;
    /// Every member's `v` concatenated in rank order.
    ///
    /// # Errors
    /// As [`Communicator::all_gather`].
    fn all_gather_vec<T: Element>(&self, v: &[T]) -> Result<Vec<T>, CommError>;
    /// Tells each peer how many items this member will send it; returns how many it will
    /// receive from each. `tag` must be equal on every member (it names the exchange, e.g. the
    /// layer): a difference is a [`CommError::Mismatch`] instead of mixed-up data.
    ///
    /// # Errors
    /// [`CommError::Mismatch`]; as [`Communicator::all_to_all_v`].
    fn exchange_counts(&self, send_counts: &[usize], tag: u64) -> Result<Vec<usize>, CommError>;
    /// Whether every member succeeded (`ok`) at the agreement point named `point`: one small
    /// all-reduce. Members that stopped at different points (one failed early, say) get
    /// [`CommError::Mismatch`] instead of pairing the wrong calls.
    ///
    /// # Errors
    /// [`CommError::Mismatch`]; what the all-reduce returns.
    fn agree_at(&self, ok: bool, point: &str) -> Result<bool, CommError>;
    /// [`Communicator::all_to_all_v`] of typed values into a new vector.
    ///
    /// # Errors
    /// As [`Communicator::all_to_all_v`].
    fn all_to_all_v_vec<T: Element>(
        &self,
        send: &[T],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<T>, CommError>;
}

impl<C: Communicator + ?Sized> CommExt for C {
    fn all_reduce_in_place<T: Element>(&self, v: &mut [T], op: ReduceOp) -> Result<(), CommError> {
        self.all_reduce(T::buf_mut(v), op)
    }

    fn all_gather_vec<T: Element>(&self, v: &[T]) -> Result<Vec<T>, CommError> {
        let mut out = vec![T::default(); v.len() * self.size()];
        self.all_gather(T::buf(v), T::buf_mut(&mut out))?;
        Ok(out)
    }

    fn agree_at(&self, ok: bool, point: &str) -> Result<bool, CommError> {
        // FNV-1a of the name, 31 bits, so that its negation fits (min of tag and of −tag).
        let tag = point.bytes().fold(0x811c_9dc5u32, |h, b| {
            (h ^ b as u32).wrapping_mul(0x0100_0193)
        }) as i32
            & i32::MAX;
        let mut v = [ok as i32, tag, -tag];
        self.all_reduce_in_place(&mut v, ReduceOp::Min)?;
        if v[1] != -v[2] {
            return Err(CommError::Mismatch(format!(
                "rank {} reached {point:?} while another rank was at another agreement point",
                self.rank()
            )));
        }
        Ok(v[0] == 1)
    }

    fn exchange_counts(&self, send_counts: &[usize], tag: u64) -> Result<Vec<usize>, CommError> {
        let n = self.size();
        if send_counts.len() != n {
            return Err(invalid(
                "exchange_counts",
                format!("{} counts for {n} ranks", send_counts.len()),
            ));
        }
        // Each peer gets [count, tag low, tag high].
        let mut send = Vec::with_capacity(3 * n);
        for &c in send_counts {
            let c = i32::try_from(c)
                .map_err(|_| invalid("exchange_counts", format!("count {c} exceeds i32")))?;
            send.extend([c, tag as u32 as i32, (tag >> 32) as u32 as i32]);
        }
        let threes = vec![3; n];
        let recv = self.all_to_all_v_vec(&send, &threes, &threes)?;
        let mut counts = Vec::with_capacity(n);
        for (p, r) in recv.chunks(3).enumerate() {
            let theirs = (r[1] as u32 as u64) | ((r[2] as u32 as u64) << 32);
            if theirs != tag {
                return Err(CommError::Mismatch(format!(
                    "rank {} is in exchange {tag} but rank {p} in exchange {theirs}",
                    self.rank()
                )));
            }
            counts.push(r[0] as usize);
        }
        Ok(counts)
    }

    fn all_to_all_v_vec<T: Element>(
        &self,
        send: &[T],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<T>, CommError> {
        let mut out = vec![T::default(); recv_counts.iter().sum()];
        self.all_to_all_v(T::buf(send), send_counts, T::buf_mut(&mut out), recv_counts)?;
        Ok(out)
    }
}

/// The sum of per-member `counts` without member `me`'s own.
pub(crate) fn to_others(counts: &[usize], me: usize) -> usize {
    counts
        .iter()
        .enumerate()
        .filter(|(p, _)| *p != me)
        .map(|(_, c)| c)
        .sum()
}

/// Checks an all-to-all's counts against its buffers (shared by the implementations).
pub(crate) fn check_all_to_all(
    size: usize,
    send: Buf<'_>,
    send_counts: &[usize],
    recv: &BufMut<'_>,
    recv_counts: &[usize],
) -> Result<(), CommError> {
    let op = "all_to_all_v";
    if send_counts.len() != size || recv_counts.len() != size {
        return Err(invalid(
            op,
            format!(
                "{} send and {} receive counts for {size} ranks",
                send_counts.len(),
                recv_counts.len()
            ),
        ));
    }
    if send_counts.iter().sum::<usize>() != send.len()
        || recv_counts.iter().sum::<usize>() != recv.len()
    {
        return Err(invalid(
            op,
            format!(
                "counts sum to {} / {} but the buffers hold {} / {}",
                send_counts.iter().sum::<usize>(),
                recv_counts.iter().sum::<usize>(),
                send.len(),
                recv.len()
            ),
        ));
    }
    if send.dtype() != recv.as_ref().dtype() {
        return Err(type_mismatch(op, send, recv.as_ref()));
    }
    Ok(())
}

/// Checks an all-gather's buffers: `recv` holds `size` times `send`, of the same type.
pub(crate) fn check_all_gather(
    size: usize,
    send: Buf<'_>,
    recv: &BufMut<'_>,
) -> Result<(), CommError> {
    let op = "all_gather";
    if recv.len() != send.len() * size {
        return Err(invalid(
            op,
            format!(
                "{} values from each of {size} ranks into {}",
                send.len(),
                recv.len()
            ),
        ));
    }
    if send.dtype() != recv.as_ref().dtype() {
        return Err(type_mismatch(op, send, recv.as_ref()));
    }
    Ok(())
}

/// Checks a reduce-scatter's buffers: a reducible type, `send` holds `size` times `recv`.
pub(crate) fn check_reduce_scatter(
    size: usize,
    send: Buf<'_>,
    recv: &BufMut<'_>,
) -> Result<(), CommError> {
    let op = "reduce_scatter";
    check_reducible(op, send)?;
    if send.len() != recv.len() * size {
        return Err(invalid(
            op,
            format!(
                "{} values for {size} ranks of {} each",
                send.len(),
                recv.len()
            ),
        ));
    }
    if send.dtype() != recv.as_ref().dtype() {
        return Err(type_mismatch(op, send, recv.as_ref()));
    }
    Ok(())
}

/// Rejects reductions on types without arithmetic.
pub(crate) fn check_reducible(op: &'static str, b: Buf<'_>) -> Result<(), CommError> {
    match b {
        Buf::U16(_) | Buf::U8(_) => Err(CommError::Unsupported {
            op,
            dtype: b.dtype(),
        }),
        _ => Ok(()),
    }
}

/// Messages a member sends to itself, waiting for the matching receive (by tag): how a
/// communicator serves point-to-point calls to its own rank without the engine.
#[derive(Debug, Default)]
pub(crate) struct SelfQueue(Mutex<VecDeque<(u16, Owned)>>);

impl SelfQueue {
    pub(crate) fn push(&self, tag: u16, buf: Buf<'_>) {
        let copy = match buf {
            Buf::F32(s) => Owned::F32(s.to_vec()),
            Buf::F64(s) => Owned::F64(s.to_vec()),
            Buf::I32(s) => Owned::I32(s.to_vec()),
            Buf::U16(s) => Owned::U16(s.to_vec()),
            Buf::U8(s) => Owned::U8(s.to_vec()),
        };
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((tag, copy));
    }

    /// Moves the oldest message with `tag` into `buf` (same type and length; a message that
    /// does not fit stays queued).
    pub(crate) fn take_into(
        &self,
        op: &'static str,
        tag: u16,
        mut buf: BufMut<'_>,
    ) -> Result<(), CommError> {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let pos = q.iter().position(|(t, _)| *t == tag).ok_or_else(|| {
            invalid(
                op,
                format!(
                    "no message with tag {tag} was sent by this rank to itself (it would wait \
                     forever)"
                ),
            )
        })?;
        buf.copy_from(op, q[pos].1.as_buf())?;
        q.remove(pos);
        Ok(())
    }
}

/// The group of one process: every collective is a copy, sends to self are queued for the
/// matching receive. What a run without `mpirun` uses, through the same code as a real group.
#[derive(Debug, Default)]
pub struct LocalComm {
    queue: SelfQueue,
}

impl LocalComm {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
}

pub(crate) fn check_peer(op: &'static str, peer: usize, size: usize) -> Result<(), CommError> {
    if peer >= size {
        return Err(invalid(op, format!("rank {peer} of a group of {size}")));
    }
    Ok(())
}

/// A request that completed when it was made.
struct Done(Owned);

impl PendingOp for Done {
    fn test(&mut self) -> Result<bool, CommError> {
        Ok(true)
    }
    fn into_buffer(self: Box<Self>) -> Owned {
        self.0
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn engine(&self) -> &'static str {
        "local"
    }
    fn split(&self, _color: usize, _key: usize) -> Result<Arc<dyn Communicator>, CommError> {
        Ok(LocalComm::new())
    }
    fn barrier(&self) -> Result<(), CommError> {
        Ok(())
    }
    fn broadcast(&self, _buf: BufMut<'_>, root: usize) -> Result<(), CommError> {
        check_peer("broadcast", root, 1)
    }
    fn all_reduce(&self, buf: BufMut<'_>, _op: ReduceOp) -> Result<(), CommError> {
        check_reducible("all_reduce", buf.as_ref())
    }
    fn all_gather(&self, send: Buf<'_>, mut recv: BufMut<'_>) -> Result<(), CommError> {
        check_all_gather(1, send, &recv)?;
        recv.copy_from("all_gather", send)
    }
    fn reduce_scatter(
        &self,
        send: Buf<'_>,
        mut recv: BufMut<'_>,
        _op: ReduceOp,
    ) -> Result<(), CommError> {
        check_reduce_scatter(1, send, &recv)?;
        recv.copy_from("reduce_scatter", send)
    }
    fn all_to_all_v(
        &self,
        send: Buf<'_>,
        send_counts: &[usize],
        mut recv: BufMut<'_>,
        recv_counts: &[usize],
    ) -> Result<(), CommError> {
        check_all_to_all(1, send, send_counts, &recv, recv_counts)?;
        recv.copy_from("all_to_all_v", send)
    }
    fn send(&self, buf: Buf<'_>, dest: usize, tag: u16) -> Result<(), CommError> {
        check_peer("send", dest, 1)?;
        self.queue.push(tag, buf);
        Ok(())
    }
    fn recv(&self, buf: BufMut<'_>, src: usize, tag: u16) -> Result<(), CommError> {
        check_peer("recv", src, 1)?;
        self.queue.take_into("recv", tag, buf)
    }
    fn traffic(&self) -> Traffic {
        Traffic::default()
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// One all-to-all of tensor rows: this rank sends `send_rows[p]` rows to each member `p` (rows
/// sorted by destination) and receives `recv_rows[p]` from each. Its gradient is the reverse
/// exchange ([`Self::reversed`]).
#[derive(Clone, Debug)]
pub struct RowExchange {
    pub comm: Arc<dyn Communicator>,
    pub send_rows: Vec<usize>,
    pub recv_rows: Vec<usize>,
}

impl RowExchange {
    /// The exchange that sends back what this one brought (combine after dispatch, and the
    /// backward of either).
    pub fn reversed(&self) -> Self {
        Self {
            comm: self.comm.clone(),
            send_rows: self.recv_rows.clone(),
            recv_rows: self.send_rows.clone(),
        }
    }

    /// Rows sent to and received from other members (the rank's own rows stay in memory).
    pub fn remote_rows(&self) -> (usize, usize) {
        let me = self.comm.rank();
        (
            to_others(&self.send_rows, me),
            to_others(&self.recv_rows, me),
        )
    }

    /// Moves `x` (`[Σ send_rows, width]`, row-major) to the receivers; returns the
    /// `[Σ recv_rows, width]` rows this member receives.
    ///
    /// # Errors
    /// As [`Communicator::all_to_all_v`].
    pub fn run<T: Element>(&self, x: &[T], width: usize) -> Result<Vec<T>, CommError> {
        let scale = |v: &[usize]| v.iter().map(|r| r * width).collect::<Vec<_>>();
        self.comm
            .all_to_all_v_vec(x, &scale(&self.send_rows), &scale(&self.recv_rows))
    }
}
