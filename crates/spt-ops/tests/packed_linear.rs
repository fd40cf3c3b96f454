//! `packed_linear`: a frozen weight packed once for bf16 products, against its reference (x and
//! W rounded to bf16 by candle, then an f32 matmul), bit for bit where every sum is exact, the
//! same bits on any thread count, and its refusals.

use candle_core::{DType, Device, Result, Tensor, Var};
use spt_ops::gradcheck::randn_f64;
use spt_ops::packed_linear::packed_linear_reference;
use spt_ops::{packed_linear, PackedWeight};

fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
    randn_f64(shape, seed)?.to_dtype(DType::F32)
}

/// Values `k / 64` for integers `|k| ≤ 16`: bf16 holds them, and f32 holds exactly every
/// product and sum of a few hundred of them.
fn grid(shape: &[usize], seed: u64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s % 33) as i64 - 16) as f32 / 64.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

fn bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|v| v.to_bits())
        .collect())
}

/// `w [out, in]` as a contiguous tensor or as the transposed view of a contiguous `[in, out]`.
fn weight(out: usize, d_in: usize, seed: u64, view: bool, exact: bool) -> Result<Tensor> {
    let make = |s: &[usize]| if exact { grid(s, seed) } else { randn(s, seed) };
    if view {
        make(&[d_in, out])?.t()
    } else {
        make(&[out, d_in])
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 40, ..Default::default() })]

    /// Against the reference over row counts across the 256-row tasks and 32-column blocks,
    /// either weight layout, with and without a bias, x of rank 1 to 3: within f32 summation
    /// order of Σ|x||w|.
    #[test]
    fn packed_linear_matches_its_reference(
        rows in 0usize..600, d_in in 1usize..100, out in 1usize..130, view in proptest::bool::ANY,
        bias in proptest::bool::ANY, rank in 1usize..4, seed in 0u64..10_000,
    ) {
        let run = || -> Result<()> {
            let lead: Vec<usize> = match rank {
                1 => vec![],
                2 => vec![rows],
                _ => vec![2, rows / 2],
            };
            let x = randn(&[lead.clone(), vec![d_in]].concat(), seed)?;
            let w = weight(out, d_in, seed + 1, view, false)?;
            let b = bias.then(|| randn(&[out], seed + 2)).transpose()?;
            let got = packed_linear(&x, &PackedWeight::new(&w)?, b.as_ref())?;
            let want = packed_linear_reference(&x, &w, b.as_ref())?;
            assert_eq!(got.dims(), want.dims());
            let scale = packed_linear_reference(&x.abs()?, &w.abs()?, b.map(|b| b.abs()).transpose()?.as_ref())?;
            let err = (&got - &want)?.abs()?.flatten_all()?.to_vec1::<f32>()?;
            let scale = scale.flatten_all()?.to_vec1::<f32>()?;
            for (i, (e, s)) in err.iter().zip(&scale).enumerate() {
                assert!(*e <= 1e-5 * s + 1e-30, "element {i}: error {e}, scale {s}");
            }
            Ok(())
        };
        run().unwrap();
    }
}

/// Where bf16 holds the inputs and f32 every sum, the op equals the f32 product plus bias bit
/// for bit, at one text's rows (the column grid), at whole and partial 256-row tasks, and for
/// either weight layout: the kernel's tiles, edges and start from the bias are exact.
#[test]
fn packed_linear_is_exact_on_exact_values() -> Result<()> {
    for (rows, d_in, out) in [
        (1, 384, 384),
        (26, 384, 1536),
        (26, 1536, 384),
        (300, 70, 33),
        (513, 33, 100),
    ] {
        for view in [false, true] {
            let x = grid(&[rows, d_in], rows as u64)?;
            let w = weight(out, d_in, 7, view, true)?;
            let b = grid(&[out], 9)?;
            let want = x.matmul(&w.t()?)?.broadcast_add(&b)?;
            let got = packed_linear(&x, &PackedWeight::new(&w)?, Some(&b))?;
            assert_eq!(bits(&got)?, bits(&want)?, "{rows} x {d_in} x {out}, view {view}");
            let got = packed_linear(&x, &PackedWeight::new(&w)?, None)?;
            assert_eq!(bits(&got)?, bits(&x.matmul(&w.t()?)?)?, "no bias");
        }
    }
    Ok(())
}

/// The same bits on one thread and on two, for one text's rows and for several tasks of rows.
#[test]
fn packed_linear_gives_the_same_bits_on_any_thread_count() -> Result<()> {
    let w = PackedWeight::new(&randn(&[1536, 384], 1)?)?;
    let b = randn(&[1536], 2)?;
    for rows in [26, 700] {
        let x = randn(&[rows, 384], 3)?;
        let on = |threads| -> Result<Vec<u32>> {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| bits(&packed_linear(&x, &w, Some(&b))?))
        };
        assert_eq!(on(1)?, on(2)?, "{rows} rows");
    }
    Ok(())
}

/// Named refusals: a tracked x or b (no backward), shapes that do not fit, other dtypes, an
/// empty weight. Zero rows give an empty output.
#[test]
fn packed_linear_refuses_what_it_cannot_compute() -> Result<()> {
    let w = PackedWeight::new(&randn(&[8, 4], 1)?)?;
    assert_eq!((w.out_features(), w.in_features()), (8, 4));
    let x = randn(&[3, 4], 2)?;
    let err = |r: Result<Tensor>| r.expect_err("refused").to_string();
    let tracked = Var::from_tensor(&x)?;
    assert!(err(packed_linear(&tracked, &w, None)).contains("x is tracked"));
    let b = Var::from_tensor(&randn(&[8], 3)?)?;
    assert!(err(packed_linear(&x, &w, Some(&b))).contains("b is tracked"));
    assert!(err(packed_linear(&randn(&[3, 5], 2)?, &w, None)).contains("expected [.., 4]"));
    assert!(err(packed_linear(&x, &w, Some(&randn(&[7], 3)?))).contains("expected [8]"));
    assert!(err(packed_linear(&x.to_dtype(DType::F64)?, &w, None)).contains("expected f32"));
    let scalar = Tensor::new(1f32, &Device::Cpu)?;
    assert!(err(packed_linear(&scalar, &w, None)).contains("scalar"));
    let e = PackedWeight::new(&randn(&[8, 4], 1)?.to_dtype(DType::F64)?)
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected f32"), "{e}");
    let e = PackedWeight::new(&randn(&[0, 4], 1)?).unwrap_err().to_string();
    assert!(e.contains("out, in ≥ 1"), "{e}");
    let e = PackedWeight::new(&randn(&[4], 1)?).unwrap_err().to_string();
    assert!(e.contains("expected [out, in]"), "{e}");
    let empty = packed_linear(&randn(&[0, 4], 2)?, &w, Some(&randn(&[8], 3)?))?;
    assert_eq!(empty.dims(), [0, 8]);
    Ok(())
}
