//! Running CPU work on rayon's pool.
//!
//! Every parallel CPU op (candle's matmuls through gemm, the kernels here) hands its work to
//! rayon's global pool. Called from a thread outside the pool, such as `main`, each op wakes the
//! pool's threads and puts the caller to sleep until they finish: two context switches an op,
//! and the caller is a third thread competing for the cores. Called from a pool thread, the op
//! runs on that thread and the others steal from it, awake between ops. A MiniLM training step
//! (B8×L512) ran 10–16 % faster on the pool, a one-text classification 28–30 % faster, on a
//! 2-core Xeon (docs/results/speed.md).

use candle_core::Device;

/// Runs `f` on a thread of rayon's global pool when `device` is the CPU and this thread is not
/// already one of a pool's (then, and for other devices, `f` runs here). The caller sleeps until
/// `f` returns; a panic in `f` is resumed here. Wrap a whole step (forward, backward, update) or a
/// whole inference call: the cost is one wake-up, paid once. `f` gets a pool thread's stack
/// (rayon's default is 2 MiB; `spt_train::threads::fix_thread_count` builds the pool with 8).
/// `f` runs in the caller's gradient mode ([`crate::no_grad`]), set on the pool thread for
/// it either way: that thread may be inside another caller's job of the other mode.
pub fn on_pool<R: Send>(device: &Device, f: impl FnOnce() -> R + Send) -> R {
    if !device.is_cpu() || rayon::current_thread_index().is_some() {
        return f();
    }
    let enabled = crate::grad_enabled();
    rayon::scope(|_| crate::grad_mode::with_grad_mode(enabled, f))
}

#[cfg(test)]
mod tests {
    use super::on_pool;
    use candle_core::Device;

    #[test]
    fn runs_on_a_pool_thread_and_nests_in_place() {
        assert_eq!(rayon::current_thread_index(), None);
        let (outer, inner) = on_pool(&Device::Cpu, || {
            let outer = std::thread::current().id();
            let inner = on_pool(&Device::Cpu, || std::thread::current().id());
            (rayon::current_thread_index().map(|_| outer), inner)
        });
        assert!(outer.is_some(), "f did not run on a pool thread");
        assert_eq!(outer, Some(inner), "a nested call left its pool thread");
        assert_ne!(inner, std::thread::current().id());
        // The caller's no-gradient mode goes with f to the pool thread.
        assert!(!crate::no_grad(|| on_pool(&Device::Cpu, crate::grad_enabled)));
        assert!(on_pool(&Device::Cpu, crate::grad_enabled));
    }

    #[test]
    #[should_panic(expected = "from the pool")]
    fn a_panic_reaches_the_caller() {
        on_pool(&Device::Cpu, || panic!("from the pool"));
    }
}
