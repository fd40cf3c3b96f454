//! The op benches run their whole body on rayon's pool, as `spt-train` runs its steps
//! ([`spt_ops::on_pool`]): timed from `main`, every parallel op would pay a thread wake-up that no
//! training step pays, and PyTorch's main thread (OpenMP's thread 0) pays none either.

use candle_core::{Device, Result};

/// Builds the global pool with 8 MiB stacks (as `spt_train::threads::fix_thread_count` does:
/// backward sorts the graph recursively) and runs `body` on one of its threads.
pub fn run(body: impl FnOnce() -> Result<()> + Send) -> Result<()> {
    // An error means the pool already exists; it is then used as it is.
    let _ = rayon::ThreadPoolBuilder::new().stack_size(8 << 20).build_global();
    spt_ops::on_pool(&Device::Cpu, body)
}
