//! Training a candle model of your own that uses spt's layers, with candle's own optimizer.
//!
//! The model: token embeddings and a classification head from `candle_nn` (in a `VarMap`), and
//! between them one pre-LN attention block built from spt's layers: `LayerNorm` (with a
//! backward, unlike candle's fused one), frozen q/k/v/o projections with LoRA adapters on q and
//! v, and PQ-selected sparse attention keeping 8 of 64 keys per query. The adapters' `Var`s join
//! the `VarMap` (`NamedParams::add_to_var_map`), so one `candle_nn::AdamW` over
//! `map.all_vars()` trains them with the embeddings and the head.
//!
//!     cargo run --release --example own_model
//!
//! The task is synthetic: a sequence is labelled 1 when most of its tokens come from the lower
//! half of the vocabulary. It prints the loss and accuracy as training goes.

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use spt::models::pq::{KeyTopK, PqConfig};
use spt::models::{
    AttentionMask, KeyGrouping, LayerNorm, Linear, NamedParams, Param, SparseAttention, WeightLayout,
};
use spt::ops::gradcheck::randn_f64;
use spt::ops::lora::LoraConfig;

const VOCAB: usize = 64;
const LEN: usize = 64;
const E: usize = 64;
const HEADS: usize = 4;

/// The attention block: `x + o(attn(q, k, v of ln(x)))`.
struct Block {
    ln: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    attn: SparseAttention,
}

impl NamedParams for Block {
    fn visit_params<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        for l in [&self.q, &self.k, &self.v, &self.o] {
            l.visit_params(f);
        }
    }
    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        for l in [&mut self.q, &mut self.k, &mut self.v, &mut self.o] {
            l.visit_params_mut(f);
        }
    }
}

/// A frozen `[out, in]` projection standing in for a pretrained one.
fn frozen_linear(name: &str, seed: u64) -> Result<Linear> {
    let w = (randn_f64(&[E, E], seed)? * (1.0 / (E as f64).sqrt()))?.to_dtype(DType::F32)?;
    Ok(Linear::new(
        Param::frozen(format!("{name}.weight"), &w),
        None,
        WeightLayout::OutIn,
    )?)
}

/// `[B, L, E]` → `[B, H, L, E / H]`, laid out for the kernels.
fn heads(x: &Tensor) -> Result<Tensor> {
    let (b, l, _) = x.dims3()?;
    Ok(x.reshape((b, l, HEADS, E / HEADS))?
        .transpose(1, 2)?
        .contiguous()?)
}

impl Block {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let h = self.ln.forward(x)?;
        let [q, k, v] = [&self.q, &self.k, &self.v].map(|p| p.forward_t(&h, train));
        let (q, k, v) = (heads(&q?)?, heads(&k?)?, heads(&v?)?);
        let scale = 1.0 / ((E / HEADS) as f64).sqrt();
        let a = self.attn.forward(&q, &k, &v, &AttentionMask::none(), scale)?;
        let a = a.transpose(1, 2)?.reshape((b, l, E))?;
        Ok((x + self.o.forward_t(&a, train)?)?)
    }
}

/// `n` sequences and their labels.
fn data(n: usize, seed: u64) -> Result<(Tensor, Tensor)> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = |m: u64| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s % m
    };
    let (mut ids, mut labels) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let low_share = 0.3 + 0.4 * next(2) as f64; // 0.3 or 0.7 of the tokens from the low half
        let low = (0..LEN)
            .map(|_| {
                let is_low = (next(1000) as f64) < low_share * 1000.0;
                let t = next(VOCAB as u64 / 2) as u32;
                ids.push(if is_low { t } else { t + VOCAB as u32 / 2 });
                is_low as usize
            })
            .sum::<usize>();
        labels.push(u32::from(2 * low > LEN));
    }
    let dev = Device::Cpu;
    Ok((Tensor::from_vec(ids, (n, LEN), &dev)?, Tensor::new(labels, &dev)?))
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
    let embed = candle_nn::embedding(VOCAB, E, vb.pp("embed"))?;
    let head = candle_nn::linear(E, 2, vb.pp("head"))?;

    let ln = LayerNorm {
        weight: Param::frozen("ln.weight", &Tensor::ones(E, DType::F32, &dev)?),
        bias: Param::frozen("ln.bias", &Tensor::zeros(E, DType::F32, &dev)?),
        eps: 1e-5,
    };
    let k = frozen_linear("k", 2)?;
    let (x_train, y_train) = data(512, 1)?;
    let (x_test, y_test) = data(256, 2)?;
    // The PQ codebook, fitted to the keys of a first batch (refit it as they drift, in real use).
    let keys = heads(&k.forward(&ln.forward(&embed.forward(&x_train.narrow(0, 0, 64)?)?)?)?)?;
    let pq = PqConfig {
        n_subspaces: 4,
        n_codewords: 16,
        ..PqConfig::default()
    };
    let mut block = Block {
        ln,
        q: frozen_linear("q", 1)?,
        k,
        v: frozen_linear("v", 3)?,
        o: frozen_linear("o", 4)?,
        attn: SparseAttention::fit(&keys, &pq, KeyTopK::Count(8), KeyGrouping::PerQuery)?,
    };
    // One seed per adapter: A is drawn from it.
    for (i, lin) in [&mut block.q, &mut block.v].into_iter().enumerate() {
        lin.add_lora(LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            seed: 10 + i as u64,
        })?;
    }
    block.add_to_var_map(&map, "block.")?;

    let logits = |x: &Tensor, train: bool| -> Result<Tensor> {
        let h = block.forward(&embed.forward(x)?, train)?;
        Ok(head.forward(&h.mean(1)?)?)
    };
    let mut opt = AdamW::new(
        map.all_vars(),
        ParamsAdamW {
            lr: 3e-3,
            ..ParamsAdamW::default()
        },
    )?;
    let test = |when: &str| -> Result<()> {
        let out = logits(&x_test, false)?;
        let loss = candle_nn::loss::cross_entropy(&out, &y_test)?.to_scalar::<f32>()?;
        let right = out
            .argmax(D::Minus1)?
            .eq(&y_test)?
            .to_dtype(DType::F32)?
            .mean_all()?;
        println!(
            "{when}: test loss {loss:.3}, accuracy {:.3}",
            right.to_scalar::<f32>()?
        );
        Ok(())
    };
    println!("trainable tensors in the VarMap: {}", map.all_vars().len());
    test("before training")?;
    for epoch in 0..4 {
        for start in (0..512).step_by(32) {
            let (x, y) = (x_train.narrow(0, start, 32)?, y_train.narrow(0, start, 32)?);
            let loss = candle_nn::loss::cross_entropy(&logits(&x, true)?, &y)?;
            opt.backward_step(&loss)?;
        }
        test(&format!("epoch {epoch}"))?;
    }
    Ok(())
}
