//! The op benches' harness: one fused op against its composed form, forward + backward, in one
//! process and interleaved rep by rep (so both see the same machine state), with the heap held
//! between the forward and the backward (what the autograd graph keeps), counted by the
//! benches' allocator (`alloc.rs`). Records are written to `bench/results/` through a temporary
//! file and a rename.
#![allow(dead_code)] // each bench uses a part

use super::alloc::LIVE;
use candle_core::{Result, Tensor};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

/// One forward (`loss`, which returns the tensor to differentiate: a scalar loss, or any tensor,
/// whose backward then starts from ones) + backward: (seconds, bytes held between them).
pub fn step(loss: impl FnOnce() -> Result<Tensor>) -> Result<(f64, usize)> {
    let base = LIVE.load(Relaxed);
    let t0 = Instant::now();
    let loss = loss()?;
    let kept = LIVE.load(Relaxed).saturating_sub(base);
    let grads = loss.backward()?;
    let t = t0.elapsed().as_secs_f64();
    drop(grads);
    Ok((t, kept))
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The 1, 5 and 15-minute load averages, as every result file records them: the machine may be
/// shared, and other load inflates times.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The CPU and the thread count, for a result file's `machine`.
pub fn machine() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = spt_ops::cpu_model().unwrap_or_else(|| "unknown CPU".into());
    let cpus = info.lines().filter(|l| l.starts_with("processor")).count();
    format!(
        "{cpus} cores, {model}, {} rayon threads",
        rayon::current_num_threads()
    )
}

/// Times `ours` and `base` interleaved rep by rep (`reps` + 1 reps, the first dropped) on one
/// case and returns its record. Each closure gets the rep's index (a dropout seed) and returns
/// [`step`]'s (seconds, bytes).
pub fn compare(
    what: &str,
    case: serde_json::Value,
    reps: usize,
    ours: impl Fn(u64) -> Result<(f64, usize)>,
    base: impl Fn(u64) -> Result<(f64, usize)>,
) -> Result<serde_json::Value> {
    let load_before = loadavg();
    let (mut ours_s, mut base_s) = (Vec::new(), Vec::new());
    let (mut ours_bytes, mut base_bytes) = (0, 0);
    for rep in 0..=reps as u64 {
        let (to, kb) = ours(rep)?;
        let (tb, bb) = base(rep)?;
        if rep > 0 {
            ours_s.push(to);
            base_s.push(tb);
        }
        (ours_bytes, base_bytes) = (kb, bb);
    }
    let (o, bs) = (median(&mut ours_s), median(&mut base_s));
    println!(
        "{what} {case}: fused {o:.5}s, composed {bs:.5}s ({:.2}x); kept {} vs {} KiB",
        bs / o,
        ours_bytes / 1024,
        base_bytes / 1024
    );
    Ok(serde_json::json!({
        "case": case,
        "ours_s": o,
        "baseline_s": bs,
        "speedup": bs / o,
        "ours_bytes": ours_bytes,
        "baseline_bytes": base_bytes,
        "bytes_kind": "heap held between forward and backward (f32)",
        "reps": ours_s.len(),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }))
}

/// Writes `doc` to `bench/results/{name}` through a temporary file.
pub fn write_results(name: &str, doc: &serde_json::Value) -> Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/results");
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!("{name}.tmp"));
    let text = serde_json::to_string_pretty(doc).map_err(candle_core::Error::wrap)?;
    std::fs::write(&tmp, text + "\n")?;
    std::fs::rename(&tmp, dir.join(name))?;
    println!("wrote {}", dir.join(name).display());
    Ok(())
}
