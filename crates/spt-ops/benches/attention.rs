//! Sparse attention (PQ encode + ADC top-k selection + fused sparse attention, forward and
//! backward) against dense attention (candle matmul + our softmax, forward and backward) and our
//! fused dense attention (`flash_attention`), in the same run. Writes `bench/results/attention.json`.
//!
//! Run: `cargo bench -p spt-ops --bench attention` (lengths 512 … 4096 and 16384). With
//! `SPT_BENCH_LENGTHS=512,1024` only those lengths run, and their records replace the file's
//! records at those lengths (the others are kept). Beyond 4096 only block mode runs (3 reps):
//! dense would keep [H, L, L] scores and per-query selection takes minutes.
//!
//! Block-sparse mode (records with `case.selection = "blocks"`): for each tile size in
//! `SPT_BENCH_TILES` (default `64`; empty skips it), query tiles and key blocks of that size with
//! `max(1, k / tile)` blocks per tile, PQ encode + block selection + block-sparse attention,
//! measured in the same run against the same dense baseline.

use candle_core::{DType, Device, Result, Tensor, Var};
use spt_ops::{
    block_sparse_attention, dense_attention, flash_attention, select_blocks, select_keys, sparse_attention,
    AttentionMask, BlockScore, BlockTiling, Codebook, KeyTopK, PqConfig,
};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

#[path = "common/alloc.rs"]
mod alloc;
#[path = "common/pool.rs"]
mod pool;
use alloc::{LIVE, PEAK};

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

#[derive(Default, Clone, Copy)]
struct Sample {
    total: f64,
    kept_bytes: usize,
    peak_bytes: usize,
    phases: [f64; 4],
}

/// An attention forward that records phase timings.
type AttnStep<'a> = dyn Fn(&Tensor, &Tensor, &Tensor, &mut [f64; 4]) -> Result<Tensor> + 'a;

/// One training step of attention: forward, then backward of Σ o ⊙ w.
fn step(q: &Var, k: &Var, v: &Var, w: &Tensor, f: &AttnStep<'_>) -> Result<Sample> {
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    let mut phases = [0f64; 4];
    let t0 = Instant::now();
    let o = f(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mut phases)?;
    let kept_bytes = LIVE.load(Relaxed).saturating_sub(base);
    let t1 = Instant::now();
    let grads = o.mul(w)?.sum_all()?.backward()?;
    phases[3] = t1.elapsed().as_secs_f64();
    let total = t0.elapsed().as_secs_f64();
    let peak_bytes = PEAK.load(Relaxed).saturating_sub(base);
    drop((grads, o));
    Ok(Sample {
        total,
        kept_bytes,
        peak_bytes,
        phases,
    })
}

/// The 1-minute load average (other processes skew timings on a 2-core machine).
fn load_avg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split(' ').next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn machine() -> String {
    let cpu = spt_ops::cpu_model().unwrap_or_else(|| "unknown CPU".into());
    format!(
        "{} threads ({} rayon), {cpu}, simd {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        rayon::current_num_threads(),
        spt_ops::simd_path()
    )
}

/// The block-sparse attention step for one tiling, with phase timings like the per-query step.
fn blocks_step<'a>(
    cb: &'a Codebook,
    mask: &'a AttentionMask,
    tiling: BlockTiling,
    scale: f64,
) -> impl Fn(&Tensor, &Tensor, &Tensor, &mut [f64; 4]) -> Result<Tensor> + 'a {
    move |q, k, v, ph| {
        let t = Instant::now();
        let codes = cb.encode(k)?;
        ph[0] = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let sel = select_blocks(q, &codes, cb, tiling, mask, BlockScore::default())?;
        ph[1] = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let o = block_sparse_attention(q, k, v, &sel, scale)?;
        ph[2] = t.elapsed().as_secs_f64();
        Ok(o)
    }
}

/// The dense baseline of a block-mode record: its median time, kept bytes and samples.
type Baseline<'a> = Option<(f64, usize, &'a [Sample])>;

/// One block-mode record (printed, and as JSON). Without a dense run (L > 4096), the bytes
/// ratio is against the `[B, H, L, L]` f32 probabilities, a lower bound on what dense keeps.
#[allow(clippy::too_many_arguments)]
fn blocks_record(
    l: usize,
    d: usize,
    b: usize,
    h: usize,
    t: &BlockTiling,
    b_s: &[Sample],
    baseline: Baseline<'_>,
    load_before: &f64,
) -> serde_json::Value {
    let ours = median(b_s.iter().map(|x| x.total).collect());
    let phase = |i: usize| median(b_s.iter().map(|x| x.phases[i]).collect());
    let ok = b_s[0].kept_bytes;
    let probs_bytes = b * h * l * l * 4;
    let (base, bk) = match baseline {
        Some((base, bk, _)) => (Some(base), bk),
        None => (None, probs_bytes),
    };
    println!(
        "{l:>6} {:>5} {ours:>10.4} {:>10} {:>8} {ok:>12} {bk:>12} {:>7.3}  blocks {}x{} top {}",
        t.keys_per_query(),
        base.map_or("-".into(), |x| format!("{x:.4}")),
        base.map_or("-".into(), |x| format!("{:.2}", x / ours)),
        ok as f64 / bk as f64,
        t.query_tile,
        t.key_block,
        t.top_blocks
    );
    println!(
        "        blocks phases (median s): encode {:.4}, select {:.4}, attention fwd {:.4}, backward {:.4}",
        phase(0),
        phase(1),
        phase(2),
        phase(3)
    );
    let mut rec = serde_json::json!({
        "case": {"B": b, "H": h, "L": l, "d": d, "k": t.keys_per_query(), "mask": "none", "selection": "blocks",
                 "query_tile": t.query_tile, "key_block": t.key_block, "top_blocks": t.top_blocks},
        "ours": "PQ encode (S=8, C=16) + block selection (mean score) + block-sparse attention (gathered-block GEMMs), fwd+bwd, f32",
        "ours_s": ours,
        "baseline_s": base,
        "speedup": base.map(|x| x / ours),
        "ours_bytes": ok,
        "baseline_bytes": bk,
        "bytes_ratio": ok as f64 / bk as f64,
        "bytes_kind": "heap bytes held by the autograd graph after forward (counting allocator): output plus everything saved for backward, excluding q, k, v",
        "ours_peak_bytes": median(b_s.iter().map(|x| x.peak_bytes as f64).collect()),
        "min_s": b_s.iter().map(|x| x.total).fold(f64::INFINITY, f64::min),
        "max_s": b_s.iter().map(|x| x.total).fold(0.0, f64::max),
        "runs": b_s.len(),
        "load_avg_1min": [load_before, load_avg()],
        "ours_phases_s": {"pq_encode": phase(0), "select": phase(1), "attention_fwd": phase(2), "backward": phase(3)},
    });
    match baseline {
        Some((_, _, dn)) => {
            rec["baseline_peak_bytes"] = median(dn.iter().map(|x| x.peak_bytes as f64).collect()).into();
        }
        None => {
            rec["baseline_bytes_kind"] =
                "no dense run at this length: the [B, H, L, L] f32 probabilities dense attention keeps (a lower bound)".into();
        }
    }
    rec
}

fn main() -> Result<()> {
    alloc::keep_freed_memory();
    pool::run(bench)
}

fn bench() -> Result<()> {
    let lengths: Vec<usize> = std::env::var("SPT_BENCH_LENGTHS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![512, 1024, 2048, 4096, 16384]);
    let (b, h, d) = (1usize, 12usize, 64usize);
    let scale = 1.0 / (d as f64).sqrt();
    let tiles: Vec<usize> = std::env::var("SPT_BENCH_TILES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![64]);
    let mut records = Vec::new();
    println!(
        "{:>6} {:>5} {:>10} {:>10} {:>8} {:>12} {:>12} {:>7}",
        "L", "k", "sparse_s", "dense_s", "speedup", "sparse_kept", "dense_kept", "ratio"
    );
    for &l in &lengths {
        let topk = l / 8;
        let load_before = load_avg();
        let rand = |seed: u64| -> Result<Var> {
            Var::from_tensor(&(spt_ops::gradcheck::randn_f64(&[b, h, l, d], seed)?.to_dtype(DType::F32)?))
        };
        let (q, k, v) = (rand(1)?, rand(2)?, rand(3)?);
        let w = spt_ops::gradcheck::randn_f64(&[b, h, l, d], 4)?.to_dtype(DType::F32)?;
        // Calibration, done once per layer in training (refreshes are on a schedule): not timed.
        let cb = Codebook::fit(k.as_tensor(), &PqConfig::default())?;
        let mask = AttentionMask::none();
        let sparse = |q: &Tensor, k: &Tensor, v: &Tensor, ph: &mut [f64; 4]| -> Result<Tensor> {
            let t = Instant::now();
            let codes = cb.encode(k)?;
            ph[0] = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let sel = select_keys(q, &codes, &cb, KeyTopK::Count(topk), &mask)?;
            ph[1] = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let o = sparse_attention(q, k, v, &sel, scale)?;
            ph[2] = t.elapsed().as_secs_f64();
            Ok(o)
        };
        let dense =
            |q: &Tensor, k: &Tensor, v: &Tensor, _: &mut [f64; 4]| dense_attention(q, k, v, &mask, scale);
        let flash = |q: &Tensor, k: &Tensor, v: &Tensor, _: &mut [f64; 4]| {
            flash_attention(q, k, v, &mask, scale, None)
        };
        let tilings: Vec<BlockTiling> = tiles
            .iter()
            .map(|&t| BlockTiling {
                query_tile: t,
                key_block: t,
                top_blocks: (topk / t).max(1),
            })
            .collect();
        let blocks: Vec<_> = tilings
            .iter()
            .map(|&t| blocks_step(&cb, &mask, t, scale))
            .collect();
        let reps = if l >= 4096 { 5 } else { 7 };
        // Beyond 4096 only block mode runs: dense attention would keep [H, L, L] scores (12 GiB
        // at 16384) and per-query selection takes minutes; PyTorch's SDPA is the reference there.
        if l > 4096 {
            for f in &blocks {
                step(&q, &k, &v, &w, f)?;
            }
            for (t, f) in tilings.iter().zip(&blocks) {
                let b_s = (0..3)
                    .map(|_| step(&q, &k, &v, &w, f))
                    .collect::<Result<Vec<_>>>()?;
                records.push(blocks_record(l, d, b, h, t, &b_s, None, &load_before));
            }
            continue;
        }
        // Warm-up, then alternate so both see the same machine state.
        step(&q, &k, &v, &w, &sparse)?;
        // SPT_BENCH_SPARSE_ONLY=1 skips the baseline (for profiling the sparse path alone).
        let sparse_only = std::env::var("SPT_BENCH_SPARSE_ONLY").is_ok();
        if !sparse_only {
            step(&q, &k, &v, &w, &dense)?;
        }
        for f in &blocks {
            step(&q, &k, &v, &w, f)?;
        }
        step(&q, &k, &v, &w, &flash)?;
        let (mut s, mut dn, mut fl) = (Vec::new(), Vec::new(), Vec::new());
        let mut bl: Vec<Vec<Sample>> = vec![Vec::new(); blocks.len()];
        for _ in 0..reps {
            for (f, out) in blocks.iter().zip(bl.iter_mut()) {
                out.push(step(&q, &k, &v, &w, f)?);
            }
            s.push(step(&q, &k, &v, &w, &sparse)?);
            fl.push(step(&q, &k, &v, &w, &flash)?);
            dn.push(if sparse_only {
                s[s.len() - 1]
            } else {
                step(&q, &k, &v, &w, &dense)?
            });
        }
        if sparse_only {
            println!("(baseline skipped: SPT_BENCH_SPARSE_ONLY)");
        }
        let ours = median(s.iter().map(|x| x.total).collect());
        let base = median(dn.iter().map(|x| x.total).collect());
        let fused = median(fl.iter().map(|x| x.total).collect());
        let phase = |i: usize| median(s.iter().map(|x| x.phases[i]).collect());
        let (ok, bk) = (s[0].kept_bytes, dn[0].kept_bytes);
        println!(
            "        fused dense (flash_attention): {fused:.4} s, kept {} bytes",
            fl[0].kept_bytes
        );
        println!(
            "{l:>6} {topk:>5} {ours:>10.4} {base:>10.4} {:>8.2} {ok:>12} {bk:>12} {:>7.3}",
            base / ours,
            ok as f64 / bk as f64
        );
        println!(
            "        sparse phases (median s): encode {:.4}, select {:.4}, attention fwd {:.4}, backward {:.4}",
            phase(0),
            phase(1),
            phase(2),
            phase(3)
        );
        records.push(serde_json::json!({
            "case": {"B": b, "H": h, "L": l, "d": d, "k": topk, "mask": "none"},
            "ours_s": ours,
            "baseline_s": base,
            "speedup": base / ours,
            "ours_bytes": ok,
            "baseline_bytes": bk,
            "bytes_ratio": ok as f64 / bk as f64,
            "bytes_kind": "heap bytes held by the autograd graph after forward (counting allocator): output plus everything saved for backward, excluding q, k, v",
            "ours_peak_bytes": median(s.iter().map(|x| x.peak_bytes as f64).collect()),
            "baseline_peak_bytes": median(dn.iter().map(|x| x.peak_bytes as f64).collect()),
            "min_s": s.iter().map(|x| x.total).fold(f64::INFINITY, f64::min),
            "max_s": s.iter().map(|x| x.total).fold(0.0, f64::max),
            "baseline_min_s": dn.iter().map(|x| x.total).fold(f64::INFINITY, f64::min),
            "baseline_max_s": dn.iter().map(|x| x.total).fold(0.0, f64::max),
            "runs": reps,
            "load_avg_1min": [load_before, load_avg()],
            "ours_phases_s": {"pq_encode": phase(0), "select": phase(1), "attention_fwd": phase(2), "backward": phase(3)},
            "fused_dense_s": fused,
            "fused_dense_bytes": fl[0].kept_bytes,
            "fused_dense_peak_bytes": median(fl.iter().map(|x| x.peak_bytes as f64).collect()),
        }));
        for (t, b_s) in tilings.iter().zip(&bl) {
            records.push(blocks_record(
                l,
                d,
                b,
                h,
                t,
                b_s,
                Some((base, bk, &dn)),
                &load_before,
            ));
        }
    }
    let out = serde_json::json!({
        "command": "cargo bench -p spt-ops --bench attention",
        "machine": machine(),
        "ours": "PQ encode (S=8, C=16) + ADC exact top-k selection + fused sparse attention, fwd+bwd, f32",
        "baseline": "dense attention from candle matmul + spt softmax (autograd), fwd+bwd, f32",
        "fused_dense": "spt_ops::flash_attention (fused dense attention, the models' dense path on the CPU), fwd+bwd, f32, timed in the same run; `fused_dense_bytes` is what it keeps",
        "records": records,
    });
    if std::env::var("SPT_BENCH_SPARSE_ONLY").is_ok() {
        return Ok(());
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/results");
    std::fs::create_dir_all(&dir)?;
    let mut out = out;
    if std::env::var("SPT_BENCH_LENGTHS").is_ok() {
        // A run of some lengths replaces the records at those lengths and keeps the others.
        let old: serde_json::Value = std::fs::read_to_string(dir.join("attention.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let mut merged: Vec<serde_json::Value> = old["records"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| {
                let l = r["case"]["L"].as_u64().unwrap_or(0) as usize;
                !lengths.contains(&l)
            })
            .cloned()
            .collect();
        merged.extend(out["records"].as_array().cloned().unwrap_or_default());
        merged.sort_by_key(|r| r["case"]["L"].as_u64().unwrap_or(0));
        out["records"] = merged.into();
    }
    let tmp = dir.join("attention.json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_string_pretty(&out).map_err(candle_core::Error::wrap)?,
    )?;
    std::fs::rename(&tmp, dir.join("attention.json"))?;
    println!("wrote bench/results/attention.json");
    let _ = Device::Cpu;
    Ok(())
}
