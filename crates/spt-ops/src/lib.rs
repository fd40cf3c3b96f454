//! Candle custom ops with exact backward passes for sparse fine-tuning (SPT).
//! (scratch merge of main + ffn for spt-models development)

pub mod activation;
pub mod attention;
pub mod gradcheck;
pub mod lora;
pub mod norm;
pub mod pq;
pub mod routed_ffn;
mod simd;
pub mod sparse_attention;
mod util;

pub use activation::{gelu_erf, gelu_tanh, Activation};
pub use attention::{dense_attention, AttentionMask};
pub use lora::{LoraConfig, LoraError, LoraLinear};
pub use norm::{layer_norm, softmax_last_dim};
pub use pq::{pq_sparse_attention, select_keys, Codebook, KeySelection, PqConfig, Refresh, TopK};
pub use routed_ffn::{GateMode, RoutedFfn, RoutedFfnConfig, Routing};
pub use simd::simd_path;
pub use sparse_attention::sparse_attention;
