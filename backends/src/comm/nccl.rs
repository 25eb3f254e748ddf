//! [`Communicator`] over NCCL through cudarc: one rank per GPU, bootstrapped over another
//! communicator (rank 0 makes the NCCL unique id and broadcasts it: MPI across processes, a
//! `LocalComm` for one rank).
//!
//! Two ways in:
//! - the trait's host-buffer calls, which stage through the GPU: copy to device memory, run the
//!   NCCL operation on the communicator's own stream, wait for it, copy back. Correct anywhere,
//!   but each call pays two copies and a synchronisation; they are there so that code written
//!   against [`Communicator`] runs unchanged on NCCL.
//! - the device-pointer calls ([`NcclComm::all_reduce_device`],
//!   [`NcclComm::all_to_all_v_device`]) on CUDA memory, e.g. a Burn CUDA tensor's buffer from
//!   [`cuda_tensor_ptr`]. They run on the communicator's stream and wait for it before returning;
//!   the caller must first wait for the work that wrote the buffer (`Backend::sync`), since
//!   Burn's streams are private to CubeCL.
//!
//! NCCL has no tags and no unsigned 16-bit type: bf16 bit patterns (`u16`) travel as bytes (they
//! cannot be reduced anyway, see [`Communicator::all_reduce`]), and point-to-point messages
//! between two ranks match in the order they are issued, whatever their tags. Messages a rank
//! sends to itself never reach NCCL: they wait in a host queue for the matching receive (by
//! tag), as in [`super::LocalComm`].
//!
//! libnccl is opened at the first NCCL call. cudarc looks for `libnccl.so` (not `libnccl.so.2`,
//! the name NCCL installs): put a `libnccl.so` link on `LD_LIBRARY_PATH` when only
//! `libnccl.so.2` is there (`scripts/gpu-check.sh` does).

use std::ffi::c_int;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use cudarc::nccl::{result, sys};

use super::{
    check_all_gather, check_all_to_all, check_peer, check_reduce_scatter, check_reducible, invalid,
    Buf, BufMut, CommError, Communicator, ReduceOp, SelfQueue, Traffic, TrafficCounter,
};

/// Element type of device memory handed to the device-pointer calls. Unlike host buffers, bf16
/// and f16 reduce here: NCCL adds them as numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceDtype {
    F32,
    F64,
    I32,
    Bf16,
    F16,
    U8,
}

impl DeviceDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DeviceDtype::F64 => 8,
            DeviceDtype::F32 | DeviceDtype::I32 => 4,
            DeviceDtype::Bf16 | DeviceDtype::F16 => 2,
            DeviceDtype::U8 => 1,
        }
    }

    fn nccl(self) -> sys::ncclDataType_t {
        match self {
            DeviceDtype::F32 => sys::ncclDataType_t::ncclFloat32,
            DeviceDtype::F64 => sys::ncclDataType_t::ncclFloat64,
            DeviceDtype::I32 => sys::ncclDataType_t::ncclInt32,
            DeviceDtype::Bf16 => sys::ncclDataType_t::ncclBfloat16,
            DeviceDtype::F16 => sys::ncclDataType_t::ncclFloat16,
            DeviceDtype::U8 => sys::ncclDataType_t::ncclUint8,
        }
    }
}

fn engine(detail: String) -> CommError {
    CommError::Engine {
        engine: "NCCL",
        detail,
    }
}

fn nccl_err(call: &str, e: result::NcclError) -> CommError {
    engine(format!("{call} returned {:?}", e.0))
}

fn cuda_err(call: &str, e: cudarc::driver::DriverError) -> CommError {
    engine(format!("{call}: CUDA error {e:?}"))
}

fn nccl_op(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
        ReduceOp::Min => sys::ncclRedOp_t::ncclMin,
    }
}

fn to_c_int(what: &'static str, v: usize) -> Result<c_int, CommError> {
    c_int::try_from(v).map_err(|_| invalid(what, format!("{v} does not fit a C int")))
}

/// How a host buffer travels: NCCL type and bytes per NCCL element.
fn wire(b: Buf<'_>) -> (sys::ncclDataType_t, usize) {
    match b {
        Buf::F32(_) => (sys::ncclDataType_t::ncclFloat32, 4),
        Buf::F64(_) => (sys::ncclDataType_t::ncclFloat64, 8),
        Buf::I32(_) => (sys::ncclDataType_t::ncclInt32, 4),
        Buf::U16(_) | Buf::U8(_) => (sys::ncclDataType_t::ncclUint8, 1),
    }
}

/// The bytes of a host buffer.
fn bytes<'a>(b: Buf<'a>) -> &'a [u8] {
    fn cast<T>(s: &[T]) -> &[u8] {
        // SAFETY: only called on f32/f64/i32/u16/u8 slices: no padding, every byte initialised;
        // u8 has alignment 1 and the length covers exactly the slice's memory.
        unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), std::mem::size_of_val(s)) }
    }
    match b {
        Buf::F32(s) => cast(s),
        Buf::F64(s) => cast(s),
        Buf::I32(s) => cast(s),
        Buf::U16(s) => cast(s),
        Buf::U8(s) => s,
    }
}

/// The bytes of a writable host buffer.
fn bytes_mut<'a>(b: BufMut<'a>) -> &'a mut [u8] {
    fn cast<T>(s: &mut [T]) -> &mut [u8] {
        // SAFETY: only called on f32/f64/i32/u16/u8 slices, for which every bit pattern is a
        // valid value, so any bytes written through the view leave valid elements; no padding,
        // alignment 1, and the exclusive borrow is carried over.
        unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), std::mem::size_of_val(s)) }
    }
    match b {
        BufMut::F32(s) => cast(s),
        BufMut::F64(s) => cast(s),
        BufMut::I32(s) => cast(s),
        BufMut::U16(s) => cast(s),
        BufMut::U8(s) => s,
    }
}

/// The NCCL communicator and the stream its operations run on.
struct Inner {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Every operation was waited for, so destroying cannot block on pending work; an error
        // here has nobody to report to.
        // SAFETY: `comm` came from ncclCommInitRank / ncclCommSplit and is freed only here.
        let _ = unsafe { result::comm_destroy(self.comm) };
    }
}

impl Inner {
    fn cu_stream(&self) -> sys::cudaStream_t {
        self.stream.cu_stream() as sys::cudaStream_t
    }

    fn bind(&self) -> Result<(), CommError> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| cuda_err("binding the CUDA context", e))
    }

    fn synchronize(&self) -> Result<(), CommError> {
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("stream synchronize", e))
    }

    /// Device memory holding `src` (at least one byte: CUDA refuses empty allocations).
    fn upload(&self, src: &[u8]) -> Result<CudaSlice<u8>, CommError> {
        let mut d = self.alloc(src.len())?;
        if !src.is_empty() {
            self.stream
                .memcpy_htod(src, &mut d)
                .map_err(|e| cuda_err("copy to device", e))?;
        }
        Ok(d)
    }

    /// Uninitialised device memory for `n` bytes (at least one).
    fn alloc(&self, n: usize) -> Result<CudaSlice<u8>, CommError> {
        // SAFETY: the memory is only read after NCCL or a copy has written it.
        unsafe { self.stream.alloc::<u8>(n.max(1)) }.map_err(|e| cuda_err("device allocation", e))
    }

    /// Waits for the stream, then copies the first `dst.len()` bytes of `src` back.
    fn download(&self, src: &CudaSlice<u8>, dst: &mut [u8]) -> Result<(), CommError> {
        self.synchronize()?;
        if !dst.is_empty() {
            self.stream
                .memcpy_dtoh(&src.slice(..dst.len()), dst)
                .map_err(|e| cuda_err("copy to host", e))?;
            self.synchronize()?;
        }
        Ok(())
    }

    fn ptr(&self, d: &CudaSlice<u8>) -> u64 {
        // Everything runs on this one stream and is waited for, so cudarc's event records
        // (the guard) are not needed past this point.
        let (p, _guard) = d.device_ptr(&self.stream);
        p
    }

    /// Variable all-to-all on device memory: counts in NCCL elements of `wbytes` bytes. The
    /// rank's own block is a device copy; the others are one NCCL group of sends and receives.
    #[allow(clippy::too_many_arguments)]
    unsafe fn all_to_all_raw(
        &self,
        me: usize,
        send: u64,
        send_counts: &[usize],
        recv: u64,
        recv_counts: &[usize],
        dt: sys::ncclDataType_t,
        wbytes: usize,
    ) -> Result<(), CommError> {
        let offsets = |c: &[usize]| {
            c.iter()
                .scan(0usize, |at, &n| {
                    let o = *at;
                    *at += n;
                    Some(o)
                })
                .collect::<Vec<_>>()
        };
        let (so, ro) = (offsets(send_counts), offsets(recv_counts));
        if send_counts[me] != recv_counts[me] {
            return Err(invalid(
                "all_to_all_v",
                format!(
                    "this rank sends itself {} values but expects {}",
                    send_counts[me], recv_counts[me]
                ),
            ));
        }
        if send_counts[me] > 0 {
            cudarc::driver::result::memcpy_dtod_async(
                recv + (ro[me] * wbytes) as u64,
                send + (so[me] * wbytes) as u64,
                send_counts[me] * wbytes,
                self.stream.cu_stream(),
            )
            .map_err(|e| cuda_err("device copy of the own block", e))?;
        }
        result::group_start().map_err(|e| nccl_err("ncclGroupStart", e))?;
        let mut first = Ok(());
        for p in (0..send_counts.len()).filter(|&p| p != me) {
            // Ranks fit a C int: NCCL counted them in one.
            let peer = p as c_int;
            if send_counts[p] > 0 {
                let r = result::send(
                    (send + (so[p] * wbytes) as u64) as *const std::ffi::c_void,
                    send_counts[p],
                    dt,
                    peer,
                    self.comm,
                    self.cu_stream(),
                );
                if let Err(e) = r {
                    first = Err(nccl_err("ncclSend", e));
                    break;
                }
            }
            if recv_counts[p] > 0 {
                let r = result::recv(
                    (recv + (ro[p] * wbytes) as u64) as *mut std::ffi::c_void,
                    recv_counts[p],
                    dt,
                    peer,
                    self.comm,
                    self.cu_stream(),
                );
                if let Err(e) = r {
                    first = Err(nccl_err("ncclRecv", e));
                    break;
                }
            }
        }
        // The group must be closed even after a failed call.
        let end = result::group_end().map_err(|e| nccl_err("ncclGroupEnd", e));
        first?;
        end?;
        Ok(())
    }
}

/// A group of GPUs, one per process, communicating through NCCL.
pub struct NcclComm {
    inner: Mutex<Inner>,
    rank: usize,
    size: usize,
    /// The bootstrap communicator: kept for [`Communicator::abort`] (which must end every
    /// process, something NCCL cannot do).
    /// The communicator the NCCL id went over (MPI, or a world of one); also how `abort`
    /// ends every process.
    bootstrap: Arc<dyn Communicator>,
    /// Messages this rank sent to itself, waiting for their receive.
    own: SelfQueue,
    traffic: TrafficCounter,
}

// SAFETY: `Inner` holds NCCL's raw communicator handle and a cudarc stream; both are used only
// under `inner`'s lock, one call at a time, with the CUDA context bound to the calling thread
// first. NCCL allows a communicator to be used from any thread as long as calls on it do not
// overlap.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclComm(rank {} of {})", self.rank, self.size)
    }
}

impl NcclComm {
    /// Creates the NCCL communicator of the group `bootstrap` (same ranks: MPI across
    /// processes, a `LocalComm` for one), this rank on CUDA device `ordinal`. Collective over
    /// `bootstrap`: every member must call it. Every member first checks
    /// that libcuda and libnccl load and agrees on the outcome, so a missing library is an error
    /// on every rank rather than a hang.
    ///
    /// # Errors
    /// [`CommError::Engine`] when a library is missing on some rank, or CUDA or NCCL fail; what
    /// the bootstrap communicator reports.
    pub fn new(bootstrap: &Arc<dyn Communicator>, ordinal: usize) -> Result<Arc<Self>, CommError> {
        let (rank, size) = (bootstrap.rank(), bootstrap.size());
        let nranks = to_c_int("NcclComm::new", size)?;
        let my_rank = to_c_int("NcclComm::new", rank)?;
        // SAFETY: these only try to dlopen the libraries.
        let local = if !unsafe { cudarc::driver::sys::is_culib_present() } {
            Err("libcuda cannot be loaded".to_string())
        } else if !unsafe { sys::is_culib_present() } {
            Err(
                "libnccl cannot be loaded (cudarc looks for libnccl.so: link it to \
                 libnccl.so.2 in a folder on LD_LIBRARY_PATH)"
                    .to_string(),
            )
        } else {
            Ok(())
        };
        let mut ok = [i32::from(local.is_ok())];
        bootstrap.all_reduce(BufMut::I32(&mut ok), ReduceOp::Min)?;
        if let Err(e) = local {
            return Err(engine(format!("rank {rank}: {e}")));
        }
        if ok[0] == 0 {
            return Err(engine(
                "libcuda or libnccl is missing on another rank".into(),
            ));
        }

        // Byte 0 says whether rank 0 made an id; the 128 bytes after it are the id.
        let mut msg = [0u8; 129];
        let mut made = Ok(());
        if rank == 0 {
            match result::get_uniqueid() {
                Ok(id) => {
                    msg[0] = 1;
                    for (d, &c) in msg[1..].iter_mut().zip(id.internal.iter()) {
                        *d = c as u8;
                    }
                }
                Err(e) => made = Err(nccl_err("ncclGetUniqueId", e)),
            }
        }
        bootstrap.broadcast(BufMut::U8(&mut msg), 0)?;
        made?;
        if msg[0] != 1 {
            return Err(engine("rank 0 could not make an NCCL unique id".into()));
        }
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        for (d, &b) in id.internal.iter_mut().zip(msg[1..].iter()) {
            *d = b as std::ffi::c_char;
        }

        let ctx = CudaContext::new(ordinal)
            .map_err(|e| cuda_err(&format!("CUDA device {ordinal}"), e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| cuda_err("creating a stream", e))?;
        ctx.bind_to_thread()
            .map_err(|e| cuda_err("binding the CUDA context", e))?;
        let mut comm = MaybeUninit::uninit();
        // SAFETY: `comm` is written by NCCL on success and read only then.
        let comm = unsafe {
            result::comm_init_rank(comm.as_mut_ptr(), nranks, id, my_rank)
                .map_err(|e| nccl_err("ncclCommInitRank", e))?;
            comm.assume_init()
        };
        Ok(Arc::new(Self::wrap(
            Inner { comm, stream },
            rank,
            size,
            bootstrap.clone(),
        )))
    }

    fn wrap(inner: Inner, rank: usize, size: usize, bootstrap: Arc<dyn Communicator>) -> Self {
        Self {
            inner: Mutex::new(inner),
            rank,
            size,
            bootstrap,
            own: SelfQueue::default(),
            traffic: TrafficCounter::default(),
        }
    }

    /// The lock, with the CUDA context bound to this thread.
    fn lock(&self) -> Result<MutexGuard<'_, Inner>, CommError> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.bind()?;
        Ok(g)
    }

    fn ring_share(&self, bytes: usize) -> u64 {
        (bytes * (self.size - 1) / self.size) as u64
    }

    /// In-place all-reduce of `len` elements at device address `ptr`, on this communicator's
    /// stream; returns once it has completed.
    ///
    /// # Safety
    /// `ptr` must be device memory of this communicator's CUDA device (Burn CUDA tensors are: the
    /// same primary context) holding `len` elements of `dtype`, alive and not used by anything
    /// else until this returns; the work that wrote it must have completed (for a Burn tensor,
    /// call `Backend::sync` after [`cuda_tensor_ptr`]).
    ///
    /// # Errors
    /// [`CommError::Unsupported`] for `U8`; [`CommError::Engine`] for what CUDA or NCCL report.
    pub unsafe fn all_reduce_device(
        &self,
        ptr: u64,
        len: usize,
        dtype: DeviceDtype,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        if dtype == DeviceDtype::U8 {
            return Err(CommError::Unsupported {
                op: "all_reduce_device",
                dtype: "u8",
            });
        }
        let g = self.lock()?;
        result::all_reduce(
            ptr as *const std::ffi::c_void,
            ptr as *mut std::ffi::c_void,
            len,
            dtype.nccl(),
            nccl_op(op),
            g.comm,
            g.cu_stream(),
        )
        .map_err(|e| nccl_err("ncclAllReduce", e))?;
        g.synchronize()?;
        let share = 2 * self.ring_share(len * dtype.size());
        self.traffic.add(share, share);
        Ok(())
    }

    /// Variable-count all-to-all between device buffers (counts in elements, blocks in rank
    /// order, as [`Communicator::all_to_all_v`]), on this communicator's stream; returns once it
    /// has completed.
    ///
    /// # Safety
    /// As [`Self::all_reduce_device`]: `send_ptr` holds `Σ send_counts` and `recv_ptr` room for
    /// `Σ recv_counts` elements of `dtype`, and the two do not overlap.
    ///
    /// # Errors
    /// [`CommError::Invalid`] when the counts do not have one entry per rank or this rank's
    /// own send and receive counts differ; [`CommError::Engine`] for what CUDA or NCCL report.
    pub unsafe fn all_to_all_v_device(
        &self,
        send_ptr: u64,
        send_counts: &[usize],
        recv_ptr: u64,
        recv_counts: &[usize],
        dtype: DeviceDtype,
    ) -> Result<(), CommError> {
        if send_counts.len() != self.size || recv_counts.len() != self.size {
            return Err(invalid(
                "all_to_all_v_device",
                format!(
                    "{} send and {} receive counts for {} ranks",
                    send_counts.len(),
                    recv_counts.len(),
                    self.size
                ),
            ));
        }
        let g = self.lock()?;
        g.all_to_all_raw(
            self.rank,
            send_ptr,
            send_counts,
            recv_ptr,
            recv_counts,
            dtype.nccl(),
            dtype.size(),
        )?;
        g.synchronize()?;
        self.count_all_to_all(send_counts, recv_counts, dtype.size() as u64);
        Ok(())
    }

    fn count_all_to_all(&self, send_counts: &[usize], recv_counts: &[usize], eb: u64) {
        self.traffic
            .add_all_to_all(self.rank, send_counts, recv_counts, eb);
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn engine(&self) -> &'static str {
        "nccl"
    }

    /// `ncclCommSplit` (needs libnccl ≥ 2.18); the new communicator shares this one's stream.
    fn split(&self, color: usize, key: usize) -> Result<Arc<dyn Communicator>, CommError> {
        let color = to_c_int("split", color)?;
        let key = to_c_int("split", key)?;
        let g = self.lock()?;
        let mut sub: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `g.comm` is a live communicator; a null config inherits the parent's.
        unsafe { sys::ncclCommSplit(g.comm, color, key, &mut sub, std::ptr::null_mut()) }
            .result()
            .map_err(|e| nccl_err("ncclCommSplit", e))?;
        // From here `inner` owns (and on error destroys) the new communicator.
        let inner = Inner {
            comm: sub,
            stream: g.stream.clone(),
        };
        drop(g);
        // SAFETY: `sub` is the live communicator NCCL just made.
        let rank =
            unsafe { result::comm_user_rank(sub) }.map_err(|e| nccl_err("ncclCommUserRank", e))?;
        // SAFETY: as above.
        let size = unsafe { result::comm_count(sub) }.map_err(|e| nccl_err("ncclCommCount", e))?;
        Ok(Arc::new(Self::wrap(
            inner,
            rank as usize,
            size as usize,
            self.bootstrap.clone(),
        )))
    }

    fn barrier(&self) -> Result<(), CommError> {
        let mut one = [0f32];
        self.all_reduce(BufMut::F32(&mut one), ReduceOp::Sum)
    }

    fn broadcast(&self, buf: BufMut<'_>, root: usize) -> Result<(), CommError> {
        check_peer("broadcast", root, self.size)?;
        let (dt, wb) = wire(buf.as_ref());
        let root_c = to_c_int("broadcast", root)?;
        let host = bytes_mut(buf);
        let n = host.len();
        let g = self.lock()?;
        let d = g.upload(host)?;
        let p = g.ptr(&d);
        // SAFETY: `d` holds `n` bytes and lives until after the stream is synchronised.
        unsafe {
            result::broadcast(
                p as *const std::ffi::c_void,
                p as *mut std::ffi::c_void,
                n / wb,
                dt,
                root_c,
                g.comm,
                g.cu_stream(),
            )
        }
        .map_err(|e| nccl_err("ncclBroadcast", e))?;
        g.download(&d, host)?;
        // The root sends, the others receive; a world of one moves nothing.
        let moved = if self.size > 1 { n as u64 } else { 0 };
        if self.rank == root {
            self.traffic.add(moved, 0);
        } else {
            self.traffic.add(0, moved);
        }
        Ok(())
    }

    fn all_reduce(&self, buf: BufMut<'_>, op: ReduceOp) -> Result<(), CommError> {
        check_reducible("all_reduce", buf.as_ref())?;
        let (dt, wb) = wire(buf.as_ref());
        let host = bytes_mut(buf);
        let n = host.len();
        let g = self.lock()?;
        let d = g.upload(host)?;
        let p = g.ptr(&d);
        // SAFETY: `d` holds `n` bytes and lives until after the stream is synchronised.
        unsafe {
            result::all_reduce(
                p as *const std::ffi::c_void,
                p as *mut std::ffi::c_void,
                n / wb,
                dt,
                nccl_op(op),
                g.comm,
                g.cu_stream(),
            )
        }
        .map_err(|e| nccl_err("ncclAllReduce", e))?;
        g.download(&d, host)?;
        let share = 2 * self.ring_share(n);
        self.traffic.add(share, share);
        Ok(())
    }

    fn all_gather(&self, send: Buf<'_>, recv: BufMut<'_>) -> Result<(), CommError> {
        check_all_gather(self.size, send, &recv)?;
        let (dt, wb) = wire(send);
        let (src, dst) = (bytes(send), bytes_mut(recv));
        let g = self.lock()?;
        let ds = g.upload(src)?;
        let dr = g.alloc(dst.len())?;
        // SAFETY: `ds` holds the send bytes, `dr` room for `size` times as many; both live
        // until after the stream is synchronised.
        unsafe {
            result::all_gather(
                g.ptr(&ds) as *const std::ffi::c_void,
                g.ptr(&dr) as *mut std::ffi::c_void,
                src.len() / wb,
                dt,
                g.comm,
                g.cu_stream(),
            )
        }
        .map_err(|e| nccl_err("ncclAllGather", e))?;
        g.download(&dr, dst)?;
        let share = self.ring_share(dst.len());
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
        let (dt, wb) = wire(send);
        let (src, dst) = (bytes(send), bytes_mut(recv));
        let g = self.lock()?;
        let ds = g.upload(src)?;
        let dr = g.alloc(dst.len())?;
        // SAFETY: as in `all_gather`, with the sizes reversed.
        unsafe {
            result::reduce_scatter(
                g.ptr(&ds) as *const std::ffi::c_void,
                g.ptr(&dr) as *mut std::ffi::c_void,
                dst.len() / wb,
                dt,
                nccl_op(op),
                g.comm,
                g.cu_stream(),
            )
        }
        .map_err(|e| nccl_err("ncclReduceScatter", e))?;
        g.download(&dr, dst)?;
        let share = self.ring_share(src.len());
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
        let eb = send.elem_bytes();
        let (dt, wb) = wire(send);
        // Counts in NCCL elements (bf16 bits travel as two bytes each).
        let scale = |c: &[usize]| c.iter().map(|n| n * eb / wb).collect::<Vec<_>>();
        let (sc, rc) = (scale(send_counts), scale(recv_counts));
        let (src, dst) = (bytes(send), bytes_mut(recv));
        let g = self.lock()?;
        let ds = g.upload(src)?;
        let dr = g.alloc(dst.len())?;
        // SAFETY: the counts were checked against the buffers' lengths, so every block lies
        // inside `ds` / `dr`, which live until after the stream is synchronised.
        unsafe { g.all_to_all_raw(self.rank, g.ptr(&ds), &sc, g.ptr(&dr), &rc, dt, wb)? };
        g.download(&dr, dst)?;
        self.count_all_to_all(send_counts, recv_counts, eb as u64);
        Ok(())
    }

    fn send(&self, buf: Buf<'_>, dest: usize, tag: u16) -> Result<(), CommError> {
        check_peer("send", dest, self.size)?;
        if dest == self.rank {
            self.own.push(tag, buf);
            return Ok(());
        }
        let (dt, wb) = wire(buf);
        let src = bytes(buf);
        let peer = to_c_int("send", dest)?;
        let g = self.lock()?;
        let d = g.upload(src)?;
        // SAFETY: `d` holds the bytes and lives until after the stream is synchronised.
        unsafe {
            result::send(
                g.ptr(&d) as *const std::ffi::c_void,
                src.len() / wb,
                dt,
                peer,
                g.comm,
                g.cu_stream(),
            )
        }
        .map_err(|e| nccl_err("ncclSend", e))?;
        g.synchronize()?;
        self.traffic.add(src.len() as u64, 0);
        Ok(())
    }

    fn recv(&self, buf: BufMut<'_>, src: usize, tag: u16) -> Result<(), CommError> {
        check_peer("recv", src, self.size)?;
        if src == self.rank {
            return self.own.take_into("recv", tag, buf);
        }
        let (dt, wb) = wire(buf.as_ref());
        let dst = bytes_mut(buf);
        let peer = to_c_int("recv", src)?;
        let g = self.lock()?;
        let d = g.alloc(dst.len())?;
        // SAFETY: `d` has room for the bytes and lives until after the stream is synchronised.
        unsafe {
            result::recv(
                g.ptr(&d) as *mut std::ffi::c_void,
                dst.len() / wb,
                dt,
                peer,
                g.comm,
                g.cu_stream(),
            )
        }
        .map_err(|e| nccl_err("ncclRecv", e))?;
        g.download(&d, dst)?;
        self.traffic.add(0, dst.len() as u64);
        Ok(())
    }

    fn traffic(&self) -> Traffic {
        self.traffic.get()
    }

    /// Aborts through the communicator the group was made from, which ends every process.
    fn abort(&self, code: i32) -> ! {
        self.bootstrap.abort(code)
    }
}

/// The device memory of a Burn CUDA tensor, for the device-pointer calls; holds CubeCL's
/// reference to the allocation, so the memory stays the tensor's while this value lives.
pub struct CudaTensorPtr {
    /// Device address of the first element (`CUdeviceptr`, the handle's offset included).
    pub ptr: u64,
    /// Number of elements.
    pub len: usize,
    pub dtype: DeviceDtype,
    _resource: Box<dyn std::any::Any + Send>,
}

impl std::fmt::Debug for CudaTensorPtr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaTensorPtr({:#x}, {} × {:?})",
            self.ptr, self.len, self.dtype
        )
    }
}

/// The device memory of a contiguous Burn CUDA tensor (`tensor.into_primitive().tensor()` of a
/// `Tensor<Cuda<F>, D>`). Pending kernels that write it may still be running: call
/// `Backend::sync` on its device before handing the pointer to NCCL. Writing through it (an
/// in-place all-reduce) is only sound when no other tensor shares the buffer
/// (`CubeTensor::can_mut`).
///
/// # Errors
/// [`CommError::Invalid`] for a strided (non-contiguous) tensor, a buffer smaller than its
/// shape, or an element type NCCL does not carry here; [`CommError::Engine`] when CubeCL cannot
/// give the resource.
pub fn cuda_tensor_ptr(
    t: &burn_cubecl::tensor::CubeTensor<cubecl::cuda::CudaRuntime>,
) -> Result<CudaTensorPtr, CommError> {
    use burn::tensor::DType;
    let op = "cuda_tensor_ptr";
    let dtype = match t.dtype {
        DType::F32 => DeviceDtype::F32,
        DType::F64 => DeviceDtype::F64,
        DType::BF16 => DeviceDtype::Bf16,
        DType::F16 => DeviceDtype::F16,
        DType::I32 => DeviceDtype::I32,
        DType::U8 => DeviceDtype::U8,
        other => return Err(invalid(op, format!("{other:?} tensors are not supported"))),
    };
    if !t.is_contiguous() {
        return Err(invalid(op, "the tensor is not contiguous".into()));
    }
    let len = t.meta.shape().num_elements();
    let need = (len * dtype.size()) as u64;
    if t.handle.size() < need {
        return Err(invalid(
            op,
            format!(
                "the buffer holds {} bytes for {need} of elements",
                t.handle.size()
            ),
        ));
    }
    let resource = t
        .client
        .get_resource(t.handle.clone())
        .map_err(|e| engine(format!("CubeCL resource of a tensor: {e:?}")))?;
    let ptr = resource.resource().ptr;
    Ok(CudaTensorPtr {
        ptr,
        len,
        dtype,
        _resource: Box::new(resource),
    })
}
