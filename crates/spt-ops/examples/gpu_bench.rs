//! GPU benchmark: sparse attention (PQ encode + ADC top-k selection + fused sparse attention,
//! forward and backward) vs dense attention (cuBLAS matmuls + our softmax, forward and backward)
//! at GPT-2-medium-like shapes: B = 1, H = 16, d = 64, causal, k = L/8.
//!
//! In bf16 each case also times the tensor-core kernels (`kernels/flash_attention.cu`): our dense
//! flash attention and block-sparse attention (64 × 64 tiles, L/512 blocks = L/8 keys per query)
//! with its device-side block selection, under `"tiled"`.
//!
//! Every case runs in bf16 and in f32 (`SPT_BENCH_DTYPES`, default `bf16,f32`; bf16 first, as
//! the H200 target is set in it): PyTorch's flash attention, the comparison in
//! `scripts/sdpa_bench.py`, exists only in half precision.
//!
//! Usage: `gpu_bench OUT_DIR [L,L,…]` (default lengths 1024,4096,16384). Writes
//! `OUT_DIR/gpu_bench.json`. Dense attention materialises [H, L, L] scores several times over
//! (and builds its causal mask on the host), so it runs only up to `SPT_DENSE_MAX_L` (default
//! 4096); longer cases record `"dense": null` with the reason.
//!
//! Timing: 2 warm-up steps, then the median of `SPT_BENCH_REPS` (default 5) steps, each ended by
//! a device synchronize.
//!
//! Routed FFN vs dense FFN, forward + backward to x, at GPT-2-medium's FFN (d = 1024,
//! d_ff = 4096, GELU-tanh), 8192 tokens, 8 blocks with 4 (50 %) and 2 (25 %) kept. Off the CPU
//! the routed FFN is the composed path: our row-move kernels around cuBLAS GEMMs (one batched
//! GEMM over blocks padded to the fullest, or one per block for skewed routings), so this
//! measures that path, not a fused grouped-GEMM kernel.

use candle_core::{DType, Device, Result, Tensor, Var};
use spt_ops::routed_ffn::BlockTopK;
use spt_ops::{
    block_sparse_attention, dense_attention, flash_attention, select_blocks, select_keys, sparse_attention,
    Activation, AttentionMask, BlockScore, BlockSelection, BlockTiling, Codebook, KeyTopK, PqConfig,
    RoutedFfn, RoutedFfnConfig,
};
use std::time::Instant;

const B: usize = 1;
const H: usize = 16;
const D: usize = 64;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median milliseconds of `f` (each call followed by a synchronize).
fn time(dev: &Device, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..2 {
        f()?;
        dev.synchronize()?;
    }
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        f()?;
        dev.synchronize()?;
        t.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(t))
}

fn randn(dev: &Device, l: usize, seed: u64, dt: DType) -> Result<Tensor> {
    dev.set_seed(seed)?;
    Tensor::randn(0f32, 1f32, (B, H, l, D), dev)?.to_dtype(dt)
}

fn dtype_name(dt: DType) -> &'static str {
    match dt {
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

fn fwd_bwd(
    q: &Var,
    k: &Var,
    v: &Var,
    w: &Tensor,
    f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<()> {
    let o = f(q.as_tensor(), k.as_tensor(), v.as_tensor())?;
    let g = o.mul(w)?.sum_all()?.backward()?;
    for x in [q, k, v] {
        g.get(x.as_tensor()).expect("gradient");
    }
    Ok(())
}

/// Routed vs dense FFN (frozen weights, gradient to x), median ms of forward + backward.
fn ffn_cases(dev: &Device, reps: usize, dt: DType) -> Result<Vec<serde_json::Value>> {
    let (t, d, d_ff, n) = (8192, 1024, 4096, 8);
    dev.set_seed(10)?;
    let x = Tensor::randn(0f32, 1f32, (t, d), dev)?.to_dtype(dt)?;
    let w1 = (Tensor::randn(0f32, 1f32, (d_ff, d), dev)? / (d as f64).sqrt())?.to_dtype(dt)?;
    let b1 = Tensor::zeros(d_ff, dt, dev)?;
    let w2 = (Tensor::randn(0f32, 1f32, (d, d_ff), dev)? / (d_ff as f64).sqrt())?.to_dtype(dt)?;
    let b2 = Tensor::zeros(d, dt, dev)?;
    let up = Tensor::randn(0f32, 1f32, (t, d), dev)?.to_dtype(dt)?;
    let xv = Var::from_tensor(&x)?;
    let step = |y: Tensor| -> Result<()> {
        let g = (y * &up)?.sum_all()?.backward()?;
        g.get(xv.as_tensor()).expect("dx");
        Ok(())
    };
    let dense_ms = time(dev, reps, || {
        let h = Activation::GeluTanh.forward(&xv.as_tensor().matmul(&w1.t()?)?.broadcast_add(&b1)?)?;
        step(h.matmul(&w2.t()?)?.broadcast_add(&b2)?)
    })?;
    eprintln!(
        "== FFN {t}x{d}, d_ff {d_ff}, {}: dense fwd+bwd {dense_ms:.3} ms",
        dtype_name(dt)
    );
    let mut cases = Vec::new();
    for k in [4, 2] {
        let cfg = RoutedFfnConfig::new(n, BlockTopK::Count(k));
        let act = Activation::GeluTanh;
        let ffn = RoutedFfn::new(&w1, &b1, &w2, &b2, act, cfg)?;
        let routed_ms = time(dev, reps, || step(ffn.forward_t(xv.as_tensor(), true)?.y))?;
        // Where the time goes: the routing alone (router GEMM, then top-k, the counting sort and
        // the row maps on the device, with the group row counts read back) and the forward alone.
        let route_ms = time(dev, reps, || ffn.route(xv.as_tensor()).map(|_| ()))?;
        let fwd_ms = time(dev, reps, || ffn.forward_t(xv.as_tensor(), false).map(|_| ()))?;
        eprintln!(
            "  routed {k}/{n} blocks: {routed_ms:.3} ms ({:.2}x dense); routing {route_ms:.3} ms, forward {fwd_ms:.3} ms",
            routed_ms / dense_ms
        );
        let stages = if k == 4 {
            Some(ffn_stages(dev, reps, &x, &w1, n, k)?)
        } else {
            None
        };
        cases.push(serde_json::json!({
            "stages_fwd_bwd_ms": stages,
            "tokens": t, "d": d, "d_ff": d_ff, "n_blocks": n, "top_k": k,
            "kept": k as f64 / n as f64, "dtype": dtype_name(dt),
            "routed_fwd_bwd_ms": routed_ms, "dense_fwd_bwd_ms": dense_ms,
            "routed_routing_only_ms": route_ms, "routed_fwd_ms": fwd_ms,
            "ratio": routed_ms / dense_ms,
        }));
    }
    Ok(cases)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let Some(out_dir) = args.get(1) else {
        eprintln!("usage: gpu_bench OUT_DIR [L,L,...]");
        std::process::exit(2);
    };
    let lengths: Vec<usize> = args
        .get(2)
        .map(|s| {
            s.split(',')
                .map(|x| x.trim().parse().expect("a length"))
                .collect()
        })
        .unwrap_or_else(|| vec![1024, 4096, 16384]);
    let reps: usize = std::env::var("SPT_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let dense_max: usize = std::env::var("SPT_DENSE_MAX_L")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4096);
    let dtypes: Vec<DType> = std::env::var("SPT_BENCH_DTYPES")
        .unwrap_or_else(|_| "bf16,f32".into())
        .split(',')
        .map(|s| match s.trim() {
            "bf16" => DType::BF16,
            "f32" => DType::F32,
            other => {
                eprintln!("SPT_BENCH_DTYPES: unknown dtype {other:?} (expected f32 or bf16)");
                std::process::exit(2);
            }
        })
        .collect();
    let dev = Device::new_cuda(0)?;
    if std::env::var("SPT_BENCH_ONLY").as_deref() == Ok("ffn-profile") {
        return ffn_profile(&dev);
    }
    let mut cases = Vec::new();
    let mut ffn = Vec::new();
    // Attention first (the H200 target is set on it), then the FFN. A case that fails records
    // its error and the run goes on, so one broken path does not hide the others' numbers.
    let mut failed = 0;
    for (&dt, &l) in dtypes.iter().flat_map(|dt| lengths.iter().map(move |l| (dt, l))) {
        eprintln!("== L = {l}, k = {}, {}", l / 8, dtype_name(dt));
        cases.push(attention_case(&dev, reps, dense_max, dt, l).unwrap_or_else(|e| {
            failed += 1;
            eprintln!("  FAILED: {e}");
            serde_json::json!({"L": l, "k": l / 8, "dtype": dtype_name(dt), "error": e.to_string()})
        }));
        write_results(out_dir, reps, &ffn, &cases, false)?;
    }
    for &dt in &dtypes {
        match ffn_cases(&dev, reps, dt) {
            Ok(c) => ffn.extend(c),
            Err(e) => {
                failed += 1;
                eprintln!("  FFN {} FAILED: {e}", dtype_name(dt));
                ffn.push(serde_json::json!({"dtype": dtype_name(dt), "error": e.to_string()}));
            }
        }
        write_results(out_dir, reps, &ffn, &cases, false)?;
    }
    // The tensor-core kernels last: they have not run on a GPU before, and a fault in one
    // poisons the process's CUDA context, failing every case after it.
    if dtypes.contains(&DType::BF16) {
        for &l in &lengths {
            eprintln!("== L = {l}, tensor-core kernels, bf16");
            let tiled = tiled_cases(&dev, reps, l).unwrap_or_else(|e| {
                failed += 1;
                eprintln!("  FAILED: {e}");
                serde_json::json!({"error": e.to_string()})
            });
            let bf16_case = |c: &&mut serde_json::Value| c["L"] == l && c["dtype"] == "bf16";
            if let Some(case) = cases.iter_mut().find(bf16_case).and_then(|c| c.as_object_mut()) {
                case.insert("tiled".into(), tiled);
            }
            write_results(out_dir, reps, &ffn, &cases, false)?;
        }
    }
    write_results(out_dir, reps, &ffn, &cases, true)?;
    if failed > 0 {
        eprintln!("gpu_bench: {failed} case(s) failed (their errors are in the JSON)");
        std::process::exit(1);
    }
    Ok(())
}

/// For a kernel profiler (`SPT_BENCH_ONLY=ffn-profile ncu … gpu_bench OUT`): one dense and one
/// routed (4 of 8) FFN step in bf16, each after a warm-up and followed by a marker, a one-value
/// f32 → f64 cast, so the profile splits into the two steps. Prints each step's wall time.
fn ffn_profile(dev: &Device) -> Result<()> {
    let (t, d, d_ff, n, dt) = (8192, 1024, 4096, 8, DType::BF16);
    dev.set_seed(10)?;
    let r = |shape: (usize, usize), s: f64| -> Result<Tensor> {
        (Tensor::randn(0f32, 1f32, shape, dev)? * s)?.to_dtype(dt)
    };
    let (x, w1, w2, up) = (
        r((t, d), 1.0)?,
        r((d_ff, d), 0.03)?,
        r((d, d_ff), 0.015)?,
        r((t, d), 1.0)?,
    );
    let (b1, b2) = (Tensor::zeros(d_ff, dt, dev)?, Tensor::zeros(d, dt, dev)?);
    let xv = Var::from_tensor(&x)?;
    let marker = || Tensor::new(&[1f32], dev)?.to_dtype(DType::F64).map(|_| ());
    let step = |y: Tensor| -> Result<()> { (y * &up)?.sum_all()?.backward().map(|_| ()) };
    let dense = || -> Result<()> {
        let h = Activation::GeluTanh.forward(&xv.as_tensor().matmul(&w1.t()?)?.broadcast_add(&b1)?)?;
        step(h.matmul(&w2.t()?)?.broadcast_add(&b2)?)
    };
    let cfg = RoutedFfnConfig::new(n, BlockTopK::Count(4));
    let act = Activation::GeluTanh;
    let ffn = RoutedFfn::new(&w1, &b1, &w2, &b2, act, cfg)?;
    let routed = || step(ffn.forward_t(xv.as_tensor(), true)?.y);
    for (name, f) in [
        ("dense", &dense as &dyn Fn() -> Result<()>),
        ("routed 4/8", &routed),
    ] {
        f()?;
        dev.synchronize()?;
        marker()?;
        let t0 = Instant::now();
        f()?;
        dev.synchronize()?;
        eprintln!(
            "ffn-profile: {name} step {:.3} ms (wall)",
            t0.elapsed().as_secs_f64() * 1e3
        );
        marker()?;
        dev.synchronize()?;
    }
    Ok(())
}

/// Forward + backward of the composed path's pieces alone, to see where the routed FFN's time
/// goes: the row gather, fc1's per-block GEMMs (narrow, matmul, cat) and the row sum.
fn ffn_stages(
    dev: &Device,
    reps: usize,
    x: &Tensor,
    w1: &Tensor,
    n: usize,
    k: usize,
) -> Result<serde_json::Value> {
    let (t, d) = x.dims2()?;
    let block = w1.dim(0)? / n;
    let scores: Vec<f32> = (0..t * n).map(|i| ((i * 2654435761) % 1000) as f32).collect();
    let scores = Tensor::from_vec(scores, (t, n), dev)?;
    let routing = std::sync::Arc::new(spt_ops::routed_ffn::Routing::from_scores(&scores, k)?);
    let r = routing.n_rows();
    let xv = Var::from_tensor(x)?;
    let up_rd = Tensor::randn(0f32, 1f32, (r, d), dev)?.to_dtype(x.dtype())?;
    let gather = time(dev, reps, || {
        let y = spt_ops::routed_ffn::gather_rows(xv.as_tensor(), &routing)?;
        y.mul(&up_rd)?.sum_all()?.backward().map(|_| ())
    })?;
    let xr = Var::from_tensor(&up_rd)?;
    let up_rb = Tensor::randn(0f32, 1f32, (r, block), dev)?.to_dtype(x.dtype())?;
    let gemms = time(dev, reps, || {
        let mut parts = Vec::new();
        for e in 0..n {
            let rows = routing.block_rows(e);
            let we = w1.narrow(0, e * block, block)?;
            parts.push(
                xr.as_tensor()
                    .narrow(0, rows.start, rows.len())?
                    .matmul(&we.t()?)?,
            );
        }
        Tensor::cat(&parts, 0)?
            .mul(&up_rb)?
            .sum_all()?
            .backward()
            .map(|_| ())
    })?;
    let up_td = Tensor::randn(0f32, 1f32, (t, d), dev)?.to_dtype(x.dtype())?;
    let sum = time(dev, reps, || {
        let y = spt_ops::routed_ffn::sum_rows(xr.as_tensor(), &routing)?;
        y.mul(&up_td)?.sum_all()?.backward().map(|_| ())
    })?;
    eprintln!(
        "  stages (fwd+bwd): gather {gather:.3} ms, fc1 block GEMMs {gemms:.3} ms, row sum {sum:.3} ms"
    );
    Ok(serde_json::json!({"gather_rows": gather, "fc1_block_gemms": gemms, "sum_rows": sum}))
}

/// Sparse (PQ encode + ADC selection + fused attention) vs dense attention at one length.
fn attention_case(
    dev: &Device,
    reps: usize,
    dense_max: usize,
    dt: DType,
    l: usize,
) -> Result<serde_json::Value> {
    let scale = 1.0 / (D as f64).sqrt();
    let mask = AttentionMask::causal();
    let kk = l / 8;
    let (q, k, v, w) = inputs(dev, l, dt)?;
    let cb = codebook(&k)?;
    let select_ms = time(dev, reps, || {
        let codes = cb.encode(&k)?;
        select_keys(&q, &codes, &cb, KeyTopK::Count(kk), &mask).map(|_| ())
    })?;
    let sel = select_keys(&q, &cb.encode(&k)?, &cb, KeyTopK::Count(kk), &mask)?;
    let (qv, kv, vv) = (
        Var::from_tensor(&q)?,
        Var::from_tensor(&k)?,
        Var::from_tensor(&v)?,
    );
    let sparse = |a: &Tensor, b: &Tensor, c: &Tensor| sparse_attention(a, b, c, &sel, scale);
    let sparse_fwd_ms = time(dev, reps, || sparse(&q, &k, &v).map(|_| ()))?;
    let sparse_step_ms = time(dev, reps, || fwd_bwd(&qv, &kv, &vv, &w, &sparse))?;
    eprintln!("  select {select_ms:.3} ms, sparse fwd {sparse_fwd_ms:.3} ms, fwd+bwd {sparse_step_ms:.3} ms");
    let dense = if l <= dense_max {
        let f = |a: &Tensor, b: &Tensor, c: &Tensor| dense_attention(a, b, c, &mask, scale);
        let fwd = time(dev, reps, || f(&q, &k, &v).map(|_| ()));
        let step = time(dev, reps, || fwd_bwd(&qv, &kv, &vv, &w, &f));
        match (fwd, step) {
            (Ok(fwd), Ok(step)) => {
                eprintln!("  dense fwd {fwd:.3} ms, fwd+bwd {step:.3} ms");
                serde_json::json!({"fwd_ms": fwd, "fwd_bwd_ms": step})
            }
            (a, b) => serde_json::json!({"error": format!("{:?} / {:?}", a.err(), b.err())}),
        }
    } else {
        serde_json::json!(null)
    };
    Ok(serde_json::json!({
        "B": B, "H": H, "L": l, "d": D, "k": kk, "causal": true, "dtype": dtype_name(dt),
        // bf16: filled in by `tiled_cases` after every other case.
        "tiled": null,
        "pq": {"n_subspaces": cb.n_subspaces(), "n_codewords": cb.n_codewords()},
        "sparse": {
            "select_ms": select_ms,
            "fwd_ms": sparse_fwd_ms,
            "fwd_bwd_ms": sparse_step_ms,
            "fwd_bwd_plus_select_ms": sparse_step_ms + select_ms,
        },
        "dense": dense,
        "dense_note": if l > dense_max { format!("skipped: L > SPT_DENSE_MAX_L = {dense_max}") } else { String::new() },
    }))
}

/// The tensor-core kernels (bf16): our dense flash attention, and block-sparse attention over
/// 64 × 64 tiles keeping L/8 keys per query (L/512 blocks per tile), its selection (PQ encode of
/// the keys + block scores + top blocks, all on the device) timed alone and included in
/// `fwd_bwd_plus_select_ms`. The same inputs and codebook as `attention_case`'s bf16 case.
fn tiled_cases(dev: &Device, reps: usize, l: usize) -> Result<serde_json::Value> {
    let scale = 1.0 / (D as f64).sqrt();
    let mask = &AttentionMask::causal();
    let (q, k, v, w) = inputs(dev, l, DType::BF16)?;
    let cb = &codebook(&k)?;
    let (q, k, v, w) = (&q, &k, &v, &w);
    let (qv, kv, vv) = (
        &Var::from_tensor(q)?,
        &Var::from_tensor(k)?,
        &Var::from_tensor(v)?,
    );
    let flash = |a: &Tensor, b: &Tensor, c: &Tensor| flash_attention(a, b, c, mask, scale, None);
    let flash_fwd = time(dev, reps, || flash(q, k, v).map(|_| ()))?;
    let flash_step = time(dev, reps, || fwd_bwd(qv, kv, vv, w, &flash))?;
    eprintln!("  flash (tensor cores) fwd {flash_fwd:.3} ms, fwd+bwd {flash_step:.3} ms");
    let tiling = BlockTiling {
        query_tile: 64,
        key_block: 64,
        top_blocks: (l / 512).max(1),
    };
    // Through the public functions, which check a caller's codes and block lists (a few small
    // kernels and one value read back each); pq_attention, the models' path, skips both since
    // it made them itself. At these sizes that is microseconds against milliseconds.
    let select = || -> Result<BlockSelection> {
        let codes = cb.encode(k)?;
        select_blocks(q, &codes, cb, tiling, mask, BlockScore::default())
    };
    let select_ms = time(dev, reps, || select().map(|_| ()))?;
    let sel = select()?;
    let blocks = |a: &Tensor, b: &Tensor, c: &Tensor| block_sparse_attention(a, b, c, &sel, scale);
    let fwd = time(dev, reps, || blocks(q, k, v).map(|_| ()))?;
    let step = time(dev, reps, || fwd_bwd(qv, kv, vv, w, &blocks))?;
    eprintln!("  block-sparse select {select_ms:.3} ms, fwd {fwd:.3} ms, fwd+bwd {step:.3} ms");
    Ok(serde_json::json!({
        "flash": {"fwd_ms": flash_fwd, "fwd_bwd_ms": flash_step},
        "block_sparse": {
            "tiling": tiling,
            "select_ms": select_ms,
            "fwd_ms": fwd,
            "fwd_bwd_ms": step,
            "fwd_bwd_plus_select_ms": step + select_ms,
        },
    }))
}

/// q, k, v and the upstream gradient of an attention case, from fixed seeds.
fn inputs(dev: &Device, l: usize, dt: DType) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    Ok((
        randn(dev, l, 1, dt)?,
        randn(dev, l, 2, dt)?,
        randn(dev, l, 3, dt)?,
        randn(dev, l, 4, dt)?,
    ))
}

/// A codebook fitted on the host from a sample of keys (as training does once per refresh).
fn codebook(k: &Tensor) -> Result<Codebook> {
    Codebook::fit(
        &k.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
        &PqConfig {
            kmeans_iters: 5,
            max_samples: 4096,
            ..PqConfig::default()
        },
    )
}

/// Writes `OUT_DIR/gpu_bench.json` (temporary file, then rename). Called after every case, so a
/// run cut short by gpu-check.sh's timeout still leaves the finished cases (`complete: false`).
fn write_results(
    out_dir: &str,
    reps: usize,
    ffn: &[serde_json::Value],
    cases: &[serde_json::Value],
    complete: bool,
) -> Result<()> {
    let out = serde_json::json!({
        "bench": "spt-ops gpu_bench: sparse vs dense attention, fwd+bwd",
        "reps": reps,
        "complete": complete,
        "timing": "median ms over reps after 2 warm-ups; device synchronize after each step",
        "routed_ffn": ffn,
        "routed_ffn_note": "composed path off the CPU (routed_ffn.cu row moves around cuBLAS GEMMs: one batched GEMM over padded blocks, or one per block for skewed routings); frozen weights, gradient to x",
        "cases": cases,
    });
    std::fs::create_dir_all(out_dir)?;
    let path = std::path::Path::new(out_dir).join("gpu_bench.json");
    let tmp = path.with_extension("json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_string_pretty(&out).map_err(candle_core::Error::wrap)?,
    )?;
    std::fs::rename(&tmp, &path)?;
    if complete {
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
