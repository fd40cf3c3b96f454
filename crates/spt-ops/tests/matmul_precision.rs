//! `MatmulPrecision::Bf16`: `lora_linear`'s products with the merged weight take bf16 inputs
//! and accumulate in f32; everything else is unchanged. Its own test binary, since the setting
//! is process-wide: each test holds `LOCK` while it switches it.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::routed::random_routing;
use spt_ops::gradcheck::randn_f64;
use spt_ops::routed_ffn::routed_lora_ffn;
use spt_ops::Activation;
use spt_ops::{lora_linear, lora_linear_heads, set_matmul_precision, HeadsLayout, MatmulPrecision};
use std::sync::Arc;
use std::sync::Mutex;

static LOCK: Mutex<()> = Mutex::new(());

/// `f` under `p`, the setting restored to f32 after it.
fn with_precision<R>(p: MatmulPrecision, f: impl FnOnce() -> R) -> R {
    set_matmul_precision(p);
    let r = f();
    set_matmul_precision(MatmulPrecision::F32);
    r
}

/// Values `k / 64` for integers `|k| ≤ max_k`, from a seeded LCG: bf16 holds them exactly, and
/// so does f32 every product and sum the tests form from them.
fn grid(shape: &[usize], max_k: i64, seed: u64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let k = ((state >> 33) % (2 * max_k as u64 + 1)) as i64 - max_k;
            k as f32 / 64.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// y, dx, dA and dB of `Σ lora_linear(x, W, bias, A, B, s) ⊙ u` under `p`, for
/// `[W, bias, A, B]`.
fn run(
    p: MatmulPrecision,
    x: &Tensor,
    layer: [&Tensor; 4],
    s: f64,
    layout: HeadsLayout,
) -> Result<[Tensor; 4]> {
    let [w, bias, a, b] = layer;
    with_precision(p, || {
        let (xv, av, bv) = (Var::from_tensor(x)?, Var::from_tensor(a)?, Var::from_tensor(b)?);
        let y = lora_linear_heads(&xv, w, Some(bias), &av, &bv, s, layout)?;
        let u = grid(y.dims(), 64, 99)?;
        let g = (&y * &u)?.sum_all()?.backward()?;
        let grad = |v: &Var| g.get(v).cloned().expect("a gradient");
        Ok([y, grad(&xv), grad(&av), grad(&bv)])
    })
}

/// The LoRA factors: rank 2, entries in {−1/4, 0, 1/4}, so that `s·B A` (s = 1) is a multiple
/// of 1/16 and the merged weight stays on the grid.
fn factors(out: usize, d_in: usize) -> Result<(Tensor, Tensor)> {
    let quarter = |shape: &[usize], seed| grid(shape, 1, seed).and_then(|t| t * 16.0);
    Ok((quarter(&[2, d_in], 3)?, quarter(&[out, 2], 4)?))
}

/// On values bf16 holds exactly, bf16 products equal f32 ones bit for bit (every sum is exact in
/// f32 too), at every row count (the decoding path's few rows, whole and partial 256-row
/// tasks) and in the attention-head layouts: the AMX kernel's tiles, tails and accumulation
/// into the bias are checked against gemm.
#[test]
fn bf16_products_equal_f32_on_exact_values() -> Result<()> {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (out, d_in) = (96, 80);
    let w = grid(&[out, d_in], 24, 1)?;
    let bias = grid(&[out], 64, 2)?;
    let (a, b) = factors(out, d_in)?;
    for (rows, layout) in [
        (1, HeadsLayout::default()),
        (65, HeadsLayout::default()),
        (300, HeadsLayout::default()),
        (512, HeadsLayout::default()),
        (
            300,
            HeadsLayout {
                input_heads: false,
                output_heads: Some(4),
            },
        ),
        (
            300,
            HeadsLayout {
                input_heads: true,
                output_heads: None,
            },
        ),
    ] {
        let x = if layout.input_heads {
            grid(&[1, 4, rows, d_in / 4], 64, 5)?
        } else {
            grid(&[1, rows, d_in], 64, 5)?
        };
        let f = run(MatmulPrecision::F32, &x, [&w, &bias, &a, &b], 1.0, layout)?;
        let h = run(MatmulPrecision::Bf16, &x, [&w, &bias, &a, &b], 1.0, layout)?;
        for (name, (f, h)) in ["y", "dx", "dA", "dB"].iter().zip(f.iter().zip(&h)) {
            let diff = (f - h)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(
                diff, 0.0,
                "{name} at {rows} rows, {layout:?}: bf16 differs from f32 by {diff}"
            );
        }
    }
    Ok(())
}

/// Relative Frobenius distance.
fn rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let n = |t: &Tensor| -> Result<f64> { t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>() };
    Ok((n(&(a - b)?)? / n(b)?).sqrt())
}

/// On general values the bf16 products round x, the merged weight and the output gradient
/// (y and dx move by bf16's ~2^-9 relative rounding), while dA and dB, products of f32
/// activations with the f32 adapters, stay what f32 gives to f32 rounding. f64 is untouched.
#[test]
fn bf16_products_round_their_inputs_only() -> Result<()> {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (out, d_in, rows) = (384, 384, 512);
    let randn = |shape: &[usize], std: f64, seed| (randn_f64(shape, seed)? * std)?.to_dtype(DType::F32);
    let w = randn(&[out, d_in], 0.05, 1)?;
    let bias = randn(&[out], 0.1, 2)?;
    let a = randn(&[8, d_in], 0.05, 3)?;
    let b = randn(&[out, 8], 0.05, 4)?;
    let x = randn(&[2, rows / 2, d_in], 1.0, 5)?;
    let layout = HeadsLayout::default();
    let f = run(MatmulPrecision::F32, &x, [&w, &bias, &a, &b], 2.0, layout)?;
    let h = run(MatmulPrecision::Bf16, &x, [&w, &bias, &a, &b], 2.0, layout)?;
    for (name, i) in [("y", 0), ("dx", 1)] {
        let r = rel(&h[i], &f[i])?;
        assert!(
            (2e-4..1e-2).contains(&r),
            "{name}: bf16 against f32 {r:e}, expected bf16 rounding"
        );
    }
    for (name, i) in [("dA", 2), ("dB", 3)] {
        let r = rel(&h[i], &f[i])?;
        assert!(r < 1e-5, "{name}: bf16 against f32 {r:e}, expected f32 rounding");
    }
    // f64 keeps f64 products.
    let to64 = |t: &Tensor| t.to_dtype(DType::F64);
    let f64s = |p| {
        with_precision(p, || {
            lora_linear(
                &to64(&x)?,
                &to64(&w)?,
                Some(&to64(&bias)?),
                &to64(&a)?,
                &to64(&b)?,
                2.0,
            )
        })
    };
    let (y32, y16) = (f64s(MatmulPrecision::F32)?, f64s(MatmulPrecision::Bf16)?);
    assert_eq!((y32 - y16)?.abs()?.max_all()?.to_scalar::<f64>()?, 0.0);
    Ok(())
}

/// `linear_cross_entropy` under bf16: on values bf16 holds the logits are exact either way, so
/// the loss is the f32 loss bit for bit (300 rows: a chunk's row tasks end in a partial one);
/// `dh = P W` rounds `P = softmax − onehot`, so it moves by bf16 rounding.
#[test]
fn linear_cross_entropy_takes_bf16_products() -> Result<()> {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (n, d, v) = (300, 80, 1000);
    let h = grid(&[n, d], 64, 11)?;
    let w = grid(&[v, d], 24, 12)?;
    let targets = Tensor::from_vec(
        (0..n as u32).map(|i| i * 7 % v as u32).collect::<Vec<_>>(),
        n,
        &Device::Cpu,
    )?;
    let run = |p| {
        with_precision(p, || -> Result<(f32, Tensor)> {
            let hv = Var::from_tensor(&h)?;
            let loss = spt_ops::linear_cross_entropy(&hv, &w, &targets, None, spt_ops::Reduction::Mean)?;
            let g = loss.backward()?;
            Ok((loss.to_scalar::<f32>()?, g.get(&hv).cloned().expect("dh")))
        })
    };
    let (l32, dh32) = run(MatmulPrecision::F32)?;
    let (l16, dh16) = run(MatmulPrecision::Bf16)?;
    assert_eq!(l32, l16, "the loss from exact logits");
    let r = rel(&dh16, &dh32)?;
    assert!(
        (1e-5..1e-2).contains(&r),
        "dh: bf16 against f32 {r:e}, expected bf16 rounding of P"
    );
    Ok(())
}

/// The routed LoRA FFN under bf16. Forward: with inputs chosen so that every value fc1 and fc2
/// read is a bf16 value (x in {0, ±1/8}, pre-activations below 2^-1 on a 2^-9 grid, ReLU),
/// y equals the f32 op's bit for bit: the kernels' per-block packing, gathers, tails, gates and
/// scatter. Backward: the gates' gradient `⟨h, dy W2'_e⟩` reads exact products too, so it is
/// equal; dx reads `dpre`, which bf16 rounds, so it moves by bf16 rounding only.
#[test]
fn routed_lora_ffn_takes_bf16_products() -> Result<()> {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (t, d, n, b, k, d_out) = (600, 20, 4, 24, 2, 48);
    let routing = Arc::new(random_routing(t, n, k, None, 7)?);
    let x = (grid(&[t, d], 1, 1)? * 8.0)?;
    let (w1, b1) = (grid(&[n * b, d], 4, 2)?, (grid(&[n * b], 8, 3)? / 8.0)?);
    let (w2, b2) = (grid(&[d_out, n * b], 64, 4)?, grid(&[d_out], 64, 5)?);
    let gates = grid(&[t * k], 64, 6)?;
    let quarter = |shape: &[usize], seed| grid(shape, 1, seed).and_then(|t| t * 16.0);
    let adapters = [
        quarter(&[2, d], 7)?,
        quarter(&[n * b, 2], 8)?,
        quarter(&[2, n * b], 9)?,
        quarter(&[d_out, 2], 10)?,
    ];
    let run = |p| {
        with_precision(p, || -> Result<[Tensor; 3]> {
            let (xv, gv) = (Var::from_tensor(&x)?, Var::from_tensor(&gates)?);
            let av: Vec<Var> = adapters.iter().map(Var::from_tensor).collect::<Result<_>>()?;
            let y = routed_lora_ffn(
                &xv,
                &gv,
                [&w1, &b1, &w2, &b2],
                [&av[0], &av[1], &av[2], &av[3]],
                1.0,
                Activation::Relu,
                &routing,
            )?;
            let g = (&y * grid(y.dims(), 64, 99)?)?.sum_all()?.backward()?;
            let grad = |v: &Var| g.get(v).cloned().expect("a gradient");
            Ok([y, grad(&gv), grad(&xv)])
        })
    };
    let (f, h) = (run(MatmulPrecision::F32)?, run(MatmulPrecision::Bf16)?);
    for (name, i) in [("y", 0), ("dgates", 1)] {
        let diff = (&f[i] - &h[i])?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "{name}: bf16 differs from f32 by {diff}");
    }
    let r = rel(&h[2], &f[2])?;
    assert!(
        (1e-6..1e-2).contains(&r),
        "dx: bf16 against f32 {r:e}, expected bf16 rounding of dpre"
    );
    Ok(())
}

/// On general values every product of the routed LoRA FFN moves by bf16 rounding: y (fc1, fc2),
/// the gates' gradient (`dy W2'_e`) and dx. With x untracked (a first layer's input) the
/// backward still runs its bf16 products for the adapters.
#[test]
fn routed_lora_ffn_rounds_on_general_values() -> Result<()> {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (t, d, n, b, k, d_out, r) = (700, 64, 4, 48, 2, 64, 4);
    let routing = Arc::new(random_routing(t, n, k, None, 17)?);
    let randn = |shape: &[usize], std: f64, seed| (randn_f64(shape, seed)? * std)?.to_dtype(DType::F32);
    let x = randn(&[t, d], 1.0, 1)?;
    let (w1, b1) = (randn(&[n * b, d], 0.1, 2)?, randn(&[n * b], 0.1, 3)?);
    let (w2, b2) = (randn(&[d_out, n * b], 0.1, 4)?, randn(&[d_out], 0.1, 5)?);
    let gates = (randn(&[t * k], 0.2, 6)? + 1.0)?;
    let adapters = [
        randn(&[r, d], 0.1, 7)?,
        randn(&[n * b, r], 0.1, 8)?,
        randn(&[r, n * b], 0.1, 9)?,
        randn(&[d_out, r], 0.1, 10)?,
    ];
    let run = |p, track_x: bool| {
        with_precision(p, || -> Result<Vec<Tensor>> {
            let xv = Var::from_tensor(&x)?;
            let xin = if track_x {
                xv.as_tensor().clone()
            } else {
                x.clone()
            };
            let gv = Var::from_tensor(&gates)?;
            let av: Vec<Var> = adapters.iter().map(Var::from_tensor).collect::<Result<_>>()?;
            let y = routed_lora_ffn(
                &xin,
                &gv,
                [&w1, &b1, &w2, &b2],
                [&av[0], &av[1], &av[2], &av[3]],
                2.0,
                Activation::GeluErf,
                &routing,
            )?;
            let g = (&y * grid(y.dims(), 64, 99)?)?.sum_all()?.backward()?;
            let grad = |v: &Var| g.get(v).cloned().expect("a gradient");
            let mut out = vec![y, grad(&gv), grad(&av[0])];
            if track_x {
                out.push(grad(&xv));
            }
            Ok(out)
        })
    };
    let (f, h) = (
        run(MatmulPrecision::F32, true)?,
        run(MatmulPrecision::Bf16, true)?,
    );
    for (name, i) in [("y", 0), ("dgates", 1), ("dA1", 2), ("dx", 3)] {
        let r = rel(&h[i], &f[i])?;
        assert!(
            (1e-5..2e-2).contains(&r),
            "{name}: bf16 against f32 {r:e}, expected bf16 rounding"
        );
    }
    let (f, h) = (
        run(MatmulPrecision::F32, false)?,
        run(MatmulPrecision::Bf16, false)?,
    );
    for (name, i) in [("y", 0), ("dgates", 1), ("dA1", 2)] {
        let r = rel(&h[i], &f[i])?;
        assert!(
            (1e-5..2e-2).contains(&r),
            "{name} (x untracked): bf16 against f32 {r:e}"
        );
    }
    Ok(())
}

/// The output layer's logits take bf16 inputs too (evaluation: nothing tracked), and a
/// zero-width layer gives the f32 op's answer instead of packing an empty weight.
#[test]
fn linear_cross_entropy_logits_round_and_empty_widths_pass() -> Result<()> {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (n, d, v) = (300, 80, 1000);
    let randn = |shape: &[usize], std: f64, seed| (randn_f64(shape, seed)? * std)?.to_dtype(DType::F32);
    let (h, w) = (randn(&[n, d], 1.0, 21)?, randn(&[v, d], 0.2, 22)?);
    let targets = Tensor::from_vec(
        (0..n as u32).map(|i| i * 13 % v as u32).collect::<Vec<_>>(),
        n,
        &Device::Cpu,
    )?;
    let loss = |p, h: &Tensor, w: &Tensor| {
        with_precision(p, || {
            spt_ops::linear_cross_entropy(h, w, &targets, None, spt_ops::Reduction::Mean)?.to_scalar::<f32>()
        })
    };
    let (l32, l16) = (
        loss(MatmulPrecision::F32, &h, &w)?,
        loss(MatmulPrecision::Bf16, &h, &w)?,
    );
    let r = ((l16 - l32) / l32).abs();
    assert!(
        r > 0.0 && r < 1e-2,
        "loss {l16} under bf16 against {l32}: expected bf16 rounding of the logits"
    );
    let (h0, w0) = (
        Tensor::zeros((n, 0), DType::F32, &Device::Cpu)?,
        Tensor::zeros((v, 0), DType::F32, &Device::Cpu)?,
    );
    assert_eq!(
        loss(MatmulPrecision::F32, &h0, &w0)?,
        loss(MatmulPrecision::Bf16, &h0, &w0)?
    );
    Ok(())
}

/// The routed FFN's linear correction `y + [x, 1] C` under bf16: on values bf16 holds, the output
/// and dx are the f32 ones bit for bit (300 rows: a whole and a partial 256-row task, added onto
/// y); on general values both move by bf16 rounding (what shows that the bf16 path ran), and dy
/// (the upstream gradient) not at all.
#[test]
fn linear_correction_takes_bf16_products() -> Result<()> {
    use spt_ops::routed_ffn::add_linear_correction;
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (t, d) = (300, 80);
    let run = |p, y: &Tensor, x: &Tensor, c: &Tensor| {
        with_precision(p, || -> Result<[Tensor; 3]> {
            let (yv, xv) = (Var::from_tensor(y)?, Var::from_tensor(x)?);
            let out = add_linear_correction(&yv, &xv, c)?;
            let u = grid(out.dims(), 64, 21)?;
            let g = (&out * &u)?.sum_all()?.backward()?;
            let grad = |v: &Var| g.get(v).cloned().expect("a gradient");
            Ok([out, grad(&yv), grad(&xv)])
        })
    };
    let (y, x, c) = (
        grid(&[t, d], 64, 22)?,
        grid(&[t, d], 64, 23)?,
        grid(&[d + 1, d], 24, 24)?,
    );
    let f = run(MatmulPrecision::F32, &y, &x, &c)?;
    let h = run(MatmulPrecision::Bf16, &y, &x, &c)?;
    for (name, (f, h)) in ["y", "dy", "dx"].iter().zip(f.iter().zip(&h)) {
        let diff = (f - h)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "{name}: bf16 differs from f32 by {diff}");
    }
    let randn = |shape: &[usize], std: f64, seed| (randn_f64(shape, seed)? * std)?.to_dtype(DType::F32);
    let (y, x, c) = (
        randn(&[t, d], 0.01, 25)?,
        randn(&[t, d], 1.0, 26)?,
        randn(&[d + 1, d], 0.1, 27)?,
    );
    let f = run(MatmulPrecision::F32, &y, &x, &c)?;
    let h = run(MatmulPrecision::Bf16, &y, &x, &c)?;
    for (name, i) in [("y", 0), ("dx", 2)] {
        let r = rel(&h[i], &f[i])?;
        assert!(
            (2e-4..1e-2).contains(&r),
            "{name}: bf16 against f32 {r:e}, expected bf16 rounding"
        );
    }
    assert_eq!(rel(&h[1], &f[1])?, 0.0, "dy is the upstream gradient");
    Ok(())
}

/// Fused attention under bf16: every product takes bf16 inputs, so o and the three gradients
/// move by bf16 rounding against f32, under every mask: none (128-row tiles, the last one
/// partial), causal (64-row tiles, each multiplying by a prefix of the keys), key padding (a key
/// span ending inside a 32-key step, and a sequence with no allowed key, whose rows stay 0) and
/// dropout; and with d = 40, d_v = 24 and 200 queries over 300 keys (K steps and output blocks
/// that end inside a tile). The backward keeps its fixed summation order (the same bits on 1
/// and 2 threads), and f64 keeps f64 products.
#[test]
fn flash_attention_takes_bf16_products() -> Result<()> {
    use spt_ops::{flash_attention, AttentionMask, SeededDropout};
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let b = 2;
    // Sequence 0: keys 0..237 allowed; sequence 1: none.
    let padded = |l: usize| -> Result<AttentionMask> {
        let keep: Vec<u8> = (0..b * l).map(|i| (i < 237) as u8).collect();
        Ok(AttentionMask::none().with_key_padding(Tensor::from_vec(keep, (b, l), &Device::Cpu)?))
    };
    let dropout = Some(SeededDropout { p: 0.1, seed: 5 });
    for (h, lq, lk, d, dv) in [(2, 300, 300, 32, 32), (1, 200, 300, 40, 24)] {
        let randn = |shape: &[usize], seed| randn_f64(shape, seed)?.to_dtype(DType::F32);
        let q = randn(&[b, h, lq, d], 31)?;
        let (k, v) = (randn(&[b, h, lk, d], 32)?, randn(&[b, h, lk, dv], 33)?);
        let u = randn(&[b, h, lq, dv], 34)?;
        let run = |p, threads: usize, mask: &AttentionMask, drop: Option<SeededDropout>| {
            with_precision(p, || {
                common::pool(threads)?.install(|| -> Result<[Tensor; 4]> {
                    let vars = [
                        Var::from_tensor(&q)?,
                        Var::from_tensor(&k)?,
                        Var::from_tensor(&v)?,
                    ];
                    let o = flash_attention(&vars[0], &vars[1], &vars[2], mask, 0.25, drop)?;
                    let g = (&o * &u)?.sum_all()?.backward()?;
                    let grad = |v: &Var| g.get(v).cloned().expect("a gradient");
                    Ok([o.clone(), grad(&vars[0]), grad(&vars[1]), grad(&vars[2])])
                })
            })
        };
        let mut masks = vec![
            ("no mask", AttentionMask::none(), None),
            ("key padding", padded(lk)?, None),
        ];
        if lq == lk {
            masks.push(("causal", AttentionMask::causal(), None));
            masks.push(("causal, dropout", AttentionMask::causal(), dropout));
        }
        for (what, mask, drop) in masks {
            let what = format!("{what}, [{lq}, {lk}, {d}, {dv}]");
            let f = run(MatmulPrecision::F32, 2, &mask, drop)?;
            let h2 = run(MatmulPrecision::Bf16, 2, &mask, drop)?;
            for (name, (f, h)) in ["o", "dq", "dk", "dv"].iter().zip(f.iter().zip(&h2)) {
                let r = rel(h, f)?;
                assert!(
                    (1e-4..2e-2).contains(&r),
                    "{what}, {name}: bf16 against f32 {r:e}, expected bf16 rounding"
                );
            }
            let h1 = run(MatmulPrecision::Bf16, 1, &mask, drop)?;
            for (name, (a, b)) in ["o", "dq", "dk", "dv"].iter().zip(h1.iter().zip(&h2)) {
                assert_eq!(
                    common::f32_bits(a)?,
                    common::f32_bits(b)?,
                    "{what}, {name}: 1 against 2 threads"
                );
            }
            if what.starts_with("key padding") {
                for t in &h2 {
                    let seq1 = t.narrow(0, 1, 1)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert_eq!(seq1, 0.0, "{what}: the sequence with no allowed key");
                }
            }
        }
    }
    let (q, k, v) = (
        randn_f64(&[b, 2, 70, 32], 35)?,
        randn_f64(&[b, 2, 70, 32], 36)?,
        randn_f64(&[b, 2, 70, 32], 37)?,
    );
    let f64s = |p| {
        with_precision(p, || {
            flash_attention(&q, &k, &v, &AttentionMask::causal(), 0.25, None)
        })
    };
    let (o32, o16) = (f64s(MatmulPrecision::F32)?, f64s(MatmulPrecision::Bf16)?);
    assert_eq!((o32 - o16)?.abs()?.max_all()?.to_scalar::<f64>()?, 0.0);
    Ok(())
}

/// Under bf16, as in f32, fused attention never reads the keys past a sequence's last allowed
/// one: a NaN in such a key's K and V (keys 237.. of 300 padded; the bf16 key steps are 32 wide,
/// so 237..256 share a step with allowed keys) reaches neither o nor any gradient.
#[test]
fn flash_attention_bf16_never_reads_trailing_padding() -> Result<()> {
    use spt_ops::{flash_attention, AttentionMask};
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (b, h, l, d) = (1, 2, 300, 32);
    let keep: Vec<u8> = (0..l).map(|j| (j < 237) as u8).collect();
    let keep = Tensor::from_vec(keep, (b, l), &Device::Cpu)?;
    let randn = |seed| randn_f64(&[b, h, l, d], seed)?.to_dtype(DType::F32);
    let nan_at_250 = |t: Tensor| -> Result<Tensor> {
        let mut v = t.flatten_all()?.to_vec1::<f32>()?;
        v[250 * d..251 * d].fill(f32::NAN); // head 0, key 250
        Tensor::from_vec(v, (b, h, l, d), &Device::Cpu)
    };
    let (q, k, v, u) = (
        randn(41)?,
        nan_at_250(randn(42)?)?,
        nan_at_250(randn(43)?)?,
        randn(44)?,
    );
    for mask in [AttentionMask::none(), AttentionMask::causal()] {
        let mask = mask.with_key_padding(keep.clone());
        let out = with_precision(MatmulPrecision::Bf16, || -> Result<Vec<Tensor>> {
            let vars = [
                Var::from_tensor(&q)?,
                Var::from_tensor(&k)?,
                Var::from_tensor(&v)?,
            ];
            let o = flash_attention(&vars[0], &vars[1], &vars[2], &mask, 0.25, None)?;
            let g = (&o * &u)?.sum_all()?.backward()?;
            let mut out = vec![o.clone()];
            out.extend(vars.iter().map(|x| g.get(x).cloned().expect("a gradient")));
            Ok(out)
        })?;
        for (name, t) in ["o", "dq", "dk", "dv"].iter().zip(&out) {
            // dk and dv of the padded keys are 0 (no query weights them); NaN nowhere.
            let finite = t.flatten_all()?.to_vec1::<f32>()?.iter().all(|x| x.is_finite());
            assert!(finite, "causal {}: {name} holds a NaN", mask.causal);
        }
    }
    Ok(())
}

/// A frozen `LoraLinear` under bf16 multiplies by `W + s·B A` packed once: its output is the
/// packed reference of that weight (rounding order aside), at a few rows and at many, whole and
/// split into head-layout parts; unfrozen it keeps the op's path; merging and unmerging drop the
/// kept weight (the merged layer multiplies by the merged W).
#[test]
fn frozen_lora_linear_multiplies_by_its_packed_weight() -> Result<()> {
    use spt_ops::lora::delta_weight;
    use spt_ops::packed_linear::packed_linear_reference;
    use spt_ops::{LoraConfig, LoraLinear};
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let f32t = |shape: &[usize], seed| randn_f64(shape, seed)?.to_dtype(DType::F32);
    let (out, d_in) = (48, 40);
    let (w, bias) = (f32t(&[out, d_in], 1)?, f32t(&[out], 2)?);
    let cfg = LoraConfig {
        rank: 3,
        alpha: 6.0,
        dropout: 0.0,
        seed: 4,
    };
    let mut layer = LoraLinear::new(&w, Some(&bias), cfg)?;
    layer.lora_b().set(&f32t(&[out, 3], 5)?)?;
    let merged = (&w + delta_weight(layer.lora_a(), layer.lora_b(), &cfg)?)?;
    let close = |got: &Tensor, want: &Tensor| -> Result<f64> {
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
        Ok(diff / want.abs()?.max_all()?.to_scalar::<f32>()? as f64)
    };
    for rows in [5, 300] {
        let x = f32t(&[rows, d_in], 10 + rows as u64)?;
        let want = packed_linear_reference(&x, &merged, Some(&bias))?;
        let unfrozen = with_precision(MatmulPrecision::Bf16, || layer.forward_t(&x, false))?;
        layer.freeze();
        let got = with_precision(MatmulPrecision::Bf16, || layer.forward_t(&x, false))?;
        assert!(close(&got, &want)? < 1e-5, "{rows} rows: {}", close(&got, &want)?);
        if rows > 64 {
            // The op takes bf16 products from 65 rows too, per call: the same values.
            assert!(close(&unfrozen, &want)? < 1e-5);
        }
        let layout = HeadsLayout {
            input_heads: false,
            output_heads: Some(4),
        };
        let parts = with_precision(MatmulPrecision::Bf16, || {
            layer.forward_parts(&x.unsqueeze(0)?, 2, layout, false)
        })?;
        for (i, p) in parts.iter().enumerate() {
            let rows_of = spt_ops::split_heads(&got.narrow(1, i * out / 2, out / 2)?.unsqueeze(0)?, 4)?;
            assert_eq!(
                p.flatten_all()?.to_vec1::<f32>()?,
                rows_of.flatten_all()?.to_vec1::<f32>()?
            );
        }
        // f32 under the same freeze: the op's f32 products, far from bf16's rounding.
        let f = layer.forward_t(&x, false)?;
        assert!(close(&f, &x.matmul(&merged.t()?)?.broadcast_add(&bias)?)? < 1e-5);
        assert!(close(&got, &f)? > 1e-5, "bf16 products were not taken");
        layer = LoraLinear::new(&w, Some(&bias), cfg)?;
        layer.lora_b().set(&f32t(&[out, 3], 5)?)?;
    }
    let x = f32t(&[7, d_in], 30)?;
    layer.freeze();
    let before = with_precision(MatmulPrecision::Bf16, || layer.forward_t(&x, false))?;
    layer
        .merge()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let after = with_precision(MatmulPrecision::Bf16, || layer.forward_t(&x, false))?;
    // Merged: W + s·B A formed once (as the kept copy was), so the same packed values.
    assert!(close(&after, &before)? < 1e-6);
    layer
        .unmerge()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let again = with_precision(MatmulPrecision::Bf16, || layer.forward_t(&x, false))?;
    assert!(close(&again, &before)? < 1e-5);
    Ok(())
}

/// A frozen routed FFN (LoRA and linear correction) under bf16 takes its packed operands from
/// the first forward, few tokens included: the first and the second forward give the same bits;
/// with more tokens than the decoding path's, the unfrozen layer's per-call products give the
/// same values; a few tokens' rows are those of the same tokens among more; and the output is
/// bf16 rounding away from f32's.
#[test]
fn frozen_routed_ffn_takes_bf16_products_from_the_first_call() -> Result<()> {
    use spt_ops::routed_ffn::{BlockTopK, RoutedFfnConfig};
    use spt_ops::{LoraConfig, RoutedFfn};
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let f32t = |shape: &[usize], seed| randn_f64(shape, seed)?.to_dtype(DType::F32);
    let (d, d_ff) = (40, 96);
    let build = || -> Result<RoutedFfn> {
        let mut cfg = RoutedFfnConfig::new(4, BlockTopK::Count(2));
        cfg.correction = true;
        let mut l = RoutedFfn::new(
            &(f32t(&[d_ff, d], 1)? * 0.2)?,
            &(f32t(&[d_ff], 2)? * 0.1)?,
            &(f32t(&[d, d_ff], 3)? * 0.2)?,
            &(f32t(&[d], 4)? * 0.1)?,
            Activation::GeluErf,
            cfg,
        )?
        .with_lora(LoraConfig {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            seed: 5,
        })?;
        l.set_correction(&(f32t(&[d + 1, d], 6)? * 0.05)?)?;
        let (_, b1, _, b2) = l.lora_factors().expect("lora");
        b1.set(&f32t(&[d_ff, 2], 7)?)?;
        b2.set(&f32t(&[d, 2], 8)?)?;
        Ok(l)
    };
    let rel = |a: &Tensor, b: &Tensor| -> Result<f64> {
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
        Ok(diff / b.abs()?.max_all()?.to_scalar::<f32>()? as f64)
    };
    let x40 = f32t(&[40, d], 20)?;
    let mut rows = Vec::new();
    for t in [40, 5] {
        let x = x40.narrow(0, 0, t)?;
        let unfrozen = build()?;
        let eval = with_precision(MatmulPrecision::Bf16, || unfrozen.forward_t(&x, false))?.y;
        let mut layer = build()?;
        layer.freeze();
        let f32_y = layer.forward_t(&x, false)?.y;
        let (first, second) = with_precision(MatmulPrecision::Bf16, || -> Result<_> {
            Ok((layer.forward_t(&x, false)?.y, layer.forward_t(&x, false)?.y))
        })?;
        assert_eq!(
            first.flatten_all()?.to_vec1::<f32>()?,
            second.flatten_all()?.to_vec1::<f32>()?
        );
        let (e, e32) = (rel(&first, &eval)?, rel(&first, &f32_y)?);
        if t > 16 {
            assert!(e < 1e-5, "{t} tokens: frozen against unfrozen bf16: {e}");
        }
        assert!(e32 > 1e-5 && e32 < 3e-2, "{t} tokens: bf16 against f32: {e32}");
        rows.push(first.narrow(0, 0, 5)?);
    }
    // Few tokens take the same products as many: each token's row is its own.
    assert!(rel(&rows[1], &rows[0])? < 1e-6, "{}", rel(&rows[1], &rows[0])?);
    Ok(())
}
