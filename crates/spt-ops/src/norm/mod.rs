//! Normalisations with exact backward: `layer_norm` over the last dimension and `softmax` over
//! the last dimension. candle-nn's fused versions are forward-only; these are drop-in
//! replacements on trainable paths. Also the residual adds around them, fused with the
//! sublayer's dropout (`residual_layer_norm` for post-LN blocks, `residual_dropout` for pre-LN).

#[cfg(feature = "cuda")]
mod cuda;
mod layer_norm;
pub mod reference;
mod residual;
mod residual_dropout;
mod rows;
mod softmax;

pub use layer_norm::{layer_norm, LayerNormOp};
pub use residual::{residual_layer_norm, residual_layer_norm_reference};
pub use residual_dropout::{residual_dropout, residual_dropout_reference};
pub use softmax::{softmax_last_dim, SoftmaxOp};
