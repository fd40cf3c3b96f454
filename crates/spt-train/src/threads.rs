//! The CPU thread count, fixed once per process.
//!
//! candle 0.11 asks for its thread count on every CPU matmul (`candle_core::utils::
//! get_num_threads`): it reads `RAYON_NUM_THREADS`, and without it counts the physical cores by
//! parsing `/proc/cpuinfo`, each time. That parse took 29 µs a call on this 2-core machine (more
//! with more cores, whose cpuinfo is longer): 1.4 ms of a generated GPT-2 token's 24 ms.

/// Sets `RAYON_NUM_THREADS` to the count candle would compute, unless the variable already
/// holds one, and builds rayon's global pool with the count rayon would have taken without it
/// (the logical CPUs; the variable would otherwise set it too, to candle's physical-core count):
/// the same threads as before on every machine, counted once. The pool's threads get `main`'s
/// usual 8 MiB of stack, not rayon's 2 MiB: training steps run on them (`spt_ops::on_pool`), and
/// candle's backward sorts the graph recursively. Call it first in `main`, before any thread
/// starts (it writes the process environment).
pub fn fix_thread_count() {
    let mut pool = rayon::ThreadPoolBuilder::new().stack_size(POOL_STACK);
    if let Some(n) = count_to_fix() {
        // rayon's own default: its deprecated variable, else the logical CPUs.
        let threads = std::env::var("RAYON_RS_NUM_CPUS")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |p| p.get()));
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        pool = pool.num_threads(threads);
    }
    // Without num_threads, rayon reads RAYON_NUM_THREADS itself. Fails only if the pool already
    // exists, which then keeps its settings.
    let _ = pool.build_global();
}

/// The stack of each pool thread: what Linux gives `main`.
const POOL_STACK: usize = 8 << 20;

/// The count to write: candle's, when `RAYON_NUM_THREADS` holds no positive count (the cases in
/// which candle counts cores itself).
fn count_to_fix() -> Option<usize> {
    count_to_fix_for(std::env::var("RAYON_NUM_THREADS").ok().as_deref())
}

/// [`count_to_fix`] for a given value of `RAYON_NUM_THREADS`.
fn count_to_fix_for(env: Option<&str>) -> Option<usize> {
    let set = env.and_then(|s| s.parse::<usize>().ok()).is_some_and(|n| n > 0);
    (!set).then(candle_core::utils::get_num_threads)
}

#[cfg(test)]
mod tests {
    // The values are passed in: writing the environment while other test threads read it races.
    #[test]
    fn writes_only_what_candle_would_count() {
        let candle = Some(candle_core::utils::get_num_threads());
        assert_eq!(super::count_to_fix_for(Some("4")), None);
        assert_eq!(super::count_to_fix_for(Some("1")), None);
        for unset in [None, Some("0"), Some(""), Some("two"), Some("-3")] {
            assert_eq!(super::count_to_fix_for(unset), candle, "{unset:?}");
        }
    }
}
