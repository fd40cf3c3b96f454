//! Routed FFN forward + backward vs the dense FFN, CPU.
//!
//! Run: `cargo bench -p spt-ops --bench ffn` (writes `bench/results/ffn.json`).
//! `FFN_BENCH_QUICK=1` runs only the first case of each shape (for development; writes nothing).
//! `FFN_BENCH_QUICK=1 FFN_BENCH_PROFILE=ours|baseline|dense_skip|phases` runs one variant of the
//! first case only, for `perf record`; `FFN_BENCH_D=384` keeps only the cases of that width (and writes nothing);
//! `FFN_BENCH_REPS=n` sets the repetitions (for profiling; default 7 at d768, 15 at d384).
//!
//! For each case, in one process and interleaved rep by rep:
//! - **ours**: [`RoutedFfn`] (softmax-kept gates, top-k of the blocks), forward + backward;
//! - **baseline**: the dense FFN from candle matmuls and our differentiable activation
//!   (`reference::dense_ffn`), plus, in the frozen case, the same LoRA (r = 16) as candle
//!   matmuls; frozen base weights are plain tensors, trainable ones are `Var`s;
//! - **dense_skip** (extra): the dense FFN through our frozen-aware ops (LoraLinear), which,
//!   unlike candle's matmul backward, computes no gradient for frozen weights. This isolates the
//!   gain of routing from the gain of skipping frozen weight gradients.
//!
//! Memory comes from mimalloc with purging off, as in the `spt-train` binary (benches/common).
//!
//! x is a `Var` (as inside a model, the layer's input needs a gradient); the loss is
//! `Σ y ⊙ u` with a fixed random `u`. Times are medians of 7 (d 768) or 15 (d 384, whose runs
//! are short and noisier) runs after one warm-up.

use candle_core::{DType, Result, Tensor, Var};
use spt_ops::gradcheck::randn_f64;
use spt_ops::routed_ffn::reference;
use spt_ops::routed_ffn::BlockTopK;
use spt_ops::{Activation, GateMode, LoraConfig, LoraLinear, RoutedFfn, RoutedFfnConfig};
use std::time::Instant;

#[path = "common/alloc.rs"]
mod alloc;
#[path = "common/compare.rs"]
mod compare;
#[path = "common/pool.rs"]
mod pool;
use compare::{loadavg, machine};

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

const N_TOKENS: usize = 4096;
const RANK: usize = 16;
const ACT: Activation = Activation::GeluErf;

#[derive(Clone, Copy, Debug)]
struct Case {
    d: usize,
    d_ff: usize,
    block: usize,
    kept: f64,
    frozen: bool,
}

struct Timing {
    median: f64,
    min: f64,
    max: f64,
    fwd_median: f64,
}

fn summarize(total: &mut [f64], fwd: &mut [f64]) -> Timing {
    total.sort_by(f64::total_cmp);
    fwd.sort_by(f64::total_cmp);
    Timing {
        median: total[total.len() / 2],
        min: total[0],
        max: total[total.len() - 1],
        fwd_median: fwd[fwd.len() / 2],
    }
}

/// Times `f` (which returns the output) for forward and forward + backward of `Σ y ⊙ u`.
fn run_once(f: &dyn Fn() -> Result<Tensor>, u: &Tensor) -> Result<(f64, f64)> {
    let t0 = Instant::now();
    let y = f()?;
    let fwd = t0.elapsed().as_secs_f64();
    let grads = y.mul(u)?.sum_all()?.backward()?;
    let total = t0.elapsed().as_secs_f64();
    drop(grads);
    Ok((total, fwd))
}

fn f32t(t: Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)
}

struct Record {
    case: Case,
    load_before: String,
    load_after: String,
    ours: Timing,
    base: Timing,
    skip: Timing,
    ours_bytes: usize,
    base_bytes: usize,
}

fn bench_case(c: Case, reps: usize) -> Result<Record> {
    let load_before = loadavg();
    let (d, d_ff) = (c.d, c.d_ff);
    let n_blocks = d_ff / c.block;
    let w1 = f32t((randn_f64(&[d_ff, d], 1)? * (1.0 / (d as f64).sqrt()))?)?;
    let b1 = f32t((randn_f64(&[d_ff], 2)? * 0.02)?)?;
    let w2 = f32t((randn_f64(&[d, d_ff], 3)? * (1.0 / (d_ff as f64).sqrt()))?)?;
    let b2 = f32t((randn_f64(&[d], 4)? * 0.02)?)?;
    let x = Var::from_tensor(&f32t(randn_f64(&[N_TOKENS, d], 5)?)?)?;
    let u = f32t(randn_f64(&[N_TOKENS, d], 6)?)?;
    let lcfg = LoraConfig {
        rank: RANK,
        alpha: 2.0 * RANK as f64,
        dropout: 0.0,
        seed: 7,
    };
    // Base weights: plain tensors (frozen) or Vars (trainable).
    let (w1v, b1v, w2v, b2v);
    let (w1, b1, w2, b2) = if c.frozen {
        (w1, b1, w2, b2)
    } else {
        w1v = Var::from_tensor(&w1)?;
        b1v = Var::from_tensor(&b1)?;
        w2v = Var::from_tensor(&w2)?;
        b2v = Var::from_tensor(&b2)?;
        (
            w1v.as_tensor().clone(),
            b1v.as_tensor().clone(),
            w2v.as_tensor().clone(),
            b2v.as_tensor().clone(),
        )
    };
    let mut cfg = RoutedFfnConfig::new(n_blocks, BlockTopK::Fraction(c.kept));
    let act = ACT;
    cfg.gate = GateMode::SoftmaxKept;
    let mut routed = RoutedFfn::new(&w1, &b1, &w2, &b2, act, cfg)?;
    if c.frozen {
        routed = routed.with_lora(lcfg)?;
    }
    // Non-zero B so that no gradient is trivially zero.
    if let Some((_, lb1, _, lb2)) = routed.lora_factors() {
        lb1.set(&f32t((randn_f64(&[d_ff, RANK], 8)? * 0.01)?)?)?;
        lb2.set(&f32t((randn_f64(&[d, RANK], 9)? * 0.01)?)?)?;
    }
    // Dense LoRA factors for the baselines (trainable Vars, same shapes and init scheme).
    let a1 = Var::from_tensor(&f32t((randn_f64(&[RANK, d], 10)? * 0.02)?)?)?;
    let lb1 = Var::from_tensor(&f32t((randn_f64(&[d_ff, RANK], 11)? * 0.01)?)?)?;
    let a2 = Var::from_tensor(&f32t((randn_f64(&[RANK, d_ff], 12)? * 0.02)?)?)?;
    let lb2 = Var::from_tensor(&f32t((randn_f64(&[d, RANK], 13)? * 0.01)?)?)?;
    let s = lcfg.scale();
    let xt = x.as_tensor().clone();
    let ours = || -> Result<Tensor> { Ok(routed.forward_t(&xt, true)?.y) };
    let baseline = || -> Result<Tensor> {
        if !c.frozen {
            return reference::dense_ffn(&xt, &w1, &b1, &w2, &b2, ACT);
        }
        let lora = |x: &Tensor, a: &Var, b: &Var| -> Result<Tensor> {
            x.matmul(&a.as_tensor().t()?)?.matmul(&b.as_tensor().t()?)? * s
        };
        let h = (xt.matmul(&w1.t()?)?.broadcast_add(&b1)? + lora(&xt, &a1, &lb1)?)?;
        let h = ACT.forward(&h)?;
        h.matmul(&w2.t()?)?.broadcast_add(&b2)? + lora(&h, &a2, &lb2)?
    };
    let fc1 = LoraLinear::new(&w1, Some(&b1), lcfg)?;
    let fc2 = LoraLinear::new(&w2, Some(&b2), lcfg)?;
    let dense_skip = || -> Result<Tensor> {
        if !c.frozen {
            // Trainable weights: every gradient is needed; skipping has nothing to skip.
            return reference::dense_ffn(&xt, &w1, &b1, &w2, &b2, ACT);
        }
        fc2.forward_t(&ACT.forward(&fc1.forward_t(&xt, true)?)?, true)
    };
    if std::env::var("FFN_BENCH_PROFILE").as_deref() == Ok("phases") {
        phases(&routed, &xt, &u, reps)?;
        return Err(candle_core::Error::Msg("profiling run: no record".into()));
    }
    if let Ok(which) = std::env::var("FFN_BENCH_PROFILE") {
        // Profiling aid (`perf record`): only one variant, many reps, nothing recorded.
        let f: &dyn Fn() -> Result<Tensor> = match which.as_str() {
            "baseline" => &baseline,
            "dense_skip" => &dense_skip,
            _ => &ours,
        };
        for _ in 0..reps {
            run_once(f, &u)?;
        }
        return Err(candle_core::Error::Msg("profiling run: no record".into()));
    }
    // Warm-up, then interleaved reps.
    for f in [&ours as &dyn Fn() -> Result<Tensor>, &baseline, &dense_skip] {
        run_once(f, &u)?;
    }
    let (mut o, mut of, mut b, mut bf, mut k, mut kf) = (vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..reps {
        let (t, f) = run_once(&ours, &u)?;
        o.push(t);
        of.push(f);
        let (t, f) = run_once(&baseline, &u)?;
        b.push(t);
        bf.push(f);
        let (t, f) = run_once(&dense_skip, &u)?;
        k.push(t);
        kf.push(f);
    }
    let k_blocks = BlockTopK::Fraction(c.kept).resolve(n_blocks)?;
    // f32 hidden activations held for backward: fc1's output and the activation's (the dense
    // FFN, and ours with trainable weights), or fc1's alone (the one-op LoRA FFN recomputes h).
    let held = if c.frozen { 1 } else { 2 };
    let ours_bytes = 4 * held * N_TOKENS * k_blocks * c.block;
    let base_bytes = 4 * 2 * N_TOKENS * d_ff;
    Ok(Record {
        case: c,
        load_before,
        load_after: loadavg(),
        ours: summarize(&mut o, &mut of),
        base: summarize(&mut b, &mut bf),
        skip: summarize(&mut k, &mut kf),
        ours_bytes,
        base_bytes,
    })
}

/// Median seconds of `f` over `reps` runs.
fn med(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut ts = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        f()?;
        ts.push(t0.elapsed().as_secs_f64());
    }
    ts.sort_by(f64::total_cmp);
    Ok(ts[ts.len() / 2])
}

/// Per-phase timings of the routed layer (profiling aid; `FFN_BENCH_PROFILE=phases`).
fn phases(layer: &RoutedFfn, x: &Tensor, u: &Tensor, reps: usize) -> Result<()> {
    use spt_ops::routed_ffn::{gather_matmul, scatter_matmul};
    let (w1, b1, w2, _) = layer.weights();
    let routing = layer.route(x)?;
    let gates = Tensor::ones(routing.n_rows(), DType::F32, x.device())?;
    let xd = x.detach();
    let t_route = med(reps, || layer.route(&xd).map(|_| ()))?;
    let t_g = med(reps, || gather_matmul(&xd, w1, Some(b1), &routing).map(|_| ()))?;
    let hpre = gather_matmul(&xd, w1, Some(b1), &routing)?;
    let t_act = med(reps, || ACT.forward(&hpre).map(|_| ()))?;
    let h = ACT.forward(&hpre)?;
    let t_s = med(reps, || scatter_matmul(&h, &gates, w2, &routing).map(|_| ()))?;
    let hv = Var::from_tensor(&h)?;
    let t_s_bwd = med(reps, || {
        let y = scatter_matmul(hv.as_tensor(), &gates, w2, &routing)?;
        let t0 = Instant::now();
        y.mul(u)?.sum_all()?.backward()?;
        let _ = t0;
        Ok(())
    })? - t_s;
    let xv = Var::from_tensor(&xd)?;
    let up = Tensor::ones(hpre.shape(), DType::F32, x.device())?;
    let t_g_bwd = med(reps, || {
        gather_matmul(xv.as_tensor(), w1, Some(b1), &routing)?
            .mul(&up)?
            .sum_all()?
            .backward()
            .map(|_| ())
    })? - t_g;
    let t_full = med(reps, || {
        let out = layer.forward_t(x, true)?;
        out.y.mul(u)?.sum_all()?.backward().map(|_| ())
    })?;
    let t_fwd = med(reps, || layer.forward_t(x, true).map(|_| ()))?;
    // The same layer without LoRA (same router, so the same routing): what LoRA adds.
    let (w1, b1, w2, b2) = layer.weights();
    let bare = RoutedFfn::new(w1, b1, w2, b2, layer.activation(), layer.config().clone())?;
    let t_bare = med(reps, || {
        let out = bare.forward_t(x, true)?;
        out.y.mul(u)?.sum_all()?.backward().map(|_| ())
    })?;
    println!(
        "phases (median s): route {t_route:.4} | fc1 gather fwd {t_g:.4} | act fwd {t_act:.4} | fc2 scatter fwd {t_s:.4} | \
         fc2 scatter bwd(dh) {t_s_bwd:.4} | fc1 gather bwd(dx)+mul {t_g_bwd:.4} | layer fwd {t_fwd:.4} | layer fwd+bwd {t_full:.4} | without LoRA {t_bare:.4}"
    );
    Ok(())
}

fn main() -> Result<()> {
    alloc::keep_freed_memory();
    pool::run(bench)
}

fn bench() -> Result<()> {
    let quick = std::env::var("FFN_BENCH_QUICK").is_ok();
    println!("machine: {}; load average {}", machine(), loadavg());
    let mut records = Vec::new();
    let only_d: Option<usize> = std::env::var("FFN_BENCH_D").ok().and_then(|v| v.parse().ok());
    for (d, d_ff) in [(768usize, 3072usize), (384, 1536)] {
        if only_d.is_some_and(|o| o != d) {
            continue;
        }
        for frozen in [true, false] {
            for block in [64usize, 128] {
                for kept in [0.5, 0.25] {
                    let c = Case {
                        d,
                        d_ff,
                        block,
                        kept,
                        frozen,
                    };
                    let reps = std::env::var("FFN_BENCH_REPS")
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(if d >= 768 { 7 } else { 15 });
                    let r = bench_case(c, reps)?;
                    println!(
                        "d={d:4} d_ff={d_ff:4} block={block:3} kept={kept:.2} {:11}: ours {:.4}s (min {:.4}, fwd {:.4}) | candle dense {:.4}s (fwd {:.4}) → {:.2}× | dense_skip {:.4}s (fwd {:.4}) → {:.2}×",
                        if frozen { "frozen_lora" } else { "trainable" },
                        r.ours.median,
                        r.ours.min,
                        r.ours.fwd_median,
                        r.base.median,
                        r.base.fwd_median,
                        r.base.median / r.ours.median,
                        r.skip.median,
                        r.skip.fwd_median,
                        r.skip.median / r.ours.median,
                    );
                    records.push(r);
                    if quick {
                        break;
                    }
                }
                if quick {
                    break;
                }
            }
        }
    }
    if quick || only_d.is_some() {
        return Ok(()); // a partial run: no record
    }
    let recs: Vec<serde_json::Value> = records
        .iter()
        .map(|r| {
            let c = r.case;
            serde_json::json!({
                "case": {"d": c.d, "d_ff": c.d_ff, "block": c.block, "kept": c.kept,
                         "weights": if c.frozen { "frozen_lora" } else { "trainable" }},
                "ours_s": r.ours.median,
                "baseline_s": r.base.median,
                "speedup": r.base.median / r.ours.median,
                "ours_bytes": r.ours_bytes,
                "baseline_bytes": r.base_bytes,
                "bytes_kind": "analytic: f32 FFN hidden activations held for backward (the baseline's pre- and post-activation; ours: the same with trainable weights, the pre-activation alone with frozen + LoRA)",
                "min_s": r.ours.min,
                "max_s": r.ours.max,
                "baseline_min_s": r.base.min,
                "baseline_max_s": r.base.max,
                "ours_fwd_s": r.ours.fwd_median,
                "baseline_fwd_s": r.base.fwd_median,
                "dense_skip_s": r.skip.median,
                "dense_skip_fwd_s": r.skip.fwd_median,
                "speedup_vs_dense_skip": r.skip.median / r.ours.median,
                "tokens": N_TOKENS,
                "loadavg_before": r.load_before,
                "loadavg_after": r.load_after,
                "lora_rank": if c.frozen { RANK } else { 0 },
            })
        })
        .collect();
    let doc = serde_json::json!({
        "command": "cargo bench -p spt-ops --bench ffn",
        "machine": machine(),
        "allocator": "mimalloc, purging off (as the spt-train binary)",
        "records": recs,
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/results");
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join("ffn.json.tmp");
    let text = serde_json::to_string_pretty(&doc).map_err(candle_core::Error::wrap)?;
    std::fs::write(&tmp, text + "\n")?;
    std::fs::rename(&tmp, dir.join("ffn.json"))?;
    println!("wrote {}", dir.join("ffn.json").display());
    Ok(())
}
