//! The benches' allocator: mimalloc with purging off, as in the `spt-train` binary, wrapped to
//! count live and peak heap bytes (what the autograd graph keeps).
//!
//! Under glibc every large buffer is a fresh mmap: page zeroing plus TLB shootdowns on unmap were
//! ~35 % of the routed FFN's samples (perf). A candle user can make the same choice in their
//! binary; the benches measure the kernels as `spt-train` runs them.
#![allow(dead_code)] // each bench uses a part

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

pub struct Counting;
pub static LIVE: AtomicUsize = AtomicUsize::new(0);
pub static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Relaxed) + by;
    PEAK.fetch_max(now, Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { mimalloc::MiMalloc.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: p came from this allocator with layout l.
        unsafe { mimalloc::MiMalloc.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: p came from this allocator with layout l.
        let q = unsafe { mimalloc::MiMalloc.realloc(p, l, new_size) };
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Relaxed);
            grew(new_size);
        }
        q
    }
}

/// `mi_option_purge_delay` (mimalloc.h, v3); spt-train's main checks the index against the default.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory stays with the process for reuse (never purged), as in `spt-train`.
pub fn keep_freed_memory() {
    // SAFETY: sets one process-wide allocator option to a documented value (-1: never purge).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}
