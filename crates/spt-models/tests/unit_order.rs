//! Regrouped routed-FFN units (`FfnCalibration::cluster_units`): the reordering is exact for
//! the dense model and for export (BERT's out×in and GPT-2's Conv1D in×out layouts), and a saved
//! order plus the trained values rebuild the same routed model.

mod common;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use common::{expected, fixture, max_abs, rel_err};
use rand::{rngs::StdRng, Rng, SeedableRng};
use spt_models::buffers::BufferKind;
use spt_models::lora::LoraConfig;
use spt_models::routed_ffn::{BlockTopK, GateMode, RoutedFfnConfig, RouterFitConfig};
use spt_models::{
    sparsify, BertConfig, BertForSequenceClassification, CalibrationBatch, FfnCalibration, GPT2Config,
    GPT2LMHeadModel, LoadOptions, LoraSettings, LoraTarget, NamedParams, SptConfig, SptModel, Trainable,
    WeightSource,
};
use std::collections::HashMap;

/// The unit-order buffers of a model.
fn unit_orders(m: &mut dyn SptModel) -> Result<Vec<(String, Tensor)>> {
    let mut v = m.named_buffers()?;
    v.retain(|(n, _)| n.starts_with(BufferKind::FfnUnitOrder.prefix()));
    Ok(v)
}

fn as_vecs(buffers: &[(String, Tensor)]) -> Result<Vec<(String, Vec<u32>)>> {
    buffers
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_vec1::<u32>()?)))
        .collect()
}

/// A fixture model with a trainable head only (LoRA and routers are added by `sparsify`).
#[allow(clippy::large_enum_variant)] // a few per test
enum Model {
    Bert(BertForSequenceClassification),
    Gpt2(GPT2LMHeadModel),
}

struct Case {
    name: &'static str,
    inputs: HashMap<String, Tensor>,
}

impl Case {
    fn new(name: &'static str) -> Result<Self> {
        Ok(Self {
            name,
            inputs: expected(name)?,
        })
    }

    fn load_from(&self, src: &WeightSource) -> Result<Model> {
        let opts = LoadOptions {
            trainable: Trainable::only(|n: &str| n.starts_with("classifier.")),
            ..LoadOptions::default()
        };
        let cfg = fixture(self.name).join("config.json");
        Ok(if self.name.contains("bert") {
            Model::Bert(
                BertForSequenceClassification::load(&BertConfig::from_file(&cfg)?, src, &opts, None)?.0,
            )
        } else {
            Model::Gpt2(GPT2LMHeadModel::load(&GPT2Config::from_file(&cfg)?, src, &opts)?.0)
        })
    }

    fn load(&self) -> Result<Model> {
        self.load_from(&WeightSource::from_dir(fixture(self.name))?)
    }

    fn calibration(&self) -> CalibrationBatch {
        CalibrationBatch {
            input_ids: self.inputs["input_ids"].clone(),
            attention_mask: Some(self.inputs["attention_mask"].clone()),
            token_type_ids: self.inputs.get("token_type_ids").cloned(),
        }
    }

    fn logits(&self, m: &Model) -> Result<Tensor> {
        let (ids, mask) = (&self.inputs["input_ids"], Some(&self.inputs["attention_mask"]));
        Ok(match m {
            Model::Bert(b) => b.forward_t(ids, self.inputs.get("token_type_ids"), mask, false)?,
            Model::Gpt2(g) => g.forward_t(ids, mask, false)?,
        })
    }
}

impl Model {
    fn spt(&mut self) -> &mut dyn SptModel {
        match self {
            Model::Bert(b) => b,
            Model::Gpt2(g) => g,
        }
    }
    fn params(&self) -> &dyn NamedParams {
        match self {
            Model::Bert(b) => b,
            Model::Gpt2(g) => g,
        }
    }
}

fn config(top_k: usize, gate: GateMode, fit: bool) -> SptConfig {
    SptConfig {
        ffn: Some(RoutedFfnConfig {
            gate,
            seed: 5,
            ..RoutedFfnConfig::new(4, BlockTopK::Count(top_k))
        }),
        ffn_calibration: FfnCalibration {
            router_fit: fit.then(RouterFitConfig::default),
            cluster_units: fit,
        },
        lora: Some(LoraSettings {
            targets: vec![LoraTarget::Fc1, LoraTarget::Fc2],
            config: LoraConfig {
                rank: 2,
                alpha: 4.0,
                dropout: 0.0,
                seed: 7,
            },
        }),
        ..SptConfig::default()
    }
}

/// Gives every LoRA B (zero at the start) values, so the adapters change the output.
fn randomize_lora(m: &Model, seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    for (k, v) in m.params().named_vars() {
        if k.contains("lora_B") {
            let data: Vec<f32> = (0..v.elem_count()).map(|_| rng.random_range(-0.1..0.1)).collect();
            v.set(&Tensor::from_vec(data, v.shape(), &Device::Cpu)?)?;
        }
    }
    Ok(())
}

#[test]
fn regrouped_units_keep_the_dense_model_and_its_export() -> Result<()> {
    for case in [Case::new("tiny-bert-cls")?, Case::new("tiny-gpt2")?] {
        let name = case.name;
        let dense = case.logits(&case.load()?)?;
        // All blocks with gate 1 is the dense FFN, whatever units form the blocks.
        let mut m = case.load()?;
        // Without a router fit, a layer keeps its clustered units: with one, it keeps its
        // contiguous blocks where they fit the dense FFN better (both of tiny-bert's layers,
        // since GELU's erf changed in its last bits), and this test would check nothing.
        let mut cfg = config(4, GateMode::Ones, true);
        cfg.ffn_calibration.router_fit = None;
        sparsify(m.spt(), &cfg, &[case.calibration()])?;
        let orders = unit_orders(m.spt())?;
        assert!(!orders.is_empty(), "{name}: no layer was regrouped");
        // An identity order would make every check below hold trivially.
        assert!(
            as_vecs(&orders)?
                .iter()
                .any(|(_, o)| o.iter().enumerate().any(|(i, &u)| u as usize != i)),
            "{name}: every unit order is the identity"
        );
        let e = rel_err(&case.logits(&m)?, &dense)?;
        assert!(
            e < 1e-5,
            "{name}: regrouped model differs from the dense one by {e:e}"
        );

        // Trained adapters, merged and exported under HF names, load as a plain model that
        // computes the same function (the export holds the regrouped order).
        randomize_lora(&m, 3)?;
        let adapted = case.logits(&m)?;
        assert!(max_abs(&adapted, &dense)? > 1e-4, "{name}: LoRA had no effect");
        m.spt().merge_lora()?;
        let hf: HashMap<String, Tensor> = m
            .params()
            .named_tensors()
            .into_iter()
            .filter(|(n, _)| !n.contains(".lora_") && !n.contains(".router."))
            .collect();
        let reloaded = case.load_from(&WeightSource::from_tensors(hf))?;
        let e = rel_err(&case.logits(&reloaded)?, &adapted)?;
        assert!(e < 1e-5, "{name}: export of the regrouped model differs by {e:e}");
    }
    Ok(())
}

#[test]
fn saved_unit_orders_rebuild_the_routed_model() -> Result<()> {
    for case in [Case::new("tiny-bert-cls")?, Case::new("tiny-gpt2")?] {
        let name = case.name;
        // A run: fit the routers on regrouped units (2 of 4 blocks), then "train".
        let mut a = case.load()?;
        let report = sparsify(
            a.spt(),
            &config(2, GateMode::SoftmaxKept, true),
            &[case.calibration()],
        )?;
        let q = report.layers[0].routing.context("routing summary")?;
        assert!(q.contiguous_cosine.is_some(), "{q:?}");
        randomize_lora(&a, 11)?;
        let want = case.logits(&a)?;
        let orders = unit_orders(a.spt())?;

        // A restore: no calibration; the saved orders, then the saved trained values.
        let mut b = case.load()?;
        sparsify(b.spt(), &config(2, GateMode::SoftmaxKept, false), &[])?;
        b.spt().load_buffers(&orders, None)?;
        b.spt().load_buffers(&orders, None)?; // idempotent
        let saved: HashMap<String, Tensor> = a
            .params()
            .named_vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
        for (k, v) in b.params().named_vars() {
            v.set(saved.get(&k).with_context(|| format!("{name}: {k} not saved"))?)?;
        }
        assert_eq!(as_vecs(&unit_orders(b.spt())?)?, as_vecs(&orders)?);
        let got = case.logits(&b)?;
        assert!(max_abs(&got, &want)? < 1e-6, "{name}: rebuilt model differs");
        // Without the orders the routed blocks hold other units: the check above can fail.
        let mut c = case.load()?;
        sparsify(c.spt(), &config(2, GateMode::SoftmaxKept, false), &[])?;
        for (k, v) in c.params().named_vars() {
            v.set(&saved[&k])?;
        }
        assert!(
            max_abs(&case.logits(&c)?, &want)? > 1e-4,
            "{name}: the order made no difference"
        );

        // Bad orders are named errors, and leave the model as it was.
        let (layer, order) = (&orders[0].0, orders[0].1.to_vec1::<u32>()?);
        let load = |b: &mut Model, name: &str, order: Vec<u32>| -> Result<String> {
            let t = Tensor::new(order, &Device::Cpu)?;
            Ok(b.spt()
                .load_buffers(&[(name.to_string(), t)], None)
                .unwrap_err()
                .to_string())
        };
        let mut dup = order.clone();
        dup[1] = dup[0];
        let err = load(&mut b, layer, dup)?;
        assert!(err.contains("appears twice"), "{err}");
        let mut far = order.clone();
        far[0] = order.len() as u32;
        let err = load(&mut b, layer, far)?;
        assert!(
            err.contains("unit_order") && err.contains("units are 0.."),
            "{err}"
        );
        let err = load(&mut b, "ffn_unit_order.layer.99", order.clone())?;
        assert!(err.contains("`ffn_unit_order.layer.99`"), "{err}");
        let err = load(&mut b, "ffn_unit_order.layer.x", order.clone())?;
        assert!(err.contains("layer number"), "{err}");
        let err = load(&mut b, "ffn_skip_bias.layer.0", order.clone())?;
        assert!(err.contains("removed"), "{err}");
        let err = load(&mut b, "router_state.layer.0", order.clone())?;
        assert!(err.contains("not a buffer spt knows"), "{err}");
        let floats = Tensor::new(&[0f32, 1.0], &Device::Cpu)?;
        let err = b
            .spt()
            .load_buffers(&[(layer.clone(), floats)], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected a u32 vector"), "{err}");
        assert!(
            max_abs(&case.logits(&b)?, &want)? < 1e-6,
            "{name}: a refused order changed the model"
        );
    }
    Ok(())
}
