//! The README's "Using the ops in your own candle model" snippet, run with the tensors it
//! assumes. `SNIPPET` is the README's block line for line (the first test checks it), and
//! `snippet_runs` holds the same code (as rustfmt lays it out) after its setup: change the three
//! together.

use candle_core::{DType, Device, Tensor, Var};

const SNIPPET: &str = r#"use spt::ops::{pq_sparse_attention, AttentionMask, Codebook, KeyTopK, PqConfig, Refresh};

// q, k, v: [B, H, L, d] (contiguous), on the CPU.
let mut codebook = Codebook::fit(&calibration_keys, &PqConfig { n_subspaces: 8, n_codewords: 16, ..Default::default() })?;
let mask = AttentionMask::causal().with_key_padding(attention_mask.clone()); // [B, L], 1 = attend
let o = pq_sparse_attention(&q, &k, &v, &codebook, KeyTopK::Fraction(0.125), &mask, 1.0 / (d as f64).sqrt())?;
// o is differentiable in q, k and v; the selection is not. Refresh the codebook on your schedule:
codebook.refresh(&fresh_keys, Refresh::Ema { decay: 0.9 })?;
"#;

#[test]
fn the_readme_shows_this_snippet() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let block = format!("```rust\n{SNIPPET}```");
    assert!(
        readme.contains(&block),
        "README.md's rust block differs from tests/readme.rs's SNIPPET"
    );
}

#[test]
fn snippet_runs() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let (b, h, l, d) = (2, 4, 64, 32);
    let q = Var::randn(0f32, 1.0, (b, h, l, d), &dev)?;
    let k = Var::randn(0f32, 1.0, (b, h, l, d), &dev)?;
    let v = Var::randn(0f32, 1.0, (b, h, l, d), &dev)?;
    let calibration_keys = k.as_tensor().clone();
    let fresh_keys = Tensor::randn(0f32, 1.0, (b, h, l, d), &dev)?;
    // The second sequence is padded after 48 tokens.
    let attention_mask = Tensor::cat(
        &[
            Tensor::ones((1, l), DType::U32, &dev)?,
            Tensor::cat(
                &[
                    Tensor::ones((1, 48), DType::U32, &dev)?,
                    Tensor::zeros((1, l - 48), DType::U32, &dev)?,
                ],
                1,
            )?,
        ],
        0,
    )?;
    let (q, k, v) = (
        q.as_tensor().clone(),
        k.as_tensor().clone(),
        v.as_tensor().clone(),
    );

    // The README's code.
    use spt::ops::{pq_sparse_attention, AttentionMask, Codebook, KeyTopK, PqConfig, Refresh};

    // q, k, v: [B, H, L, d] (contiguous), on the CPU.
    let mut codebook = Codebook::fit(
        &calibration_keys,
        &PqConfig {
            n_subspaces: 8,
            n_codewords: 16,
            ..Default::default()
        },
    )?;
    let mask = AttentionMask::causal().with_key_padding(attention_mask.clone()); // [B, L], 1 = attend
    let o = pq_sparse_attention(
        &q,
        &k,
        &v,
        &codebook,
        KeyTopK::Fraction(0.125),
        &mask,
        1.0 / (d as f64).sqrt(),
    )?;
    // o is differentiable in q, k and v; the selection is not. Refresh the codebook on your schedule:
    codebook.refresh(&fresh_keys, Refresh::Ema { decay: 0.9 })?;

    // What the comments claim: the shape, and gradients for q, k and v.
    assert_eq!(o.dims(), &[b, h, l, d]);
    let grads = o.sqr()?.sum_all()?.backward()?;
    for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
        let g = grads.get(t).unwrap_or_else(|| panic!("no gradient for {name}"));
        assert!(
            g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0,
            "zero gradient for {name}"
        );
    }
    Ok(())
}
