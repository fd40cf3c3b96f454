//! Normalisations with exact backward: `layer_norm` over the last dimension and `softmax` over
//! the last dimension. candle-nn's fused versions are forward-only; these are drop-in
//! replacements on trainable paths.

#[cfg(feature = "cuda")]
mod cuda;
mod layer_norm;
pub mod reference;
mod residual;
mod softmax;

pub use layer_norm::{layer_norm, LayerNormOp};
pub use residual::{residual_layer_norm, residual_layer_norm_reference};
pub use softmax::{softmax_last_dim, SoftmaxOp};
