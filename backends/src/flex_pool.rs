//! Jobs on Flex's thread pool (rayon's global pool, or the one a caller installs), run in
//! order on the calling thread when the pool has a single thread: handing work to a one-thread
//! pool only adds a wake-up of that thread and a sleep of the caller per call (11% of a
//! one-thread training step went to waking it), and serializes callers on other threads
//! (the trainer's concurrent micro-batch workers) on that one pool thread. A micro-batch
//! worker runs with its share of the pool's threads ([`with_share`]): with a share of one its
//! jobs and its `dense_matmul` products run on its own thread, so workers as many as cores do
//! not contend for the pool. A larger share only sizes the worker's own decisions (its jobs
//! still go to the whole pool), and Flex's own operations (element-wise kernels, its matmul on
//! other dtypes) do not read it. [`on_pool`] moves a caller from outside the pool onto one of its
//! threads (an inference forward), so its jobs do not wake the pool and sleep the caller each.

use std::cell::Cell;

use rayon::prelude::*;

thread_local! {
    /// The calling thread's share of the pool, when it runs as one of several workers.
    static SHARE: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The threads this thread's jobs may use: its worker share, else the pool's size.
pub(crate) fn threads() -> usize {
    SHARE
        .with(Cell::get)
        .unwrap_or_else(rayon::current_num_threads)
}

/// Runs `f` with `threads` as this thread's share of the pool (restored after, also on panic).
pub(crate) fn with_share<R>(threads: usize, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<usize>);
    impl Drop for Restore {
        fn drop(&mut self) {
            SHARE.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SHARE.with(|s| s.replace(Some(threads.max(1)))));
    f()
}

/// Whether jobs run in order on the caller.
fn serial() -> bool {
    threads() <= 1
}

/// `f(i, chunk i)` for the `chunk`-long pieces of `v` (the last may be shorter).
pub(crate) fn for_each_chunk<T: Send>(
    v: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    let chunk = chunk.max(1);
    if serial() {
        v.chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
    } else {
        v.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}

/// `[f(i, chunk i)]` for the `chunk`-long pieces of `v`, in order.
pub(crate) fn map_chunks<T: Send, R: Send>(
    v: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) -> R + Sync + Send,
) -> Vec<R> {
    let chunk = chunk.max(1);
    if serial() {
        v.chunks_mut(chunk)
            .enumerate()
            .map(|(i, c)| f(i, c))
            .collect()
    } else {
        v.par_chunks_mut(chunk)
            .enumerate()
            .map(|(i, c)| f(i, c))
            .collect()
    }
}

/// `[f(item)]`, in order.
pub(crate) fn map<T: Send, R: Send>(items: Vec<T>, f: impl Fn(T) -> R + Sync + Send) -> Vec<R> {
    if serial() {
        items.into_iter().map(f).collect()
    } else {
        items.into_par_iter().map(f).collect()
    }
}

/// `f()` on a pool thread: in place when this thread is one already or its jobs run in order,
/// else handed to the pool (the caller sleeps until it returns).
pub(crate) fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if serial() || rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}
