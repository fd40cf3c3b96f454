//! Memory accounting: bytes of activations one Transformer layer keeps for its backward pass.
//!
//! This counts the tensors an exact backward needs (an ideal implementation's lower bound, which
//! spt's ops aim at), per layer and per batch, in the parameter dtype:
//! - layer input (for q/k/v weight grads): `B·L·E`;
//! - q, k, v: `3·B·L·E`;
//! - attention: dense keeps the probabilities `B·H·L·L` (plus a dropout mask of the same size
//!   when attention dropout is on); sparse keeps the selected key indices (u32, `B·H·L·k`) and
//!   one log-sum-exp per row (`B·H·L`), as spt-ops' `sparse_attention` does (it has no
//!   attention dropout);
//! - context (input of the output projection): `B·L·E`;
//! - two layer-norm inputs and the FFN input: `3·B·L·E`;
//! - FFN hidden pre- and post-activation: `2·B·L·F` (routed: only the active fraction);
//! - dropout masks on the two residual branches when dropout is on: `2·B·L·E`.
//!
//! Candle's autograd keeps more than this in practice (e.g. pre-softmax scores, reshape copies),
//! so treat the numbers as the comparison that matters between dense and sparse, not as peak RSS.

/// How attention is computed in a layer, for accounting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AttentionCost {
    Dense,
    /// Sparse attention over `k` selected keys per query.
    Sparse {
        k: usize,
    },
}

/// How the FFN is computed in a layer, for accounting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FfnCost {
    Dense,
    /// Routed FFN: each token runs `top_k` of `n_blocks` blocks.
    Routed {
        n_blocks: usize,
        top_k: usize,
    },
}

/// The shape of one layer's work.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerShape {
    pub batch: usize,
    pub seq_len: usize,
    pub hidden: usize,
    pub heads: usize,
    pub intermediate: usize,
    /// Bytes per element (4 for f32).
    pub dtype_bytes: usize,
    /// Whether dropout is active (training with p > 0): its masks are kept too.
    pub dropout: bool,
}

/// Bytes kept for backward by one layer, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct ActivationBytes {
    /// Attention probabilities (and indices, dropout mask).
    pub attention_scores: usize,
    /// Layer input, q, k, v, context.
    pub attention_io: usize,
    /// FFN hidden activations.
    pub ffn: usize,
    /// Layer-norm inputs, FFN input, residual dropout masks.
    pub other: usize,
}

impl ActivationBytes {
    pub fn total(&self) -> usize {
        self.attention_scores + self.attention_io + self.ffn + self.other
    }
}

/// Bytes of activations one layer keeps for backward (see the module docs for what is counted).
pub fn activation_bytes(s: &LayerShape, attn: AttentionCost, ffn: FfnCost) -> ActivationBytes {
    let tok = s.batch * s.seq_len;
    let e = tok * s.hidden;
    let rows = s.batch * s.heads * s.seq_len;
    let attention_scores = match attn {
        AttentionCost::Dense => rows * s.seq_len * s.dtype_bytes * if s.dropout { 2 } else { 1 },
        AttentionCost::Sparse { k } => rows * (4 * k.min(s.seq_len) + s.dtype_bytes),
    };
    let f = match ffn {
        FfnCost::Dense => tok * s.intermediate,
        FfnCost::Routed { n_blocks, top_k } => {
            let n = n_blocks.max(1);
            let block = s.intermediate.div_ceil(n);
            tok * block * top_k.min(n)
        }
    };
    ActivationBytes {
        attention_scores,
        attention_io: 5 * e * s.dtype_bytes,
        ffn: 2 * f * s.dtype_bytes,
        other: (3 + if s.dropout { 2 } else { 0 }) * e * s.dtype_bytes,
    }
}

/// Per-layer accounting of a model's current slots (dense or sparse attention, dense or routed
/// FFN), for a batch of `batch × seq_len` tokens.
pub trait ActivationAccounting {
    /// One entry per layer, in order.
    fn activation_bytes_per_layer(&self, batch: usize, seq_len: usize, train: bool) -> Vec<ActivationBytes>;
}
