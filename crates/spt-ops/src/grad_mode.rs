//! A scoped no-gradient mode for forwards whose result is never differentiated (evaluation
//! between training steps). candle has none: an op records its inputs whenever one of them is
//! a `Var`, so a forward over trainable weights builds a graph that nothing reads, keeps every
//! activation until its output is dropped, and misses the untracked fast paths. Inside
//! [`no_grad`], the layers that read their own `Var`s (LoRA factors, routers, a routed FFN's
//! trained base weights) and spt-models' parameters read them detached: the same values,
//! nothing recorded.
//!
//! The mode belongs to the calling thread (the one running the model's code; the ops' own
//! rayon tasks read no parameters). `on_pool` sets the caller's mode on the pool thread for the
//! job, whichever it is: a worker waiting inside an evaluation's parallel op may pick up another
//! thread's training step, which must still record its graph.

use std::cell::Cell;

thread_local! {
    static NO_GRAD: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with gradients off on this thread; the previous mode is back afterwards, also when
/// `f` panics.
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    with_grad_mode(false, f)
}

/// Runs `f` with gradients `enabled` or not on this thread, then restores the previous mode
/// (also when `f` panics).
pub(crate) fn with_grad_mode<R>(enabled: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            NO_GRAD.with(|m| m.set(self.0));
        }
    }
    let _restore = Restore(NO_GRAD.with(|m| m.replace(!enabled)));
    f()
}

/// False inside [`no_grad`] on this thread.
pub fn grad_enabled() -> bool {
    !NO_GRAD.with(Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_grad_nests_and_restores_after_a_panic() {
        assert!(grad_enabled());
        no_grad(|| {
            assert!(!grad_enabled());
            no_grad(|| assert!(!grad_enabled()));
            assert!(!grad_enabled(), "an inner scope must not turn gradients back on");
        });
        assert!(grad_enabled());
        // What on_pool does for a caller with gradients on, on a thread that had them off.
        assert!(no_grad(|| with_grad_mode(true, grad_enabled)));
        assert!(no_grad(|| {
            with_grad_mode(true, || ());
            !grad_enabled()
        }));
        let r = std::panic::catch_unwind(|| no_grad(|| panic!("inside")));
        assert!(r.is_err());
        assert!(grad_enabled(), "a panic inside must not leave gradients off");
        // Another thread's mode is its own.
        no_grad(|| {
            std::thread::spawn(grad_enabled)
                .join()
                .map(|on| assert!(on))
                .unwrap()
        });
    }
}
