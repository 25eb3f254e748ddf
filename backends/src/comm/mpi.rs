//! [`Communicator`] over MPI through the `mpi` crate (rsmpi): the CPU path, and how processes
//! start anywhere (`mpirun -n W dsv3 ...`). MPI is initialised with `MPI_THREAD_SERIALIZED`
//! and every call holds one process-wide lock, so any thread may call (one at a time);
//! Burn's worker threads never do.

use std::sync::{Arc, Mutex, MutexGuard};

use mpi::collective::SystemOperation;
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::Communicator as _;
use mpi::traits::*;
use mpi::Threading;

use super::{
    check_all_gather, check_all_to_all, check_peer, check_reduce_scatter, check_reducible,
    each_buf, each_buf_mut, invalid, type_mismatch, Buf, BufMut, CommError, Communicator, Owned,
    PendingOp, ReduceOp, Request, Traffic, TrafficCounter,
};

/// The MPI environment of the process: finalises MPI when dropped, so keep it alive (declared
/// before, hence dropped after, every communicator) for the whole run.
pub struct MpiRuntime {
    _universe: Universe,
}

impl std::fmt::Debug for MpiRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MpiRuntime")
    }
}

/// A group of MPI processes (the world, or a part of it from [`Communicator::split`]).
pub struct MpiComm {
    comm: Arc<SimpleCommunicator>,
    rank: usize,
    size: usize,
    traffic: TrafficCounter,
}

// SAFETY: the raw MPI handle inside `SimpleCommunicator` is only used under the process-wide
// lock (`PROCESS`, taken by every MPI call of this module), and MPI runs at
// `MPI_THREAD_SERIALIZED` (checked in `MpiRuntime::init`), which allows calls from any thread,
// one at a time in the process.
unsafe impl Send for MpiComm {}
unsafe impl Sync for MpiComm {}

impl std::fmt::Debug for MpiComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MpiComm(rank {} of {})", self.rank, self.size)
    }
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        // Freeing a communicator after MPI_Finalize is an error; the world is never freed.
        if mpi::environment::is_finalized() {
            std::mem::forget(self.comm.clone());
        }
    }
}

impl MpiRuntime {
    /// Initialises MPI (once per process) and returns the environment and the world. A
    /// process started without `mpirun` is a world of one.
    ///
    /// # Errors
    /// [`CommError::Engine`] when MPI was already initialised or cannot give the
    /// `MPI_THREAD_SERIALIZED` level.
    pub fn init() -> Result<(Self, Arc<MpiComm>), CommError> {
        let (universe, level) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| engine("MPI was already initialised in this process".into()))?;
        if level < Threading::Serialized {
            return Err(engine(format!(
                "the MPI library gives thread level {level:?}; MPI_THREAD_SERIALIZED is needed"
            )));
        }
        let world = universe.world();
        let comm = MpiComm::new(world);
        Ok((
            Self {
                _universe: universe,
            },
            Arc::new(comm),
        ))
    }
}

fn engine(detail: String) -> CommError {
    CommError::Engine {
        engine: "MPI",
        detail,
    }
}

fn counts(v: &[usize]) -> Result<(Vec<i32>, Vec<i32>), CommError> {
    let mut displs = Vec::with_capacity(v.len());
    let mut at = 0i64;
    let mut c = Vec::with_capacity(v.len());
    for &n in v {
        if at + n as i64 > i32::MAX as i64 {
            return Err(invalid(
                "all_to_all_v",
                "more than 2^31 values in one exchange".into(),
            ));
        }
        displs.push(at as i32);
        c.push(n as i32);
        at += n as i64;
    }
    Ok((c, displs))
}

/// `MPI_THREAD_SERIALIZED` allows one MPI call at a time in the whole process, whatever the
/// communicator: every call holds this lock.
static PROCESS: Mutex<()> = Mutex::new(());

/// A communicator under the process lock, for one MPI call.
struct Locked<'a> {
    comm: &'a SimpleCommunicator,
    _process: MutexGuard<'static, ()>,
}

impl std::ops::Deref for Locked<'_> {
    type Target = SimpleCommunicator;
    fn deref(&self) -> &SimpleCommunicator {
        self.comm
    }
}

fn lock(comm: &SimpleCommunicator) -> Locked<'_> {
    Locked {
        comm,
        _process: PROCESS.lock().unwrap_or_else(|p| p.into_inner()),
    }
}

fn mpi_op(op: ReduceOp) -> SystemOperation {
    match op {
        ReduceOp::Sum => SystemOperation::sum(),
        ReduceOp::Max => SystemOperation::max(),
        ReduceOp::Min => SystemOperation::min(),
    }
}

/// Runs `$body` with `$s`/`$r` bound to the typed slices of two buffers of the same type.
macro_rules! same_type {
    ($op:expr, $send:expr, $recv:expr, |$s:ident, $r:ident| $body:expr) => {
        match ($send, $recv) {
            (Buf::F32($s), BufMut::F32($r)) => $body,
            (Buf::F64($s), BufMut::F64($r)) => $body,
            (Buf::I32($s), BufMut::I32($r)) => $body,
            (Buf::U16($s), BufMut::U16($r)) => $body,
            (Buf::U8($s), BufMut::U8($r)) => $body,
            (s, r) => return Err(type_mismatch($op, s, r.as_ref())),
        }
    };
}

impl MpiComm {
    fn new(comm: SimpleCommunicator) -> Self {
        let (rank, size) = (comm.rank() as usize, comm.size() as usize);
        Self {
            // Not Send by itself: shared with requests under the lock (see the SAFETY note above).
            #[allow(clippy::arc_with_non_send_sync)]
            comm: Arc::new(comm),
            rank,
            size,
            traffic: TrafficCounter::default(),
        }
    }

    fn lock(&self) -> Locked<'_> {
        lock(&self.comm)
    }

    fn ring_share(&self, bytes: usize) -> u64 {
        (bytes * (self.size - 1) / self.size) as u64
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn engine(&self) -> &'static str {
        "mpi"
    }

    fn split(&self, color: usize, key: usize) -> Result<Arc<dyn Communicator>, CommError> {
        let c = self.lock();
        let sub = c
            .split_by_color_with_key(Color::with_value(color as i32), key as i32)
            .ok_or_else(|| engine(format!("split by color {color} gave no communicator")))?;
        Ok(Arc::new(MpiComm::new(sub)))
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.lock().barrier();
        Ok(())
    }

    fn broadcast(&self, buf: BufMut<'_>, root: usize) -> Result<(), CommError> {
        check_peer("broadcast", root, self.size)?;
        let bytes = buf.len() * buf.as_ref().elem_bytes();
        let c = self.lock();
        let p = c.process_at_rank(root as i32);
        each_buf_mut!(buf, s => p.broadcast_into(s));
        // The root sends, the others receive; a world of one moves nothing.
        let moved = if self.size > 1 { bytes as u64 } else { 0 };
        if self.rank == root {
            self.traffic.add(moved, 0);
        } else {
            self.traffic.add(0, moved);
        }
        Ok(())
    }

    fn all_reduce(&self, buf: BufMut<'_>, op: ReduceOp) -> Result<(), CommError> {
        check_reducible("all_reduce", buf.as_ref())?;
        let bytes = buf.len() * buf.as_ref().elem_bytes();
        let c = self.lock();
        match buf {
            BufMut::F32(s) => {
                let send = s.to_vec();
                c.all_reduce_into(&send[..], s, mpi_op(op));
            }
            BufMut::F64(s) => {
                let send = s.to_vec();
                c.all_reduce_into(&send[..], s, mpi_op(op));
            }
            BufMut::I32(s) => {
                let send = s.to_vec();
                c.all_reduce_into(&send[..], s, mpi_op(op));
            }
            BufMut::U16(_) | BufMut::U8(_) => unreachable!("checked above"),
        }
        let share = 2 * self.ring_share(bytes);
        self.traffic.add(share, share);
        Ok(())
    }

    fn all_gather(&self, send: Buf<'_>, recv: BufMut<'_>) -> Result<(), CommError> {
        check_all_gather(self.size, send, &recv)?;
        let bytes = recv.len() * send.elem_bytes();
        let c = self.lock();
        same_type!("all_gather", send, recv, |s, r| c.all_gather_into(s, r));
        let share = self.ring_share(bytes);
        self.traffic.add(share, share);
        Ok(())
    }

    fn reduce_scatter(
        &self,
        send: Buf<'_>,
        recv: BufMut<'_>,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        check_reduce_scatter(self.size, send, &recv)?;
        let bytes = send.len() * send.elem_bytes();
        let c = self.lock();
        same_type!("reduce_scatter", send, recv, |s, r| c
            .reduce_scatter_block_into(s, r, mpi_op(op)));
        let share = self.ring_share(bytes);
        self.traffic.add(share, share);
        Ok(())
    }

    fn all_to_all_v(
        &self,
        send: Buf<'_>,
        send_counts: &[usize],
        recv: BufMut<'_>,
        recv_counts: &[usize],
    ) -> Result<(), CommError> {
        check_all_to_all(self.size, send, send_counts, &recv, recv_counts)?;
        let eb = send.elem_bytes() as u64;
        let (sc, sd) = counts(send_counts)?;
        let (rc, rd) = counts(recv_counts)?;
        let c = self.lock();
        same_type!("all_to_all_v", send, recv, |s, r| {
            let s = Partition::new(s, sc, &sd[..]);
            let mut r = PartitionMut::new(r, rc, &rd[..]);
            c.all_to_all_varcount_into(&s, &mut r)
        });
        self.traffic
            .add_all_to_all(self.rank, send_counts, recv_counts, eb);
        Ok(())
    }

    fn send(&self, buf: Buf<'_>, dest: usize, tag: u16) -> Result<(), CommError> {
        check_peer("send", dest, self.size)?;
        let bytes = (buf.len() * buf.elem_bytes()) as u64;
        let c = self.lock();
        let p = c.process_at_rank(dest as i32);
        each_buf!(buf, s => p.send_with_tag(s, tag as i32));
        self.traffic.add(bytes, 0);
        Ok(())
    }

    fn recv(&self, buf: BufMut<'_>, src: usize, tag: u16) -> Result<(), CommError> {
        check_peer("recv", src, self.size)?;
        let (want, eb) = (buf.len(), buf.as_ref().elem_bytes());
        let c = self.lock();
        let p = c.process_at_rank(src as i32);
        let status = each_buf_mut!(buf, s => p.receive_into_with_tag(s, tag as i32));
        let got = status.count(match eb {
            8 => f64::equivalent_datatype(),
            4 => f32::equivalent_datatype(),
            2 => u16::equivalent_datatype(),
            _ => u8::equivalent_datatype(),
        }) as usize;
        if got != want {
            return Err(invalid(
                "recv",
                format!("message of {got} values into a buffer of {want}"),
            ));
        }
        self.traffic.add(0, (want * eb) as u64);
        Ok(())
    }

    fn isend(&self, buf: Owned, dest: usize, tag: u16) -> Result<Request, CommError> {
        check_peer("isend", dest, self.size)?;
        let bytes = (buf.as_buf().len() * buf.as_buf().elem_bytes()) as u64;
        let op = Immediate::start(self, buf, dest, tag, true)?;
        self.traffic.add(bytes, 0);
        Ok(Request::new(Box::new(op)))
    }

    fn irecv(&self, buf: Owned, src: usize, tag: u16) -> Result<Request, CommError> {
        check_peer("irecv", src, self.size)?;
        let bytes = (buf.as_buf().len() * buf.as_buf().elem_bytes()) as u64;
        let op = Immediate::start(self, buf, src, tag, false)?;
        self.traffic.add(0, bytes);
        Ok(Request::new(Box::new(op)))
    }

    fn traffic(&self) -> Traffic {
        self.traffic.get()
    }

    fn abort(&self, code: i32) -> ! {
        self.lock().abort(code)
    }
}

/// A non-blocking send or receive through `MPI_Isend` / `MPI_Irecv`: the buffer lives on the
/// heap inside this value (its address does not move) until MPI reports completion; dropping an
/// unfinished one waits for it first.
struct Immediate {
    buf: Option<Owned>,
    request: mpi::ffi::MPI_Request,
    done: bool,
    /// The communicator (its lock is held during each MPI call).
    comm: Arc<SimpleCommunicator>,
}

// SAFETY: the request handle is only touched under the communicator's lock (serialized MPI),
// and the buffer is owned.
unsafe impl Send for Immediate {}

impl Immediate {
    fn start(
        comm: &MpiComm,
        mut buf: Owned,
        peer: usize,
        tag: u16,
        send: bool,
    ) -> Result<Self, CommError> {
        use mpi::raw::AsRaw;
        let guard = comm.lock();
        let raw = guard.as_raw();
        let (ptr, len, dtype) = match &mut buf {
            Owned::F32(v) => (
                v.as_mut_ptr().cast(),
                v.len(),
                f32::equivalent_datatype().as_raw(),
            ),
            Owned::F64(v) => (
                v.as_mut_ptr().cast(),
                v.len(),
                f64::equivalent_datatype().as_raw(),
            ),
            Owned::I32(v) => (
                v.as_mut_ptr().cast(),
                v.len(),
                i32::equivalent_datatype().as_raw(),
            ),
            Owned::U16(v) => (
                v.as_mut_ptr().cast(),
                v.len(),
                u16::equivalent_datatype().as_raw(),
            ),
            Owned::U8(v) => (
                v.as_mut_ptr().cast(),
                v.len(),
                u8::equivalent_datatype().as_raw(),
            ),
        };
        let ptr: *mut std::ffi::c_void = ptr;
        let len = i32::try_from(len).map_err(|_| invalid("isend", "message over 2^31".into()))?;
        let mut request = unsafe { std::mem::zeroed::<mpi::ffi::MPI_Request>() };
        // SAFETY: `ptr` points into the Vec owned by the returned value, which is neither
        // moved (heap memory) nor freed before MPI completes the request.
        let rc = unsafe {
            if send {
                mpi::ffi::MPI_Isend(ptr, len, dtype, peer as i32, tag as i32, raw, &mut request)
            } else {
                mpi::ffi::MPI_Irecv(ptr, len, dtype, peer as i32, tag as i32, raw, &mut request)
            }
        };
        drop(guard);
        if rc != 0 {
            return Err(engine(format!("MPI_Isend/Irecv returned {rc}")));
        }
        Ok(Self {
            buf: Some(buf),
            request,
            done: false,
            comm: comm.comm.clone(),
        })
    }
}

impl PendingOp for Immediate {
    fn test(&mut self) -> Result<bool, CommError> {
        if self.done {
            return Ok(true);
        }
        let _guard = lock(&self.comm);
        let mut flag = 0;
        let rc = unsafe {
            mpi::ffi::MPI_Test(&mut self.request, &mut flag, mpi::ffi::RSMPI_STATUS_IGNORE)
        };
        if rc != 0 {
            return Err(engine(format!("MPI_Test returned {rc}")));
        }
        self.done = flag != 0;
        Ok(self.done)
    }

    fn into_buffer(mut self: Box<Self>) -> Owned {
        self.buf.take().expect("buffer until completion")
    }
}

impl Drop for Immediate {
    fn drop(&mut self) {
        if mpi::environment::is_finalized() {
            // Nothing may call MPI any more: keep the buffer and the communicator alive (leak)
            // rather than free memory MPI might still own or free the communicator late.
            std::mem::forget(self.buf.take());
            std::mem::forget(self.comm.clone());
            return;
        }
        while self.buf.is_some() && !self.done {
            if self.test().is_err() {
                // MPI may still write into the buffer: leak it rather than free it.
                std::mem::forget(self.buf.take());
            }
        }
    }
}
