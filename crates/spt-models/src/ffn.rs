//! The feed-forward slot: `fc2(act(fc1(x)))`, which `sparsify` swaps per layer.
//!
//! BERT's `intermediate.dense` / `output.dense` and GPT-2's `mlp.c_fc` / `mlp.c_proj` are `fc1` /
//! `fc2` here, keeping their HF parameter names. Residual, dropout and layer norm stay in the layer.

use crate::error::Result;
use crate::layers::Linear;
use crate::weights::{NamedParams, Param};
use candle_core::Tensor;
use spt_ops::Activation;

/// The dense two-layer FFN.
#[derive(Debug, Clone)]
pub struct DenseFfn {
    pub fc1: Linear,
    pub fc2: Linear,
    pub act: Activation,
}

impl DenseFfn {
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.fc1.forward_t(x, train)?;
        let h = self.act.forward(&h)?;
        self.fc2.forward_t(&h, train)
    }
}

/// The per-layer FFN slot. Phase 2 adds `Routed` (router + routed FFN op).
#[derive(Debug, Clone)]
pub enum FeedForward {
    Dense(DenseFfn),
}

impl FeedForward {
    /// `x [.., d] → [.., d]`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let _span = tracing::trace_span!("ffn", kind = self.kind()).entered();
        match self {
            Self::Dense(f) => f.forward_t(x, train),
        }
    }

    /// How this slot is accounted in [`crate::memory::activation_bytes`].
    pub fn cost(&self) -> crate::memory::FfnCost {
        match self {
            Self::Dense(_) => crate::memory::FfnCost::Dense,
        }
    }

    /// Short name for reports ("dense").
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Dense(_) => "dense",
        }
    }
}

impl NamedParams for FeedForward {
    fn visit_params<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        match self {
            Self::Dense(d) => {
                d.fc1.visit_params(f);
                d.fc2.visit_params(f);
            }
        }
    }
    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        match self {
            Self::Dense(d) => {
                d.fc1.visit_params_mut(f);
                d.fc2.visit_params_mut(f);
            }
        }
    }
}
