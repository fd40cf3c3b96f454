//! spt's layers in a model of one's own: separate dropout masks, masks checked against the
//! batch on every path, strided inputs, weights shared with a candle `VarMap`, and a base weight
//! replaced behind a LoRA adapter's back.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use spt_models::pq::{KeyTopK, PqConfig};
use spt_models::{
    AttentionMask, DenseAttention, Dropout, DropoutRng, KeyGrouping, Linear, NamedParams, Param,
    PreparedMask, SparseAttention, WeightLayout,
};
use spt_ops::lora::LoraConfig;
use std::sync::Arc;

fn max_abs(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok(spt_ops::gradcheck::max_abs_diff(a, b)?)
}

fn randn(dims: &[usize], seed: u64) -> Result<Tensor> {
    Ok(spt_ops::gradcheck::randn_f64(dims, seed)?.to_dtype(DType::F32)?)
}

/// Was a defect: every `Dropout::new` (and so every `AttentionCore::dense`) started from the
/// same seed, so layers built by hand dropped the same positions at the same call.
#[test]
fn dropouts_made_apart_draw_their_own_masks() -> Result<()> {
    let x = Tensor::ones((4, 64), DType::F32, &Device::Cpu)?;
    let (a, b) = (Dropout::new(0.5)?, Dropout::new(0.5)?);
    assert!(max_abs(&a.forward_t(&x, true)?, &b.forward_t(&x, true)?)? > 0.0);
    // Dropouts sharing a seed source draw from one sequence, which reseeding repeats.
    let rng = Arc::new(DropoutRng::seeded(3));
    let (c, d) = (
        Dropout::with_rng(0.5, rng.clone())?,
        Dropout::with_rng(0.5, rng.clone())?,
    );
    let first = c.forward_t(&x, true)?;
    assert!(max_abs(&d.forward_t(&x, true)?, &first)? > 0.0);
    rng.seed(3);
    assert_eq!(max_abs(&c.forward_t(&x, true)?, &first)?, 0.0);
    Ok(())
}

/// Was a defect: where dense attention runs composed (here: a row with no allowed key), one
/// sequence's key padding `[1, L]` spread over a batch of 2 in silence; the fused path refused it.
#[test]
fn one_sequences_padding_is_refused_for_a_batch_on_every_path() -> Result<()> {
    let dev = Device::Cpu;
    let att = DenseAttention {
        dropout: Dropout::new(0.0)?,
    };
    let q = randn(&[2, 1, 4, 8], 1)?;
    for (pad, composed) in [([[1u8, 1, 0, 1]], false), ([[0u8, 1, 1, 1]], true)] {
        let mask = AttentionMask::causal().with_key_padding(Tensor::new(&pad, &dev)?);
        let prepared = PreparedMask::new(mask, 4, DType::F32, &dev)?;
        assert_eq!(prepared.rows_nonempty, !composed);
        let e = att
            .forward_t(&q, &q, &q, &prepared, 0.5, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[1, 4]") || e.contains("a batch of 2"), "{e}");
        // A mask for both sequences runs.
        let both = Tensor::new(&[pad[0], pad[0]], &dev)?;
        let prepared = PreparedMask::new(
            AttentionMask::causal().with_key_padding(both),
            4,
            DType::F32,
            &dev,
        )?;
        assert_eq!(
            att.forward_t(&q, &q, &q, &prepared, 0.5, false)?.dims(),
            [2, 1, 4, 8]
        );
    }
    Ok(())
}

/// Was a defect: sparse attention took heads split by `transpose` (a strided view) while it kept
/// every key, and refused them once it selected keys.
#[test]
fn sparse_attention_takes_strided_heads_like_dense() -> Result<()> {
    let (b, l, h, d) = (2, 16, 2, 8);
    let split = |t: &Tensor| t.reshape((b, l, h, d))?.transpose(1, 2); // [B, H, L, d], strided
    let (q, k, v) = (
        randn(&[b, l, h * d], 2)?,
        randn(&[b, l, h * d], 3)?,
        randn(&[b, l, h * d], 4)?,
    );
    let (q, k, v) = (split(&q)?, split(&k)?, split(&v)?);
    assert!(!q.is_contiguous());
    let pq = PqConfig {
        n_subspaces: 2,
        n_codewords: 4,
        ..PqConfig::default()
    };
    let sparse = SparseAttention::fit(&k.contiguous()?, &pq, KeyTopK::Count(4), KeyGrouping::PerQuery)?;
    let mask = AttentionMask::causal();
    let strided = sparse.forward(&q, &k, &v, &mask, 0.35)?;
    let laid_out = sparse.forward(&q.contiguous()?, &k.contiguous()?, &v.contiguous()?, &mask, 0.35)?;
    assert_eq!(max_abs(&strided, &laid_out)?, 0.0);
    Ok(())
}

/// A layer's weight taken from a `VarMap` trains as the map's variable, and the `Var`s spt makes
/// (LoRA factors) join the map, so that an optimizer over `map.all_vars()` trains them.
#[test]
fn var_map_weights_and_lora_factors_train_through_the_map() -> Result<()> {
    let dev = Device::Cpu;
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
    let _ = vb.get_with_hints((6, 4), "a.weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
    let _ = vb.get_with_hints((5, 6), "b.weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
    let a = Linear::new(Param::from_var_map(&map, "a.weight")?, None, WeightLayout::OutIn)?;
    let mut b = Linear::new(Param::from_var_map(&map, "b.weight")?, None, WeightLayout::OutIn)?;
    let e = Param::from_var_map(&map, "c.weight").unwrap_err().to_string();
    assert!(e.contains("c.weight"), "{e}");
    b.add_lora(LoraConfig {
        rank: 2,
        ..LoraConfig::default()
    })?;
    b.add_to_var_map(&map, "")?;
    // a.weight, b.weight (now frozen in b), two factors.
    assert_eq!(map.all_vars().len(), 4);
    // Adding again, or under another prefix, adds nothing (an optimizer would step a Var twice);
    // a name the map holds for another variable is refused, as are two layers named alike.
    b.add_to_var_map(&map, "")?;
    b.add_to_var_map(&map, "again.")?;
    a.add_to_var_map(&map, "model.")?;
    assert_eq!(map.all_vars().len(), 4);
    let twin = |seed| -> Result<Linear> {
        let mut l = Linear::new(
            Param::frozen("t.weight", &randn(&[5, 6], seed)?),
            None,
            WeightLayout::OutIn,
        )?;
        l.add_lora(LoraConfig {
            rank: 2,
            ..LoraConfig::default()
        })?;
        Ok(l)
    };
    let twins = Layers(vec![twin(11)?, twin(12)?]);
    let e = twins.add_to_var_map(&map, "").unwrap_err().to_string();
    assert!(e.contains("t.lora_"), "{e}");
    assert_eq!(map.all_vars().len(), 4, "nothing added");
    let other = Linear::new(
        Param::trainable("b.lora_A.weight", &randn(&[2, 6], 5)?)?,
        None,
        WeightLayout::OutIn,
    )?;
    let e = other.add_to_var_map(&map, "").unwrap_err().to_string();
    assert!(e.contains("b.lora_A.weight"), "{e}");

    let w_a = a.weight.tensor().copy()?;
    let b_lora = b
        .named_vars()
        .into_iter()
        .find(|(n, _)| n.contains("lora_B"))
        .expect("lora_B")
        .1;
    let before = b_lora.as_tensor().copy()?;
    let mut opt = candle_nn::SGD::new(map.all_vars(), 0.1)?;
    let x = randn(&[3, 4], 6)?;
    let loss = b.forward_t(&a.forward_t(&x, true)?, true)?.sqr()?.sum_all()?;
    opt.backward_step(&loss)?;
    assert!(
        max_abs(&a.weight.tensor().copy()?, &w_a)? > 0.0,
        "the map's a.weight trained"
    );
    assert!(
        max_abs(&b_lora.as_tensor().copy()?, &before)? > 0.0,
        "lora_B trained"
    );
    Ok(())
}

/// A model of one's own: its layers' parameters, in order.
struct Layers(Vec<Linear>);

impl NamedParams for Layers {
    fn visit_params<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        self.0.iter().for_each(|l| l.visit_params(f));
    }
    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.0.iter_mut().for_each(|l| l.visit_params_mut(f));
    }
}

/// Was a defect: a base weight replaced through the public field after `add_lora` was exported
/// but never computed with (the adapter holds its own copy).
#[test]
fn a_base_weight_replaced_behind_lora_is_refused() -> Result<()> {
    let mut lin = Linear::new(
        Param::frozen("l.weight", &randn(&[5, 4], 7)?),
        None,
        WeightLayout::OutIn,
    )?;
    lin.add_lora(LoraConfig {
        rank: 2,
        ..LoraConfig::default()
    })?;
    let x = randn(&[3, 4], 8)?;
    lin.forward_t(&x, true)?;
    lin.weight.set(&randn(&[5, 4], 9)?)?;
    for e in [
        lin.forward_t(&x, true).unwrap_err().to_string(),
        lin.forward(&x).unwrap_err().to_string(),
        lin.merge_lora().unwrap_err().to_string(),
    ] {
        assert!(
            e.contains("lora = l:") && e.contains("replaced after add_lora"),
            "{e}"
        );
    }
    // Merging writes the merged weight back into the layer (InOut: a new tensor), which is no
    // replacement: the layer computes the same before, while and after.
    let mut fine = Linear::new(
        Param::frozen("m.weight", &randn(&[5, 4], 7)?),
        None,
        WeightLayout::InOut,
    )?;
    fine.add_lora(LoraConfig {
        rank: 2,
        ..LoraConfig::default()
    })?;
    let lora_b = fine.lora().expect("adapter").lora_b().clone();
    lora_b.set(&randn(lora_b.dims(), 11)?)?; // B ≠ 0, so the merge changes the weight
    let x = randn(&[3, 5], 10)?;
    let before = fine.forward(&x)?;
    fine.merge_lora()?;
    assert!(max_abs(&before, &fine.forward(&x)?)? < 1e-5);
    fine.unmerge_lora()?;
    assert!(max_abs(&before, &fine.forward(&x)?)? < 1e-5);
    Ok(())
}

#[test]
fn a_param_from_a_var_map_shares_its_variable() -> Result<()> {
    // `Param::from_var_map` shares the map's variable: an update through the map is what the
    // parameter reads.
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let _ = vb.get_with_hints(3, "w", candle_nn::init::ZERO)?;
    let p = Param::from_var_map(&map, "w")?;
    let var: Var = map.data().lock().unwrap()["w"].clone();
    var.set(&Tensor::new(&[1f32, 2., 3.], &Device::Cpu)?)?;
    assert_eq!(p.tensor().to_vec1::<f32>()?, [1., 2., 3.]);
    Ok(())
}
