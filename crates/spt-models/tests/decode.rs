//! KV-cached decoding (`GPT2LMHeadModel::next_token_logits`): the prompt, then one token (or a
//! chunk) at a time, gives the logits of a full `forward_t` over the whole sequence at the same
//! positions, for the dense model and for a fully sparse one (per-query PQ attention keeping a
//! fixed number of keys, routed FFN, LoRA with non-zero B); bad input is refused with the cache
//! left as it was.

mod common;

use anyhow::Result;
use candle_core::{Device, Tensor};
use common::{fixture, max_abs};
use rand::{rngs::StdRng, Rng, SeedableRng};
use spt_models::lora::LoraConfig;
use spt_models::pq::{KeyTopK, PqConfig};
use spt_models::routed_ffn::{BlockTopK, GateMode, RoutedFfnConfig, RouterFitConfig};
use spt_models::{
    sparsify, CalibrationBatch, FfnCalibration, GPT2LMHeadModel, KeyGrouping, KvCache, LayerSelection,
    LoadOptions, LoraSettings, LoraTarget, ModelError, NamedParams, SparseAttentionConfig, SptConfig,
};

/// f32 rounding of a different summation order (one query row against the whole batch's GEMMs).
const TOL: f64 = 2e-5;

fn tiny() -> Result<GPT2LMHeadModel> {
    Ok(GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::frozen())?.0)
}

fn random_ids(rng: &mut StdRng, b: usize, l: usize) -> Result<Tensor> {
    let v: Vec<u32> = (0..b * l).map(|_| rng.random_range(0..1000)).collect();
    Ok(Tensor::from_vec(v, (b, l), &Device::Cpu)?)
}

/// Decodes `ids [B, L]` with the cache: the first `prompt` tokens in one call, then the rest in
/// calls of `chunk` tokens; returns the worst |Δ| of the last position of each call against the
/// full forward's logits there, relative to the logits' largest magnitude.
fn cached_vs_full(m: &GPT2LMHeadModel, ids: &Tensor, prompt: usize, chunk: usize) -> Result<f64> {
    let full = m.forward_t(ids, None, false)?;
    let scale = full.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let l = ids.dim(1)?;
    let mut cache = KvCache::new();
    let (mut at, mut worst) = (0, 0f64);
    while at < l {
        let n = if at == 0 { prompt } else { chunk.min(l - at) };
        let logits = m.next_token_logits(&ids.narrow(1, at, n)?, &mut cache)?;
        at += n;
        assert_eq!(cache.len(), at);
        let want = full.narrow(1, at - 1, 1)?.squeeze(1)?;
        // Not f64::max, which passes a NaN step over.
        let e = max_abs(&logits, &want)? / scale;
        if e.is_nan() || e > worst {
            worst = e;
        }
    }
    Ok(worst)
}

#[test]
fn cached_decoding_equals_the_full_forward_dense() -> Result<()> {
    let m = tiny()?;
    let mut rng = StdRng::seed_from_u64(1);
    let ids = random_ids(&mut rng, 2, 40)?;
    // One token at a time after a 7-token prompt; chunks of 5 after the prompt (run a position
    // at a time inside); a 1-token prompt.
    for (prompt, chunk) in [(7, 1), (7, 5), (1, 1), (40, 1)] {
        let e = cached_vs_full(&m, &ids, prompt, chunk)?;
        assert!(e < TOL, "prompt {prompt}, chunk {chunk}: rel err {e:e}");
    }
    Ok(())
}

#[test]
fn cached_decoding_equals_the_full_forward_sparse() -> Result<()> {
    let mut m = tiny()?;
    let mut rng = StdRng::seed_from_u64(2);
    let calib = random_ids(&mut rng, 2, 32)?;
    let cfg = SptConfig {
        layers: LayerSelection::All,
        attention: Some(SparseAttentionConfig {
            pq: PqConfig {
                n_subspaces: 4,
                n_codewords: 16,
                ..PqConfig::default()
            },
            top_k: KeyTopK::Count(6),
            grouping: KeyGrouping::PerQuery,
        }),
        ffn: Some(RoutedFfnConfig {
            gate: GateMode::SoftmaxKept,
            seed: 3,
            ..RoutedFfnConfig::new(4, BlockTopK::Count(2))
        }),
        ffn_calibration: FfnCalibration {
            router_fit: Some(RouterFitConfig::default()),
            cluster_units: false,
        },
        lora: Some(LoraSettings {
            targets: vec![LoraTarget::Query, LoraTarget::Output, LoraTarget::Fc1],
            config: LoraConfig {
                rank: 2,
                alpha: 4.0,
                dropout: 0.0,
                seed: 5,
            },
        }),
    };
    sparsify(&mut m, &cfg, &[CalibrationBatch::new(calib, None)])?;
    // LoRA's B starts at zero: give it values, so the adapters take part.
    for (name, v) in m.named_vars() {
        if name.contains("lora_B") {
            v.set(&(Tensor::randn(0f32, 0.05, v.shape(), &Device::Cpu)?))?;
        }
    }
    let ids = random_ids(&mut rng, 2, 40)?;
    // With 6 of up to 40 keys the model is sparse (later positions differ from the dense model),
    // and each position's keys are the same whether decoded or run in one forward.
    let dense = tiny()?.forward_t(&ids, None, false)?;
    assert!(
        max_abs(
            &m.forward_t(&ids, None, false)?.narrow(1, 8, 32)?,
            &dense.narrow(1, 8, 32)?
        )? > 1e-3
    );
    for (prompt, chunk) in [(7, 1), (3, 4)] {
        let e = cached_vs_full(&m, &ids, prompt, chunk)?;
        assert!(e < TOL, "prompt {prompt}, chunk {chunk}: rel err {e:e}");
    }
    Ok(())
}

/// Block mode and fractions decode too (their keys are taken at the length so far); keeping
/// every key, they are the dense model.
#[test]
fn cached_decoding_in_block_mode_with_every_key_is_dense() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(3);
    let calib = random_ids(&mut rng, 2, 30)?;
    let ids = random_ids(&mut rng, 1, 30)?;
    let dense = tiny()?;
    for grouping in [KeyGrouping::Blocks { tile: 4 }, KeyGrouping::PerQuery] {
        let mut m = tiny()?;
        let cfg = SptConfig {
            layers: LayerSelection::All,
            attention: Some(SparseAttentionConfig {
                pq: PqConfig {
                    n_subspaces: 4,
                    n_codewords: 8,
                    ..PqConfig::default()
                },
                top_k: KeyTopK::Fraction(1.0),
                grouping,
            }),
            ..SptConfig::default()
        };
        sparsify(&mut m, &cfg, &[CalibrationBatch::new(calib.clone(), None)])?;
        let mut cache = KvCache::new();
        let full = dense.forward_t(&ids, None, false)?;
        let scale = full.abs()?.max_all()?.to_scalar::<f32>()? as f64;
        for t in 0..30 {
            let n = if t == 0 { 5 } else { 1 };
            if t > 0 && t < 5 {
                continue;
            }
            let logits = m.next_token_logits(&ids.narrow(1, t, n)?, &mut cache)?;
            let want = full.narrow(1, t + n - 1, 1)?.squeeze(1)?;
            let e = max_abs(&logits, &want)? / scale;
            assert!(e < TOL, "{grouping:?}, position {}: rel err {e:e}", t + n - 1);
        }
        // Fewer keys than positions still decodes, to the end of the context.
        let mut few = tiny()?;
        let mut cfg = cfg;
        cfg.attention.as_mut().unwrap().top_k = KeyTopK::Fraction(0.25);
        sparsify(&mut few, &cfg, &[CalibrationBatch::new(calib.clone(), None)])?;
        let ids = random_ids(&mut rng, 1, 128)?;
        // Each decoded position's logits, the sequence decoded twice: the same bits each time,
        // finite, and not the dense model's (a quarter of the keys is used).
        let decode = |m: &GPT2LMHeadModel| -> Result<Vec<Tensor>> {
            let mut cache = KvCache::new();
            let mut out = vec![m.next_token_logits(&ids.narrow(1, 0, 100)?, &mut cache)?];
            for t in 100..128 {
                out.push(m.next_token_logits(&ids.narrow(1, t, 1)?, &mut cache)?);
            }
            assert_eq!(cache.len(), 128);
            Ok(out)
        };
        let (a, b) = (decode(&few)?, decode(&few)?);
        let full = dense.forward_t(&ids, None, false)?;
        let mut moved = 0f64;
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(
                max_abs(x, y)?,
                0.0,
                "{grouping:?}: decoding twice differs at step {i}"
            );
            assert!(
                spt_ops::gradcheck::max_abs(x)?.is_finite(),
                "{grouping:?}: step {i}"
            );
            let e = max_abs(x, &full.narrow(1, 99 + i, 1)?.squeeze(1)?)?;
            moved = moved.max(e);
        }
        assert!(
            moved > 1e-3,
            "{grouping:?}: a quarter of the keys gave the dense logits ({moved:e})"
        );
    }
    Ok(())
}

#[test]
fn bad_input_leaves_the_cache_as_it_was() -> Result<()> {
    let m = tiny()?;
    let mut rng = StdRng::seed_from_u64(4);
    let mut cache = KvCache::new();
    m.next_token_logits(&random_ids(&mut rng, 2, 120)?, &mut cache)?;
    assert_eq!(cache.len(), 120);
    // Past the context of 128 positions.
    let e = m
        .next_token_logits(&random_ids(&mut rng, 2, 9)?, &mut cache)
        .unwrap_err();
    assert!(
        matches!(
            e,
            ModelError::SequenceTooLong {
                len: 129,
                max: 128,
                ..
            }
        ),
        "{e}"
    );
    // Another batch size than the cached one.
    let e = m
        .next_token_logits(&random_ids(&mut rng, 3, 1)?, &mut cache)
        .unwrap_err()
        .to_string();
    assert!(e.contains("batch of 3") && e.contains("holds 2"), "{e}");
    // A cache of a model with fewer layers (its missing layers had no past keys, silently).
    let mut shallow = tiny()?;
    shallow.transformer.h.truncate(1);
    let mut other = KvCache::new();
    shallow.next_token_logits(&random_ids(&mut rng, 2, 4)?, &mut other)?;
    let e = m
        .next_token_logits(&random_ids(&mut rng, 2, 1)?, &mut other)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("keys of 1 layers") && e.contains("another model"),
        "{e}"
    );
    // No tokens; a token id outside the vocabulary.
    let e = m
        .next_token_logits(
            &Tensor::zeros((2, 0), candle_core::DType::U32, &Device::Cpu)?,
            &mut cache,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty batch or sequence"), "{e}");
    let e = m
        .next_token_logits(&Tensor::new(&[[5u32, 1000], [1, 2]], &Device::Cpu)?, &mut cache)
        .unwrap_err()
        .to_string();
    assert!(e.contains("1000") && e.contains("vocab_size"), "{e}");
    assert_eq!(cache.len(), 120);
    // The cache still decodes, and clears.
    m.next_token_logits(&random_ids(&mut rng, 2, 8)?, &mut cache)?;
    assert_eq!(cache.len(), 128);
    cache.clear();
    assert!(cache.is_empty());
    m.next_token_logits(&random_ids(&mut rng, 3, 2)?, &mut cache)?;
    assert_eq!(cache.len(), 2);
    Ok(())
}
