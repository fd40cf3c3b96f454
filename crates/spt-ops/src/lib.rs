//! Candle custom ops with exact backward passes for sparse fine-tuning (SPT).
//!
//! Every op has a dense reference built from plain candle ops (autograd through it is the
//! oracle the tests use), a CPU kernel, and an exact backward. Stock candle's fused
//! `layer_norm` and `softmax_last_dim` have no backward; the versions here do.
//!
//! - [`norm`]: `layer_norm` and `softmax` over the last dimension.
//! - [`activation`]: GELU (erf and tanh) and ReLU with backward.
//! - [`pq`]: product-quantisation codebooks and ADC top-k key selection.
//! - [`sparse_attention`]: attention over the selected keys only, plus the dense baseline.

pub mod activation;
pub mod gradcheck;
pub mod lora;
pub mod norm;
pub mod routed_ffn;
mod util;

pub use activation::{gelu_erf, gelu_tanh, Activation};
pub use lora::{LoraConfig, LoraError, LoraLinear};
pub use norm::{layer_norm, softmax_last_dim};
pub use routed_ffn::{GateMode, RoutedFfn, RoutedFfnConfig, Routing, TopK};
