//! Memory accounting: bytes of activations one Transformer layer keeps for its backward pass.
//!
//! This counts the tensors an exact backward needs (an ideal implementation's lower bound, which
//! spt's ops aim at), per layer and per batch, in the parameter dtype:
//! - layer input (for q/k/v weight grads): `B·L·E`;
//! - q, k, v: `3·B·L·E`;
//! - attention: dense keeps the probabilities `B·H·L·L` (plus a dropout mask of the same size
//!   when attention dropout is on); sparse keeps the selected key indices (u32, `B·H·L·k`) and
//!   one log-sum-exp per row (`B·H·L`), as spt-ops' `sparse_attention` does (it has no
//!   attention dropout). This is the composed form (and PyTorch eager's); on the CPU the dense
//!   path runs spt-ops' fused `flash_attention`, which keeps one log-sum-exp per row instead;
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
    /// The sum (saturating: sizes too large to count read as `usize::MAX`).
    pub fn total(&self) -> usize {
        self.attention_scores
            .saturating_add(self.attention_io)
            .saturating_add(self.ffn)
            .saturating_add(self.other)
    }
}

/// Bytes of activations one layer keeps for backward (see the module docs for what is counted).
/// Products saturate: a batch too large to count reads as `usize::MAX` bytes, which no memory
/// check lets through.
pub fn activation_bytes(s: &LayerShape, attn: AttentionCost, ffn: FfnCost) -> ActivationBytes {
    let m = |xs: &[usize]| xs.iter().fold(1usize, |a, &x| a.saturating_mul(x));
    let tok = m(&[s.batch, s.seq_len]);
    let e = m(&[tok, s.hidden]);
    let rows = m(&[s.batch, s.heads, s.seq_len]);
    let attention_scores = match attn {
        AttentionCost::Dense => m(&[rows, s.seq_len, s.dtype_bytes, if s.dropout { 2 } else { 1 }]),
        AttentionCost::Sparse { k } => m(&[rows, m(&[4, k.min(s.seq_len)]).saturating_add(s.dtype_bytes)]),
    };
    let f = match ffn {
        FfnCost::Dense => m(&[tok, s.intermediate]),
        FfnCost::Routed { n_blocks, top_k } => {
            let n = n_blocks.max(1);
            let block = s.intermediate.div_ceil(n);
            m(&[tok, block, top_k.min(n)])
        }
    };
    ActivationBytes {
        attention_scores,
        attention_io: m(&[5, e, s.dtype_bytes]),
        ffn: m(&[2, f, s.dtype_bytes]),
        other: m(&[3 + if s.dropout { 2 } else { 0 }, e, s.dtype_bytes]),
    }
}

/// Per-layer accounting of a model's current slots (dense or sparse attention, dense or routed
/// FFN), for a batch of `batch × seq_len` tokens.
pub trait ActivationAccounting {
    /// One entry per layer, in order.
    fn activation_bytes_per_layer(&self, batch: usize, seq_len: usize, train: bool) -> Vec<ActivationBytes>;
}

/// Largest value a size field of a model config may take: far above any released BERT or GPT-2
/// (GPT-3: 96 layers, width 12288), low enough that the products below stay meaningful.
const SIZE_LIMIT: usize = 1 << 20;

/// Saturating product of sizes.
pub(crate) fn prod(xs: &[u128]) -> u128 {
    xs.iter().fold(1, |a, &x| a.saturating_mul(x))
}

/// Saturating sum of sizes.
pub(crate) fn sum(xs: &[u128]) -> u128 {
    xs.iter().fold(0, |a, &x| a.saturating_add(x))
}

/// Rejects a config whose sizes cannot be built on this machine, before anything is allocated
/// (an absurd config would otherwise abort the process on allocation).
///
/// `fields` are the config's size fields with their values; each must be in 1..=2^20.
/// `params` is the parameter count they imply; its f32 bytes must fit in physical memory
/// (training needs several times more: gradients and optimizer state).
pub(crate) fn check_model_size(fields: &[(&'static str, usize)], params: u128) -> crate::Result<()> {
    for &(field, v) in fields {
        if v == 0 || v > SIZE_LIMIT {
            return Err(crate::ModelError::InvalidConfig {
                field,
                value: v.to_string(),
                reason: format!("must be in 1..={SIZE_LIMIT}"),
            });
        }
    }
    let bytes = params.saturating_mul(4);
    if let Some(total) = physical_memory_bytes() {
        if bytes > total as u128 {
            // Headed by the largest field; every size is listed, since any of them may be the typo.
            let (field, v) = fields
                .iter()
                .copied()
                .max_by_key(|&(_, v)| v)
                .unwrap_or(("size", 0));
            let all: Vec<String> = fields.iter().map(|(f, v)| format!("{f} {v}")).collect();
            return Err(crate::ModelError::InvalidConfig {
                field,
                value: v.to_string(),
                reason: format!(
                    "the config's sizes ({}) imply {params} parameters ({:.1} GiB in f32), more than this machine's {:.1} GiB of memory",
                    all.join(", "),
                    bytes as f64 / (1u64 << 30) as f64,
                    total as f64 / (1u64 << 30) as f64
                ),
            });
        }
    }
    Ok(())
}

/// Physical memory in bytes (Linux: `MemTotal` of /proc/meminfo); `None` where unknown.
pub fn physical_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
