//! Candle custom ops with exact backward passes for sparse fine-tuning (SPT).
//!
//! Every op has a dense reference built from plain candle ops (autograd through it is the
//! oracle the tests use), a CPU kernel, and an exact backward. Stock candle's fused
//! `layer_norm` and `softmax_last_dim` have no backward; the versions here do.
//!
//! - [`norm`]: `layer_norm` and `softmax` over the last dimension.
//! - [`activation`]: GELU (erf and tanh) and ReLU with backward.
//! - [`attention`]: masks and the dense attention baseline.
//! - [`mod@flash_attention`]: fused dense attention (no `[B, H, L, L]` kept), with dropout.
//! - [`heads`]: attention head split and merge as single autograd nodes.
//! - [`mod@bias`]: a bias added over rows, with a parallel bias gradient.
//! - [`pq`]: product-quantisation codebooks, ADC top-k key selection and block selection
//!   ([`Selection`]: per query or per query tile).
//! - [`mod@sparse_attention`]: attention over the selected keys only.
//! - [`mod@block_sparse_attention`]: attention over key blocks shared by a tile of queries.
//! - [`routed_ffn`]: the routed FFN (router, grouped gather/scatter GEMMs, router fit).
//! - [`lora`]: LoRA linear layer, frozen-aware dense `linear`, seeded dropout.
//! - [`cross_entropy`](mod@cross_entropy): fused output projection + cross-entropy (no `[N, V]` logits kept).
//! - [`precision`]: the CPU kernels' matmul precision (f32, or bf16 inputs on AMX).
//! - [`mod@packed_linear`]: a frozen weight packed once for bf16 products (inference).
//!
//! [`on_pool`] runs a step or an inference call on rayon's pool, where the CPU ops' threads
//! start without waking (10–30 % faster on 2 cores than from `main`).

pub mod activation;
mod amx;
pub mod attention;
pub mod bias;
mod blas;
pub mod block_sparse_attention;
pub mod cross_entropy;
#[cfg(feature = "cuda")]
mod cuda;
pub mod flash_attention;
#[cfg(target_arch = "x86_64")]
mod gelu_simd;
mod gemv;
pub mod grad_mode;
pub mod gradcheck;
pub mod heads;
pub mod lora;
pub mod norm;
pub mod packed_linear;
mod pool;
pub mod pq;
pub mod precision;
pub mod routed_ffn;
mod row_gemm;
mod simd;
pub mod sparse_attention;
mod util;

pub use activation::{gelu_erf, gelu_tanh, Activation};
pub use attention::{dense_attention, AttentionMask};
pub use bias::{bias_add, matmul_bias};
pub use block_sparse_attention::block_sparse_attention;
pub use cross_entropy::{cross_entropy, linear_cross_entropy, linear_cross_entropy_reference, Reduction};
pub use flash_attention::{
    flash_attention, flash_attention_is_fused, flash_attention_reference, SeededDropout,
};
pub use grad_mode::{grad_enabled, no_grad};
pub use heads::{merge_heads, split_heads};
pub use lora::{lora_linear, lora_linear_heads, HeadsLayout, LoraConfig, LoraError, LoraLinear};
pub use norm::{layer_norm, residual_dropout, residual_layer_norm, softmax_last_dim};
pub use packed_linear::{packed_linear, PackedCache, PackedWeight};
pub use pool::on_pool;
pub use pq::{
    pq_attention, pq_sparse_attention, select_blocks, select_keys, BlockScore, BlockSelection, BlockTiling,
    Codebook, KeySelection, KeyTopK, PqConfig, Refresh, Selection,
};
pub use precision::{bf16_matmul_is_native, matmul_precision, set_matmul_precision, MatmulPrecision};
pub use routed_ffn::{BlockTopK, GateMode, RoutedFfn, RoutedFfnConfig, Routing};
pub use simd::{cpu_model, simd_path};
pub use sparse_attention::sparse_attention;
