//! Trainable BERT, loaded from Hugging Face checkpoints.
//!
//! Upstream: Hugging Face transformers `src/transformers/models/bert/modeling_bert.py`
//! (`BertEmbeddings`, `BertSelfAttention`, `BertSelfOutput`, `BertIntermediate`, `BertOutput`,
//! `BertLayer`, `BertPooler`, `BertModel`, `BertForSequenceClassification`), and candle-transformers
//! 0.11.1 `src/models/bert.rs`. Written anew for spt, not copied. What changed versus candle's bert.rs:
//! - trainable: spt-ops' differentiable `layer_norm`/`softmax` (candle's fused ones have no
//!   backward), a real dropout with a `train` flag, weights as `Var`s or frozen tensors by choice;
//! - the attention core ([`AttentionCore`]) and the FFN ([`FeedForward`]) are per-layer slots that
//!   `sparsify` swaps; `intermediate.dense`/`output.dense` are the FFN's `fc1`/`fc2`;
//! - adds the pooler and `BertForSequenceClassification`;
//! - bad checkpoints, configs and inputs are named errors ([`ModelError`]), never panics.
//!
//! Module and field names follow HF (`self` is `self_attn`, `LayerNorm` is `layer_norm`), and every
//! parameter keeps its HF name (see [`NamedParams`]).

use crate::attention::{merge_heads, AttentionCore, AttentionMask, DenseAttention, PreparedMask, FROM_HEADS};
use crate::error::{ModelError, Result};
use crate::ffn::{DenseFfn, FeedForward};
use crate::layers::{
    check_ids, check_mask, log_softmax_last, Dropout, DropoutRng, Embedding, LayerNorm, Linear, WeightLayout,
};
use crate::memory::{activation_bytes, ActivationAccounting, ActivationBytes, LayerShape};
use crate::sparsify::{CalibrationBatch, LayerSlots, LayerTrace, LoraTarget, SptModel};
use crate::weights::{read_json, Init, LoadOptions, LoadReport, Loader, NamedParams, Param, WeightSource};
use candle_core::{DType, Tensor, D};
use spt_ops::lora::HeadsLayout;
use spt_ops::Activation;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

fn d_vocab() -> usize {
    30522
}
fn d_hidden() -> usize {
    768
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    12
}
fn d_inter() -> usize {
    3072
}
fn d_act() -> String {
    "gelu".into()
}
fn d_drop() -> f64 {
    0.1
}
fn d_maxpos() -> usize {
    512
}
fn d_types() -> usize {
    2
}
fn d_init() -> f64 {
    0.02
}
fn d_eps() -> f64 {
    1e-12
}

/// HF `BertConfig` (the fields we use; the rest of config.json is ignored).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct BertConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_drop")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "d_drop")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default = "d_maxpos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_types")]
    pub type_vocab_size: usize,
    #[serde(default = "d_init")]
    pub initializer_range: f64,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
    #[serde(default)]
    pub num_labels: Option<usize>,
    #[serde(default)]
    pub id2label: Option<BTreeMap<String, String>>,
    /// transformers' causal BERT (a decoder): refused, the model here is bidirectional.
    #[serde(default, skip_serializing_if = "is_false")]
    pub is_decoder: bool,
    /// Cross-attention layers (an encoder-decoder's decoder): refused.
    #[serde(default, skip_serializing_if = "is_false")]
    pub add_cross_attention: bool,
    /// How the classifier is read: single-label (softmax) is the one spt trains and answers in;
    /// multi-label (a sigmoid per class) and regression are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem_type: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl BertConfig {
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

    /// One layer's work for a batch of `batch × seq_len` tokens, for
    /// [`crate::memory::activation_bytes`] (dropout counted when `train` and the config has some).
    pub fn layer_shape(&self, batch: usize, seq_len: usize, dtype_bytes: usize, train: bool) -> LayerShape {
        LayerShape {
            batch,
            seq_len,
            hidden: self.hidden_size,
            heads: self.num_attention_heads,
            intermediate: self.intermediate_size,
            dtype_bytes,
            dropout: train && self.hidden_dropout_prob > 0.0,
        }
    }

    /// The FFN activation.
    pub fn activation(&self) -> Result<Activation> {
        Activation::from_hf(&self.hidden_act)
            .ok_or_else(|| ModelError::UnknownActivation(self.hidden_act.clone()))
    }

    /// `num_labels`, else the size of `id2label`.
    pub fn num_labels(&self) -> Option<usize> {
        self.num_labels
            .or_else(|| self.id2label.as_ref().map(|m| m.len()))
    }

    /// Head dimension; 0 for a config without heads (which [`validate`](Self::validate)
    /// refuses, naming `num_attention_heads`) rather than a division by zero.
    pub fn head_dim(&self) -> usize {
        self.hidden_size
            .checked_div(self.num_attention_heads)
            .unwrap_or(0)
    }

    /// The weight matrices' scalars the sizes imply (embeddings and the layers' projections; the
    /// biases and norms, a fraction of a percent, left out), saturating: any config has one.
    pub fn param_count(&self) -> u128 {
        use crate::memory::{prod, sum};
        let w = |x: usize| x as u128;
        let (h, f) = (w(self.hidden_size), w(self.intermediate_size));
        let per_layer = sum(&[prod(&[4, h, h]), prod(&[2, h, f])]);
        let embeddings = prod(&[
            sum(&[
                w(self.vocab_size),
                w(self.max_position_embeddings),
                w(self.type_vocab_size),
            ]),
            h,
        ]);
        sum(&[embeddings, prod(&[w(self.num_hidden_layers), per_layer])])
    }

    /// Rejects what the model cannot run.
    pub fn validate(&self) -> Result<()> {
        if let Some(p) = &self.position_embedding_type {
            if p != "absolute" {
                return Err(ModelError::UnsupportedPositionEmbedding(p.clone()));
            }
        }
        // Read as a plain encoder, these would give other numbers than transformers, silently.
        for (field, on, what) in [
            ("is_decoder", self.is_decoder, "a causal (decoder) BERT"),
            (
                "add_cross_attention",
                self.add_cross_attention,
                "cross-attention layers",
            ),
        ] {
            if on {
                return Err(ModelError::InvalidConfig {
                    field,
                    value: "true".into(),
                    reason: format!("{what} is not supported: spt's BERT is a bidirectional encoder"),
                });
            }
        }
        if let Some(p) = self
            .problem_type
            .as_deref()
            .filter(|&p| p != "single_label_classification")
        {
            return Err(ModelError::InvalidConfig {
                field: "problem_type",
                value: p.to_string(),
                reason: "spt trains and answers single-label classification (a softmax over the \
                         classes); to fine-tune this checkpoint for that, remove problem_type from \
                         its config.json (for a hub id, in a copy of the downloaded folder)"
                    .into(),
            });
        }
        self.activation()?;
        let (v, h, f, l, p) = (
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.max_position_embeddings,
        );
        let params = self.param_count();
        crate::memory::check_model_size(
            &[
                ("vocab_size", v),
                ("hidden_size", h),
                ("intermediate_size", f),
                ("num_hidden_layers", l),
                ("num_attention_heads", self.num_attention_heads),
                ("max_position_embeddings", p),
                ("type_vocab_size", self.type_vocab_size),
            ],
            params,
        )?;
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(ModelError::InvalidConfig {
                field: "layer_norm_eps",
                value: self.layer_norm_eps.to_string(),
                reason: "must be a positive number".into(),
            });
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(ModelError::InvalidConfig {
                field: "num_attention_heads",
                value: self.num_attention_heads.to_string(),
                reason: format!("must divide hidden_size = {}", self.hidden_size),
            });
        }
        for (field, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            ("attention_probs_dropout_prob", self.attention_probs_dropout_prob),
            ("classifier_dropout", self.classifier_dropout.unwrap_or(0.0)),
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

/// Word + position + token-type embeddings, then LayerNorm and dropout.
#[derive(Debug, Clone)]
pub struct BertEmbeddings {
    pub word_embeddings: Embedding,
    pub position_embeddings: Embedding,
    pub token_type_embeddings: Embedding,
    pub layer_norm: LayerNorm,
    pub dropout: Dropout,
}

impl BertEmbeddings {
    fn load(l: &mut Loader, c: &BertConfig) -> Result<Self> {
        let h = c.hidden_size;
        Ok(Self {
            word_embeddings: Embedding::load(l, "embeddings.word_embeddings", c.vocab_size, h)?,
            position_embeddings: Embedding::load(
                l,
                "embeddings.position_embeddings",
                c.max_position_embeddings,
                h,
            )?,
            token_type_embeddings: Embedding::load(
                l,
                "embeddings.token_type_embeddings",
                c.type_vocab_size,
                h,
            )?,
            layer_norm: LayerNorm::load(l, "embeddings.LayerNorm", h, c.layer_norm_eps)?,
            dropout: l.dropout(c.hidden_dropout_prob)?,
        })
    }

    /// `ids, type_ids: [B, L]` u32 (checked) → `[B, L, H]`.
    fn forward_t(&self, ids: &Tensor, type_ids: &Tensor, train: bool) -> Result<Tensor> {
        let (_b, len) = ids.dims2()?;
        let pos = Tensor::arange(0u32, len as u32, ids.device())?.unsqueeze(0)?;
        let x = self.word_embeddings.forward_checked(ids)?;
        let x = x.broadcast_add(&self.position_embeddings.forward_checked(&pos)?)?;
        let x = (x + self.token_type_embeddings.forward_checked(type_ids)?)?;
        let x = self.layer_norm.forward(&x)?;
        self.dropout.forward_t(&x, train)
    }
}

impl NamedParams for BertEmbeddings {
    fn visit_params<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        self.word_embeddings.visit_params(f);
        self.position_embeddings.visit_params(f);
        self.token_type_embeddings.visit_params(f);
        self.layer_norm.visit_params(f);
    }
    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.word_embeddings.visit_params_mut(f);
        self.position_embeddings.visit_params_mut(f);
        self.token_type_embeddings.visit_params_mut(f);
        self.layer_norm.visit_params_mut(f);
    }
}

/// HF `BertSelfAttention`: q/k/v projections plus the swappable attention core.
#[derive(Debug)]
pub struct BertSelfAttention {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub core: AttentionCore,
    pub num_attention_heads: usize,
}

impl BertSelfAttention {
    /// `x [B, L, H] → context [B, L, H]`.
    pub fn forward_t(&self, x: &Tensor, mask: &PreparedMask, train: bool) -> Result<Tensor> {
        merge_heads(&self.forward_with_keys(x, mask, train)?.0)
    }

    /// The context `[B, heads, L, d]` (the output projection reads it in that layout) and the
    /// queries and keys `[B, heads, L, d]` (for calibration).
    fn forward_with_keys(
        &self,
        x: &Tensor,
        mask: &PreparedMask,
        train: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        self.attend(x, x, mask, train)
    }

    /// [`BertSelfAttention::forward_with_keys`] for the queries of `xq [B, Lq, H]` (leading
    /// positions of `x`) over the keys and values of every position of `x [B, L, H]`.
    fn attend(
        &self,
        xq: &Tensor,
        x: &Tensor,
        mask: &PreparedMask,
        train: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let to_heads = HeadsLayout {
            input_heads: false,
            output_heads: Some(self.num_attention_heads),
        };
        let q = self.query.forward_t_heads(xq, to_heads, train)?;
        let k = self.key.forward_t_heads(x, to_heads, train)?;
        let v = self.value.forward_t_heads(x, to_heads, train)?;
        let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
        let ctx = self.core.forward_t(&q, &k, &v, mask, scale, train)?;
        Ok((ctx, q, k))
    }
}

/// HF `BertSelfOutput`: dense, dropout, LayerNorm(x + input).
#[derive(Debug)]
pub struct BertSelfOutput {
    pub dense: Linear,
    pub layer_norm: LayerNorm,
    pub dropout: Dropout,
}

/// HF `BertAttention` (`self` + `output`).
#[derive(Debug)]
pub struct BertAttention {
    pub self_attn: BertSelfAttention,
    pub output: BertSelfOutput,
}

/// HF `BertLayer`: attention, then the FFN slot (`intermediate.dense` → act → `output.dense`),
/// dropout and `output.LayerNorm`.
#[derive(Debug)]
pub struct BertLayer {
    pub attention: BertAttention,
    pub ffn: FeedForward,
    pub output_layer_norm: LayerNorm,
    pub output_dropout: Dropout,
}

impl BertLayer {
    fn load(l: &mut Loader, c: &BertConfig, i: usize) -> Result<Self> {
        let h = c.hidden_size;
        let p = format!("encoder.layer.{i}");
        let lin = |l: &mut Loader, name: &str, i, o| {
            Linear::load(l, &format!("{p}.{name}"), i, o, WeightLayout::OutIn)
        };
        let self_attn = BertSelfAttention {
            query: lin(l, "attention.self.query", h, h)?,
            key: lin(l, "attention.self.key", h, h)?,
            value: lin(l, "attention.self.value", h, h)?,
            core: AttentionCore::Dense(DenseAttention {
                dropout: l.dropout(c.attention_probs_dropout_prob)?,
            }),
            num_attention_heads: c.num_attention_heads,
        };
        let output = BertSelfOutput {
            dense: lin(l, "attention.output.dense", h, h)?,
            layer_norm: LayerNorm::load(l, &format!("{p}.attention.output.LayerNorm"), h, c.layer_norm_eps)?,
            dropout: l.dropout(c.hidden_dropout_prob)?,
        };
        let ffn = FeedForward::Dense(DenseFfn {
            fc1: lin(l, "intermediate.dense", h, c.intermediate_size)?,
            fc2: lin(l, "output.dense", c.intermediate_size, h)?,
            act: c.activation()?,
        });
        Ok(Self {
            attention: BertAttention { self_attn, output },
            ffn,
            output_layer_norm: LayerNorm::load(l, &format!("{p}.output.LayerNorm"), h, c.layer_norm_eps)?,
            output_dropout: l.dropout(c.hidden_dropout_prob)?,
        })
    }

    /// `x [B, L, H] → [B, L, H]`.
    pub fn forward_t(&self, x: &Tensor, mask: &PreparedMask, train: bool) -> Result<Tensor> {
        self.forward_traced(x, mask, train, None)
    }

    fn forward_traced(
        &self,
        x: &Tensor,
        mask: &PreparedMask,
        train: bool,
        trace: Option<&mut Vec<LayerTrace>>,
    ) -> Result<Tensor> {
        self.forward_rows(x, x, mask, train, trace)
    }

    /// The layer's output at the first position, `[B, 1, H]`. Keys and values come from every
    /// position of `x`; the queries, attention, output projection and FFN run only for the
    /// leading rows that the first one depends on ([`AttentionCore::first_query_rows`]: one, or
    /// a block-mode query tile, which shares one key selection), so the first row is the full
    /// forward's. Unless `train` routes tokens with a batch-wide balancing loss, which would
    /// then see only these rows: that runs the whole layer.
    fn forward_first(&self, x: &Tensor, mask: &PreparedMask, train: bool) -> Result<Tensor> {
        let len = x.dim(1)?;
        let rows = self.attention.self_attn.core.first_query_rows(len);
        let y = if train && self.ffn.has_aux_loss() {
            self.forward_rows(x, x, mask, train, None)?
        } else {
            let xq = x.narrow(1, 0, rows)?.contiguous()?;
            self.forward_rows(&xq, x, mask, train, None)?
        };
        Ok(y.narrow(1, 0, 1.min(len))?)
    }

    /// The layer's output at the positions of `xq` (the leading rows of `x`), attending over
    /// every position of `x`.
    fn forward_rows(
        &self,
        xq: &Tensor,
        x: &Tensor,
        mask: &PreparedMask,
        train: bool,
        trace: Option<&mut Vec<LayerTrace>>,
    ) -> Result<Tensor> {
        let _span = tracing::trace_span!("bert_layer").entered();
        let (a, queries, keys) = self.attention.self_attn.attend(xq, x, mask, train)?;
        let o = &self.attention.output;
        let a = o.layer_norm.forward_residual(
            &o.dense.forward_t_heads(&a, FROM_HEADS, train)?,
            xq,
            &o.dropout,
            train,
        )?;
        if let Some(t) = trace {
            t.push(LayerTrace {
                queries: queries.detach(),
                keys: keys.detach(),
                ffn_input: a.detach(),
            });
        }
        let f = self.ffn.forward_t(&a, train)?;
        self.output_layer_norm
            .forward_residual(&f, &a, &self.output_dropout, train)
    }
}

impl NamedParams for BertLayer {
    fn visit_params<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        let s = &self.attention.self_attn;
        s.query.visit_params(f);
        s.key.visit_params(f);
        s.value.visit_params(f);
        self.attention.output.dense.visit_params(f);
        self.attention.output.layer_norm.visit_params(f);
        self.ffn.visit_params(f);
        self.output_layer_norm.visit_params(f);
    }
    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        let s = &mut self.attention.self_attn;
        s.query.visit_params_mut(f);
        s.key.visit_params_mut(f);
        s.value.visit_params_mut(f);
        self.attention.output.dense.visit_params_mut(f);
        self.attention.output.layer_norm.visit_params_mut(f);
        self.ffn.visit_params_mut(f);
        self.output_layer_norm.visit_params_mut(f);
    }
}

/// HF `BertPooler`: `tanh(dense(h[:, 0]))`.
#[derive(Debug)]
pub struct BertPooler {
    pub dense: Linear,
}

impl BertPooler {
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let first = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(self.dense.forward(&first)?.tanh()?)
    }
}

/// HF `BertModel`: embeddings, encoder and (if the checkpoint has one) the pooler.
#[derive(Debug)]
pub struct BertModel {
    pub config: BertConfig,
    pub embeddings: BertEmbeddings,
    /// `encoder.layer.N`.
    pub layers: Vec<BertLayer>,
    pub pooler: Option<BertPooler>,
    dropout_rng: Arc<DropoutRng>,
}

/// Keys in BERT checkpoints that are buffers, not parameters.
fn bert_buffer(key: &str) -> bool {
    // Buffers transformers saves beside the weights (index ranges), not parameters.
    key.ends_with("position_ids") || key.ends_with("embeddings.token_type_ids")
}

impl BertModel {
    /// Loads a `BertModel` (canonical names without the `bert.` prefix). Checkpoints with or
    /// without the prefix both load; unknown keys (e.g. an MLM head) are reported as unused.
    pub fn load(config: &BertConfig, src: &WeightSource, opts: &LoadOptions) -> Result<(Self, LoadReport)> {
        config.validate()?;
        let mut l = Loader::new(src, opts, "", "bert.");
        let with_pooler =
            src.get("pooler.dense.weight").is_some() || src.get("bert.pooler.dense.weight").is_some();
        let m = Self::load_inner(&mut l, config, with_pooler)?;
        Ok((m, l.finish(bert_buffer)))
    }

    /// Reads `config.json` and the checkpoint from a directory.
    pub fn from_dir(dir: impl AsRef<Path>, opts: &LoadOptions) -> Result<(Self, LoadReport)> {
        let dir = dir.as_ref();
        let cfg = BertConfig::from_file(dir.join("config.json"))?;
        Self::load(&cfg, &WeightSource::from_dir(dir)?, opts)
    }

    fn load_inner(l: &mut Loader, c: &BertConfig, with_pooler: bool) -> Result<Self> {
        let embeddings = BertEmbeddings::load(l, c)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| BertLayer::load(l, c, i))
            .collect::<Result<Vec<_>>>()?;
        let pooler = if with_pooler {
            let h = c.hidden_size;
            Some(BertPooler {
                dense: Linear::load(l, "pooler.dense", h, h, WeightLayout::OutIn)?,
            })
        } else {
            None
        };
        Ok(Self {
            config: c.clone(),
            embeddings,
            layers,
            pooler,
            dropout_rng: l.dropout_rng.clone(),
        })
    }

    /// Checks inputs; returns `(ids, type_ids, mask)` ready for the layers.
    fn prepare(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor, PreparedMask)> {
        let c = &self.config;
        let ids = check_ids(input_ids, "input_ids", "token", c.vocab_size, "vocab_size")?;
        let (b, len) = ids.dims2()?;
        if len > c.max_position_embeddings {
            return Err(ModelError::SequenceTooLong {
                len,
                max: c.max_position_embeddings,
                field: "max_position_embeddings",
            });
        }
        let type_ids = match token_type_ids {
            Some(t) => {
                if t.dims() != [b, len] {
                    return Err(ModelError::BadInput {
                        name: "token_type_ids",
                        reason: format!("expected shape [{b}, {len}], got {:?}", t.dims()),
                    });
                }
                check_ids(
                    t,
                    "token_type_ids",
                    "token type",
                    c.type_vocab_size,
                    "type_vocab_size",
                )?
            }
            None => Tensor::zeros((b, len), DType::U32, ids.device())?,
        };
        let dtype = self.embeddings.word_embeddings.weight.tensor().dtype();
        let mask = check_mask(attention_mask, (b, len))?;
        let mask = PreparedMask::new(
            AttentionMask {
                causal: false,
                key_padding: mask,
            },
            len,
            dtype,
            ids.device(),
        )?;
        Ok((ids, type_ids, mask))
    }

    /// The last hidden state `[B, L, H]`. `attention_mask`: `[B, L]`, 1 = attend.
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        self.forward_traced(input_ids, token_type_ids, attention_mask, train, None, false)
    }

    /// The last hidden state, or with `first_only` its first position, which the last layer then
    /// computes alone ([`BertModel::forward_first_t`]).
    fn forward_traced(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        train: bool,
        mut trace: Option<&mut Vec<LayerTrace>>,
        first_only: bool,
    ) -> Result<Tensor> {
        let (ids, type_ids, mask) = self.prepare(input_ids, token_type_ids, attention_mask)?;
        let mut x = self.embeddings.forward_t(&ids, &type_ids, train)?;
        let last = self.layers.len().checked_sub(1).filter(|_| first_only);
        for (i, layer) in self.layers.iter().enumerate() {
            x = if Some(i) == last {
                layer.forward_first(&x, &mask, train)?
            } else {
                layer.forward_traced(&x, &mask, train, trace.as_deref_mut())?
            };
        }
        if first_only && last.is_none() {
            x = x.narrow(1, 0, 1.min(x.dim(1)?))?;
        }
        Ok(x)
    }

    /// The last hidden state at the first position, `[B, 1, H]` (what the pooler reads): the
    /// same values as [`BertModel::forward_t`]'s first position, but the last layer computes its
    /// queries, attention and FFN for that position only (keys and values still cover the whole
    /// sequence), about `1 / num_hidden_layers` of the encoder's work saved.
    pub fn forward_first_t(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        self.forward_traced(input_ids, token_type_ids, attention_mask, train, None, true)
    }

    /// Restarts the model's dropout masks from `seed` (call once per training step for
    /// reproducible, resumable runs).
    pub fn seed_dropout(&self, seed: u64) {
        self.dropout_rng.seed(seed);
        for (i, layer) in self.layers.iter().enumerate() {
            layer
                .ffn
                .seed_dropout(seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
    }

    /// The pooled output `[B, H]` of a last hidden state; an error if the model has no pooler.
    pub fn pool(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.pooler {
            Some(p) => p.forward(hidden),
            None => Err(ModelError::MissingTensor {
                name: "pooler.dense.weight".into(),
                tried: vec![],
            }),
        }
    }
}

impl NamedParams for BertModel {
    fn visit_params<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        self.embeddings.visit_params(f);
        self.layers.iter().for_each(|l| l.visit_params(f));
        if let Some(p) = &self.pooler {
            p.dense.visit_params(f);
        }
    }
    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.embeddings.visit_params_mut(f);
        self.layers.iter_mut().for_each(|l| l.visit_params_mut(f));
        if let Some(p) = &mut self.pooler {
            p.dense.visit_params_mut(f);
        }
    }
}

/// HF `BertForSequenceClassification`: pooler → dropout → `classifier`.
/// Parameter names carry the `bert.` prefix, as HF saves them.
#[derive(Debug)]
pub struct BertForSequenceClassification {
    pub bert: BertModel,
    pub dropout: Dropout,
    pub classifier: Linear,
    pub num_labels: usize,
}

impl BertForSequenceClassification {
    /// Loads the model. `num_labels`: the caller's, else the config's (`num_labels`/`id2label`).
    /// A missing pooler or classifier is initialised (normal(0, initializer_range), zero bias,
    /// seeded by `opts.init_seed`) and listed in [`LoadReport::initialised`].
    pub fn load(
        config: &BertConfig,
        src: &WeightSource,
        opts: &LoadOptions,
        num_labels: Option<usize>,
    ) -> Result<(Self, LoadReport)> {
        config.validate()?;
        let num_labels = num_labels
            .or(config.num_labels())
            .ok_or(ModelError::InvalidConfig {
                field: "num_labels",
                value: "none".into(),
                reason: "give num_labels, or set num_labels / id2label in the config".into(),
            })?;
        if num_labels == 0 {
            return Err(ModelError::InvalidConfig {
                field: "num_labels",
                value: "0".into(),
                reason: "must be positive".into(),
            });
        }
        let mut l = Loader::new(src, opts, "bert.", "bert.");
        let has_pooler =
            src.get("pooler.dense.weight").is_some() || src.get("bert.pooler.dense.weight").is_some();
        let mut bert = BertModel::load_inner(&mut l, config, has_pooler)?;
        let h = config.hidden_size;
        let std = config.initializer_range;
        if !has_pooler {
            let weight = l.top_or_init("bert.pooler.dense.weight", &[h, h], Init::Normal(std))?;
            let bias = l.top_or_init("bert.pooler.dense.bias", &[h], Init::Zeros)?;
            bert.pooler = Some(BertPooler {
                dense: Linear::new(weight, Some(bias), WeightLayout::OutIn)?,
            });
        }
        let weight = l.top_or_init("classifier.weight", &[num_labels, h], Init::Normal(std))?;
        let bias = l.top_or_init("classifier.bias", &[num_labels], Init::Zeros)?;
        let classifier = Linear::new(weight, Some(bias), WeightLayout::OutIn)?;
        let dropout = l.dropout(config.classifier_dropout.unwrap_or(config.hidden_dropout_prob))?;
        let report = l.finish(bert_buffer);
        Ok((
            Self {
                bert,
                dropout,
                classifier,
                num_labels,
            },
            report,
        ))
    }

    /// Reads `config.json` and the checkpoint from a directory.
    pub fn from_dir(
        dir: impl AsRef<Path>,
        opts: &LoadOptions,
        num_labels: Option<usize>,
    ) -> Result<(Self, LoadReport)> {
        let dir = dir.as_ref();
        let cfg = BertConfig::from_file(dir.join("config.json"))?;
        Self::load(&cfg, &WeightSource::from_dir(dir)?, opts, num_labels)
    }

    /// Restarts the model's dropout masks from `seed` (see [`BertModel::seed_dropout`]).
    pub fn seed_dropout(&self, seed: u64) {
        self.bert.seed_dropout(seed);
    }

    /// Logits `[B, num_labels]` of `input_ids [B, L]`; `attention_mask [B, L]`: 1 = attend, 0 =
    /// padding (an additive mask is refused).
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        // The pooler reads the first position only, so the last layer runs for that one.
        let h = self
            .bert
            .forward_first_t(input_ids, token_type_ids, attention_mask, train)?;
        let pooled = self.bert.pool(&h)?;
        let pooled = self.dropout.forward_t(&pooled, train)?;
        self.classifier.forward_t(&pooled, train)
    }

    /// Mean cross-entropy of `logits [B, C]` against integer `labels [B]`; with one label (HF's
    /// regression case) the mean squared error against float labels.
    pub fn loss(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let &[b, c] = logits.dims() else {
            return Err(ModelError::BadInput {
                name: "logits",
                reason: format!("expected [batch, num_labels], got {:?}", logits.dims()),
            });
        };
        if labels.dims() != [b] {
            return Err(ModelError::BadInput {
                name: "labels",
                reason: format!("expected shape [{b}], got {:?}", labels.dims()),
            });
        }
        if c == 1 {
            // HF's regression head (num_labels = 1): mean squared error against float labels.
            let target = labels.to_dtype(logits.dtype())?.detach();
            return Ok((logits.squeeze(1)? - target)?.sqr()?.mean_all()?);
        }
        let labels = check_ids(&labels.unsqueeze(0)?, "labels", "label", c, "num_labels")?.squeeze(0)?;
        let logp = log_softmax_last(logits)?;
        let picked = logp.gather(&labels.unsqueeze(1)?, 1)?; // [B, 1]
        Ok((picked.sum_all()? * (-1.0 / b as f64))?)
    }
}

impl NamedParams for BertForSequenceClassification {
    fn visit_params<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        self.bert.visit_params(f);
        self.classifier.visit_params(f);
    }
    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.bert.visit_params_mut(f);
        self.classifier.visit_params_mut(f);
    }
}

impl SptModel for BertModel {
    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn trace(&self, batch: &CalibrationBatch) -> Result<Vec<LayerTrace>> {
        let mut t = Vec::with_capacity(self.layers.len());
        self.forward_traced(
            &batch.input_ids,
            batch.token_type_ids.as_ref(),
            batch.attention_mask.as_ref(),
            false,
            Some(&mut t),
            false,
        )?;
        Ok(t)
    }

    fn layer_slots(&mut self, i: usize) -> Option<LayerSlots<'_>> {
        let layer = self.layers.get_mut(i)?;
        let sa = &mut layer.attention.self_attn;
        let heads = sa.num_attention_heads;
        let head_dim = sa.query.out_features() / heads.max(1);
        Some(LayerSlots {
            attention: &mut sa.core,
            ffn: &mut layer.ffn,
            linears: vec![
                (LoraTarget::Query, &mut sa.query),
                (LoraTarget::Key, &mut sa.key),
                (LoraTarget::Value, &mut sa.value),
                (LoraTarget::Output, &mut layer.attention.output.dense),
            ],
            dropout_rng: self.dropout_rng.clone(),
            heads,
            head_dim,
        })
    }
}

impl SptModel for BertForSequenceClassification {
    fn num_layers(&self) -> usize {
        self.bert.num_layers()
    }
    fn trace(&self, batch: &CalibrationBatch) -> Result<Vec<LayerTrace>> {
        self.bert.trace(batch)
    }
    fn layer_slots(&mut self, i: usize) -> Option<LayerSlots<'_>> {
        self.bert.layer_slots(i)
    }
}

impl ActivationAccounting for BertModel {
    fn activation_bytes_per_layer(&self, batch: usize, seq_len: usize, train: bool) -> Vec<ActivationBytes> {
        let c = &self.config;
        let dtype_bytes = self
            .embeddings
            .word_embeddings
            .weight
            .tensor()
            .dtype()
            .size_in_bytes();
        let shape = c.layer_shape(batch, seq_len, dtype_bytes, train);
        self.layers
            .iter()
            .map(|l| activation_bytes(&shape, l.attention.self_attn.core.cost(seq_len), l.ffn.cost()))
            .collect()
    }
}

impl ActivationAccounting for BertForSequenceClassification {
    fn activation_bytes_per_layer(&self, batch: usize, seq_len: usize, train: bool) -> Vec<ActivationBytes> {
        self.bert.activation_bytes_per_layer(batch, seq_len, train)
    }
}
