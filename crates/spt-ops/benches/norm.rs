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

#[path = "common/alloc.rs"]
mod alloc;
#[path = "common/compare.rs"]
mod compare;
#[path = "common/pool.rs"]
mod pool;
use compare::{compare, loadavg, step, write_results};

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

type Op = fn(&Tensor, &Tensor, &Tensor, &Tensor, f64, Option<SeededDropout>) -> Result<Tensor>;
type DropOp = fn(&Tensor, &Tensor, Option<SeededDropout>) -> Result<Tensor>;

/// Reps timed per variant and case (after one warm-up).
const REPS: usize = 11;

struct Inputs {
    x: Var,
    r: Var,
    g: Tensor,
    b: Tensor,
    /// The upstream gradient.
    u: Tensor,
}

/// [`step`] of `Σ y ⊙ u` for a residual + layer-norm op.
fn step_norm(op: Op, t: &Inputs, p: f64, seed: u64) -> Result<(f64, usize)> {
    let (x, r) = (t.x.as_tensor(), t.r.as_tensor());
    step(|| {
        op(x, r, &t.g, &t.b, 1e-12, Some(SeededDropout { p, seed }))?
            .mul(&t.u)?
            .sum_all()
    })
}

/// [`step`] of `Σ y ⊙ u` for a residual-dropout op.
fn step_dropout(op: DropOp, t: &Inputs, p: f64, seed: u64) -> Result<(f64, usize)> {
    let (x, r) = (t.x.as_tensor(), t.r.as_tensor());
    step(|| op(x, r, Some(SeededDropout { p, seed }))?.mul(&t.u)?.sum_all())
}

fn main() -> Result<()> {
    alloc::keep_freed_memory();
    pool::run(bench)
}

fn bench() -> Result<()> {
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
                serde_json::json!({"rows": rows, "d": d, "dropout": p}),
                REPS,
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
            serde_json::json!({"rows": rows, "d": d, "dropout": p}),
            REPS,
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
