//! The allocator setting `spt-train` and its benchmarks share.
//!
//! Training allocates and frees the same large tensor buffers every step: glibc unmaps them and
//! pays page faults (and TLB shootdowns) to get them back, 17 % of a GPT-2 step here (perf).
//! mimalloc with purging off keeps them for reuse: the process stays at its peak footprint. A
//! binary opts in with `#[global_allocator] static GLOBAL: mimalloc::MiMalloc =
//! mimalloc::MiMalloc;` and [`keep_freed_memory`] first in `main`.

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (mimalloc.h); the test below checks
/// it against the option's default.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Turns mimalloc's purging off: freed memory stays mapped for reuse.
pub fn keep_freed_memory() {
    // SAFETY: sets one process-wide allocator option to a documented value (-1: never purge).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_delay_option_index_matches_mimalloc() {
        // The bundled mimalloc's options.c defaults `purge_delay` to 1000 ms (mimalloc.h still
        // says 10); no neighbouring option has that default, so a wrong index fails here.
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            // SAFETY: reads a process-wide option.
            assert_eq!(
                unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) },
                1000
            );
        }
        keep_freed_memory();
        // SAFETY: as above.
        assert_eq!(
            unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) },
            -1
        );
    }
}
