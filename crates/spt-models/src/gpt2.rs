//! Trainable GPT-2, loaded from Hugging Face checkpoints.
//!
//! Upstream: Hugging Face transformers `src/transformers/models/gpt2/modeling_gpt2.py`
//! (`GPT2Attention`, `GPT2MLP`, `GPT2Block`, `GPT2Model`, `GPT2LMHeadModel`) and `pytorch_utils.py`
//! (`Conv1D`). candle-transformers has no GPT-2; this is written anew for spt. Notes:
//! - `Conv1D` weights stay `[in, out]` as stored ([`WeightLayout::InOut`]), so gradients have the
//!   checkpoint's shapes; `c_attn` is fused q|k|v along its output.
//! - `lm_head` is tied to `wte` (the same `Param`), so its gradient sums the embedding and the
//!   output-projection contributions; an untied `lm_head.weight` is loaded when the config says
//!   `tie_word_embeddings: false`.
//! - `attn.bias` / `attn.masked_bias` buffers are ignored; the causal mask is built per forward,
//!   combined with an optional key-padding mask.
//! - The attention core and the MLP are per-layer slots ([`AttentionCore`], [`FeedForward`]) that
//!   `sparsify` swaps.
//! - Incremental decoding ([`GPT2Model::forward_cached`], [`GPT2LMHeadModel::next_token_logits`])
//!   keeps each layer's keys and values in a [`KvCache`], as HF's `past_key_values` do.

use crate::attention::{AttentionCore, AttentionMask, DenseAttention, PreparedMask, FROM_HEADS};
use crate::error::{ModelError, Result};
use crate::ffn::{DenseFfn, FeedForward};
use crate::layers::{check_ids, check_mask, Dropout, DropoutRng, Embedding, LayerNorm, Linear, WeightLayout};
use crate::memory::{activation_bytes, ActivationAccounting, ActivationBytes, LayerShape};
use crate::sparsify::{CalibrationBatch, LayerSlots, LayerTrace, LoraTarget, SptModel};
use crate::weights::{read_json, LoadOptions, LoadReport, Loader, NamedParams, Param, WeightSource};
use candle_core::{DType, Tensor, D};
use spt_ops::lora::HeadsLayout;
use spt_ops::{Activation, Reduction};
use std::path::Path;
use std::sync::Arc;

fn d_vocab() -> usize {
    50257
}
fn d_embd() -> usize {
    768
}
fn d_layer() -> usize {
    12
}
fn d_head() -> usize {
    12
}
fn d_pos() -> usize {
    1024
}
fn d_act() -> String {
    "gelu_new".into()
}
fn d_drop() -> f64 {
    0.1
}
fn d_eps() -> f64 {
    1e-5
}
fn d_true() -> bool {
    true
}
fn d_init() -> f64 {
    0.02
}

/// HF `GPT2Config` (the fields we use).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct GPT2Config {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_embd")]
    pub n_embd: usize,
    #[serde(default = "d_layer")]
    pub n_layer: usize,
    #[serde(default = "d_head")]
    pub n_head: usize,
    #[serde(default = "d_pos")]
    pub n_positions: usize,
    /// FFN width; `None` means `4 · n_embd`.
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "d_act")]
    pub activation_function: String,
    #[serde(default = "d_drop")]
    pub resid_pdrop: f64,
    #[serde(default = "d_drop")]
    pub embd_pdrop: f64,
    #[serde(default = "d_drop")]
    pub attn_pdrop: f64,
    #[serde(default = "d_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "d_init")]
    pub initializer_range: f64,
    #[serde(default = "d_true")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default = "d_true")]
    pub tie_word_embeddings: bool,
}

impl GPT2Config {
    /// Parses and validates `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let cfg: Self = read_json(path.as_ref())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses and validates a JSON string.
    pub fn from_json_str(s: &str) -> Result<Self> {
        let cfg: Self = crate::weights::parse_json(s, Path::new("<string>"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn activation(&self) -> Result<Activation> {
        Activation::from_hf(&self.activation_function)
            .ok_or_else(|| ModelError::UnknownActivation(self.activation_function.clone()))
    }

    /// One layer's work for a batch of `batch × seq_len` tokens, for
    /// [`crate::memory::activation_bytes`] (dropout counted when `train` and the config has some).
    pub fn layer_shape(&self, batch: usize, seq_len: usize, dtype_bytes: usize, train: bool) -> LayerShape {
        LayerShape {
            batch,
            seq_len,
            hidden: self.n_embd,
            heads: self.n_head,
            intermediate: self.inner_dim(),
            dtype_bytes,
            dropout: train && self.resid_pdrop > 0.0,
        }
    }

    pub fn inner_dim(&self) -> usize {
        self.n_inner.unwrap_or(self.n_embd.saturating_mul(4))
    }

    /// Head dimension; 0 for a config without heads (which [`validate`](Self::validate)
    /// refuses, naming `n_head`) rather than a division by zero.
    pub fn head_dim(&self) -> usize {
        self.n_embd.checked_div(self.n_head).unwrap_or(0)
    }

    /// The weight matrices' scalars the sizes imply (embeddings and the blocks' projections; the
    /// biases and norms, a fraction of a percent, left out), saturating: any config has one.
    pub fn param_count(&self) -> u128 {
        use crate::memory::{prod, sum};
        let w = |x: usize| x as u128;
        let (e, f) = (w(self.n_embd), w(self.inner_dim()));
        let per_layer = sum(&[prod(&[4, e, e]), prod(&[2, e, f])]);
        sum(&[
            prod(&[w(self.vocab_size), e]),
            prod(&[w(self.n_positions), e]),
            prod(&[w(self.n_layer), per_layer]),
        ])
    }

    pub fn validate(&self) -> Result<()> {
        self.activation()?;
        let (v, e, f, l, p) = (
            self.vocab_size,
            self.n_embd,
            self.inner_dim(),
            self.n_layer,
            self.n_positions,
        );
        let params = self.param_count();
        crate::memory::check_model_size(
            &[
                ("vocab_size", v),
                ("n_embd", e),
                ("n_inner", f),
                ("n_layer", l),
                ("n_head", self.n_head),
                ("n_positions", p),
            ],
            params,
        )?;
        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon > 0.0) {
            return Err(ModelError::InvalidConfig {
                field: "layer_norm_epsilon",
                value: self.layer_norm_epsilon.to_string(),
                reason: "must be a positive number".into(),
            });
        }
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return Err(ModelError::InvalidConfig {
                field: "n_head",
                value: self.n_head.to_string(),
                reason: format!("must divide n_embd = {}", self.n_embd),
            });
        }
        for (field, p) in [
            ("resid_pdrop", self.resid_pdrop),
            ("embd_pdrop", self.embd_pdrop),
            ("attn_pdrop", self.attn_pdrop),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(ModelError::InvalidConfig {
                    field,
                    value: p.to_string(),
                    reason: "must be in [0, 1)".into(),
                });
            }
        }
        Ok(())
    }
}

/// HF `GPT2Attention` (self-attention only): fused `c_attn`, the attention core, `c_proj`.
#[derive(Debug)]
pub struct GPT2Attention {
    pub c_attn: Linear,
    pub c_proj: Linear,
    pub core: AttentionCore,
    pub resid_dropout: Dropout,
    pub n_head: usize,
    /// Softmax scale: `1/√d` (÷ (layer+1) with `scale_attn_by_inverse_layer_idx`).
    pub scale: f64,
}

impl GPT2Attention {
    /// `x [B, L, E] → [B, L, E]`.
    pub fn forward_t(&self, x: &Tensor, mask: &PreparedMask, train: bool) -> Result<Tensor> {
        let out = self.forward_with_keys(x, mask, train, None)?.0;
        self.resid_dropout.forward_t(&out, train)
    }

    /// The output before `resid_dropout` (the block fuses it with the residual add) and the
    /// queries and keys `[B, heads, L, d]` (for calibration). With `past`, the layer's cached
    /// keys and values come before this call's, and the cache is extended with them.
    fn forward_with_keys(
        &self,
        x: &Tensor,
        mask: &PreparedMask,
        train: bool,
        past: Option<&mut LayerKv>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        // c_attn's [B, L, 3E] output as q, k, v [B, heads, L, d] each.
        let heads = HeadsLayout {
            input_heads: false,
            output_heads: Some(self.n_head),
        };
        let qkv = self.c_attn.forward_t_parts(x, 3, heads, train)?;
        let (q, mut k, mut v) = (qkv[0].clone(), qkv[1].clone(), qkv[2].clone());
        if let Some(slot) = past {
            // Detached: a cache that held its graph would keep every earlier step's alive.
            let (k_new, v_new) = (k.detach(), v.detach());
            (k, v) = match slot.take() {
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k_new], 2)?, Tensor::cat(&[&pv, &v_new], 2)?),
                None => (k_new, v_new),
            };
            *slot = Some((k.clone(), v.clone()));
        }
        let ctx = self.core.forward_t(&q, &k, &v, mask, self.scale, train)?;
        let out = self.c_proj.forward_t_heads(&ctx, FROM_HEADS, train)?;
        Ok((out, q, k))
    }
}

/// HF `GPT2Block`: pre-LN attention and MLP with residuals.
#[derive(Debug)]
pub struct GPT2Block {
    pub ln_1: LayerNorm,
    pub attn: GPT2Attention,
    pub ln_2: LayerNorm,
    /// `mlp.c_fc` → act → `mlp.c_proj`.
    pub mlp: FeedForward,
    pub mlp_dropout: Dropout,
}

impl GPT2Block {
    fn load(l: &mut Loader, c: &GPT2Config, i: usize) -> Result<Self> {
        let e = c.n_embd;
        let p = format!("h.{i}");
        let conv = |l: &mut Loader, name: &str, i, o| {
            Linear::load(l, &format!("{p}.{name}"), i, o, WeightLayout::InOut)
        };
        let mut scale = if c.scale_attn_weights {
            1.0 / (c.head_dim() as f64).sqrt()
        } else {
            1.0
        };
        if c.scale_attn_by_inverse_layer_idx {
            scale /= (i + 1) as f64;
        }
        Ok(Self {
            ln_1: LayerNorm::load(l, &format!("{p}.ln_1"), e, c.layer_norm_epsilon)?,
            attn: GPT2Attention {
                c_attn: conv(l, "attn.c_attn", e, 3 * e)?,
                c_proj: conv(l, "attn.c_proj", e, e)?,
                core: AttentionCore::Dense(DenseAttention {
                    dropout: l.dropout(c.attn_pdrop)?,
                }),
                resid_dropout: l.dropout(c.resid_pdrop)?,
                n_head: c.n_head,
                scale,
            },
            ln_2: LayerNorm::load(l, &format!("{p}.ln_2"), e, c.layer_norm_epsilon)?,
            mlp: FeedForward::Dense(DenseFfn {
                fc1: conv(l, "mlp.c_fc", e, c.inner_dim())?,
                fc2: conv(l, "mlp.c_proj", c.inner_dim(), e)?,
                act: c.activation()?,
            }),
            mlp_dropout: l.dropout(c.resid_pdrop)?,
        })
    }

    pub fn forward_t(&self, x: &Tensor, mask: &PreparedMask, train: bool) -> Result<Tensor> {
        self.forward_traced(x, mask, train, None, None)
    }

    fn forward_traced(
        &self,
        x: &Tensor,
        mask: &PreparedMask,
        train: bool,
        trace: Option<&mut Vec<LayerTrace>>,
        past: Option<&mut LayerKv>,
    ) -> Result<Tensor> {
        let _span = tracing::trace_span!("gpt2_block").entered();
        let (a, queries, keys) = self
            .attn
            .forward_with_keys(&self.ln_1.forward(x)?, mask, train, past)?;
        let x = self.attn.resid_dropout.residual_add(&a, x, train)?;
        let h = self.ln_2.forward(&x)?;
        if let Some(t) = trace {
            t.push(LayerTrace {
                queries: queries.detach(),
                keys: keys.detach(),
                ffn_input: h.detach(),
            });
        }
        let m = self.mlp.forward_t(&h, train)?;
        self.mlp_dropout.residual_add(&m, &x, train)
    }
}

impl NamedParams for GPT2Block {
    fn visit_params<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        self.ln_1.visit_params(f);
        self.attn.c_attn.visit_params(f);
        self.attn.c_proj.visit_params(f);
        self.ln_2.visit_params(f);
        self.mlp.visit_params(f);
    }
    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.ln_1.visit_params_mut(f);
        self.attn.c_attn.visit_params_mut(f);
        self.attn.c_proj.visit_params_mut(f);
        self.ln_2.visit_params_mut(f);
        self.mlp.visit_params_mut(f);
    }
}

/// HF `GPT2Model`: token and position embeddings, blocks, final LayerNorm.
#[derive(Debug)]
pub struct GPT2Model {
    pub config: GPT2Config,
    pub wte: Embedding,
    pub wpe: Embedding,
    pub drop: Dropout,
    pub h: Vec<GPT2Block>,
    pub ln_f: LayerNorm,
    dropout_rng: Arc<DropoutRng>,
    /// The LM head's frozen weight packed for bf16 products, by the id of the tensor it came
    /// from (see [`GPT2LMHeadModel::next_token_logits`]).
    packed_head: spt_ops::PackedCache,
}

/// Keys in GPT-2 checkpoints that are buffers, not parameters.
fn gpt2_buffer(key: &str) -> bool {
    key.ends_with(".attn.bias") || key.ends_with(".attn.masked_bias") || key.ends_with("position_ids")
}

/// With `tie_word_embeddings` (the default), a saved `lm_head.weight` must be wte's copy: one
/// that differs is untied by transformers 5 and overwritten by transformers 4, so the numbers
/// depend on the version; it was dropped here in silence. `wte`: the loaded embedding.
fn check_tied_head(l: &Loader, wte: &Tensor) -> Result<()> {
    let Some(head) = l.peek("lm_head.weight").filter(|_| !l.was_used("lm_head.weight")) else {
        return Ok(());
    };
    let field = "tie_word_embeddings";
    if head.dims() != wte.dims() {
        return Err(ModelError::InvalidConfig {
            field,
            value: "true".into(),
            reason: format!(
                "lm_head.weight is {:?} but the tied transformer.wte.weight is {:?}",
                head.dims(),
                wte.dims()
            ),
        });
    }
    // Compared in the model's dtype and place, as stored copies come out equal there; `ne`
    // counts a NaN as a difference.
    let head = head.to_dtype(wte.dtype())?.to_device(wte.device())?;
    let differ = head
        .ne(wte)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    if differ > 0.0 {
        return Err(ModelError::InvalidConfig {
            field,
            value: "true".into(),
            reason: format!(
                "lm_head.weight differs from transformer.wte.weight in {differ} values, so they are \
                 not tied (transformers 5 unties them, 4 overwrites the head); set \
                 \"tie_word_embeddings\": false in config.json for this head, or remove \
                 lm_head.weight from the checkpoint to tie it to wte"
            ),
        });
    }
    Ok(())
}

impl GPT2Model {
    /// Loads a `GPT2Model` (canonical names without the `transformer.` prefix).
    pub fn load(config: &GPT2Config, src: &WeightSource, opts: &LoadOptions) -> Result<(Self, LoadReport)> {
        config.validate()?;
        let mut l = Loader::new(src, opts, "", "transformer.");
        let m = Self::load_inner(&mut l, config)?;
        Ok((m, l.finish(gpt2_buffer)))
    }

    fn load_inner(l: &mut Loader, c: &GPT2Config) -> Result<Self> {
        let e = c.n_embd;
        Ok(Self {
            config: c.clone(),
            wte: Embedding::load(l, "wte", c.vocab_size, e)?,
            wpe: Embedding::load(l, "wpe", c.n_positions, e)?,
            drop: l.dropout(c.embd_pdrop)?,
            h: (0..c.n_layer)
                .map(|i| GPT2Block::load(l, c, i))
                .collect::<Result<Vec<_>>>()?,
            ln_f: LayerNorm::load(l, "ln_f", e, c.layer_norm_epsilon)?,
            dropout_rng: l.dropout_rng.clone(),
            packed_head: Default::default(),
        })
    }

    /// Restarts the model's dropout masks from `seed` (call once per training step for
    /// reproducible, resumable runs).
    pub fn seed_dropout(&self, seed: u64) {
        self.dropout_rng.seed(seed);
        for (i, layer) in self.h.iter().enumerate() {
            layer
                .mlp
                .seed_dropout(seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
    }

    /// The final hidden state `[B, L, E]` (after `ln_f`). `attention_mask`: `[B, L]`, 1 = attend;
    /// attention is always causal.
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        self.forward_traced(input_ids, attention_mask, train, None)
    }

    fn forward_traced(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
        mut trace: Option<&mut Vec<LayerTrace>>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let ids = check_ids(input_ids, "input_ids", "token", c.vocab_size, "vocab_size")?;
        let (b, len) = ids.dims2()?;
        if len > c.n_positions {
            return Err(ModelError::SequenceTooLong {
                len,
                max: c.n_positions,
                field: "n_positions",
            });
        }
        let dtype = self.wte.weight.tensor().dtype();
        let pad = check_mask(attention_mask, (b, len))?;
        let mask = PreparedMask::new(
            AttentionMask {
                causal: true,
                key_padding: pad,
            },
            len,
            dtype,
            ids.device(),
        )?;
        let pos = Tensor::arange(0u32, len as u32, ids.device())?.unsqueeze(0)?;
        let x = self
            .wte
            .forward_checked(&ids)?
            .broadcast_add(&self.wpe.forward_checked(&pos)?)?;
        let mut x = self.drop.forward_t(&x, train)?;
        for block in &self.h {
            x = block.forward_traced(&x, &mask, train, trace.as_deref_mut(), None)?;
        }
        self.ln_f.forward(&x)
    }

    /// Incremental decoding: the final hidden states `[B, L, E]` (after `ln_f`) of `input_ids`
    /// `[B, L]` placed after the `cache.len()` positions already in `cache`, whose keys and values
    /// are appended to it. Call it with the prompt, then with each sampled token. Inference only:
    /// no dropout, no graph kept, no padding mask (every sequence in the batch has the same
    /// length). On an error the cache is left as it was.
    ///
    /// A position sees itself and every position before it, as in [`Self::forward_t`]; with dense
    /// attention, or sparse attention keeping a fixed number of keys ([`KeyTopK::Count`]), the
    /// result equals `forward_t` over the whole sequence at the same positions (up to float
    /// rounding). Settings whose keys depend on the sequence length are taken at the length so far:
    /// with [`KeyTopK::Fraction`] a decoded position keeps that fraction of the positions up to
    /// it, and in block mode each decoded position is a query tile of its own.
    ///
    /// [`KeyTopK::Count`]: spt_ops::pq::KeyTopK::Count
    /// [`KeyTopK::Fraction`]: spt_ops::pq::KeyTopK::Fraction
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let c = &self.config;
        let ids = check_ids(input_ids, "input_ids", "token", c.vocab_size, "vocab_size")?;
        let (b, len) = ids.dims2()?; // check_ids refuses no tokens
        let past = cache.len;
        if past + len > c.n_positions {
            return Err(ModelError::SequenceTooLong {
                len: past + len,
                max: c.n_positions,
                field: "n_positions",
            });
        }
        // A cache from another model would give the layers it lacks no past keys, silently.
        if past > 0 && cache.layers.len() != self.h.len() {
            return Err(ModelError::BadInput {
                name: "cache",
                reason: format!(
                    "holds keys of {} layers, but this model has {}: a cache of another model",
                    cache.layers.len(),
                    self.h.len()
                ),
            });
        }
        if let Some(cached) = cache.batch_size()? {
            if cached != b {
                return Err(ModelError::BadInput {
                    name: "input_ids",
                    reason: format!("batch of {b} sequences, but the cache holds {cached}"),
                });
            }
        }
        if past > 0 && len > 1 {
            // New positions after cached ones need a causal mask aligned to the last key, which
            // the attention ops do not take (theirs starts at key 0): one position at a time.
            let mut work = cache.clone();
            let hidden = (0..len)
                .map(|t| self.forward_cached(&ids.narrow(1, t, 1)?, &mut work))
                .collect::<Result<Vec<_>>>()?;
            *cache = work;
            return Ok(Tensor::cat(&hidden, 1)?);
        }
        // The prompt (past = 0) is causal; one new position may see every cached key.
        let mask = AttentionMask {
            causal: past == 0,
            key_padding: None,
        };
        let mask = PreparedMask::new(mask, len, self.wte.weight.tensor().dtype(), ids.device())?;
        let pos = Tensor::arange(past as u32, (past + len) as u32, ids.device())?.unsqueeze(0)?;
        let mut x = self
            .wte
            .forward_checked(&ids)?
            .broadcast_add(&self.wpe.forward_checked(&pos)?)?;
        let mut layers = cache.layers.clone();
        layers.resize(self.h.len(), None);
        for (block, kv) in self.h.iter().zip(layers.iter_mut()) {
            x = block.forward_traced(&x, &mask, false, None, Some(kv))?;
        }
        let hidden = self.ln_f.forward(&x)?.detach();
        cache.layers = layers;
        cache.len = past + len;
        Ok(hidden)
    }
}

/// One layer's cached keys and values, `[B, heads, T, d]` each.
type LayerKv = Option<(Tensor, Tensor)>;

/// The keys and values of the positions a GPT-2 has decoded, per layer, for incremental
/// decoding ([`GPT2Model::forward_cached`]). Start each sequence (or batch) with an empty cache.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions decoded so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position (to decode a new sequence).
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// The batch size of the cached sequences (`None` when empty).
    fn batch_size(&self) -> Result<Option<usize>> {
        match self.layers.first() {
            Some(Some((k, _))) => Ok(Some(k.dim(0)?)),
            _ => Ok(None),
        }
    }
}

impl NamedParams for GPT2Model {
    fn visit_params<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        self.wte.visit_params(f);
        self.wpe.visit_params(f);
        self.h.iter().for_each(|b| b.visit_params(f));
        self.ln_f.visit_params(f);
    }
    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.wte.visit_params_mut(f);
        self.wpe.visit_params_mut(f);
        self.h.iter_mut().for_each(|b| b.visit_params_mut(f));
        self.ln_f.visit_params_mut(f);
    }
}

/// HF `GPT2LMHeadModel`: `GPT2Model` plus the (tied) LM head. Parameter names carry the
/// `transformer.` prefix, as HF saves them.
#[derive(Debug)]
pub struct GPT2LMHeadModel {
    pub transformer: GPT2Model,
    /// `None` when tied to `transformer.wte` (the default).
    pub lm_head: Option<Param>,
}

impl GPT2LMHeadModel {
    pub fn load(config: &GPT2Config, src: &WeightSource, opts: &LoadOptions) -> Result<(Self, LoadReport)> {
        config.validate()?;
        let mut l = Loader::new(src, opts, "transformer.", "transformer.");
        if config.tie_word_embeddings {
            // transformers fills a tied wte from the head when only the head was saved.
            l.alias("wte.weight", "lm_head.weight");
        }
        let transformer = GPT2Model::load_inner(&mut l, config)?;
        let lm_head = if config.tie_word_embeddings {
            check_tied_head(&l, transformer.wte.weight.tensor())?;
            None
        } else {
            Some(l.top("lm_head.weight", &[config.vocab_size, config.n_embd])?)
        };
        let mut report = l.finish(gpt2_buffer);
        // A saved tied head duplicates wte: not a parameter of ours, not an oversight.
        if config.tie_word_embeddings {
            if let Some(i) = report.unused.iter().position(|k| k == "lm_head.weight") {
                report.ignored.push(report.unused.remove(i));
            }
        }
        Ok((Self { transformer, lm_head }, report))
    }

    /// Reads `config.json` and the checkpoint from a directory.
    pub fn from_dir(dir: impl AsRef<Path>, opts: &LoadOptions) -> Result<(Self, LoadReport)> {
        let dir = dir.as_ref();
        let cfg = GPT2Config::from_file(dir.join("config.json"))?;
        Self::load(&cfg, &WeightSource::from_dir(dir)?, opts)
    }

    /// Restarts the model's dropout masks from `seed` (see [`GPT2Model::seed_dropout`]).
    pub fn seed_dropout(&self, seed: u64) {
        self.transformer.seed_dropout(seed);
    }

    /// The head's weight packed for bf16 products when a decoding step of `last` takes them:
    /// `MatmulPrecision::Bf16`, a frozen f32 head on the CPU, `last` untracked. Packed on the first
    /// such step and kept (half the f32 head's bytes: 77 MB for GPT-2 small's vocabulary).
    fn packed_head(&self, last: &Tensor) -> Result<Option<spt_ops::PackedWeight>> {
        let head = self.lm_head.as_ref().unwrap_or(&self.transformer.wte.weight);
        let w = head.tensor();
        if spt_ops::matmul_precision() != spt_ops::MatmulPrecision::Bf16
            || head.is_trainable()
            || w.track_op()
            || last.track_op()
            || !w.device().is_cpu()
            || w.dtype() != DType::F32
            || last.dtype() != DType::F32
            || w.dims().contains(&0)
        {
            return Ok(None);
        }
        Ok(Some(self.transformer.packed_head.get_or_pack(w)?))
    }

    /// The output projection `[vocab, n_embd]`: `wte` when tied.
    fn head_weight(&self) -> &Tensor {
        match &self.lm_head {
            Some(p) => p.tensor(),
            None => self.transformer.wte.weight.tensor(),
        }
    }

    /// Logits `[B, L, vocab]` of `input_ids [B, L]`; `attention_mask [B, L]`: 1 = attend, 0 =
    /// padding (an additive mask is refused).
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let h = self.transformer.forward_t(input_ids, attention_mask, train)?;
        let (b, l, e) = h.dims3()?;
        let logits = h.reshape((b * l, e))?.matmul(&self.head_weight().t()?)?;
        Ok(logits.reshape((b, l, ()))?)
    }

    /// Incremental decoding for generation: runs `input_ids [B, L]` after the positions in
    /// `cache` (the prompt first, then each sampled token) and returns the logits of the last
    /// position, `[B, vocab]`; the head runs for that position only. See
    /// [`GPT2Model::forward_cached`].
    ///
    /// Under `MatmulPrecision::Bf16` a frozen head multiplies by its weight packed once for
    /// bf16 products (half the bytes a decoding step reads from it).
    pub fn next_token_logits(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let h = self.transformer.forward_cached(input_ids, cache)?;
        let last = h.narrow(1, h.dim(1)? - 1, 1)?.squeeze(1)?;
        if let Some(p) = self.packed_head(&last)? {
            return Ok(spt_ops::packed_linear(&last, &p, None)?);
        }
        // [vocab, d] read in place (one row: on every thread), not packed as a transposed view.
        Ok(spt_ops::lora::few_rows_matmul(
            &last,
            &self.head_weight().detach(),
        )?)
    }

    /// Mean next-token cross-entropy: position t predicts `input_ids[t+1]`; targets whose
    /// `attention_mask` is 0 are ignored (HF's shift with padded labels = -100).
    pub fn loss(
        &self,
        logits: &Tensor,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        lm_loss(logits, input_ids, attention_mask)
    }

    /// `forward_t` and `loss` together: `(logits, loss)`.
    pub fn forward_with_loss(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        let logits = self.forward_t(input_ids, attention_mask, train)?;
        let loss = lm_loss(&logits, input_ids, attention_mask)?;
        Ok((logits, loss))
    }

    /// The mean next-token loss of [`Self::loss`] straight from the hidden states, through the
    /// fused [`spt_ops::linear_cross_entropy`]: no `[B, L, vocab]` logits are kept, and a frozen
    /// head costs no weight-gradient GEMM. Use this for training; it equals
    /// `loss(forward_t(..))` up to float rounding.
    pub fn forward_loss(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        Ok(self
            .fused_nll(input_ids, attention_mask, train, Reduction::Mean, true)?
            .0)
    }

    /// Summed next-token NLL over the targets that count, and their number (for evaluation and
    /// perplexity over many batches); no graph is kept.
    pub fn nll_sum(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<(f64, usize)> {
        let (sum, count) = self.fused_nll(input_ids, attention_mask, false, Reduction::Sum, false)?;
        Ok((sum.to_dtype(DType::F64)?.to_scalar::<f64>()?, count))
    }

    fn fused_nll(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
        reduction: Reduction,
        grads: bool,
    ) -> Result<(Tensor, usize)> {
        let w = self.head_weight();
        let (b, l) = input_ids.dims2().map_err(|_| ModelError::BadInput {
            name: "input_ids",
            reason: format!("expected shape [batch, seq_len], got {:?}", input_ids.dims()),
        })?;
        let t = next_token_targets(input_ids, attention_mask, (b, l), w.dim(0)?, w.dtype())?;
        let h = self.transformer.forward_t(input_ids, attention_mask, train)?;
        let e = h.dim(D::Minus1)?;
        let h = h.narrow(1, 0, l - 1)?.reshape((t.count_rows, e))?;
        // Detached inputs: the fused op then computes no gradients (it forms them in its forward).
        let (h, w) = if grads {
            (h, w.clone())
        } else {
            (h.detach(), w.detach())
        };
        let loss = spt_ops::linear_cross_entropy(&h, &w, &t.ids, t.weight.as_ref(), reduction)?;
        Ok((loss, t.counted))
    }
}

/// The shifted targets of a next-token loss over `[B, L]` ids: `ids[:, 1:]` flattened, the 0/1
/// weight of each (from `attention_mask[:, 1:]`), and how many count.
struct NextTokenTargets {
    ids: Tensor,
    weight: Option<Tensor>,
    count_rows: usize,
    counted: usize,
}

fn next_token_targets(
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    (b, l): (usize, usize),
    vocab: usize,
    dtype: DType,
) -> Result<NextTokenTargets> {
    if input_ids.dims() != [b, l] {
        return Err(ModelError::BadInput {
            name: "input_ids",
            reason: format!(
                "expected shape [{b}, {l}] to match the logits, got {:?}",
                input_ids.dims()
            ),
        });
    }
    if l < 2 {
        return Err(ModelError::BadInput {
            name: "input_ids",
            reason: "need at least 2 tokens for a next-token loss".into(),
        });
    }
    let ids = check_ids(input_ids, "input_ids", "token", vocab, "vocab_size")?;
    let n = b * (l - 1);
    let ids = ids.narrow(1, 1, l - 1)?.reshape(n)?;
    let weight = match check_mask(attention_mask, (b, l))? {
        Some(m) => {
            crate::layers::binary_mask_values(&m)?;
            Some(m.narrow(1, 1, l - 1)?.reshape(n)?.ne(0f64)?.to_dtype(dtype)?)
        }
        None => None,
    };
    let counted = match &weight {
        Some(w) => w.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()? as usize,
        None => n,
    };
    if counted == 0 {
        return Err(ModelError::BadInput {
            name: "attention_mask",
            reason: "no unpadded target token".into(),
        });
    }
    Ok(NextTokenTargets {
        ids,
        weight,
        count_rows: n,
        counted,
    })
}

/// Shifted next-token cross-entropy over `logits [B, L, V]`, ignoring targets where
/// `attention_mask [B, L]` is 0. Errors if no target is left.
pub fn lm_loss(logits: &Tensor, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
    let &[b, l, v] = logits.dims() else {
        return Err(ModelError::BadInput {
            name: "logits",
            reason: format!("expected [batch, seq_len, vocab], got {:?}", logits.dims()),
        });
    };
    let t = next_token_targets(input_ids, attention_mask, (b, l), v, logits.dtype())?;
    let pred = logits.narrow(1, 0, l - 1)?.reshape((t.count_rows, v))?;
    Ok(spt_ops::cross_entropy::cross_entropy(
        &pred,
        &t.ids,
        t.weight.as_ref(),
        Reduction::Mean,
    )?)
}

impl NamedParams for GPT2LMHeadModel {
    fn visit_params<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        self.transformer.visit_params(f);
        if let Some(p) = &self.lm_head {
            f(p);
        }
    }
    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.transformer.visit_params_mut(f);
        if let Some(p) = &mut self.lm_head {
            f(p);
        }
    }
}

impl SptModel for GPT2Model {
    fn num_layers(&self) -> usize {
        self.h.len()
    }

    fn trace(&self, batch: &CalibrationBatch) -> Result<Vec<LayerTrace>> {
        let mut t = Vec::with_capacity(self.h.len());
        self.forward_traced(
            &batch.input_ids,
            batch.attention_mask.as_ref(),
            false,
            Some(&mut t),
        )?;
        Ok(t)
    }

    fn layer_slots(&mut self, i: usize) -> Option<LayerSlots<'_>> {
        let block = self.h.get_mut(i)?;
        let heads = block.attn.n_head;
        let head_dim = block.attn.c_proj.in_features() / heads.max(1);
        Some(LayerSlots {
            attention: &mut block.attn.core,
            ffn: &mut block.mlp,
            // q, k and v share the fused c_attn: a LoRA on any of them wraps c_attn (as PEFT does).
            linears: vec![
                (LoraTarget::QueryKeyValue, &mut block.attn.c_attn),
                (LoraTarget::Output, &mut block.attn.c_proj),
            ],
            dropout_rng: self.dropout_rng.clone(),
            heads,
            head_dim,
        })
    }
}

impl SptModel for GPT2LMHeadModel {
    fn num_layers(&self) -> usize {
        self.transformer.num_layers()
    }
    fn trace(&self, batch: &CalibrationBatch) -> Result<Vec<LayerTrace>> {
        self.transformer.trace(batch)
    }
    fn layer_slots(&mut self, i: usize) -> Option<LayerSlots<'_>> {
        self.transformer.layer_slots(i)
    }
}

impl ActivationAccounting for GPT2Model {
    fn activation_bytes_per_layer(&self, batch: usize, seq_len: usize, train: bool) -> Vec<ActivationBytes> {
        let c = &self.config;
        let shape = c.layer_shape(
            batch,
            seq_len,
            self.wte.weight.tensor().dtype().size_in_bytes(),
            train,
        );
        self.h
            .iter()
            .map(|b| activation_bytes(&shape, b.attn.core.cost(seq_len), b.mlp.cost()))
            .collect()
    }
}

impl ActivationAccounting for GPT2LMHeadModel {
    fn activation_bytes_per_layer(&self, batch: usize, seq_len: usize, train: bool) -> Vec<ActivationBytes> {
        self.transformer.activation_bytes_per_layer(batch, seq_len, train)
    }
}
