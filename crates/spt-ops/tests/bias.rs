//! `bias_add`: a bias over rows. f64 finite differences for both inputs (across the 64-row task
//! seam), candle's `broadcast_add` as reference over random shapes with x / b frozen or
//! tracked, a bias gradient independent of the thread count, and named errors for bad input.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::max_diff;
use spt_ops::bias::bias_add_reference;
use spt_ops::gradcheck::{check_gradients, randn_f64, GradCheck};
use spt_ops::{bias_add, matmul_bias};

#[test]
fn gradients_match_finite_differences() -> Result<()> {
    for (lead, n) in [(vec![3usize], 5usize), (vec![2, 70], 3), (vec![130], 1)] {
        let mut shape = lead.clone();
        shape.push(n);
        let x = randn_f64(&shape, 1)?;
        let b = randn_f64(&[n], 2)?;
        check_gradients(
            |t| bias_add(&t[0], &t[1]),
            &[x, b],
            &[0, 1],
            GradCheck {
                max_elems: 96,
                ..Default::default()
            },
        )
        .map_err(|e| candle_core::Error::Msg(format!("shape {shape:?}: {e}")))?;
    }
    Ok(())
}

/// The bias gradient is summed in fixed row tasks, so a one-thread pool gives the same bits.
#[test]
fn bias_gradient_is_independent_of_the_thread_count() -> Result<()> {
    let x = Var::from_tensor(&randn_f64(&[1000, 37], 3)?.to_dtype(DType::F32)?)?;
    let b = Var::from_tensor(&randn_f64(&[37], 4)?.to_dtype(DType::F32)?)?;
    let up = randn_f64(&[1000, 37], 5)?.to_dtype(DType::F32)?;
    let grad = || -> Result<Vec<u32>> {
        let g = (bias_add(x.as_tensor(), b.as_tensor())? * &up)?
            .sum_all()?
            .backward()?;
        let db = g.get(b.as_tensor()).expect("db").to_vec1::<f32>()?;
        Ok(db.iter().map(|v| v.to_bits()).collect())
    };
    let many = grad()?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    let one = pool.install(grad)?;
    assert_eq!(many, one);
    Ok(())
}

#[test]
fn bad_input_is_a_named_error() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::zeros((4, 8), DType::F32, &dev)?;
    let err = |r: Result<Tensor>| r.unwrap_err().to_string();
    let e = err(bias_add(&x, &Tensor::zeros(7, DType::F32, &dev)?));
    assert!(
        e.contains("b is [7], expected [8]") && e.contains("[4, 8]"),
        "{e}"
    );
    let e = err(bias_add(&x, &Tensor::zeros((1, 8), DType::F32, &dev)?));
    assert!(e.contains("b is [1, 8], expected [8]"), "{e}");
    let e = err(bias_add(&x, &Tensor::zeros(8, DType::F64, &dev)?));
    assert!(e.contains("b has dtype F64"), "{e}");
    // Other dtypes take candle's path.
    let h = bias_add(&x.to_dtype(DType::BF16)?, &Tensor::ones(8, DType::BF16, &dev)?)?;
    assert_eq!(h.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?, 32.0);
    Ok(())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 40, ..Default::default() })]

    /// The op equals `broadcast_add` in values and in both gradients, over ranks 1 to 3, row
    /// counts across task seams, and x / b frozen or tracked.
    #[test]
    fn op_equals_broadcast_add(
        lead in proptest::collection::vec(1usize..90, 0..3), n in 1usize..70,
        x_tracked in proptest::bool::ANY, b_tracked in proptest::bool::ANY,
        seed in 0u64..10_000,
    ) {
        let run = || -> Result<()> {
            let mut shape = lead.clone();
            shape.push(n);
            let f = |s: &[usize], k: u64| randn_f64(s, seed * 8 + k).and_then(|t| t.to_dtype(DType::F32));
            let var = |t: Tensor, tracked: bool| -> Result<(Var, Tensor)> {
                let v = Var::from_tensor(&t)?;
                let t = if tracked { v.as_tensor().clone() } else { v.as_tensor().detach() };
                Ok((v, t))
            };
            let (xv, x) = var(f(&shape, 0)?, x_tracked)?;
            let (bv, b) = var(f(&[n], 1)?, b_tracked)?;
            let up = f(&shape, 4)?;
            let got = bias_add(&x, &b)?;
            let want = bias_add_reference(&x, &b)?;
            assert_eq!(max_diff(&got, &want)?, 0.0, "values");
            if !(x_tracked || b_tracked) {
                return Ok(());
            }
            let (gg, gw) = ((got * &up)?.sum_all()?.backward()?, (want * &up)?.sum_all()?.backward()?);
            for (v, tracked, name) in [(&xv, x_tracked, "dx"), (&bv, b_tracked, "db")] {
                let (a, b) = (gg.get(v.as_tensor()), gw.get(v.as_tensor()));
                assert_eq!(a.is_some(), tracked, "{name}: gradient presence");
                if let (Some(a), Some(b)) = (a, b) {
                    // dx is the upstream gradient itself; db sums up to 8100 rows in another
                    // order than candle.
                    let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0) as f64;
                    let tol = if name == "dx" { 0.0 } else { 1e-5 * scale };
                    assert!(max_diff(a, b)? <= tol, "{name}");
                }
            }
            Ok(())
        };
        run().unwrap();
    }
}

/// `matmul_bias` names what does not fit, and with every input tracked it is the differentiable
/// composition (its gradients are candle's matmul's and `bias_add`'s).
#[test]
fn matmul_bias_errors_and_gradients() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::zeros((4, 8), DType::F32, &dev)?;
    let w = Tensor::zeros((8, 3), DType::F32, &dev)?;
    let err = |r: Result<Tensor>| r.unwrap_err().to_string();
    let e = err(matmul_bias(&x, &w, &Tensor::zeros(4, DType::F32, &dev)?));
    assert!(e.contains("b [4]") && e.contains("w [8, 3]"), "{e}");
    let e = err(matmul_bias(&x, &w.t()?, &Tensor::zeros(8, DType::F32, &dev)?));
    assert!(e.contains("do not form"), "{e}");
    let e = err(matmul_bias(
        &x.unsqueeze(0)?,
        &w,
        &Tensor::zeros(3, DType::F32, &dev)?,
    ));
    assert!(e.contains("expected [rows, k] and [k, n]"), "{e}");
    check_gradients(
        |t| matmul_bias(&t[0], &t[1], &t[2]),
        &[
            randn_f64(&[5, 4], 6)?,
            randn_f64(&[4, 3], 7)?,
            randn_f64(&[3], 8)?,
        ],
        &[0, 1, 2],
        GradCheck::default(),
    )
    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    Ok(())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 40, ..Default::default() })]

    /// Untracked, `matmul_bias` equals `x.matmul(w) + b` over row counts across its 64-row fill
    /// tasks, k from 0, and w contiguous, a transposed view, or a narrowed view at an offset, in
    /// f32 and f64; the result is a new contiguous tensor.
    #[test]
    fn matmul_bias_equals_matmul_then_bias(
        rows in 1usize..150, k in 0usize..40, n in 1usize..50, w_form in 0usize..3,
        f64_ in proptest::bool::ANY, seed in 0u64..10_000,
    ) {
        let run = || -> Result<()> {
            let dt = if f64_ { DType::F64 } else { DType::F32 };
            let f = |s: &[usize], i: u64| randn_f64(s, seed * 8 + i).and_then(|t| t.to_dtype(dt));
            let x = f(&[rows, k], 0)?;
            let b = f(&[n], 1)?;
            let w = match w_form {
                0 => f(&[k, n], 2)?,
                1 => f(&[n, k], 2)?.t()?,
                _ => f(&[k + 2, n + 3], 2)?.narrow(0, 1, k)?.narrow(1, 2, n)?,
            };
            let got = matmul_bias(&x, &w, &b)?;
            let want = x.matmul(&w.contiguous()?)?.broadcast_add(&b)?;
            assert!(got.is_contiguous());
            assert_eq!(got.dims(), [rows, n]);
            let tol = if f64_ { 1e-12 } else { 1e-4 } * (1.0 + k as f64);
            let d = max_diff(&got, &want)?;
            assert!(d < tol, "rows {rows} k {k} n {n} w {w_form}: {d}");
            Ok(())
        };
        run().map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
    }
}
