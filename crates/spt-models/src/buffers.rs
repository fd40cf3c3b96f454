//! Fitted state as named buffers: the tensors sparsification fits but training does not
//! (PQ codebooks, routed-FFN hidden unit orders, linear corrections). They are saved and restored
//! by one mechanism, [`SptModel::named_buffers`] / [`SptModel::load_buffers`], next to the
//! parameters of [`crate::NamedParams`].
//!
//! Names are `<kind>.layer.<i>`; they are the checkpoint format of spt-train's `extra.safetensors`
//! since codebooks were first saved, so every checkpoint written so far loads unchanged:
//!
//! | name                    | tensor                                   |
//! |-------------------------|------------------------------------------|
//! | `pq_codebook.layer.N`   | centroids `[G, S, C, d_codeword]` (f32)  |
//! | `pq_counts.layer.N`     | the codebook's mini-batch counts `[G, S, C]` (f32) |
//! | `ffn_unit_order.layer.N`| hidden unit order `[d_ff]` (u32)         |
//! | `ffn_correction.layer.N`| linear correction `[d + 1, d]`           |
//!
//! `pq_counts` came later: a checkpoint without them still loads, with counts of 0 (the first
//! mini-batch refresh then moves each codeword that gets keys to their mean; see
//! `spt_ops::pq::Refresh::MiniBatch`). An EMA refresh does not read them. Counts load only with
//! their layer's codebook. A buffer of an option that was removed (`ffn_skip_bias.layer.N`) is
//! refused by name.

use crate::attention::{AttentionCore, KeyGrouping, SparseAttention};
use crate::error::{ModelError, Result};
use crate::ffn::{FeedForward, NamedRoutedFfn};
use crate::sparsify::{LayerSlots, SptModel};
use candle_core::{DType, Device, Tensor};
use spt_ops::pq::{Codebook, KeyTopK};

/// The kinds of buffer, in the order [`load_buffers`] installs them: a unit order permutes the
/// FFN and resets its correction, so orders go first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BufferKind {
    FfnUnitOrder,
    FfnCorrection,
    PqCodebook,
    /// A codebook's mini-batch k-means counts, installed with it.
    PqCounts,
}

impl BufferKind {
    pub const ALL: [BufferKind; 4] = [
        Self::FfnUnitOrder,
        Self::FfnCorrection,
        Self::PqCodebook,
        Self::PqCounts,
    ];

    /// The name's prefix, e.g. `pq_codebook.layer.`.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::FfnUnitOrder => "ffn_unit_order.layer.",
            Self::FfnCorrection => "ffn_correction.layer.",
            Self::PqCodebook => "pq_codebook.layer.",
            Self::PqCounts => "pq_counts.layer.",
        }
    }

    /// The buffer's name for layer `layer`.
    pub fn name(self, layer: usize) -> String {
        format!("{}{layer}", self.prefix())
    }
}

/// Buffer prefixes of options that were removed from spt, with what they held.
pub const REMOVED_BUFFERS: [(&str, &str); 1] = [("ffn_skip_bias.layer.", "the routed FFN's skip biases")];

/// Parses a buffer name into its kind and layer, or names what is wrong with it.
pub fn parse_buffer_name(name: &str) -> Result<(BufferKind, usize)> {
    if let Some((_, what)) = REMOVED_BUFFERS.iter().find(|(p, _)| name.starts_with(p)) {
        return Err(bad_buffer(
            name,
            format!(
                "it holds {what}, an option that was removed from spt (its measurements are in \
                 docs/experiments/routed-ffn.md): this state cannot be restored by this version"
            ),
        ));
    }
    for kind in BufferKind::ALL {
        if let Some(rest) = name.strip_prefix(kind.prefix()) {
            let layer = rest.parse().map_err(|_| {
                bad_buffer(name, format!("expected {}N with N a layer number", kind.prefix()))
            })?;
            return Ok((kind, layer));
        }
    }
    let known: Vec<String> = BufferKind::ALL
        .iter()
        .map(|k| format!("{}N", k.prefix()))
        .collect();
    Err(bad_buffer(
        name,
        format!("not a buffer spt knows (expected one of {})", known.join(", ")),
    ))
}

fn bad_buffer(name: &str, reason: String) -> ModelError {
    ModelError::InvalidConfig {
        field: "buffer",
        value: format!("`{name}`"),
        reason,
    }
}

/// See [`SptModel::named_buffers`].
pub fn named_buffers<M: SptModel + ?Sized>(m: &mut M) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for i in 0..m.num_layers() {
        let Some(slots) = m.layer_slots(i) else {
            continue;
        };
        if let FeedForward::Routed(r) = slots.ffn {
            let order = r.unit_order();
            // The identity order is what a restored model has anyway.
            if order.iter().enumerate().any(|(j, &u)| u as usize != j) {
                let t = Tensor::new(order, &Device::Cpu)?;
                out.push((BufferKind::FfnUnitOrder.name(i), t));
            }
            if let Some(c) = r.correction() {
                out.push((BufferKind::FfnCorrection.name(i), c.to_device(&Device::Cpu)?));
            }
        }
        if let AttentionCore::Sparse(s) = slots.attention {
            out.push((
                BufferKind::PqCodebook.name(i),
                s.codebook.to_tensor(&Device::Cpu)?,
            ));
            // A resumed run's mini-batch refreshes step as the uninterrupted run's only with these.
            out.push((
                BufferKind::PqCounts.name(i),
                s.codebook.counts_tensor(&Device::Cpu)?,
            ));
        }
    }
    Ok(out)
}

/// See [`SptModel::load_buffers`].
pub fn load_buffers<M: SptModel + ?Sized>(
    m: &mut M,
    buffers: &[(String, Tensor)],
    attention: Option<(KeyTopK, KeyGrouping)>,
) -> Result<usize> {
    // Check the settings, every name, layer and unit-order tensor before touching the model.
    if let Some((top_k, grouping)) = attention {
        crate::attention::check_top_k(top_k)?;
        crate::attention::check_grouping(grouping)?;
    }
    let n_layers = m.num_layers();
    let mut parsed = Vec::with_capacity(buffers.len());
    for (name, t) in buffers {
        let (kind, layer) = parse_buffer_name(name)?;
        if layer >= n_layers {
            return Err(bad_buffer(name, format!("the model has {n_layers} layers")));
        }
        if kind == BufferKind::FfnUnitOrder && (t.dtype() != DType::U32 || t.rank() != 1) {
            return Err(bad_buffer(
                name,
                format!(
                    "is {:?} {:?}, expected a u32 vector (a unit order)",
                    t.dtype(),
                    t.dims()
                ),
            ));
        }
        if matches!(kind, BufferKind::PqCodebook | BufferKind::PqCounts) && attention.is_none() {
            return Err(bad_buffer(
                name,
                "a PQ codebook, but no sparse attention was asked for".into(),
            ));
        }
        let checked = check_fits_layer(m, kind, layer, name, t)?;
        parsed.push((kind, layer, name.as_str(), checked));
    }
    // Counts go into their layer's codebook here, so that they are checked against it before
    // anything is installed.
    let counts: Vec<(usize, &str, &Tensor)> = parsed
        .iter()
        .filter_map(|(_, layer, name, c)| match c {
            Checked::Counts(t) => Some((*layer, *name, *t)),
            _ => None,
        })
        .collect();
    for (layer, name, t) in counts {
        let codebook = parsed.iter_mut().find_map(|(_, l, _, c)| match c {
            Checked::Codebook(cb) if *l == layer => Some(cb),
            _ => None,
        });
        let Some(codebook) = codebook else {
            return Err(bad_buffer(
                name,
                format!(
                    "PQ counts without their codebook `{}` (they count its codewords)",
                    BufferKind::PqCodebook.name(layer)
                ),
            ));
        };
        codebook
            .set_counts(t)
            .map_err(|e| bad_buffer(name, e.to_string()))?;
    }
    parsed.sort_by_key(|(kind, layer, _, _)| (*kind, *layer));
    let n = parsed.len();
    for (_, layer, name, checked) in parsed {
        match (checked, attention) {
            (Checked::UnitOrder(order), _) => routed_ffn(m, layer, name)?.set_unit_order(&order)?,
            (Checked::Correction(t), _) => routed_ffn(m, layer, name)?.set_correction(t)?,
            (Checked::Codebook(codebook), Some((top_k, grouping))) => {
                let slots = m
                    .layer_slots(layer)
                    .ok_or_else(|| bad_buffer(name, "no such layer".into()))?;
                *slots.attention = AttentionCore::Sparse(SparseAttention {
                    codebook,
                    top_k,
                    grouping,
                });
            }
            // Refused in the first pass; counts went into their codebook above.
            (Checked::Codebook(_), None) | (Checked::Counts(_), _) => {}
        }
    }
    Ok(n)
}

/// A buffer that fits its layer, read into what that layer takes.
enum Checked<'a> {
    UnitOrder(Vec<u32>),
    Correction(&'a Tensor),
    Codebook(Codebook),
    Counts(&'a Tensor),
}

/// Whether buffer `name` (`kind` of layer `layer`) fits that layer: a unit order is a
/// permutation of its FFN's hidden units, a correction is `[d + 1, d]` and finite, a codebook
/// quantises its head width with one group or one per head (counts are checked against their
/// codebook by the caller). Checked for every buffer before any is applied.
fn check_fits_layer<'a, M: SptModel + ?Sized>(
    m: &mut M,
    kind: BufferKind,
    layer: usize,
    name: &str,
    t: &'a Tensor,
) -> Result<Checked<'a>> {
    Ok(match kind {
        BufferKind::FfnUnitOrder => {
            let n = routed_ffn(m, layer, name)?.unit_order().len();
            let order = t.to_vec1::<u32>()?;
            let mut seen = vec![false; n];
            for (pos, &u) in order.iter().enumerate() {
                let why = match seen.get_mut(u as usize) {
                    Some(s) if !*s => {
                        *s = true;
                        continue;
                    }
                    Some(_) => format!("unit {u} appears twice in the unit order (position {pos})"),
                    None => format!("unit_order: unit {u} at position {pos}: units are 0..{n}"),
                };
                return Err(bad_buffer(name, why));
            }
            if order.len() != n {
                return Err(bad_buffer(
                    name,
                    format!("the unit order has {} entries, expected d_ff = {n}", order.len()),
                ));
            }
            // Reordering moves the FFN's weights, which only frozen weights allow: refused
            // here, before any layer is reordered (it failed at that layer, after the earlier
            // ones had been).
            let ffn = routed_ffn(m, layer, name)?;
            let (w1, b1, w2, _) = ffn.ffn.weights();
            if order != ffn.unit_order() && [w1, b1, w2].iter().any(|w| w.track_op()) {
                return Err(bad_buffer(
                    name,
                    "this layer's FFN weights are trained (tracked): a unit order can only \
                     reorder frozen weights; load the buffers before making them trainable"
                        .into(),
                ));
            }
            Checked::UnitOrder(order)
        }
        BufferKind::FfnCorrection => {
            let ffn = routed_ffn(m, layer, name)?;
            let d = ffn.fc1.in_features();
            if t.dims() != [d + 1, d] {
                return Err(bad_buffer(
                    name,
                    format!("is {:?}, expected [{}, {d}] (d + 1 rows of d)", t.dims(), d + 1),
                ));
            }
            // Values too (a NaN would reach every token that skips a block), before any is set.
            ffn.check_correction(t)
                .map_err(|e| bad_buffer(name, e.to_string()))?;
            Checked::Correction(t)
        }
        BufferKind::PqCounts => Checked::Counts(t),
        BufferKind::PqCodebook => {
            let cb = Codebook::from_tensor(t).map_err(|e| bad_buffer(name, e.to_string()))?;
            let slots = m
                .layer_slots(layer)
                .ok_or_else(|| bad_buffer(name, "no such layer".into()))?;
            if cb.head_dim() != slots.head_dim || ![1, slots.heads].contains(&cb.groups()) {
                return Err(bad_buffer(
                    name,
                    format!(
                        "quantises {} groups of width {}; layer {layer} has {} heads of width {} \
                         (a codebook of another model?)",
                        cb.groups(),
                        cb.head_dim(),
                        slots.heads,
                        slots.head_dim
                    ),
                ));
            }
            Checked::Codebook(cb)
        }
    })
}

/// The routed FFN of layer `i`, or an error naming the buffer that expected one.
fn routed_ffn<'a, M: SptModel + ?Sized>(
    m: &'a mut M,
    i: usize,
    name: &str,
) -> Result<&'a mut NamedRoutedFfn> {
    match m.layer_slots(i) {
        Some(LayerSlots {
            ffn: FeedForward::Routed(r),
            ..
        }) => Ok(r),
        _ => Err(bad_buffer(name, format!("layer {i} has no routed FFN"))),
    }
}
