//! `residual_layer_norm` (one op) against its composed form (dropout mask multiply, add,
//! `layer_norm`: three graph nodes), forward + backward of `Σ y ⊙ u`, in one process and
//! interleaved rep by rep. x and the residual are tracked, gamma and beta frozen (as in LoRA and
//! SPT fine-tuning). Bytes: heap held between the forward and the backward (what the graph keeps),
//! counted by a wrapping allocator. Writes `bench/results/residual-layer-norm.json`.
//!
//! Then `residual_dropout` (one op: GPT-2's pre-LN residual branches) against its composed form
//! (a mask drawn on one thread, a multiply and an add), the same way, into
//! `bench/results/residual-dropout.json`.
//!
//! Run: `cargo bench -p spt-ops --bench norm`.

use candle_core::{DType, Result, Tensor, Var};
use spt_ops::gradcheck::randn_f64;
use spt_ops::norm::{residual_dropout_reference, residual_layer_norm_reference};
use spt_ops::{residual_dropout, residual_layer_norm, SeededDropout};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

#[path = "common/alloc.rs"]
mod alloc;
use alloc::LIVE;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

type Op = fn(&Tensor, &Tensor, &Tensor, &Tensor, f64, Option<SeededDropout>) -> Result<Tensor>;
type DropOp = fn(&Tensor, &Tensor, Option<SeededDropout>) -> Result<Tensor>;

struct Inputs {
    x: Var,
    r: Var,
    g: Tensor,
    b: Tensor,
    /// The upstream gradient.
    u: Tensor,
}

/// One forward (`forward`) + backward of `Σ y ⊙ u`: (seconds, bytes held between them).
fn step(t: &Inputs, forward: impl FnOnce() -> Result<Tensor>) -> Result<(f64, usize)> {
    let base = LIVE.load(Relaxed);
    let t0 = Instant::now();
    let loss = forward()?.mul(&t.u)?.sum_all()?;
    let kept = LIVE.load(Relaxed).saturating_sub(base);
    let grads = loss.backward()?;
    let t = t0.elapsed().as_secs_f64();
    drop(grads);
    Ok((t, kept))
}

/// [`step`] for a residual + layer-norm op.
fn step_norm(op: Op, t: &Inputs, p: f64, seed: u64) -> Result<(f64, usize)> {
    let (x, r) = (t.x.as_tensor(), t.r.as_tensor());
    step(t, || op(x, r, &t.g, &t.b, 1e-12, Some(SeededDropout { p, seed })))
}

/// [`step`] for a residual-dropout op.
fn step_dropout(op: DropOp, t: &Inputs, p: f64, seed: u64) -> Result<(f64, usize)> {
    let (x, r) = (t.x.as_tensor(), t.r.as_tensor());
    step(t, || op(x, r, Some(SeededDropout { p, seed })))
}

/// Writes `doc` to `bench/results/{name}` through a temporary file.
fn write_results(name: &str, doc: &serde_json::Value) -> Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/results");
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!("{name}.tmp"));
    let text = serde_json::to_string_pretty(doc).map_err(candle_core::Error::wrap)?;
    std::fs::write(&tmp, text + "\n")?;
    std::fs::rename(&tmp, dir.join(name))?;
    println!("wrote {}", dir.join(name).display());
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Times `ours` and `base` interleaved rep by rep (12 reps, the first dropped) on one case and
/// returns its record.
fn compare(
    what: &str,
    (rows, d, p): (usize, usize, f64),
    ours: impl Fn(u64) -> Result<(f64, usize)>,
    base: impl Fn(u64) -> Result<(f64, usize)>,
) -> Result<serde_json::Value> {
    let load_before = loadavg();
    let (mut ours_s, mut base_s) = (Vec::new(), Vec::new());
    let (mut ours_bytes, mut base_bytes) = (0, 0);
    for rep in 0..12u64 {
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
        "{what} rows {rows} d {d} p {p}: fused {o:.5}s, composed {bs:.5}s ({:.2}x); kept {} vs {} KiB",
        bs / o,
        ours_bytes / 1024,
        base_bytes / 1024
    );
    Ok(serde_json::json!({
        "case": {"rows": rows, "d": d, "dropout": p},
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

fn main() -> Result<()> {
    alloc::keep_freed_memory();
    let threads = rayon::current_num_threads();
    println!("{threads} rayon threads; load average {}", loadavg());
    let f32t = |t: Tensor| t.to_dtype(DType::F32);
    let inputs = |rows: usize, d: usize| -> Result<Inputs> {
        Ok(Inputs {
            x: Var::from_tensor(&f32t(randn_f64(&[rows, d], 1)?)?)?,
            r: Var::from_tensor(&f32t(randn_f64(&[rows, d], 2)?)?)?,
            g: f32t(randn_f64(&[d], 3)?.affine(0.1, 1.0)?)?,
            b: f32t(randn_f64(&[d], 4)?)?,
            u: f32t(randn_f64(&[rows, d], 5)?)?,
        })
    };
    let doc = |ours: &str, baseline: &str, records: Vec<serde_json::Value>| {
        serde_json::json!({
            "command": "cargo bench -p spt-ops --bench norm",
            "machine": format!("{threads} rayon threads"),
            "ours": ours,
            "baseline": baseline,
            "records": records,
        })
    };
    let mut records = Vec::new();
    // MiniLM B8 x L512 and BERT-base B4 x L512 sublayer outputs.
    for (rows, d) in [(4096usize, 384usize), (2048, 768)] {
        for p in [0.0, 0.1] {
            let t = inputs(rows, d)?;
            records.push(compare(
                "residual_layer_norm",
                (rows, d, p),
                |rep| step_norm(residual_layer_norm, &t, p, rep),
                |rep| step_norm(residual_layer_norm_reference, &t, p, rep),
            )?);
        }
    }
    write_results(
        "residual-layer-norm.json",
        &doc(
            "spt_ops::residual_layer_norm (one op; mask regenerated from its seed in backward)",
            "the composed form: dropout mask multiply, add, spt_ops::layer_norm (three graph nodes)",
            records,
        ),
    )?;

    let mut records = Vec::new();
    // GPT-2 small B4 x L512 and a MiniLM-width [4096, 384], at GPT-2's dropout.
    for (rows, d) in [(2048usize, 768usize), (4096, 384)] {
        let (t, p) = (inputs(rows, d)?, 0.1);
        records.push(compare(
            "residual_dropout",
            (rows, d, p),
            |rep| step_dropout(residual_dropout, &t, p, rep),
            |rep| step_dropout(residual_dropout_reference, &t, p, rep),
        )?);
    }
    write_results(
        "residual-dropout.json",
        &doc(
            "spt_ops::residual_dropout (one op; mask regenerated from its seed in backward)",
            "the composed form: a mask drawn on one thread, a multiply and an add (two graph nodes, the mask kept)",
            records,
        ),
    )
}
