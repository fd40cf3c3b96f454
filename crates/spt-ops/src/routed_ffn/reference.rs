//! Dense, obviously-correct FFNs from plain candle ops: the oracle of the routed FFN's tests and
//! the benchmark baseline. Autograd through these gives the reference gradients. Never optimise.

use crate::activation::Activation;
use candle_core::{Result, Tensor};

/// `act(x W1ᵀ + b1) W2ᵀ + b2` for `x [T, d]`, `W1 [d_ff, d]`, `W2 [d, d_ff]`.
pub fn dense_ffn(
    x: &Tensor,
    w1: &Tensor,
    b1: &Tensor,
    w2: &Tensor,
    b2: &Tensor,
    act: Activation,
) -> Result<Tensor> {
    let h = act.forward(&x.matmul(&w1.t()?)?.broadcast_add(b1)?)?; // [T, d_ff]
    h.matmul(&w2.t()?)?.broadcast_add(b2) // [T, d]
}

/// The dense FFN with its hidden units scaled per token by `mask [T, d_ff]`:
/// `(act(x W1ᵀ + b1) ⊙ mask) W2ᵀ + b2`. With `mask` = the gate of each kept block on that block's
/// units and 0 elsewhere, this is what the routed FFN computes.
pub fn masked_ffn(
    x: &Tensor,
    w1: &Tensor,
    b1: &Tensor,
    w2: &Tensor,
    b2: &Tensor,
    act: Activation,
    mask: &Tensor,
) -> Result<Tensor> {
    let h = act.forward(&x.matmul(&w1.t()?)?.broadcast_add(b1)?)?; // [T, d_ff]
    h.mul(mask)?.matmul(&w2.t()?)?.broadcast_add(b2) // [T, d]
}

/// Expands per-(token, block) gates `[T, n_blocks]` (0 for blocks a token skips) to a hidden-unit
/// mask `[T, n_blocks·block]`.
pub fn block_mask(gates: &Tensor, block: usize) -> Result<Tensor> {
    let (t, n) = gates.dims2()?;
    gates
        .unsqueeze(2)?
        .broadcast_as((t, n, block))?
        .reshape((t, n * block))
}
