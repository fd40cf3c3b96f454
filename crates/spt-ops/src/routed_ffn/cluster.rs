//! Which hidden units form a block. The method splits d_ff into contiguous blocks, but a
//! pretrained FFN's unit order is arbitrary, so contiguous blocks mix units that fire on
//! different tokens and no top-k choice captures much of a token's activation. Grouping units
//! that fire together (balanced k-means on their activation profiles over sample tokens, as in
//! MoEfication) concentrates each token's activation in fewer blocks. Reordering hidden units is
//! exact for the dense FFN: W1's rows, b1 and W2's columns move together.

use super::RoutedFfn;
use candle_core::{bail, Result, Tensor, D};

/// How [`RoutedFfn::cluster_units`] groups the units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UnitClusterConfig {
    /// Balanced k-means rounds (it stops early once no unit moves).
    pub iterations: usize,
    /// At most this many sample tokens describe a unit (the first ones).
    pub max_tokens: usize,
}

impl Default for UnitClusterConfig {
    fn default() -> Self {
        Self {
            iterations: 25,
            max_tokens: 4096,
        }
    }
}

/// `t.index_select(idx, dim)` for a matrix, keeping a transposed view transposed: the GEMMs
/// read the weights in their stored layout (GPT-2's Conv1D weights are views of `[in, out]`).
fn select_keeping_layout(t: &Tensor, idx: &Tensor, dim: usize) -> Result<Tensor> {
    if !t.is_contiguous() && t.t()?.is_contiguous() {
        t.t()?.index_select(idx, 1 - dim)?.t()
    } else {
        t.contiguous()?.index_select(idx, dim)
    }
}

/// Checks that `order` is a permutation of `0..n`.
pub(crate) fn check_permutation(what: &str, order: &[u32], n: usize) -> Result<()> {
    if order.len() != n {
        bail!(
            "{what}: the unit order has {} entries, expected d_ff = {n}",
            order.len()
        );
    }
    let mut seen = vec![false; n];
    for (pos, &u) in order.iter().enumerate() {
        match seen.get_mut(u as usize) {
            Some(s) if !*s => *s = true,
            Some(_) => bail!("{what}: unit {u} appears twice in the unit order (position {pos})"),
            None => bail!("{what}: unit {u} at position {pos} is out of range 0..{n}"),
        }
    }
    Ok(())
}

/// Assigns each of `m` items to one of `n` clusters of exactly `cap` items (`m = n·cap`),
/// greedily by descending similarity `sim [m, n]` (row-major). Deterministic: ties go to the
/// lower item, then the lower cluster.
fn balanced_assign(sim: &[f64], m: usize, n: usize, cap: usize) -> Vec<usize> {
    let mut pairs: Vec<(usize, usize)> = (0..m).flat_map(|i| (0..n).map(move |c| (i, c))).collect();
    pairs.sort_by(|&(i, c), &(j, e)| {
        sim[j * n + e]
            .total_cmp(&sim[i * n + c])
            .then((i, c).cmp(&(j, e)))
    });
    let mut assign = vec![usize::MAX; m];
    let mut fill = vec![0usize; n];
    for (i, c) in pairs {
        if assign[i] == usize::MAX && fill[c] < cap {
            assign[i] = c;
            fill[c] += 1;
        }
    }
    assign
}

/// `[m, s]` row-normalised profiles → a balanced partition into `n` groups (cluster per row).
/// Seeds: the rows at evenly spaced ranks of the profiles' total activation, so the run is
/// deterministic and starts from distinct units.
fn balanced_kmeans(profiles: &Tensor, n: usize, iterations: usize) -> Result<Vec<usize>> {
    let m = profiles.dim(0)?;
    let cap = m / n;
    let totals: Vec<f64> = profiles.sum(D::Minus1)?.to_vec1()?;
    let mut by_total: Vec<usize> = (0..m).collect();
    by_total.sort_by(|&a, &b| totals[b].total_cmp(&totals[a]).then(a.cmp(&b)));
    let seeds: Vec<u32> = (0..n).map(|c| by_total[c * cap + cap / 2] as u32).collect();
    let mut centroids = profiles.index_select(&Tensor::new(seeds, profiles.device())?, 0)?;
    let mut assign = vec![usize::MAX; m];
    for _ in 0..iterations.max(1) {
        let sim: Vec<f64> = profiles.matmul(&centroids.t()?)?.flatten_all()?.to_vec1()?;
        let next = balanced_assign(&sim, m, n, cap);
        if next == assign {
            break;
        }
        assign = next;
        // Centroid = normalised mean profile of the members (cosine k-means).
        let onehot: Vec<f64> = (0..n)
            .flat_map(|c| assign.iter().map(move |&a| f64::from(u8::from(a == c))))
            .collect();
        let onehot = Tensor::from_vec(onehot, (n, m), profiles.device())?;
        let sums = onehot.matmul(profiles)?;
        let norms = (sums.sqr()?.sum_keepdim(1)?.sqrt()? + 1e-300)?;
        centroids = sums.broadcast_div(&norms)?;
    }
    Ok(assign)
}

impl RoutedFfn {
    /// A unit order (position → original hidden unit) that puts units firing on the same
    /// sample tokens `[.., d]` in the same block; apply it with
    /// [`permute_units`](Self::permute_units). Blocks are listed by their lowest unit, and units
    /// ascend within a block, so the result does not depend on the clusters' labels.
    pub fn cluster_units(&self, sample: &Tensor, cfg: UnitClusterConfig) -> Result<Vec<u32>> {
        let (_, t) = self.check_input(sample)?;
        if t == 0 {
            bail!("routed_ffn: clustering the hidden units needs at least one sample token");
        }
        let (n, d_ff) = (self.cfg.n_blocks, self.d_ff());
        // One NaN token would make every unit's profile NaN and the order arbitrary.
        let x = self
            .sample_tokens(sample)?
            .narrow(0, 0, t.min(cfg.max_tokens.max(1)))?;
        let h = self.hidden_f64(&x)?;
        // A unit's profile: |activation| over the tokens, unit length (cosine similarity).
        let a = h.abs()?.t()?.contiguous()?; // [d_ff, S]
        let norms = (a.sqr()?.sum_keepdim(1)?.sqrt()? + 1e-300)?;
        let profiles = a.broadcast_div(&norms)?;
        let assign = balanced_kmeans(&profiles, n, cfg.iterations)?;
        let mut groups: Vec<Vec<u32>> = vec![Vec::new(); n];
        for (u, &c) in assign.iter().enumerate() {
            groups[c].push(u as u32);
        }
        groups.sort_by_key(|g| g.first().copied());
        let order: Vec<u32> = groups.concat();
        check_permutation("routed_ffn", &order, d_ff)?;
        Ok(order)
    }

    /// Reorders the hidden units: new unit `j` is old unit `perm[j]` in W1's rows, b1, W2's
    /// columns and LoRA's B1 rows / A2 columns. The dense function is unchanged; the blocks
    /// (and so the routed output) now hold other units. The FFN weights must be frozen (plain
    /// tensors): a trained weight (a `Var`, or a view of one) would lose its `Var` identity. LoRA
    /// factors move in place;
    /// the linear correction is reset to 0 (it belongs to the old blocks).
    pub fn permute_units(&mut self, perm: &[u32]) -> Result<()> {
        let d_ff = self.d_ff();
        check_permutation("routed_ffn", perm, d_ff)?;
        if self.w1.track_op() || self.b1.track_op() || self.w2.track_op() {
            bail!("routed_ffn: permute_units needs frozen FFN weights (W1, b1, W2 are trained here)");
        }
        let idx = Tensor::new(perm, self.w1.device())?;
        self.frozen_operands = Default::default();
        self.w1 = select_keeping_layout(&self.w1, &idx, 0)?;
        self.b1 = self.b1.contiguous()?.index_select(&idx, 0)?;
        self.w2 = select_keeping_layout(&self.w2, &idx, 1)?;
        if let Some(l) = &self.lora {
            l.b1.set(&l.b1.as_tensor().index_select(&idx, 0)?)?;
            l.a2.set(&l.a2.as_tensor().index_select(&idx, 1)?.contiguous()?)?;
        }
        // The correction describes the old blocks; refit it (init_router) after regrouping.
        if let Some(c) = &mut self.correction {
            *c = c.zeros_like()?;
        }
        Ok(())
    }
}
