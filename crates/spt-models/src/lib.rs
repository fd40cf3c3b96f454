//! Trainable BERT and GPT-2 for candle, loaded from Hugging Face checkpoints, with per-layer
//! swappable attention and feed-forward slots for sparse fine-tuning (SPT).
//!
//! - [`bert`]: `BertModel` (token-level output) and `BertForSequenceClassification`.
//! - [`gpt2`]: `GPT2Model` and `GPT2LMHeadModel` (tied head, shifted next-token loss, KV-cached
//!   decoding).
//! - [`weights`]: checkpoint reading ([`WeightSource`]: safetensors, sharded safetensors,
//!   `pytorch_model.bin`), [`Param`] (trainable `Var` or frozen tensor, with its HF name),
//!   [`LoadOptions`] and the [`LoadReport`] of unused / ignored / initialised tensors.
//! - [`attention`] and [`ffn`]: the per-layer slots ([`AttentionCore`], [`FeedForward`]).
//! - [`mod@sparsify`]: [`sparsify()`](fn@sparsify) converts a loaded model in place (sparse attention, routed FFN, LoRA).
//! - [`buffers`]: fitted state (codebooks, unit orders, corrections) as named buffers.
//! - [`memory`]: bytes of activations kept for backward per layer, dense vs sparse.
//!
//! Everything trainable uses spt-ops' differentiable `layer_norm` and `softmax` and a real
//! dropout; errors are [`ModelError`]s that name the tensor, file or input at fault.

pub mod attention;
pub mod bert;
pub mod buffers;
pub mod error;
pub mod ffn;
pub mod gpt2;
pub mod layers;
pub mod memory;
pub mod sparsify;
pub mod weights;

pub use attention::{
    AttentionCore, AttentionMask, DenseAttention, KeyGrouping, PreparedMask, SparseAttention,
};
pub use bert::{BertConfig, BertForSequenceClassification, BertModel};
pub use error::{ModelError, Result};
pub use ffn::{DenseFfn, FeedForward, NamedRoutedFfn};
pub use gpt2::{lm_loss, GPT2Config, GPT2LMHeadModel, GPT2Model, KvCache};
pub use layers::{Dropout, DropoutRng, Embedding, LayerNorm, Linear, WeightLayout};
pub use memory::{
    activation_bytes, physical_memory_bytes, ActivationAccounting, ActivationBytes, AttentionCost, FfnCost,
    LayerShape,
};
pub use sparsify::{
    sparsify, CalibrationBatch, FfnCalibration, LayerReport, LayerSelection, LayerTrace, LoraSettings,
    LoraTarget, RoutingSummary, SparseAttentionConfig, SparsifyReport, SptConfig, SptModel,
};
/// spt-ops' types used in [`SptConfig`]: PQ, routed FFN, LoRA.
pub use spt_ops::{lora, pq, routed_ffn};
pub use weights::{
    all_finite, check_safetensors_shapes, read_safetensors_file, read_safetensors_from, save_safetensors,
    save_tensors, LoadOptions, LoadReport, NamedParams, Param, Trainable, WeightSource,
};
