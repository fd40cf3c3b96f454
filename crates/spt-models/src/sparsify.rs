//! [`sparsify`]: converts a loaded dense model, in place, into an SPT model.
//!
//! Per selected layer it can
//! - swap the attention core for [`SparseAttention`]: a PQ codebook fitted by k-means on the
//!   layer's keys from a few calibration batches (padding excluded), and a top-k per query;
//! - swap the FFN for a [`NamedRoutedFfn`] (`n_blocks` blocks, top-k per token), its router
//!   fitted to rank blocks by their activation norm on the calibration tokens (and, if asked, the
//!   hidden units regrouped first and the linear correction fitted after);
//! - wrap linear layers with LoRA (q, k, v, o, fc1, fc2; GPT-2's fused `c_attn` for q/k/v). On a
//!   routed FFN, LoRA lives inside the routed op and covers both fc1 and fc2.
//!
//! The calibration batches run through the *dense* model once (eval mode, no gradient), recording
//! every layer's keys and FFN inputs, before anything is swapped, so every layer is calibrated on
//! the activations the pretrained model produces.

use crate::attention::{AttentionCore, KeyGrouping, SparseAttention};
use crate::error::{ModelError, Result};
use crate::ffn::{DenseFfn, FeedForward, NamedRoutedFfn};
use crate::layers::{DropoutRng, Linear};
use crate::weights::Param;
use candle_core::{DType, Tensor};
use spt_ops::lora::LoraConfig;
use spt_ops::pq::{KeyTopK, PqConfig, Refresh};
use spt_ops::routed_ffn::{RoutedFfnConfig, RouterFitConfig, RoutingQuality, UnitClusterConfig};
use std::sync::Arc;

/// One batch of calibration inputs (the model's forward arguments).
#[derive(Debug, Clone)]
pub struct CalibrationBatch {
    /// `[B, L]` token ids.
    pub input_ids: Tensor,
    /// `[B, L]`, 1 = real token; padded positions are left out of calibration.
    pub attention_mask: Option<Tensor>,
    /// `[B, L]` (BERT only).
    pub token_type_ids: Option<Tensor>,
}

impl CalibrationBatch {
    pub fn new(input_ids: Tensor, attention_mask: Option<Tensor>) -> Self {
        Self {
            input_ids,
            attention_mask,
            token_type_ids: None,
        }
    }
}

/// What one layer saw during a calibration forward pass (detached).
#[derive(Debug, Clone)]
pub struct LayerTrace {
    /// `[B, H, L, d]`, after the query projection.
    pub queries: Tensor,
    /// `[B, H, L, d]`, after the key projection.
    pub keys: Tensor,
    /// `[B, L, E]`, the FFN's input.
    pub ffn_input: Tensor,
}

/// The linear layers LoRA can wrap. GPT-2's fused `c_attn` is [`LoraTarget::QueryKeyValue`]
/// (asking for any of q, k, v wraps it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraTarget {
    Query,
    Key,
    Value,
    /// GPT-2's fused `c_attn`; on BERT, asking for it wraps query, key and value.
    QueryKeyValue,
    /// The attention output projection.
    Output,
    /// The FFN's first linear (`intermediate.dense` / `mlp.c_fc`).
    Fc1,
    /// The FFN's second linear (`output.dense` / `mlp.c_proj`).
    Fc2,
}

impl LoraTarget {
    /// Whether this requested target names the linear layer in `slot`: the same target, or q, k,
    /// v across the two attention layouts (GPT-2's one fused layer, BERT's three).
    pub fn matches(self, slot: LoraTarget) -> bool {
        use LoraTarget::{Key, Query, QueryKeyValue, Value};
        self == slot
            || matches!(
                (self, slot),
                (Query | Key | Value, QueryKeyValue) | (QueryKeyValue, Query | Key | Value)
            )
    }
}

/// Mutable access to the swappable parts of one layer.
pub struct LayerSlots<'a> {
    pub attention: &'a mut AttentionCore,
    pub ffn: &'a mut FeedForward,
    /// The attention's linear layers, by LoRA target (the FFN's are inside `ffn`).
    pub linears: Vec<(LoraTarget, &'a mut Linear)>,
    /// The model's dropout seed source (LoRA dropout draws from it).
    pub dropout_rng: Arc<DropoutRng>,
    /// Attention heads and their width (what a PQ codebook for this layer must quantise).
    pub heads: usize,
    pub head_dim: usize,
}

/// A model [`sparsify`] can convert: BERT and GPT-2 (base and head models).
pub trait SptModel {
    fn num_layers(&self) -> usize;
    /// Runs the model (eval mode) on one batch and returns every layer's trace.
    fn trace(&self, batch: &CalibrationBatch) -> Result<Vec<LayerTrace>>;
    /// The swappable parts of layer `i`.
    fn layer_slots(&mut self, i: usize) -> Option<LayerSlots<'_>>;

    /// The mean over routed layers of the router load-balancing losses of the last training
    /// forward (differentiable; taken, so a second call returns `None`). `None` when no routed
    /// layer computes it (see spt-ops' `RoutedFfnConfig::aux_loss`).
    fn take_router_aux_loss(&mut self) -> Result<Option<Tensor>> {
        let mut losses = Vec::new();
        for i in 0..self.num_layers() {
            if let Some(slots) = self.layer_slots(i) {
                losses.extend(slots.ffn.take_aux_loss());
            }
        }
        if losses.is_empty() {
            return Ok(None);
        }
        Ok(Some(Tensor::stack(&losses, 0)?.mean(0)?))
    }

    /// The fitted state (PQ codebooks, regrouped FFN unit orders, linear corrections) as named
    /// CPU tensors, for checkpoints: it is not trained, so `named_tensors` leaves it out. The
    /// names are listed in [`crate::buffers`].
    fn named_buffers(&mut self) -> Result<Vec<(String, Tensor)>> {
        crate::buffers::named_buffers(self)
    }

    /// Restores buffers saved by [`SptModel::named_buffers`] (unit orders first: the saved LoRA
    /// factors are in the saved order, so call it before loading them). Codebooks make their
    /// layers sparse with `attention`'s top-k and grouping; no calibration is needed. Every name
    /// is checked before the model changes; an unknown or removed kind is refused by name.
    /// Returns the number of buffers installed.
    fn load_buffers(
        &mut self,
        buffers: &[(String, Tensor)],
        attention: Option<(KeyTopK, KeyGrouping)>,
    ) -> Result<usize> {
        crate::buffers::load_buffers(self, buffers, attention)
    }

    /// Folds every LoRA adapter (dense linears and routed FFNs) into its frozen weight, for
    /// export: `named_tensors` then carries the merged weights under their HF names (drop the
    /// `.lora_` entries for a plain HF checkpoint). Returns the number of adapters merged.
    fn merge_lora(&mut self) -> Result<usize> {
        let mut n = 0;
        for i in 0..self.num_layers() {
            let Some(slots) = self.layer_slots(i) else {
                continue;
            };
            for (_, lin) in slots.linears {
                if lin.lora().is_some_and(|l| !l.is_merged()) {
                    lin.merge_lora()?;
                    n += 1;
                }
            }
            match slots.ffn {
                FeedForward::Dense(d) => {
                    for lin in [&mut d.fc1, &mut d.fc2] {
                        if lin.lora().is_some_and(|l| !l.is_merged()) {
                            lin.merge_lora()?;
                            n += 1;
                        }
                    }
                }
                FeedForward::Routed(r) => {
                    if r.ffn.lora_factors().is_some() && !r.is_merged() {
                        r.merge_lora()?;
                        n += 1;
                    }
                }
            }
        }
        Ok(n)
    }

    /// For inference: every LoRA adapter and routed FFN reads its own `Var`s (factors, router)
    /// detached, so with the parameters frozen too (`NamedParams::set_trainable`) no op records
    /// a graph and activations are freed as the forward goes. Values are unchanged; load
    /// trained values first, since routed FFNs keep their GEMM operands once frozen
    /// (`RoutedFfn::freeze`). Returns the number of layers (adapters and routed FFNs) frozen.
    fn freeze_adapters(&mut self) -> Result<usize> {
        let mut n = 0;
        for i in 0..self.num_layers() {
            let Some(slots) = self.layer_slots(i) else {
                continue;
            };
            let dense_ffn = match slots.ffn {
                FeedForward::Dense(d) => vec![&mut d.fc1, &mut d.fc2],
                FeedForward::Routed(r) => {
                    r.ffn.freeze();
                    n += 1;
                    Vec::new()
                }
            };
            for lin in slots.linears.into_iter().map(|(_, l)| l).chain(dense_ffn) {
                n += usize::from(lin.freeze_lora());
            }
        }
        Ok(n)
    }

    /// Moves every sparse layer's PQ codebook toward the keys the current model produces on
    /// `batch` (padding excluded), by EMA or mini-batch k-means: the codebook refresh of SPT,
    /// e.g. every few hundred steps. Returns the number of layers refreshed.
    fn refresh_codebooks(&mut self, batch: &CalibrationBatch, rule: Refresh) -> Result<usize> {
        let traces = self.trace(batch)?;
        let mut n = 0;
        for (i, t) in traces.iter().enumerate() {
            if let Some(LayerSlots {
                attention: AttentionCore::Sparse(s),
                ..
            }) = self.layer_slots(i)
            {
                let (keys, _) = gather_valid(t, batch.attention_mask.as_ref())?;
                s.codebook.refresh(&keys, rule)?;
                n += 1;
            }
        }
        Ok(n)
    }
}

/// Which layers to convert.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerSelection {
    #[default]
    All,
    /// These layer indices.
    Only(Vec<usize>),
    /// The last n layers.
    LastN(usize),
}

impl LayerSelection {
    /// The selected indices for a model with `n` layers, or an error naming a bad index.
    pub fn resolve(&self, n: usize) -> Result<Vec<usize>> {
        match self {
            Self::All => Ok((0..n).collect()),
            Self::LastN(k) => Ok((n.saturating_sub(*k)..n).collect()),
            Self::Only(v) => {
                if let Some(&bad) = v.iter().find(|&&i| i >= n) {
                    return Err(ModelError::InvalidConfig {
                        field: "layers",
                        value: bad.to_string(),
                        reason: format!("the model has {n} layers"),
                    });
                }
                let mut v = v.clone();
                v.sort_unstable();
                v.dedup();
                Ok(v)
            }
        }
    }
}

/// Sparse attention settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SparseAttentionConfig {
    /// Codebook shape and k-means settings.
    pub pq: PqConfig,
    /// Keys kept per query.
    pub top_k: KeyTopK,
    /// Per-query selection (default) or per query tile.
    #[serde(default)]
    pub grouping: KeyGrouping,
}

/// How [`sparsify`] fits the routed FFNs on the calibration tokens (the layers' routing itself
/// is spt-ops' `RoutedFfnConfig`, [`SptConfig::ffn`]).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FfnCalibration {
    /// Fit the router (then the linear correction, if the layer has one) on the calibration
    /// tokens; `None` keeps the seeded random `nn.Linear`-style initialisation.
    pub router_fit: Option<RouterFitConfig>,
    /// Before fitting the router, regroup the hidden units so that units firing on the same
    /// calibration tokens share a block (spt-ops' `cluster_units`; exact for the dense FFN). With
    /// a router fit, a layer keeps its contiguous blocks where they fit the dense FFN better.
    /// Needs frozen FFN weights (LoRA on the FFN, or a frozen model): trained ones are an error.
    #[serde(default)]
    pub cluster_units: bool,
}

impl Default for FfnCalibration {
    /// The router fitted with the default settings; contiguous units.
    fn default() -> Self {
        Self {
            router_fit: Some(RouterFitConfig::default()),
            cluster_units: false,
        }
    }
}

/// LoRA settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraSettings {
    pub targets: Vec<LoraTarget>,
    /// Rank, alpha, dropout; `seed` is combined with the layer and target for each adapter.
    pub config: LoraConfig,
}

/// What [`sparsify`] does.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct SptConfig {
    pub layers: LayerSelection,
    /// Sparse attention in the selected layers, or keep dense attention.
    pub attention: Option<SparseAttentionConfig>,
    /// Routed FFN in the selected layers, or keep the dense FFN. Layer `i`'s router seed is
    /// `seed ^ i`; its LoRA comes from [`SptConfig::lora`] (targets `Fc1` / `Fc2`).
    pub ffn: Option<RoutedFfnConfig>,
    /// How the routed FFNs are fitted on the calibration tokens.
    #[serde(default)]
    pub ffn_calibration: FfnCalibration,
    /// LoRA adapters in the selected layers, or none.
    pub lora: Option<LoraSettings>,
}

/// What [`sparsify`] did to one layer.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LayerReport {
    pub layer: usize,
    /// "dense" or "sparse".
    pub attention: &'static str,
    /// Mean squared PQ reconstruction error of the calibration keys.
    pub quantization_mse: Option<f64>,
    /// Calibration tokens used (unpadded).
    pub calibration_tokens: usize,
    /// "dense" or "routed".
    pub ffn: &'static str,
    /// Routed vs dense FFN on the calibration tokens, after the router fit.
    pub routing: Option<RoutingSummary>,
    /// Names of the modules given a LoRA adapter.
    pub lora: Vec<String>,
}

/// spt-ops' `RoutingQuality`, serializable.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RoutingSummary {
    /// Cosine similarity of routed and dense FFN outputs.
    pub cosine: f64,
    /// `‖routed − dense‖ / ‖dense‖`.
    pub rel_error: f64,
    /// Fraction of router picks among each token's top-k blocks by output norm.
    pub oracle_recall: f64,
    /// The cosine of the oracle routing (each token's top-k blocks by output norm).
    pub oracle_cosine: f64,
    /// The per-token cosine to the dense FFN, averaged over the calibration tokens (the
    /// `cosine` above is dominated by the few tokens with very large FFN outputs).
    pub token_cosine: f64,
    /// The per-token cosine of the oracle routing.
    pub oracle_token_cosine: f64,
    /// Which hidden units form the blocks: "contiguous" (the checkpoint's order) or "clustered".
    pub units: &'static str,
    /// The cosine with contiguous blocks.
    pub contiguous_cosine: Option<f64>,
    /// The cosine with regrouped units, when regrouping was tried (it is kept if not worse).
    pub clustered_cosine: Option<f64>,
}

/// Per-layer outcome of [`sparsify`].
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct SparsifyReport {
    pub layers: Vec<LayerReport>,
}

/// Flat indices `b·L + l` of the unpadded positions, or `None` when nothing is padded.
fn valid_positions(mask: Option<&Tensor>, b: usize, l: usize) -> Result<Option<Tensor>> {
    let Some(m) = mask else { return Ok(None) };
    let v: Vec<f64> = m.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    if v.len() != b * l {
        return Err(ModelError::BadInput {
            name: "attention_mask",
            reason: format!("expected [{b}, {l}] values, got {}", v.len()),
        });
    }
    let idx: Vec<u32> = v
        .iter()
        .enumerate()
        .filter(|(_, &x)| x != 0.0)
        .map(|(i, _)| i as u32)
        .collect();
    Ok(Some(Tensor::from_vec(
        idx,
        v.len() - v.iter().filter(|&&x| x == 0.0).count(),
        m.device(),
    )?))
}

/// Keys `[B, H, L, d]` of unpadded positions as `[1, H, N, d]`; FFN inputs as `[N, E]`.
fn gather_valid(trace: &LayerTrace, mask: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    let (b, h, l, d) = trace.keys.dims4()?;
    let e = trace.ffn_input.dim(2)?;
    let keys = trace.keys.transpose(1, 2)?.contiguous()?.reshape((b * l, h, d))?;
    let ffn = trace.ffn_input.reshape((b * l, e))?;
    let (keys, ffn) = match valid_positions(mask, b, l)? {
        Some(idx) => (keys.index_select(&idx, 0)?, ffn.index_select(&idx, 0)?),
        None => (keys, ffn),
    };
    Ok((keys.transpose(0, 1)?.contiguous()?.unsqueeze(0)?, ffn))
}

/// Converts `model` in place as `cfg` says, calibrating on `calibration` batches (at least one
/// when sparse attention, a fitted router or clustered FFN units are requested: the defaults fit
/// the routers). Layers not selected stay as they are.
///
/// What trains afterwards: the adapters, and the new routers, which come back as trainable
/// variables. spt-train gives the routers a learning rate of 0 by default (`router_lr_scale`:
/// trained at the adapters' rate they destabilised runs), so with an optimizer of your own,
/// leave them out or scale them. The base weights train as the model was loaded
/// ([`crate::LoadOptions`]): spt-train loads them frozen except the task head.
pub fn sparsify<M: SptModel + ?Sized>(
    model: &mut M,
    cfg: &SptConfig,
    calibration: &[CalibrationBatch],
) -> Result<SparsifyReport> {
    let n = model.num_layers();
    let layers = cfg.layers.resolve(n)?;
    let calib = cfg.ffn_calibration;
    let ffn_needs_tokens = cfg.ffn.is_some() && (calib.router_fit.is_some() || calib.cluster_units);
    if let Some(ac) = &cfg.attention {
        crate::attention::check_top_k(ac.top_k)?;
    }
    if (cfg.attention.is_some() || ffn_needs_tokens) && calibration.is_empty() {
        return Err(ModelError::InvalidConfig {
            field: "calibration_batches",
            value: "0".into(),
            reason: "fitting PQ codebooks, routers or unit groups needs at least one calibration batch"
                .into(),
        });
    }
    // Check the FFN conversion up front, so that no layer is left half-converted.
    if let Some(fc) = &cfg.ffn {
        for &i in &layers {
            let Some(slots) = model.layer_slots(i) else {
                continue;
            };
            let FeedForward::Dense(d) = &*slots.ffn else {
                return Err(ModelError::InvalidConfig {
                    field: "ffn",
                    value: i.to_string(),
                    reason: "this layer's FFN is already routed".into(),
                });
            };
            let d_ff = d.fc1.out_features();
            if fc.n_blocks == 0 || d_ff % fc.n_blocks != 0 {
                return Err(ModelError::InvalidConfig {
                    field: "ffn.n_blocks",
                    value: fc.n_blocks.to_string(),
                    reason: format!("must divide d_ff = {d_ff} (layer {i})"),
                });
            }
            fc.top_k.resolve(fc.n_blocks)?;
            if d.fc1.lora().is_some() || d.fc2.lora().is_some() {
                return Err(ModelError::InvalidConfig {
                    field: "ffn",
                    value: i.to_string(),
                    reason: "fc1/fc2 already have LoRA adapters; route the FFN first".into(),
                });
            }
            // LoRA on fc1/fc2 freezes them; otherwise they train as loaded, and a trained
            // weight cannot be regrouped.
            let ffn_lora = cfg.lora.as_ref().is_some_and(|l| {
                l.targets
                    .iter()
                    .any(|t| matches!(t, LoraTarget::Fc1 | LoraTarget::Fc2))
            });
            let trained = [&d.fc1, &d.fc2]
                .iter()
                .any(|l| l.weight.is_trainable() || l.bias.as_ref().is_some_and(Param::is_trainable));
            if calib.cluster_units && trained && !ffn_lora {
                return Err(ModelError::InvalidConfig {
                    field: "ffn_calibration.cluster_units",
                    value: "true".into(),
                    reason: format!(
                        "layer {i}'s fc1/fc2 train, and trained weights cannot be regrouped: freeze \
                         them, put LoRA on fc1/fc2, or keep contiguous units"
                    ),
                });
            }
        }
        if let Some(fit) = &calib.router_fit {
            fit.check()?;
        }
    }
    // A LoRA config that cannot be built is refused before any layer changes, and so is a
    // target no selected layer has: it would add no adapter, and train nothing there, silently.
    if let Some(l) = &cfg.lora {
        l.config.check("lora")?;
        let mut slots_seen: Vec<LoraTarget> = Vec::new();
        for &i in &layers {
            let Some(slots) = model.layer_slots(i) else {
                continue;
            };
            slots_seen.extend(slots.linears.iter().map(|(t, _)| *t));
            // fc1 / fc2 take LoRA on a dense FFN, or on the routed one this call builds.
            if cfg.ffn.is_some() || matches!(&*slots.ffn, FeedForward::Dense(_)) {
                slots_seen.extend([LoraTarget::Fc1, LoraTarget::Fc2]);
            }
        }
        slots_seen.sort_by_key(|t| *t as u8);
        slots_seen.dedup();
        if let Some(t) = l
            .targets
            .iter()
            .find(|t| !slots_seen.iter().any(|&s| t.matches(s)))
        {
            return Err(ModelError::InvalidConfig {
                field: "lora.targets",
                value: format!("{t:?}"),
                reason: format!(
                    "matches no linear layer of the {} selected layers (they have {slots_seen:?})",
                    layers.len()
                ),
            });
        }
    }
    // Record every layer's keys and FFN inputs on the dense model.
    let mut keys: Vec<Vec<Tensor>> = vec![Vec::new(); n];
    let mut ffn_in: Vec<Vec<Tensor>> = vec![Vec::new(); n];
    for batch in calibration {
        let traces = model.trace(batch)?;
        for (i, t) in traces.iter().enumerate() {
            if layers.contains(&i) {
                let (k, f) = gather_valid(t, batch.attention_mask.as_ref())?;
                keys[i].push(k);
                ffn_in[i].push(f);
            }
        }
    }

    let lora = cfg.lora.as_ref();
    let wants = |slot: LoraTarget| lora.is_some_and(|l| l.targets.iter().any(|t| t.matches(slot)));
    let lora_cfg = |i: usize, slot: u64| {
        lora.map(|l| LoraConfig {
            seed: l.config.seed ^ ((i as u64) << 8 | slot).wrapping_mul(0x9E37_79B9),
            ..l.config
        })
    };
    // Every layer's new parts are built first and swapped in only when all are whole: a failed
    // fit leaves the model as it was.
    let mut built = Vec::with_capacity(layers.len());
    for &i in &layers {
        let slots = model.layer_slots(i).ok_or(ModelError::InvalidConfig {
            field: "layers",
            value: i.to_string(),
            reason: format!("the model has {n} layers"),
        })?;
        let mut lr = LayerReport {
            layer: i,
            attention: slots.attention.kind(),
            quantization_mse: None,
            calibration_tokens: keys[i]
                .iter()
                .map(|k| k.dim(2))
                .sum::<candle_core::Result<usize>>()?,
            ffn: slots.ffn.kind(),
            routing: None,
            lora: Vec::new(),
        };
        let mut sparse = None;
        if let Some(ac) = &cfg.attention {
            let k = Tensor::cat(&keys[i], 2)?; // [1, H, N, d]
            let fitted = SparseAttention::fit(&k, &ac.pq, ac.top_k, ac.grouping)?;
            lr.quantization_mse = Some(
                fitted
                    .codebook
                    .quantization_loss(&k, false)?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?,
            );
            sparse = Some(fitted);
            lr.attention = "sparse";
        }
        let mut routed = None;
        if let Some(fc) = &cfg.ffn {
            // Built beside the dense FFN on the same weights (checked above: no LoRA on them).
            let dense = match &*slots.ffn {
                FeedForward::Dense(d) => DenseFfn {
                    fc1: d.fc1.share_weights()?,
                    fc2: d.fc2.share_weights()?,
                    act: d.act,
                },
                FeedForward::Routed(_) => {
                    return Err(ModelError::InvalidConfig {
                        field: "ffn",
                        value: i.to_string(),
                        reason: "this layer's FFN is already routed".into(),
                    })
                }
            };
            let rc = RoutedFfnConfig {
                seed: fc.seed ^ i as u64,
                ..fc.clone()
            };
            let mut ffn_lora = None;
            if wants(LoraTarget::Fc1) || wants(LoraTarget::Fc2) {
                ffn_lora = lora_cfg(i, 10);
                lr.lora.push(dense.fc1.module_name().to_string());
                lr.lora.push(dense.fc2.module_name().to_string());
            }
            let mut r = NamedRoutedFfn::from_dense(dense, rc, ffn_lora)?;
            lr.routing = fit_routed(&mut r, &ffn_in[i], calib)?;
            routed = Some(r);
            lr.ffn = "routed";
        } else if let FeedForward::Dense(d) = &*slots.ffn {
            for (t, lin, slot) in [(LoraTarget::Fc1, &d.fc1, 10), (LoraTarget::Fc2, &d.fc2, 11)] {
                if let (true, Some(c)) = (wants(t), lora_cfg(i, slot)) {
                    lin.check_lora(&c)?;
                    lr.lora.push(lin.module_name().to_string());
                }
            }
        }
        for (slot, (t, lin)) in slots.linears.iter().enumerate() {
            if let (true, Some(c)) = (wants(*t), lora_cfg(i, slot as u64)) {
                lin.check_lora(&c)?;
                lr.lora.push(lin.module_name().to_string());
            }
        }
        built.push((i, lr, sparse, routed));
    }
    let mut report = SparsifyReport::default();
    for (i, lr, sparse, routed) in built {
        let Some(slots) = model.layer_slots(i) else {
            continue; // refused above
        };
        if let Some(s) = sparse {
            *slots.attention = AttentionCore::Sparse(s);
        }
        match routed {
            Some(r) => *slots.ffn = FeedForward::Routed(r),
            None => {
                if let FeedForward::Dense(d) = slots.ffn {
                    for (t, lin, slot) in [
                        (LoraTarget::Fc1, &mut d.fc1, 10),
                        (LoraTarget::Fc2, &mut d.fc2, 11),
                    ] {
                        if let (true, Some(c)) = (wants(t), lora_cfg(i, slot)) {
                            lin.add_lora_seeded(c, slots.dropout_rng.clone())?;
                        }
                    }
                }
            }
        }
        for (slot, (t, lin)) in slots.linears.into_iter().enumerate() {
            if let (true, Some(c)) = (wants(t), lora_cfg(i, slot as u64)) {
                lin.add_lora_seeded(c, slots.dropout_rng.clone())?;
            }
        }
        report.layers.push(lr);
    }
    Ok(report)
}

/// Fits a new routed FFN's router on its layer's calibration inputs (and regroups its units, as
/// `calib` asks), returning what the fit reports.
fn fit_routed(
    routed: &mut NamedRoutedFfn,
    ffn_in: &[Tensor],
    calib: FfnCalibration,
) -> Result<Option<RoutingSummary>> {
    if calib.router_fit.is_none() && !calib.cluster_units {
        return Ok(None);
    }
    let sample = Tensor::cat(ffn_in, 0)?.to_dtype(routed.fc1.weight.tensor().dtype())?;
    let fit_router = |r: &mut NamedRoutedFfn| -> Result<Option<RoutingQuality>> {
        calib.router_fit.map(|f| r.init_router(&sample, f)).transpose()
    };
    let contiguous = fit_router(routed)?;
    let mut q = contiguous;
    let mut units = "contiguous";
    let mut clustered_cosine = None;
    if calib.cluster_units {
        routed.cluster_units(&sample, UnitClusterConfig::default())?;
        let clustered = fit_router(routed)?;
        clustered_cosine = clustered.map(|c| c.cosine);
        // Regrouping targets activation mass, not the output: where the fitted router
        // reproduces the dense FFN better on contiguous blocks, keep those.
        match (contiguous, clustered) {
            (Some(c), Some(g)) if c.cosine > g.cosine => {
                let identity: Vec<u32> = (0..routed.unit_order().len() as u32).collect();
                routed.set_unit_order(&identity)?;
                q = fit_router(routed)?;
            }
            _ => {
                q = clustered;
                units = "clustered";
            }
        }
    }
    Ok(q.map(|q| RoutingSummary {
        cosine: q.cosine,
        rel_error: q.rel_error,
        oracle_recall: q.oracle_recall,
        oracle_cosine: q.oracle_cosine,
        token_cosine: q.token_cosine,
        oracle_token_cosine: q.oracle_token_cosine,
        units,
        contiguous_cosine: contiguous.map(|c| c.cosine),
        clustered_cosine,
    }))
}
