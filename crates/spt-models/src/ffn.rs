//! The feed-forward slot: `fc2(act(fc1(x)))`, which `sparsify` swaps per layer.
//!
//! BERT's `intermediate.dense` / `output.dense` and GPT-2's `mlp.c_fc` / `mlp.c_proj` are `fc1` /
//! `fc2` here, keeping their HF parameter names. Residual, dropout and layer norm stay in the layer.
//!
//! The routed FFN ([`NamedRoutedFfn`]) runs spt-ops' `RoutedFfn` on the same weights: d_ff is
//! split into `n_blocks` blocks and each token runs the top-k blocks its router picks. Its router
//! is named `{fc1's parent}.router.{weight,bias}` (e.g. `encoder.layer.3.intermediate.router`,
//! `transformer.h.3.mlp.router`); its optional linear correction is a constant, not a parameter
//! (see [`NamedRoutedFfn::correction`]).
//! LoRA on a routed FFN lives inside the op and is named like LoRA on a dense linear
//! (`{fc1}.lora_A.weight`, ...).

use crate::error::{ModelError, Result};
use crate::layers::{lora_err, Linear, WeightLayout};
use crate::weights::{NamedParams, Param};
use candle_core::Tensor;
use spt_ops::lora::LoraConfig;
use spt_ops::routed_ffn::{RoutedFfn, RoutedFfnConfig, RouterFitConfig, RoutingQuality, UnitClusterConfig};
use spt_ops::Activation;
use std::sync::Mutex;

/// The dense two-layer FFN.
#[derive(Debug)]
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

/// spt-ops' `RoutedFfn` bound to one model layer. The op computes; this adds what a model needs
/// around it: the HF-named parameters (fc1 / fc2 for export, the router, the LoRA factors), the
/// unit order that maps the op's hidden units to the pretrained checkpoint's, and the last
/// training forward's balancing loss. The LoRA factors, fc1 / fc2 and so an export are in the
/// op's order (one permutation of the hidden units: the same dense function); a saved order
/// restored first puts a checkpoint's factors back where they were trained.
#[derive(Debug)]
pub struct NamedRoutedFfn {
    /// The dense layers, kept for their HF names and export; the op reads the same tensors.
    /// Read them, do not replace their weights: the op computes with the tensors it was built
    /// from (set weights on the dense FFN before [`NamedRoutedFfn::from_dense`]).
    pub fc1: Linear,
    pub fc2: Linear,
    pub ffn: RoutedFfn,
    router_params: Vec<Param>,
    lora_params: Vec<Param>,
    merged: bool,
    /// The load-balancing loss of the last training forward, until taken.
    aux_loss: Mutex<Option<Tensor>>,
    /// Hidden unit order: position `j` holds the checkpoint's unit `unit_order[j]`.
    unit_order: Vec<u32>,
}

impl NamedRoutedFfn {
    /// Converts a dense FFN. The FFN weights keep the trainability they have now (a `Var` is
    /// trained through the op, a frozen tensor costs no weight-gradient work); with `lora` they
    /// are frozen and LoRA factors are added inside the op.
    pub fn from_dense(mut dense: DenseFfn, cfg: RoutedFfnConfig, lora: Option<LoraConfig>) -> Result<Self> {
        if dense.fc1.lora().is_some() || dense.fc2.lora().is_some() {
            return Err(ModelError::InvalidConfig {
                field: "lora",
                value: dense.fc1.module_name().to_string(),
                reason: "a routed FFN takes its LoRA inside the op (from_dense's `lora`), not from wrapped fc1/fc2"
                    .into(),
            });
        }
        if lora.is_some() {
            for p in [&mut dense.fc1.weight, &mut dense.fc2.weight] {
                p.freeze();
            }
            for b in [&mut dense.fc1.bias, &mut dense.fc2.bias].into_iter().flatten() {
                b.freeze();
            }
        }
        let bias = |l: &Linear| -> Result<Tensor> {
            match &l.bias {
                Some(b) => Ok(b.tensor().clone()),
                None => Ok(Tensor::zeros(
                    l.out_features(),
                    l.weight.tensor().dtype(),
                    l.weight.tensor().device(),
                )?),
            }
        };
        // RoutedFfn takes HF Linear layout: W1 [d_ff, d], W2 [d, d_ff].
        let w1 = dense.fc1.weight_out_in()?;
        let w2 = dense.fc2.weight_out_in()?;
        let mut ffn = RoutedFfn::new(&w1, &bias(&dense.fc1)?, &w2, &bias(&dense.fc2)?, dense.act, cfg)?;
        if let Some(lc) = lora {
            ffn = ffn.with_lora(lc)?;
        }
        let unit_order = (0..ffn.d_ff() as u32).collect();
        let fc1 = dense.fc1.module_name().to_string();
        let fc2 = dense.fc2.module_name().to_string();
        let router = match fc1.rsplit_once('.') {
            Some((parent, _)) => format!("{parent}.router"),
            None => "router".to_string(),
        };
        let (rw, rb) = ffn.router();
        let router_params = vec![
            Param::from_var(format!("{router}.weight"), rw.clone()),
            Param::from_var(format!("{router}.bias"), rb.clone()),
        ];
        let lora_params = match ffn.lora_factors() {
            Some((a1, b1, a2, b2)) => vec![
                Param::from_var(format!("{fc1}.lora_A.weight"), a1.clone()),
                Param::from_var(format!("{fc1}.lora_B.weight"), b1.clone()),
                Param::from_var(format!("{fc2}.lora_A.weight"), a2.clone()),
                Param::from_var(format!("{fc2}.lora_B.weight"), b2.clone()),
            ],
            None => Vec::new(),
        };
        Ok(Self {
            fc1: dense.fc1,
            fc2: dense.fc2,
            ffn,
            router_params,
            lora_params,
            merged: false,
            aux_loss: Mutex::new(None),
            unit_order,
        })
    }

    /// The current hidden unit order (identity until [`set_unit_order`](Self::set_unit_order)).
    pub fn unit_order(&self) -> &[u32] {
        &self.unit_order
    }

    /// Groups hidden units that fire together on sample FFN inputs `[N, d]` into the same block
    /// (spt-ops' `cluster_units`); returns the new order.
    pub fn cluster_units(&mut self, sample: &Tensor, cfg: UnitClusterConfig) -> Result<Vec<u32>> {
        let relative = self.ffn.cluster_units(sample, cfg)?;
        let order: Vec<u32> = relative.iter().map(|&j| self.unit_order[j as usize]).collect();
        self.set_unit_order(&order)?;
        Ok(order)
    }

    /// Puts the hidden units in `order` (position → the checkpoint's unit), whatever the current
    /// order: setting the same order twice changes nothing. The dense function is unchanged and
    /// `fc1` / `fc2` (what export writes) follow, so an exported model equals this one.
    pub fn set_unit_order(&mut self, order: &[u32]) -> Result<()> {
        let n = self.unit_order.len();
        let mut pos = vec![u32::MAX; n];
        for (j, &u) in self.unit_order.iter().enumerate() {
            pos[u as usize] = j as u32;
        }
        let relative: Vec<u32> = order
            .iter()
            .enumerate()
            .map(|(j, &u)| {
                pos.get(u as usize)
                    .copied()
                    .ok_or_else(|| ModelError::InvalidConfig {
                        field: "unit_order",
                        value: format!("{u} at position {j}"),
                        reason: format!("{}: units are 0..{n}", self.fc1.module_name()),
                    })
            })
            .collect::<Result<_>>()?;
        if relative.iter().enumerate().all(|(j, &r)| r as usize == j) && order.len() == n {
            return Ok(());
        }
        self.ffn.permute_units(&relative)?;
        self.unit_order = order.to_vec();
        self.sync_weights()?;
        let (_, b1, _, _) = self.ffn.weights();
        if let Some(b) = &mut self.fc1.bias {
            *b = Param::frozen(b.name().to_string(), b1);
        }
        Ok(())
    }

    /// The linear correction `[d+1, d]` (a fitted constant, saved beside the parameters), if
    /// any.
    pub fn correction(&self) -> Option<&Tensor> {
        self.ffn.correction()
    }

    /// Whether `c` can be this layer's linear correction: configured, `[d + 1, d]`, finite.
    pub fn check_correction(&self, c: &Tensor) -> Result<()> {
        Ok(self.ffn.check_correction(c)?)
    }

    /// Restores a saved linear correction (after [`set_unit_order`](Self::set_unit_order),
    /// which resets it). Refuses a non-finite one.
    pub fn set_correction(&mut self, c: &Tensor) -> Result<()> {
        Ok(self.ffn.set_correction(c)?)
    }

    /// Fits the router so its scores rank blocks by activation norm on sample FFN inputs
    /// `[N, d]`, and reports the routed-vs-dense quality on them.
    pub fn init_router(&mut self, sample: &Tensor, fit: RouterFitConfig) -> Result<RoutingQuality> {
        Ok(self.ffn.init_router(sample, fit)?)
    }

    /// Folds the LoRA updates into the FFN weights (see [`Linear::merge_lora`]).
    pub fn merge_lora(&mut self) -> Result<()> {
        self.ffn.merge().map_err(lora_err)?;
        self.merged = true;
        self.sync_weights()
    }

    /// Whether the LoRA updates are folded into the weights.
    pub fn is_merged(&self) -> bool {
        self.merged
    }

    /// Undoes [`NamedRoutedFfn::merge_lora`].
    pub fn unmerge_lora(&mut self) -> Result<()> {
        self.ffn.unmerge().map_err(lora_err)?;
        self.merged = false;
        self.sync_weights()
    }

    fn sync_weights(&mut self) -> Result<()> {
        let (w1, _, w2, _) = self.ffn.weights();
        for (lin, w) in [(&mut self.fc1, w1.clone()), (&mut self.fc2, w2.clone())] {
            let w = match lin.layout {
                WeightLayout::OutIn => w,
                WeightLayout::InOut => w.t()?.contiguous()?,
            };
            lin.weight = Param::frozen(lin.weight.name().to_string(), &w);
        }
        Ok(())
    }
}

/// The per-layer FFN slot.
// One per layer, so the variants' size difference costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum FeedForward {
    /// `fc2(act(fc1(x)))`.
    Dense(DenseFfn),
    /// Router + routed FFN op.
    Routed(NamedRoutedFfn),
}

impl FeedForward {
    /// Restarts the routed FFN's own LoRA dropout masks from `seed` (its adapters live inside
    /// the spt-ops op, outside the model's shared seed source). Dense FFNs draw from that source.
    pub fn seed_dropout(&self, seed: u64) {
        if let Self::Routed(r) = self {
            r.ffn.seed_dropout(seed);
        }
    }

    /// `x [.., d] → [.., d]`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let _span = tracing::trace_span!("ffn", kind = self.kind()).entered();
        match self {
            Self::Dense(f) => f.forward_t(x, train),
            Self::Routed(r) => {
                let out = r.ffn.forward_t(x, train)?;
                if train && out.aux_loss.is_some() {
                    *r.aux_loss.lock().unwrap_or_else(|e| e.into_inner()) = out.aux_loss;
                }
                Ok(out.y)
            }
        }
    }

    /// Whether a training forward adds a router load-balancing loss, which averages over every
    /// token of the batch (so a forward over fewer tokens changes it).
    pub fn has_aux_loss(&self) -> bool {
        matches!(self, Self::Routed(r) if r.ffn.config().aux_loss)
    }

    /// The router load-balancing loss of the last training forward, if this slot is routed
    /// with the loss on; a second call returns `None`.
    pub fn take_aux_loss(&self) -> Option<Tensor> {
        match self {
            Self::Dense(_) => None,
            Self::Routed(r) => r.aux_loss.lock().unwrap_or_else(|e| e.into_inner()).take(),
        }
    }

    /// How this slot is accounted in [`crate::memory::activation_bytes`].
    pub fn cost(&self) -> crate::memory::FfnCost {
        match self {
            Self::Dense(_) => crate::memory::FfnCost::Dense,
            Self::Routed(r) => crate::memory::FfnCost::Routed {
                n_blocks: r.ffn.config().n_blocks,
                top_k: r.ffn.k(),
            },
        }
    }

    /// Short name for reports ("dense" / "routed").
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Dense(_) => "dense",
            Self::Routed(_) => "routed",
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
            Self::Routed(r) => {
                r.fc1.visit_params(f);
                r.fc2.visit_params(f);
                r.router_params.iter().for_each(&mut *f);
                r.lora_params.iter().for_each(f);
            }
        }
    }
    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        match self {
            Self::Dense(d) => {
                d.fc1.visit_params_mut(f);
                d.fc2.visit_params_mut(f);
            }
            // The op holds the FFN weights: their trainability was fixed at conversion, so only
            // the router and LoRA factors are offered.
            Self::Routed(r) => {
                r.router_params.iter_mut().for_each(&mut *f);
                r.lora_params.iter_mut().for_each(f);
            }
        }
    }
}

impl candle_core::ModuleT for DenseFfn {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        Ok(DenseFfn::forward_t(self, xs, train)?)
    }
}

impl candle_core::ModuleT for FeedForward {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        Ok(FeedForward::forward_t(self, xs, train)?)
    }
}
