//! Bad input to the models' public API found by a read-only audit: each once panicked, left a
//! model broken or returned a silently wrong value; each is now an error that leaves the model as
//! it was.

mod common;

use candle_core::{DType, Device, Tensor};
use common::fixture;

type Result<T> = anyhow::Result<T>;

fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
    Ok(spt_ops::gradcheck::randn_f64(shape, seed)?.to_dtype(DType::F32)?)
}

/// spt-models/src/gpt2.rs:133 `4 * self.n_embd` (inner_dim, called by validate at :141-145
/// before check_model_size): n_embd = 2^63 overflows usize -> panic in debug/test builds (release
/// wraps, then the size check refuses it). With n_inner given, :150's u128 product
/// w(4)·w(e)·w(e) = 2^128 overflows instead.
#[test]
fn gpt2_config_with_huge_n_embd_is_an_error() {
    let r = spt_models::GPT2Config::from_json_str(r#"{"n_embd": 9223372036854775808}"#);
    assert!(r.is_err());
    let r = spt_models::GPT2Config::from_json_str(r#"{"n_embd": 9223372036854775808, "n_inner": 8}"#);
    assert!(r.is_err());
}

/// spt-models/src/bert.rs:167 u128 parameter count `w(4) * w(h) * w(h)`: hidden_size = 2^63 gives
/// 2^128 -> overflow panic in debug/test builds, before check_model_size would refuse the size.
#[test]
fn bert_config_with_huge_hidden_size_is_an_error() {
    let r = spt_models::BertConfig::from_json_str(r#"{"hidden_size": 9223372036854775808}"#);
    assert!(r.is_err());
}

/// spt-models/src/buffers.rs:163 `Codebook::from_tensor(t)` is installed without checking its
/// head dim (S·d_codeword) or per-head groups against the layer: load_buffers returns Ok and every
/// later forward of that layer fails in encode. (Also: the doc promises every buffer is checked
/// before the model changes, but routed-FFN existence / correction shape / codebook validity are
/// only checked in the second pass, after earlier buffers were applied.)
#[test]
fn load_buffers_refuses_codebook_of_wrong_head_dim() -> Result<()> {
    use spt_models::pq::KeyTopK;
    use spt_models::{GPT2LMHeadModel, KeyGrouping, LoadOptions, SptModel};
    let (mut m, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::frozen())?;
    // head_dim is 64 / 4 = 16; this codebook quantises d = 2·3 = 6.
    let cb = Tensor::zeros((2, 4, 3), DType::F32, &Device::Cpu)?;
    let r = m.load_buffers(
        &[("pq_codebook.layer.0".to_string(), cb)],
        Some((KeyTopK::Count(4), KeyGrouping::PerQuery)),
    );
    assert!(
        r.is_err(),
        "installed a d = 6 codebook on a head_dim = 16 layer: {r:?}"
    );
    Ok(())
}

/// spt-models/src/sparsify.rs:517 `std::mem::replace(slots.ffn, placeholder_ffn()?)` then
/// :538 `NamedRoutedFfn::from_dense(..)?` (and :548/:554/:562 `fit_router(..)?`, cluster_units'
/// "needs frozen FFN weights" error): any error after the swap returns with the layer's FFN left
/// as the 0×0 placeholder, so the caller's model is silently broken (every later forward fails
/// with "input of placeholder.fc1.weight"). The LoRA config is never validated up front.
#[test]
fn sparsify_failure_leaves_the_model_usable() -> Result<()> {
    use spt_models::lora::LoraConfig;
    use spt_models::routed_ffn::{BlockTopK, RoutedFfnConfig};
    use spt_models::{
        sparsify, FfnCalibration, GPT2LMHeadModel, LoadOptions, LoraSettings, LoraTarget, SptConfig,
    };
    let (mut m, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::default())?;
    let ids = Tensor::new(&[[1u32, 2, 3, 4, 5]], &Device::Cpu)?;
    let before = m.forward_t(&ids, None, false)?;
    let cfg = SptConfig {
        ffn: Some(RoutedFfnConfig::new(4, BlockTopK::Count(2))),
        ffn_calibration: FfnCalibration {
            router_fit: None,
            cluster_units: false,
        },
        lora: Some(LoraSettings {
            targets: vec![LoraTarget::Fc1],
            config: LoraConfig {
                rank: 0,
                ..Default::default()
            },
        }),
        ..Default::default()
    };
    assert!(sparsify(&mut m, &cfg, &[]).is_err());
    let after = m.forward_t(&ids, None, false);
    assert!(
        after.is_ok(),
        "model broken by a failed sparsify: {:?}",
        after.err()
    );
    let d = (before - after?)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(d == 0.0, "{d}");
    Ok(())
}

/// spt-models/src/attention.rs:71 `p.ne(0f64)` (and :113): PreparedMask::new never checks that the
/// key-padding mask is 0/1. When some sequence has no allowed key (rows_nonempty = false),
/// DenseAttention::forward_t (:139-143) skips flash_attention's check and uses the additive mask
/// built from `ne(0)`: an HF additive mask (0 / -10000) is silently read inverted.
#[test]
fn prepared_mask_refuses_non_binary_key_padding() -> Result<()> {
    use spt_models::{AttentionMask, DenseAttention, Dropout, PreparedMask};
    let dev = Device::Cpu;
    let additive = Tensor::new(&[[0f32, 0., 0., 0.], [0., 0., -10000., -10000.]], &dev)?;
    let (q, k, v) = (
        randn(&[2, 1, 4, 4], 1)?,
        randn(&[2, 1, 4, 4], 2)?,
        randn(&[2, 1, 4, 4], 3)?,
    );
    let refused = match PreparedMask::new(
        AttentionMask::none().with_key_padding(additive),
        4,
        DType::F32,
        &dev,
    ) {
        Err(_) => true,
        Ok(pm) => {
            let att = DenseAttention {
                dropout: Dropout::new(0.0)?,
            };
            att.forward_t(&q, &k, &v, &pm, 0.5, false).is_err()
        }
    };
    assert!(
        refused,
        "an additive 0/-10000 key-padding mask was accepted (and read inverted)"
    );
    Ok(())
}

/// spt-models/src/layers.rs:134-137 freezes the weight and bias before :138 LoraLinear::new
/// validates the config (rank 0, alpha NaN, dropout ≥ 1): a refused add_lora still turns the
/// layer's trainable parameters into frozen ones (sparsify hits this for attention targets).
#[test]
fn add_lora_failure_keeps_weight_trainable() -> Result<()> {
    use spt_models::lora::LoraConfig;
    use spt_models::{Linear, Param, WeightLayout};
    let w = Param::trainable("l.weight", &randn(&[4, 4], 31)?)?;
    let b = Param::trainable("l.bias", &Tensor::zeros(4, DType::F32, &Device::Cpu)?)?;
    let mut lin = Linear::new(w, Some(b), WeightLayout::OutIn)?;
    let r = lin.add_lora(LoraConfig {
        rank: 0,
        ..Default::default()
    });
    assert!(r.is_err());
    assert!(lin.weight.is_trainable(), "a refused add_lora froze the weight");
    assert!(
        lin.bias.as_ref().is_some_and(|b| b.is_trainable()),
        "a refused add_lora froze the bias"
    );
    Ok(())
}
