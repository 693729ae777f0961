//! The global allocator (mimalloc) and when freed memory goes back to the OS.
//!
//! A training step frees and reallocates the same few hundred MB of tensors. By default mimalloc
//! purges (decommits) free pages after 10 ms, so each step faulted them in and zeroed them again
//! (BERT-base, two ranks: 6.0 s a step kept, 7.5 s purged). zoo delays purging by minutes
//! instead, which a step's churn never reaches, and purges at once where memory really was given
//! up for good: after the setup (the checkpoint read from disk, the model's whole buffers) and
//! after a checkpoint is saved ([`release_free_memory`]). Without that the resident set would stay
//! at the high-water mark of everything ever allocated.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicIsize, Ordering};

/// mimalloc (per-thread heaps: rank threads do not contend on one arena, as with glibc's),
/// counting the bytes in use and their high-water mark, which `--auto` holds against its budget.
#[global_allocator]
static ALLOCATOR: Counting = Counting(mimalloc::MiMalloc);

/// Bytes allocated and not yet freed.
static LIVE: AtomicIsize = AtomicIsize::new(0);
/// The most `LIVE` has been since [`reset_peak`].
static PEAK: AtomicIsize = AtomicIsize::new(0);

/// An allocator that counts what it hands out.
struct Counting(mimalloc::MiMalloc);

impl Counting {
    fn grew(size: usize) {
        let live = LIVE.fetch_add(size as isize, Ordering::Relaxed) + size as isize;
        PEAK.fetch_max(live, Ordering::Relaxed);
    }

    fn shrank(size: usize) {
        LIVE.fetch_sub(size as isize, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed to mimalloc unchanged; the counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let ptr = unsafe { self.0.alloc(layout) };
        if !ptr.is_null() {
            Self::grew(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let ptr = unsafe { self.0.alloc_zeroed(layout) };
        if !ptr.is_null() {
            Self::grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded: `ptr` came from this allocator with `layout`.
        unsafe { self.0.dealloc(ptr, layout) };
        Self::shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded: `ptr` came from this allocator with `layout`.
        let moved = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !moved.is_null() {
            Self::shrank(layout.size());
            Self::grew(new_size);
        }
        moved
    }
}

/// The most bytes in use at once since the last [`reset_peak`].
pub fn peak_bytes() -> usize {
    PEAK.load(Ordering::Relaxed).max(0) as usize
}

/// Starts a new high-water mark at what is in use now.
pub fn reset_peak() {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// `mi_option_purge_delay` and `mi_option_arena_purge_mult` in mimalloc 3.3's `mi_option_t`
/// (libmimalloc-sys 0.1.49, pinned); the crate's own constants stop at mimalloc 2's options.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const MI_OPTION_ARENA_PURGE_MULT: libmimalloc_sys::mi_option_t = 24;

/// Free pages wait this long (ms) before mimalloc may purge them on its own: far longer than a
/// step, so steady-state churn stays resident and is reused.
const PURGE_DELAY_MS: std::os::raw::c_long = 120_000;

/// Keeps a step's freed memory in the process (see the module docs). Call once, first thing.
pub fn keep_freed_memory() {
    // SAFETY: setting options is allowed at any time.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS);
        libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_PURGE_MULT, 1);
    }
}

/// Hands every free page back to the OS now: the resident set drops to what is in use.
pub fn release_free_memory() {
    // SAFETY: a forced collection is allowed at any time, from any thread.
    unsafe { libmimalloc_sys::mi_collect(true) };
}
