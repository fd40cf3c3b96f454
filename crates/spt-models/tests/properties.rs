//! Model properties: GPT-2 causality, padding invariance, and the activation-memory accounting.

mod common;

use anyhow::Result;
use candle_core::{Device, Tensor};
use common::{fixture, max_abs};
use rand::{rngs::StdRng, Rng, SeedableRng};
use spt_models::{
    activation_bytes, AttentionCost, BertModel, FfnCost, GPT2LMHeadModel, LayerShape, LoadOptions,
};

fn random_ids(rng: &mut StdRng, b: usize, l: usize, vocab: u32) -> Vec<u32> {
    (0..b * l).map(|_| rng.random_range(0..vocab)).collect()
}

/// Changing tokens after position t never changes the logits at positions ≤ t.
#[test]
fn gpt2_is_causal() -> Result<()> {
    let (m, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::frozen())?;
    let mut rng = StdRng::seed_from_u64(11);
    let (b, l) = (2, 40);
    let base = random_ids(&mut rng, b, l, 1000);
    let logits = m.forward_t(
        &Tensor::from_vec(base.clone(), (b, l), &Device::Cpu)?,
        None,
        false,
    )?;
    for t in [0, 1, 7, 20, 38] {
        let mut ids = base.clone();
        for row in 0..b {
            for j in t + 1..l {
                ids[row * l + j] = rng.random_range(0..1000);
            }
        }
        let changed = m.forward_t(&Tensor::from_vec(ids, (b, l), &Device::Cpu)?, None, false)?;
        let d = max_abs(&logits.narrow(1, 0, t + 1)?, &changed.narrow(1, 0, t + 1)?)?;
        assert!(d <= 1e-6, "t = {t}: logits up to t changed by {d:e}");
        // And the later positions do see the change.
        let later = max_abs(
            &logits.narrow(1, t + 1, l - t - 1)?,
            &changed.narrow(1, t + 1, l - t - 1)?,
        )?;
        assert!(later > 1e-4, "t = {t}: later logits unchanged");
    }
    Ok(())
}

/// Padded keys are invisible: the content of padded positions doesn't change unpadded outputs.
#[test]
fn padding_is_invisible_to_unpadded_positions() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(12);
    let (b, l, valid) = (2, 16, 11);
    let mask: Vec<u32> = (0..b * l).map(|i| u32::from(i % l < valid)).collect();
    let mask = Tensor::from_vec(mask, (b, l), &Device::Cpu)?;
    let a = random_ids(&mut rng, b, l, 1000);
    let mut c = a.clone();
    for row in 0..b {
        for j in valid..l {
            c[row * l + j] = rng.random_range(0..1000);
        }
    }
    let (a, c) = (
        Tensor::from_vec(a, (b, l), &Device::Cpu)?,
        Tensor::from_vec(c, (b, l), &Device::Cpu)?,
    );

    let (bert, _) = BertModel::from_dir(fixture("tiny-bert-cls"), &LoadOptions::frozen())?;
    let ha = bert
        .forward_t(&a, None, Some(&mask), false)?
        .narrow(1, 0, valid)?;
    let hc = bert
        .forward_t(&c, None, Some(&mask), false)?
        .narrow(1, 0, valid)?;
    assert!(max_abs(&ha, &hc)? <= 1e-6);

    let (gpt, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::frozen())?;
    let (_, la) = gpt.forward_with_loss(&a, Some(&mask), false)?;
    let (_, lc) = gpt.forward_with_loss(&c, Some(&mask), false)?;
    assert_eq!(
        la.to_scalar::<f32>()?,
        lc.to_scalar::<f32>()?,
        "loss must ignore padded targets"
    );
    Ok(())
}

/// A batch too large to count saturates at usize::MAX instead of overflowing (a panic in
/// debug builds, a small wrapped number that a memory check would let through in release).
#[test]
fn activation_bytes_saturate() {
    let s = LayerShape {
        batch: usize::MAX / 3,
        seq_len: 16,
        hidden: 384,
        heads: 12,
        intermediate: 1536,
        dtype_bytes: 4,
        dropout: true,
    };
    for (attn, ffn) in [
        (AttentionCost::Dense, FfnCost::Dense),
        (
            AttentionCost::Sparse { k: 4 },
            FfnCost::Routed {
                n_blocks: 8,
                top_k: 2,
            },
        ),
    ] {
        assert_eq!(activation_bytes(&s, attn, ffn).total(), usize::MAX);
    }
}

#[test]
fn activation_bytes_dense_vs_sparse() {
    // BERT-base-like layer, f32, no dropout: B=2, L=512, E=768, H=12, F=3072.
    let s = LayerShape {
        batch: 2,
        seq_len: 512,
        hidden: 768,
        heads: 12,
        intermediate: 3072,
        dtype_bytes: 4,
        dropout: false,
    };
    let dense = activation_bytes(&s, AttentionCost::Dense, FfnCost::Dense);
    let tok = 2 * 512;
    assert_eq!(dense.attention_scores, 2 * 12 * 512 * 512 * 4);
    assert_eq!(dense.attention_io, 5 * tok * 768 * 4);
    assert_eq!(dense.ffn, 2 * tok * 3072 * 4);
    assert_eq!(dense.other, 3 * tok * 768 * 4);
    assert_eq!(dense.total(), 25_165_824 + 15_728_640 + 25_165_824 + 9_437_184);

    // k = 64 of 512 keys: probabilities + u32 indices for 64 keys per row.
    let sparse = activation_bytes(
        &s,
        AttentionCost::Sparse { k: 64 },
        FfnCost::Routed {
            n_blocks: 8,
            top_k: 2,
        },
    );
    // u32 indices for 64 keys per row plus one log-sum-exp per row, as the op keeps.
    assert_eq!(sparse.attention_scores, 2 * 12 * 512 * (64 * 4 + 4));
    assert_eq!(
        sparse.attention_scores,
        spt_ops::sparse_attention::sparse_saved_bytes(2, 12, 512, 64, 4)
    );
    assert_eq!(sparse.ffn, 2 * tok * 384 * 2 * 4);
    assert!(sparse.total() < dense.total());
    // k ≥ L is clamped to L; all blocks cost what the dense FFN costs.
    let full = activation_bytes(
        &s,
        AttentionCost::Sparse { k: 4096 },
        FfnCost::Routed {
            n_blocks: 8,
            top_k: 8,
        },
    );
    assert_eq!(full.ffn, dense.ffn);
    assert_eq!(full.attention_scores, 2 * 12 * 512 * (512 * 4 + 4));

    // Dropout keeps its masks too.
    let with_drop = activation_bytes(
        &LayerShape { dropout: true, ..s },
        AttentionCost::Dense,
        FfnCost::Dense,
    );
    assert_eq!(with_drop.attention_scores, 2 * dense.attention_scores);
    assert_eq!(with_drop.other, 5 * tok * 768 * 4);
}

/// A dense `Linear` computes `yᵀ = W xᵀ` up to 64 rows and `y = x Wᵀ` above: both give the
/// composed `x Wᵀ + b` and its gradients (x, W, b), in both weight layouts.
#[test]
fn linear_equals_the_composed_form_on_both_sides_of_the_few_row_path() -> Result<()> {
    use candle_core::{DType, Var};
    use spt_models::weights::Param;
    use spt_models::{Linear, WeightLayout};
    let dev = Device::Cpu;
    let (n_in, n_out) = (37, 29);
    for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
        for rows in [1usize, 63, 64, 65, 200] {
            let w_shape = match layout {
                WeightLayout::OutIn => (n_out, n_in),
                WeightLayout::InOut => (n_in, n_out),
            };
            let w = Var::randn(0f32, 1.0, w_shape, &dev)?;
            let b = Var::randn(0f32, 1.0, n_out, &dev)?;
            let x = Var::randn(0f32, 1.0, (rows, n_in), &dev)?;
            let up = Tensor::randn(0f32, 1.0, (rows, n_out), &dev)?;
            let lin = Linear::new(
                Param::from_var("l.weight", w.clone()),
                Some(Param::from_var("l.bias", b.clone())),
                layout,
            )?;
            let wt = match layout {
                WeightLayout::OutIn => w.as_tensor().t()?,
                WeightLayout::InOut => w.as_tensor().clone(),
            };
            let want = x.as_tensor().matmul(&wt)?.broadcast_add(b.as_tensor())?;
            let got = lin.forward(x.as_tensor())?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()? as f64;
            assert!(
                max_abs(&got, &want)? <= 1e-6 * scale,
                "{layout:?}, {rows} rows: values"
            );
            let (gg, gw) = (
                (got * &up)?.sum_all()?.backward()?,
                (want * &up)?.sum_all()?.backward()?,
            );
            for (v, name) in [(&x, "x"), (&w, "W"), (&b, "b")] {
                let (a, e) = (
                    gg.get(v.as_tensor()).expect("grad"),
                    gw.get(v.as_tensor()).expect("grad"),
                );
                let scale = e.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                assert!(max_abs(a, e)? <= 1e-5 * scale, "{layout:?}, {rows} rows: d{name}");
            }
        }
    }
    Ok(())
}

/// A frozen `OutIn` weight is read above 64 rows from a `[in, out]` copy made on first use: the
/// output equals the composed `x Wᵀ + b`, and after the weight is replaced (`Param::set`, as
/// loading or merging does) the output follows the new weight, not the old copy.
#[test]
fn a_frozen_linear_follows_its_weight_when_it_is_replaced() -> Result<()> {
    use spt_models::weights::Param;
    use spt_models::{Linear, WeightLayout};
    let dev = Device::Cpu;
    let (n_in, n_out, rows) = (37, 29, 200);
    let w0 = Tensor::randn(0f32, 1.0, (n_out, n_in), &dev)?;
    let b = Tensor::randn(0f32, 1.0, n_out, &dev)?;
    let x = Tensor::randn(0f32, 1.0, (rows, n_in), &dev)?;
    let mut lin = Linear::new(
        Param::frozen("l.weight", &w0),
        Some(Param::frozen("l.bias", &b)),
        WeightLayout::OutIn,
    )?;
    let composed = |w: &Tensor| -> Result<Tensor> { Ok(x.matmul(&w.t()?)?.broadcast_add(&b)?) };
    for (i, w) in [w0.clone(), (&w0 * -2.0)?.affine(1.0, 0.5)?].iter().enumerate() {
        if i > 0 {
            lin.weight.set(w)?;
        }
        // Twice: the second call reads the kept copy.
        for _ in 0..2 {
            let (got, want) = (lin.forward(&x)?, composed(w)?);
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()? as f64;
            assert!(max_abs(&got, &want)? <= 1e-6 * scale, "weight {i}");
        }
    }
    Ok(())
}

/// `Linear::new` refuses a weight that is not a matrix and a bias of another length, naming
/// the tensor, instead of panicking later in `in_features` or broadcasting the bias.
#[test]
fn linear_new_checks_its_parameters() -> Result<()> {
    use candle_core::DType;
    use spt_models::weights::Param;
    use spt_models::{Linear, WeightLayout};
    let dev = Device::Cpu;
    let p = |name: &str, shape: &[usize]| -> Result<Param> {
        Ok(Param::frozen(name, &Tensor::zeros(shape, DType::F32, &dev)?))
    };
    let lin = Linear::new(
        p("l.weight", &[3, 5])?,
        Some(p("l.bias", &[3])?),
        WeightLayout::OutIn,
    )?;
    assert_eq!((lin.in_features(), lin.out_features()), (5, 3));
    let lin = Linear::new(
        p("l.weight", &[3, 5])?,
        Some(p("l.bias", &[5])?),
        WeightLayout::InOut,
    )?;
    assert_eq!((lin.in_features(), lin.out_features()), (3, 5));
    let e = Linear::new(p("l.weight", &[15])?, None, WeightLayout::OutIn)
        .unwrap_err()
        .to_string();
    assert!(e.contains("'l.weight' is [15], expected a matrix"), "{e}");
    let e = Linear::new(
        p("l.weight", &[3, 5])?,
        Some(p("l.bias", &[5])?),
        WeightLayout::OutIn,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("l.bias") && e.contains("[5]") && e.contains("[3]"),
        "{e}"
    );
    Ok(())
}
