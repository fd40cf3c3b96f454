//! Loader behaviour: formats (safetensors, sharded index, prefix or not), the load report,
//! trainable vs frozen parameters, new-head initialisation, and named errors for bad input.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use common::{expected, fixture, max_abs, rel_err};
use spt_models::{
    BertConfig, BertForSequenceClassification, BertModel, GPT2Config, GPT2LMHeadModel, LoadOptions,
    ModelError, NamedParams, Trainable, WeightSource,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn tmpdir(tag: &str) -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("spt-models-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn load_map(p: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(p, &Device::Cpu)?)
}

fn gpt2_cfg() -> Result<GPT2Config> {
    Ok(GPT2Config::from_file(fixture("tiny-gpt2/config.json"))?)
}

fn bert_cfg() -> Result<BertConfig> {
    Ok(BertConfig::from_file(fixture("tiny-bert-cls/config.json"))?)
}

#[test]
fn missing_tensor_is_named() -> Result<()> {
    let mut m = load_map(&fixture("tiny-gpt2/model.safetensors"))?;
    m.remove("transformer.h.1.ln_2.weight");
    let err = GPT2LMHeadModel::load(
        &gpt2_cfg()?,
        &WeightSource::from_tensors(m),
        &LoadOptions::default(),
    )
    .unwrap_err();
    match err {
        ModelError::MissingTensor { name, tried } => {
            assert_eq!(name, "transformer.h.1.ln_2.weight");
            assert!(tried.contains(&"h.1.ln_2.weight".to_string()), "{tried:?}");
        }
        other => panic!("expected MissingTensor, got {other}"),
    }
    Ok(())
}

#[test]
fn wrong_shape_reports_expected_and_got() -> Result<()> {
    let mut m = load_map(&fixture("tiny-bert-cls/model.safetensors"))?;
    m.insert(
        "bert.encoder.layer.0.attention.self.key.weight".into(),
        Tensor::zeros((64, 63), DType::F32, &Device::Cpu)?,
    );
    let err = BertForSequenceClassification::load(
        &bert_cfg()?,
        &WeightSource::from_tensors(m),
        &LoadOptions::default(),
        None,
    )
    .unwrap_err();
    match err {
        ModelError::ShapeMismatch { name, expected, got } => {
            assert_eq!(name, "bert.encoder.layer.0.attention.self.key.weight");
            assert_eq!((expected, got), (vec![64, 64], vec![64, 63]));
        }
        other => panic!("expected ShapeMismatch, got {other}"),
    }
    Ok(())
}

#[test]
fn non_finite_weights_are_named() -> Result<()> {
    let key = "bert.encoder.layer.1.output.dense.weight";
    for (bad, dtype) in [
        (f32::NAN, DType::F32),
        (f32::INFINITY, DType::BF16),
        (f32::NEG_INFINITY, DType::F16),
    ] {
        let mut m = load_map(&fixture("tiny-bert-cls/model.safetensors"))?;
        let mut v = m[key].flatten_all()?.to_vec1::<f32>()?;
        v[17] = bad;
        let dims = m[key].dims().to_vec();
        m.insert(
            key.into(),
            Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(dtype)?,
        );
        let err = BertForSequenceClassification::load(
            &bert_cfg()?,
            &WeightSource::from_tensors(m),
            &LoadOptions::default(),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(key) && err.contains("NaN or infinite"),
            "{dtype:?}: {err}"
        );
    }
    // The check itself: finite tensors of each dtype pass, strided views are read correctly.
    let t = Tensor::new(&[[1f32, f32::NAN], [3.0, 4.0]], &Device::Cpu)?;
    assert!(!spt_models::all_finite(&t)?);
    assert!(spt_models::all_finite(&t.narrow(1, 0, 1)?)?);
    assert!(!spt_models::all_finite(&t.t()?)?);
    assert!(spt_models::all_finite(&Tensor::new(&[1u32, 2], &Device::Cpu)?)?);
    Ok(())
}

#[test]
fn bad_configs_are_named() -> Result<()> {
    let text = std::fs::read_to_string(fixture("tiny-bert-cls/config.json"))?;
    let mut v: serde_json::Value = serde_json::from_str(&text)?;
    v["position_embedding_type"] = "relative_key".into();
    let err = BertConfig::from_json_str(&v.to_string()).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnsupportedPositionEmbedding(p) if p == "relative_key"),
        "{err}"
    );

    let mut v: serde_json::Value = serde_json::from_str(&text)?;
    v["hidden_act"] = "swish".into();
    let err = BertConfig::from_json_str(&v.to_string()).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnknownActivation(a) if a == "swish"),
        "{err}"
    );

    // A value of the wrong type names its field (it gave a line and column only), and text after
    // the object is still refused.
    for (field, value) in [
        ("hidden_size", serde_json::json!("64")),
        ("num_hidden_layers", serde_json::json!(2.0)),
        ("layer_norm_eps", serde_json::Value::Null),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(&text)?;
        v[field] = value;
        let err = BertConfig::from_json_str(&v.to_string()).unwrap_err().to_string();
        assert!(err.contains(&format!("{field}: invalid type")), "{err}");
    }
    let err = BertConfig::from_json_str(&format!("{text} 7"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("trailing characters"), "{err}");

    // An array is not read field by field in order (serde would): the file's shape is named.
    for err in [
        BertConfig::from_json_str("[2, 384]").unwrap_err(),
        GPT2Config::from_json_str(" [1]").unwrap_err(),
    ] {
        assert!(err.to_string().contains("expected a JSON object"), "{err}");
    }

    let text = std::fs::read_to_string(fixture("tiny-gpt2/config.json"))?;
    let mut v: serde_json::Value = serde_json::from_str(&text)?;
    v["activation_function"] = "silu_unknown".into();
    let err = GPT2Config::from_json_str(&v.to_string()).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnknownActivation(a) if a == "silu_unknown"),
        "{err}"
    );

    // A layer-norm epsilon that is not positive would fail only in the first forward.
    for eps in [0.0, -1.0] {
        let mut v: serde_json::Value = serde_json::from_str(&text)?;
        v["layer_norm_epsilon"] = eps.into();
        let err = GPT2Config::from_json_str(&v.to_string()).unwrap_err();
        assert!(
            matches!(
                &err,
                ModelError::InvalidConfig {
                    field: "layer_norm_epsilon",
                    ..
                }
            ),
            "{err}"
        );
    }
    let text = std::fs::read_to_string(fixture("tiny-bert-cls/config.json"))?;
    let mut v: serde_json::Value = serde_json::from_str(&text)?;
    v["layer_norm_eps"] = 0.0.into();
    let err = BertConfig::from_json_str(&v.to_string()).unwrap_err();
    assert!(
        matches!(
            &err,
            ModelError::InvalidConfig {
                field: "layer_norm_eps",
                ..
            }
        ),
        "{err}"
    );

    let err = BertConfig::from_file(fixture("does-not-exist.json")).unwrap_err();
    assert!(matches!(err, ModelError::Config { .. }), "{err}");
    Ok(())
}

#[test]
fn gelu_new_and_relu_bert_activations_load() -> Result<()> {
    let text = std::fs::read_to_string(fixture("tiny-bert-cls/config.json"))?;
    for act in ["gelu", "gelu_new", "relu"] {
        let mut v: serde_json::Value = serde_json::from_str(&text)?;
        v["hidden_act"] = act.into();
        let cfg = BertConfig::from_json_str(&v.to_string())?;
        let src = WeightSource::from_file(fixture("tiny-bert-cls/model.safetensors"))?;
        let (m, _) = BertForSequenceClassification::load(&cfg, &src, &LoadOptions::frozen(), None)?;
        let exp = expected("tiny-bert-cls")?;
        let logits = m.forward_t(
            &exp["input_ids"],
            Some(&exp["token_type_ids"]),
            Some(&exp["attention_mask"]),
            false,
        )?;
        // Relative to the largest logit (0.043: a random model of std 0.02).
        let d = rel_err(&logits, &exp["logits"])?;
        let spt_models::FeedForward::Dense(ffn) = &m.bert.layers[0].ffn else {
            anyhow::bail!("not dense")
        };
        assert_eq!(ffn.act, spt_ops::Activation::from_hf(act).unwrap());
        // Only "gelu" is what the fixture was made with; the others must run and differ
        // (gelu_new only slightly: it approximates gelu).
        match act {
            "gelu" => assert!(d < 1e-5, "{act}: {d}"),
            "gelu_new" => assert!(d > 0.0 && d < 1e-4, "{act}: {d}"),
            _ => assert!(d > 1e-3 && d.is_finite(), "{act}: {d}"),
        }
    }
    Ok(())
}

#[test]
fn too_long_and_out_of_range_inputs_are_named() -> Result<()> {
    let (gpt, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::frozen())?;
    let long = Tensor::zeros((1, 129), DType::U32, &Device::Cpu)?;
    let err = gpt.forward_t(&long, None, false).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::SequenceTooLong {
                len: 129,
                max: 128,
                field: "n_positions"
            }
        ),
        "{err}"
    );
    let ids = Tensor::new(&[[1u32, 2, 1000]], &Device::Cpu)?;
    let err = gpt.forward_t(&ids, None, false).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::TokenOutOfRange {
                id: 1000,
                size: 1000,
                ..
            }
        ),
        "{err}"
    );
    let ids = Tensor::new(&[[1i64, -3, 7]], &Device::Cpu)?;
    let err = gpt.forward_t(&ids, None, false).unwrap_err();
    assert!(matches!(err, ModelError::TokenOutOfRange { id: -3, .. }), "{err}");
    let err = gpt
        .forward_t(&Tensor::new(&[1.0f32, 2.0], &Device::Cpu)?, None, false)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::BadInput {
                name: "input_ids",
                ..
            }
        ),
        "{err}"
    );

    let (bert, _) = BertModel::from_dir(fixture("tiny-bert-cls"), &LoadOptions::frozen())?;
    let long = Tensor::zeros((2, 129), DType::U32, &Device::Cpu)?;
    let err = bert.forward_t(&long, None, None, false).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::SequenceTooLong {
                len: 129,
                max: 128,
                field: "max_position_embeddings"
            }
        ),
        "{err}"
    );
    let ids = Tensor::new(&[[5u32, 6, 7]], &Device::Cpu)?;
    let types = Tensor::new(&[[0u32, 1, 2]], &Device::Cpu)?;
    let err = bert.forward_t(&ids, Some(&types), None, false).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::TokenOutOfRange {
                what: "token type",
                id: 2,
                size: 2,
                ..
            }
        ),
        "{err}"
    );
    let bad_mask = Tensor::ones((1, 4), DType::U32, &Device::Cpu)?;
    let err = bert.forward_t(&ids, None, Some(&bad_mask), false).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::BadInput {
                name: "attention_mask",
                ..
            }
        ),
        "{err}"
    );
    // A mask of other values than 0 and 1 (HF's additive form, a weight): named, not read as
    // "non-zero attends", which inverted an additive mask silently.
    let (b, l) = ids.dims2()?;
    for bad in [-10000f32, 0.5, 7.0] {
        let mut v = vec![1f32; b * l];
        v[l - 1] = bad;
        let m = Tensor::from_vec(v, (b, l), &Device::Cpu)?;
        let e = bert
            .forward_t(&ids, None, Some(&m), false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("attention_mask") && e.contains(&format!("holds {bad} at [0, {}]", l - 1)),
            "{e}"
        );
        let e = gpt.forward_t(&ids, Some(&m), false).unwrap_err().to_string();
        assert!(
            e.contains("attention_mask") && e.contains("expected 1 (attend) or 0"),
            "{e}"
        );
        let logits = gpt.forward_t(&ids, None, false)?;
        assert!(gpt.loss(&logits, &ids, Some(&m)).is_err());
        assert!(gpt.forward_loss(&ids, Some(&m), false).is_err());
    }
    // Checked in the mask's own dtype: converted to the model's first, these read as 0 and 1.
    for bad in [1e-60f64, 1.0 - 1e-12] {
        let mut v = vec![1f64; b * l];
        v[0] = bad;
        let m = Tensor::from_vec(v, (b, l), &Device::Cpu)?;
        let e = bert
            .forward_t(&ids, None, Some(&m), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("attention_mask") && e.contains("at [0, 0]"), "{e}");
        let e = gpt.forward_t(&ids, Some(&m), false).unwrap_err().to_string();
        assert!(e.contains("attention_mask"), "{e}");
        let logits = gpt.forward_t(&ids, None, false)?;
        assert!(gpt.loss(&logits, &ids, Some(&m)).is_err());
    }
    // Integer masks, as tokenizers give them, are read as they are.
    for m in [
        Tensor::new(&[[1i64, 1, 0]], &Device::Cpu)?,
        Tensor::new(&[[1u8, 1, 0]], &Device::Cpu)?,
    ] {
        let f = Tensor::new(&[[1f32, 1., 0.]], &Device::Cpu)?;
        let want = bert.forward_t(&ids, None, Some(&f), false)?;
        let got = bert.forward_t(&ids, None, Some(&m), false)?;
        assert_eq!(
            got.flatten_all()?.to_vec1::<f32>()?,
            want.flatten_all()?.to_vec1::<f32>()?
        );
        let want = gpt.forward_t(&ids, Some(&f), false)?;
        let got = gpt.forward_t(&ids, Some(&m), false)?;
        assert_eq!(
            got.flatten_all()?.to_vec1::<f32>()?,
            want.flatten_all()?.to_vec1::<f32>()?
        );
    }
    // A layer or loss called directly names its input too.
    let e = gpt
        .transformer
        .wte
        .forward(&Tensor::new(&[[1i64, -2]], &Device::Cpu)?)
        .unwrap_err()
        .to_string();
    assert!(e.contains("-2") && e.contains("num_embeddings"), "{e}");
    let logits = gpt.forward_t(&ids, None, false)?;
    let e = gpt
        .loss(&logits.flatten_to(1)?, &ids, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("logits") && e.contains("[batch, seq_len, vocab]"),
        "{e}"
    );
    // An empty batch or sequence: named, not a reshape error.
    for empty in [ids.narrow(0, 0, 0)?, ids.narrow(1, 0, 0)?] {
        let e = bert.forward_t(&empty, None, None, false).unwrap_err().to_string();
        assert!(
            e.contains("input_ids") && e.contains("empty batch or sequence"),
            "{e}"
        );
        let e = gpt.forward_t(&empty, None, false).unwrap_err().to_string();
        assert!(
            e.contains("input_ids") && e.contains("empty batch or sequence"),
            "{e}"
        );
    }
    Ok(())
}

/// The loader reads a safetensors file one tensor at a time (not the whole file beside the
/// tensors): what it gives is what candle's whole-buffer loader gives, key for key and bit for bit.
#[test]
fn safetensors_read_by_tensor_match_candles_loader() -> Result<()> {
    for name in ["tiny-gpt2/model.safetensors", "tiny-bert-cls/model.safetensors"] {
        let path = fixture(name);
        let ours = WeightSource::from_file(&path)?;
        let theirs = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)?;
        let mut keys = ours.keys();
        keys.sort_unstable();
        let mut want: Vec<&str> = theirs.keys().map(String::as_str).collect();
        want.sort_unstable();
        assert_eq!(keys, want, "{name}");
        for (k, t) in &theirs {
            let o = ours.get(k).expect("key listed");
            assert_eq!((o.dtype(), o.dims()), (t.dtype(), t.dims()), "{name}: {k}");
            let bits = |t: &Tensor| -> Result<Vec<u64>> {
                Ok(t.to_dtype(candle_core::DType::F64)?
                    .flatten_all()?
                    .to_vec1::<f64>()?
                    .iter()
                    .map(|v| v.to_bits())
                    .collect())
            };
            assert_eq!(bits(o)?, bits(t)?, "{name}: {k}");
        }
    }
    Ok(())
}

#[test]
fn corrupt_and_truncated_safetensors_are_errors() -> Result<()> {
    let dir = tmpdir("corrupt")?;
    let bytes = std::fs::read(fixture("tiny-gpt2/model.safetensors"))?;
    let cases: [(&str, Vec<u8>); 7] = [
        ("truncated", bytes[..bytes.len() - 1000].to_vec()),
        ("header-only", bytes[..100].to_vec()),
        ("garbage", b"this is not a safetensors file at all".to_vec()),
        ("empty", vec![]),
        // A header longer than the file, and data past what the header describes.
        (
            "header-past-end",
            [&(1u64 << 20).to_le_bytes()[..], &bytes[8..200]].concat(),
        ),
        ("trailing", [&bytes[..], b"xx"].concat()),
        (
            "header-length-max",
            [&u64::MAX.to_le_bytes()[..], &bytes[8..200]].concat(),
        ),
    ];
    for (tag, data) in cases {
        let p = dir.join(format!("{tag}.safetensors"));
        std::fs::write(&p, data)?;
        let err = WeightSource::from_file(&p).unwrap_err();
        match err {
            ModelError::Checkpoint { path, .. } => assert_eq!(path, p, "{tag}"),
            other => panic!("{tag}: expected Checkpoint, got {other}"),
        }
    }
    let err = WeightSource::from_dir(&dir).unwrap_err();
    assert!(matches!(err, ModelError::Checkpoint { .. }), "{err}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn sharded_and_unprefixed_checkpoints_load_identically() -> Result<()> {
    let exp = expected("tiny-gpt2")?;
    let (reference, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::frozen())?;
    let want = reference.forward_t(&exp["input_ids"], Some(&exp["attention_mask"]), false)?;

    // Two shards, keys without the `transformer.` prefix, plus the buffers old checkpoints carry.
    let dir = tmpdir("sharded")?;
    std::fs::copy(fixture("tiny-gpt2/config.json"), dir.join("config.json"))?;
    let m = load_map(&fixture("tiny-gpt2/model.safetensors"))?;
    let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
    let mut weight_map = serde_json::Map::new();
    for (i, (k, t)) in m.into_iter().enumerate() {
        let k = k.strip_prefix("transformer.").unwrap_or(&k).to_string();
        let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        weight_map.insert(k.clone(), file.into());
        shards[i % 2].insert(k, t);
    }
    shards[0].insert(
        "h.0.attn.bias".into(),
        Tensor::ones((1, 1, 128, 128), DType::F32, &Device::Cpu)?,
    );
    shards[0].insert("h.0.attn.masked_bias".into(), Tensor::new(-1e4f32, &Device::Cpu)?);
    weight_map.insert("h.0.attn.bias".into(), "model-00001-of-00002.safetensors".into());
    weight_map.insert(
        "h.0.attn.masked_bias".into(),
        "model-00001-of-00002.safetensors".into(),
    );
    for (i, s) in shards.iter().enumerate() {
        candle_core::safetensors::save(s, dir.join(format!("model-0000{}-of-00002.safetensors", i + 1)))?;
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string())?;

    let (sharded, report) = GPT2LMHeadModel::from_dir(&dir, &LoadOptions::frozen())?;
    assert!(report.unused.is_empty(), "{:?}", report.unused);
    assert_eq!(
        report.ignored,
        vec!["h.0.attn.bias".to_string(), "h.0.attn.masked_bias".to_string()]
    );
    let got = sharded.forward_t(&exp["input_ids"], Some(&exp["attention_mask"]), false)?;
    assert_eq!(max_abs(&got, &want)?, 0.0);
    // Names stay canonical (HF GPT2LMHeadModel keys) whatever the file used.
    assert!(sharded
        .named_tensors()
        .iter()
        .all(|(k, _)| k.starts_with("transformer.")));

    // A shard index pointing at a tensor its shard lacks is a named checkpoint error.
    let mut bad = index.clone();
    bad["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors".into();
    std::fs::write(dir.join("model.safetensors.index.json"), bad.to_string())?;
    let err = WeightSource::from_dir(&dir).unwrap_err();
    assert!(err.to_string().contains("ghost.weight"), "{err}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn bert_model_reports_unused_head_and_classifier_head_is_initialised() -> Result<()> {
    // BertModel on a BertForSequenceClassification checkpoint: the classifier is unused.
    let (m, report) = BertModel::from_dir(fixture("tiny-bert-cls"), &LoadOptions::frozen())?;
    assert_eq!(
        report.unused,
        vec!["classifier.bias".to_string(), "classifier.weight".to_string()]
    );
    assert!(m.pooler.is_some());
    assert!(m.named_tensors().iter().all(|(k, _)| !k.starts_with("bert.")));

    // A base-model checkpoint without `bert.` prefix and without classifier: head initialised.
    let dir = tmpdir("newhead")?;
    let mut map = load_map(&fixture("tiny-bert-cls/model.safetensors"))?;
    map.remove("classifier.weight");
    map.remove("classifier.bias");
    let map: HashMap<String, Tensor> = map
        .into_iter()
        .map(|(k, t)| (k.strip_prefix("bert.").unwrap_or(&k).to_string(), t))
        .collect();
    candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
    let cfg = bert_cfg()?;
    let src = WeightSource::from_dir(&dir)?;
    let opts = LoadOptions {
        init_seed: 7,
        ..LoadOptions::default()
    };
    let (a, report) = BertForSequenceClassification::load(&cfg, &src, &opts, Some(5))?;
    assert_eq!(
        report.initialised,
        vec!["classifier.weight".to_string(), "classifier.bias".to_string()]
    );
    assert!(report.unused.is_empty());
    assert_eq!(a.classifier.weight.tensor().dims(), [5, 64]);
    let (b, _) = BertForSequenceClassification::load(&cfg, &src, &opts, Some(5))?;
    assert_eq!(
        max_abs(a.classifier.weight.tensor(), b.classifier.weight.tensor())?,
        0.0,
        "seeded init"
    );
    let std = a
        .classifier
        .weight
        .tensor()
        .sqr()?
        .mean_all()?
        .sqrt()?
        .to_scalar::<f32>()?;
    assert!((std - 0.02).abs() < 0.006, "init std {std}");
    assert_eq!(
        a.classifier
            .bias
            .as_ref()
            .unwrap()
            .tensor()
            .abs()?
            .sum_all()?
            .to_scalar::<f32>()?,
        0.0
    );
    // Canonical names carry the HF `bert.` prefix even though the file had none.
    let names: Vec<String> = a.named_vars().into_iter().map(|(k, _)| k).collect();
    assert!(names.contains(&"bert.embeddings.word_embeddings.weight".to_string()));
    assert!(names.contains(&"classifier.weight".to_string()));
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn trainable_choice_controls_vars_and_gradients() -> Result<()> {
    let exp = expected("tiny-bert-cls")?;
    let dir = fixture("tiny-bert-cls");
    let forward_loss = |m: &BertForSequenceClassification| -> Result<Tensor> {
        let logits = m.forward_t(
            &exp["input_ids"],
            Some(&exp["token_type_ids"]),
            Some(&exp["attention_mask"]),
            false,
        )?;
        Ok(m.loss(&logits, &exp["labels"])?)
    };

    let (frozen, _) = BertForSequenceClassification::from_dir(&dir, &LoadOptions::frozen(), None)?;
    assert!(frozen.named_vars().is_empty());
    assert_eq!(frozen.named_tensors().len(), 41);

    fn head_only(name: &str) -> bool {
        name.starts_with("classifier.")
    }
    let opts = LoadOptions {
        trainable: Trainable::only(head_only),
        ..LoadOptions::default()
    };
    let (mut m, _) = BertForSequenceClassification::from_dir(&dir, &opts, None)?;
    let names: Vec<String> = m.named_vars().into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        names,
        vec!["classifier.weight".to_string(), "classifier.bias".to_string()]
    );
    assert_eq!(m.num_trainable(), 3 * 64 + 3);
    let grads = forward_loss(&m)?.backward()?;
    for (name, v) in m.named_vars() {
        assert!(grads.get(&v).is_some(), "{name}");
    }
    // Frozen weights are plain tensors: the gradient store never holds them.
    assert!(grads
        .get(m.bert.embeddings.word_embeddings.weight.tensor())
        .is_none());

    // Switch to full fine-tuning in place; same values, now all trainable.
    let before = forward_loss(&m)?.to_scalar::<f32>()?;
    m.set_trainable(&|_| true)?;
    assert_eq!(m.named_vars().len(), 41);
    assert_eq!(forward_loss(&m)?.to_scalar::<f32>()?, before);

    // Inside no_grad the same model records nothing (evaluation between training steps): the
    // same loss, untracked, and the detached reads follow an update of a Var in place.
    assert!(forward_loss(&m)?.track_op());
    let quiet = spt_ops::no_grad(|| forward_loss(&m))?;
    assert!(!quiet.track_op(), "a no_grad forward recorded a graph");
    let quiet = quiet.to_scalar::<f32>()?;
    assert!(
        (quiet - before).abs() <= 1e-6 * before.abs().max(1.0),
        "{quiet} vs {before}"
    );
    let (_, w) = m
        .named_vars()
        .into_iter()
        .find(|(k, _)| k == "classifier.weight")
        .expect("classifier.weight");
    w.set(&(w.as_tensor() * 3.0)?)?;
    let moved = forward_loss(&m)?.to_scalar::<f32>()?;
    assert_ne!(moved, before);
    let quiet = spt_ops::no_grad(|| forward_loss(&m))?.to_scalar::<f32>()?;
    assert!(
        (quiet - moved).abs() <= 1e-6 * moved.abs().max(1.0),
        "{quiet} vs {moved}"
    );
    Ok(())
}

#[test]
fn dropout_is_active_only_in_training() -> Result<()> {
    let text = std::fs::read_to_string(fixture("tiny-gpt2/config.json"))?;
    let mut v: serde_json::Value = serde_json::from_str(&text)?;
    for k in ["attn_pdrop", "resid_pdrop", "embd_pdrop"] {
        v[k] = 0.3.into();
    }
    let cfg = GPT2Config::from_json_str(&v.to_string())?;
    let src = WeightSource::from_file(fixture("tiny-gpt2/model.safetensors"))?;
    let (m, _) = GPT2LMHeadModel::load(&cfg, &src, &LoadOptions::default())?;
    let exp = expected("tiny-gpt2")?;
    let ids = &exp["input_ids"];
    let eval1 = m.forward_t(ids, None, false)?;
    let eval2 = m.forward_t(ids, None, false)?;
    assert_eq!(max_abs(&eval1, &eval2)?, 0.0);
    m.seed_dropout(17);
    let (train, loss) = m.forward_with_loss(ids, None, true)?;
    assert!(
        max_abs(&train, &eval1)? > 1e-3,
        "dropout had no effect in training"
    );
    // Seeded masks: the same seed repeats the pass exactly, the next pass (or another seed) differs.
    let next = m.forward_t(ids, None, true)?;
    assert!(max_abs(&next, &train)? > 1e-3);
    m.seed_dropout(17);
    assert_eq!(max_abs(&m.forward_t(ids, None, true)?, &train)?, 0.0);
    m.seed_dropout(18);
    assert!(max_abs(&m.forward_t(ids, None, true)?, &train)? > 1e-3);
    // Gradients flow through the dropout masks into every parameter.
    let grads = loss.backward()?;
    for (name, v) in m.named_vars() {
        let g = grads
            .get(&v)
            .ok_or_else(|| anyhow::anyhow!("no grad for {name}"))?;
        assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{name}");
    }
    Ok(())
}

#[test]
fn pytorch_bin_loads_the_same_weights() -> Result<()> {
    let bin = WeightSource::from_dir(fixture("tiny-gpt2-pth"))?;
    let st = WeightSource::from_file(fixture("tiny-gpt2/model.safetensors"))?;
    assert_eq!(bin.keys(), st.keys());
    for k in st.keys() {
        assert_eq!(max_abs(bin.get(k).unwrap(), st.get(k).unwrap())?, 0.0, "{k}");
    }
    let exp = expected("tiny-gpt2")?;
    let (a, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2-pth"), &LoadOptions::frozen())?;
    let (b, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::frozen())?;
    let la = a.forward_t(&exp["input_ids"], Some(&exp["attention_mask"]), false)?;
    let lb = b.forward_t(&exp["input_ids"], Some(&exp["attention_mask"]), false)?;
    assert_eq!(max_abs(&la, &lb)?, 0.0);

    // A truncated .bin is a named checkpoint error.
    let dir = tmpdir("badbin")?;
    let bytes = std::fs::read(fixture("tiny-gpt2-pth/pytorch_model.bin"))?;
    let p = dir.join("pytorch_model.bin");
    std::fs::write(&p, &bytes[..bytes.len() / 2])?;
    let err = WeightSource::from_file(&p).unwrap_err();
    assert!(
        matches!(&err, ModelError::Checkpoint { path, .. } if *path == p),
        "{err}"
    );
    assert!(err.to_string().contains("truncated PyTorch zip archive"), "{err}");
    // torch.save before 1.6: a bare pickle stream, named as such (it read "invalid Zip archive",
    // as a truncated file did).
    std::fs::write(&p, [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20])?;
    let err = WeightSource::from_file(&p).unwrap_err().to_string();
    assert!(err.contains("legacy torch.save format"), "{err}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn saved_checkpoint_round_trips_with_hf_names() -> Result<()> {
    let exp = expected("tiny-bert-cls")?;
    let (m, _) =
        BertForSequenceClassification::from_dir(fixture("tiny-bert-cls"), &LoadOptions::default(), None)?;
    let dir = tmpdir("save")?;
    std::fs::copy(fixture("tiny-bert-cls/config.json"), dir.join("config.json"))?;
    spt_models::save_safetensors(&m, dir.join("model.safetensors"))?;
    // Same keys as the HF file, and the same model back.
    let saved = WeightSource::from_dir(&dir)?;
    let original = WeightSource::from_file(fixture("tiny-bert-cls/model.safetensors"))?;
    assert_eq!(saved.keys(), original.keys());
    let (back, report) = BertForSequenceClassification::from_dir(&dir, &LoadOptions::frozen(), None)?;
    assert!(report.unused.is_empty() && report.initialised.is_empty());
    let a = m.forward_t(
        &exp["input_ids"],
        Some(&exp["token_type_ids"]),
        Some(&exp["attention_mask"]),
        false,
    )?;
    let b = back.forward_t(
        &exp["input_ids"],
        Some(&exp["token_type_ids"]),
        Some(&exp["attention_mask"]),
        false,
    )?;
    assert_eq!(max_abs(&a, &b)?, 0.0);
    // Nothing left beside it, and the mode of any new file (the umask's), not the private mode
    // of a temporary file.
    let mut names: Vec<_> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    names.sort();
    assert_eq!(names, ["config.json", "model.safetensors"]);
    std::fs::write(dir.join("new"), b"")?;
    let mode = |f: &str| std::fs::metadata(dir.join(f)).map(|m| m.permissions());
    assert_eq!(mode("model.safetensors")?, mode("new")?);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn classification_loss_checks_labels_and_supports_regression() -> Result<()> {
    let exp = expected("tiny-bert-cls")?;
    let (m, _) =
        BertForSequenceClassification::from_dir(fixture("tiny-bert-cls"), &LoadOptions::frozen(), None)?;
    let logits = m.forward_t(
        &exp["input_ids"],
        Some(&exp["token_type_ids"]),
        Some(&exp["attention_mask"]),
        false,
    )?;
    let bad = Tensor::new(&[0i64, 3], &Device::Cpu)?;
    assert!(matches!(
        m.loss(&logits, &bad),
        Err(ModelError::TokenOutOfRange {
            what: "label",
            id: 3,
            ..
        })
    ));
    let bad = Tensor::new(&[0i64, 1, 2], &Device::Cpu)?;
    assert!(matches!(
        m.loss(&logits, &bad),
        Err(ModelError::BadInput { name: "labels", .. })
    ));

    // num_labels = 1: HF's regression head, MSE against float labels.
    let src = WeightSource::from_file(fixture("tiny-bert-cls/model.safetensors"))?;
    let mut map: HashMap<String, Tensor> = src
        .keys()
        .iter()
        .map(|k| (k.to_string(), src.get(k).unwrap().clone()))
        .collect();
    map.remove("classifier.weight");
    map.remove("classifier.bias");
    let (r, report) = BertForSequenceClassification::load(
        &bert_cfg()?,
        &WeightSource::from_tensors(map),
        &LoadOptions::default(),
        Some(1),
    )?;
    assert_eq!(report.initialised.len(), 2);
    let y = r.forward_t(
        &exp["input_ids"],
        Some(&exp["token_type_ids"]),
        Some(&exp["attention_mask"]),
        false,
    )?;
    let target = Tensor::new(&[0.5f32, -1.0], &Device::Cpu)?;
    let loss = r.loss(&y, &target)?;
    let want = ((y.squeeze(1)? - &target)?.sqr()?.mean_all()?).to_scalar::<f32>()?;
    assert!((loss.to_scalar::<f32>()? - want).abs() < 1e-7);
    Ok(())
}

#[test]
fn untied_lm_head_loads_when_the_config_says_so() -> Result<()> {
    let text = std::fs::read_to_string(fixture("tiny-gpt2/config.json"))?;
    let mut v: serde_json::Value = serde_json::from_str(&text)?;
    v["tie_word_embeddings"] = false.into();
    let cfg = GPT2Config::from_json_str(&v.to_string())?;
    let mut map = load_map(&fixture("tiny-gpt2/model.safetensors"))?;
    // Missing head: a named error.
    let err = GPT2LMHeadModel::load(
        &cfg,
        &WeightSource::from_tensors(map.clone()),
        &LoadOptions::frozen(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, ModelError::MissingTensor { name, .. } if name == "lm_head.weight"),
        "{err}"
    );
    // A head equal to wte gives the tied model's logits; it is its own parameter.
    map.insert("lm_head.weight".into(), map["transformer.wte.weight"].clone());
    let (untied, report) =
        GPT2LMHeadModel::load(&cfg, &WeightSource::from_tensors(map), &LoadOptions::default())?;
    assert!(report.unused.is_empty());
    assert!(untied.named_vars().iter().any(|(k, _)| k == "lm_head.weight"));
    let (tied, _) = GPT2LMHeadModel::from_dir(fixture("tiny-gpt2"), &LoadOptions::frozen())?;
    let exp = expected("tiny-gpt2")?;
    let a = untied.forward_t(&exp["input_ids"], None, false)?;
    let b = tied.forward_t(&exp["input_ids"], None, false)?;
    assert_eq!(max_abs(&a, &b)?, 0.0);
    Ok(())
}

/// Checkpoints as transformers writes or reads them: a tied GPT-2 saved with its head only
/// loads (transformers fills wte from it); a head that differs from wte under
/// `tie_word_embeddings` is refused (transformers 5 unties it, 4 overwrites it: it was dropped
/// here in silence); a bool `attn.bias` mask (transformers 4.10–4.29) loads (it was "corrupt");
/// BERT's `token_type_ids` buffer is not reported unused; and a decoder, cross-attention or
/// multi-label BERT config is refused by field (they gave other numbers in silence).
#[test]
fn transformers_checkpoint_variants_load_or_are_named() -> Result<()> {
    let exp = expected("tiny-gpt2")?;
    let logits = |dir: &Path| -> Result<Tensor> {
        let (m, _) = GPT2LMHeadModel::from_dir(dir, &LoadOptions::frozen())?;
        Ok(m.forward_t(&exp["input_ids"], Some(&exp["attention_mask"]), false)?)
    };
    let want = logits(&fixture("tiny-gpt2"))?;
    let base = load_map(&fixture("tiny-gpt2/model.safetensors"))?;
    let wte = base["transformer.wte.weight"].clone();
    let variant = |tag: &str, tensors: &HashMap<String, Tensor>| -> Result<PathBuf> {
        let d = tmpdir(tag)?;
        std::fs::copy(fixture("tiny-gpt2/config.json"), d.join("config.json"))?;
        spt_models::weights::save_tensors(tensors, d.join("model.safetensors"))?;
        Ok(d)
    };
    // The head alone.
    let mut head_only = base.clone();
    head_only.remove("transformer.wte.weight");
    head_only.insert("lm_head.weight".into(), wte.clone());
    let d = variant("head-only", &head_only)?;
    assert_eq!(max_abs(&logits(&d)?, &want)?, 0.0);
    std::fs::remove_dir_all(&d)?;
    // A head that is not wte's copy; wte's copy is fine.
    let mut untied = base.clone();
    untied.insert("lm_head.weight".into(), ((&wte * 0.5)? + 0.01)?);
    let d = variant("untied", &untied)?;
    let e = GPT2LMHeadModel::from_dir(&d, &LoadOptions::frozen())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tie_word_embeddings") && e.contains("lm_head.weight differs"),
        "{e}"
    );
    std::fs::remove_dir_all(&d)?;
    let mut copy = base.clone();
    copy.insert("lm_head.weight".into(), wte.clone());
    let d = variant("tied-copy", &copy)?;
    assert_eq!(max_abs(&logits(&d)?, &want)?, 0.0);
    std::fs::remove_dir_all(&d)?;
    // A bool causal mask buffer beside the f32 weights.
    let d = tmpdir("bool-bias")?;
    std::fs::copy(fixture("tiny-gpt2/config.json"), d.join("config.json"))?;
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = base
        .iter()
        .map(|(k, t)| -> Result<_> {
            let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Ok((
                k.clone(),
                t.dims().to_vec(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ))
        })
        .collect::<Result<_>>()?;
    let mask: Vec<u8> = (0..16 * 16).map(|i| u8::from(i % 16 <= i / 16)).collect();
    let mut views = vec![(
        "transformer.h.0.attn.bias".to_string(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::BOOL, vec![1, 1, 16, 16], &mask)?,
    )];
    for (k, shape, b) in &bytes {
        views.push((
            k.clone(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)?,
        ));
    }
    std::fs::write(d.join("model.safetensors"), safetensors::serialize(views, None)?)?;
    assert_eq!(max_abs(&logits(&d)?, &want)?, 0.0);
    std::fs::remove_dir_all(&d)?;

    // BERT: the token_type_ids buffer is a buffer.
    let mut bert = load_map(&fixture("tiny-bert-cls/model.safetensors"))?;
    bert.insert(
        "bert.embeddings.token_type_ids".into(),
        Tensor::zeros((1, 512), DType::I64, &Device::Cpu)?,
    );
    let d = tmpdir("bert-buffer")?;
    std::fs::copy(fixture("tiny-bert-cls/config.json"), d.join("config.json"))?;
    spt_models::weights::save_tensors(&bert, d.join("model.safetensors"))?;
    let (_, report) = BertForSequenceClassification::from_dir(&d, &LoadOptions::frozen(), None)?;
    assert!(report.unused.is_empty(), "{:?}", report.unused);
    assert!(
        report.ignored.iter().any(|k| k.ends_with("token_type_ids")),
        "{:?}",
        report.ignored
    );
    std::fs::remove_dir_all(&d)?;
    // Configs the encoder would read wrongly.
    let text = std::fs::read_to_string(fixture("tiny-bert-cls/config.json"))?;
    for (field, value) in [
        ("is_decoder", serde_json::json!(true)),
        ("add_cross_attention", serde_json::json!(true)),
        ("problem_type", serde_json::json!("multi_label_classification")),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(&text)?;
        v[field] = value;
        let e = BertConfig::from_json_str(&v.to_string()).unwrap_err().to_string();
        assert!(e.contains(field), "{field}: {e}");
    }
    Ok(())
}
