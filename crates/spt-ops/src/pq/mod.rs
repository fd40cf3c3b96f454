//! Product quantisation of attention keys and ADC top-k key selection.
//!
//! Each head vector (dimension `d`) is split into `S` subspaces of `d_codeword = d / S`. A
//! codebook holds `C ≤ 256` codewords per subspace, shape `[S, C, d_codeword]`, one per layer
//! (or `[H, S, C, d_codeword]` with one per head). Keys are encoded to `u8` codes; a query
//! scores every allowed key by asymmetric distance computation (ADC),
//! `score(q, k) = Σ_s ⟨q_s, c[s, code_s(k)]⟩` (on the CPU as one GEMM of the queries with the
//! keys rebuilt from their codes; on CUDA from per-query tables of `S·C` inner products), and
//! keeps an exact top-k. The block mode ([`Selection::Blocks`], see [`select_blocks`]) scores
//! key blocks per query tile from the same codes instead.
//!
//! Selection never records a gradient: the quantiser reads detached data. Gradients reach keys
//! only through [`Codebook::quantization_loss`] when asked for explicitly.

mod blocks;
#[cfg(feature = "cuda")]
mod cuda;
mod kmeans;
pub mod reference;
mod select;

use crate::attention::AttentionMask;
use candle_core::{bail, DType, Device, Result, Tensor};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use rayon::prelude::*;

pub use blocks::{pq_attention, select_blocks, BlockScore, BlockSelection, BlockTiling, Selection};
pub use select::select_keys;

/// Index value that pads a selection row with fewer than k allowed keys. Kernels skip it.
pub const SENTINEL: u32 = u32::MAX;

/// How a codebook is built.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PqConfig {
    /// Subspaces per head vector; must divide the head dimension.
    pub n_subspaces: usize,
    /// Codewords per subspace, 1..=256 (codes are u8).
    pub n_codewords: usize,
    /// One codebook per head instead of one shared by all heads of a layer.
    pub per_head: bool,
    /// Lloyd iterations after k-means++ seeding.
    pub kmeans_iters: usize,
    /// At most this many key vectors (per group) are sampled for fitting.
    pub max_samples: usize,
    pub seed: u64,
}

impl Default for PqConfig {
    fn default() -> Self {
        Self {
            n_subspaces: 8,
            n_codewords: 16,
            per_head: false,
            kmeans_iters: 20,
            max_samples: 8192,
            seed: 0,
        }
    }
}

/// How [`Codebook::refresh`] moves codewords toward fresh keys.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Refresh {
    /// `c ← decay·c + (1 − decay)·mean(assigned keys)`.
    Ema { decay: f32 },
    /// Mini-batch k-means: each codeword moves by `n_new / n_seen_total` toward the mean of its
    /// newly assigned keys. `n_seen_total` counts the keys each codeword was fitted on
    /// ([`Codebook::fit`]: its k-means cluster) and those of every earlier mini-batch refresh.
    /// A codebook from [`Codebook::from_tensor`] has no counts until
    /// [`Codebook::set_counts`] restores them (spt-models saves them beside the centroids);
    /// without them its first refresh moves each codeword that gets keys all the way to their
    /// mean, as a new mini-batch k-means would.
    MiniBatch,
}

/// How many keys each query keeps (sparse attention). Not [`BlockTopK`](crate::routed_ffn::BlockTopK),
/// the routed FFN's blocks per token: a fraction of the keys rounds up here (a query keeps at
/// least one key), a fraction of the blocks rounds to the nearest count there.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum KeyTopK {
    /// Exactly this many, `1 ≤ k ≤ L_k`: a larger count is an error, not clamped (the models'
    /// `SparseAttention` clamps to the sequence before it calls the op). Rows with fewer allowed
    /// keys (causal, padding) keep those.
    Count(usize),
    /// `ceil(fraction · L_k)`, at least 1.
    Fraction(f64),
}

impl KeyTopK {
    /// The count for `lk` keys, or a named error.
    pub fn resolve(self, lk: usize) -> Result<usize> {
        match self {
            KeyTopK::Count(0) => bail!("select_keys: k = 0, expected 1 ≤ k ≤ L = {lk}"),
            KeyTopK::Count(k) if k > lk => bail!("select_keys: k = {k} exceeds the number of keys L = {lk}"),
            KeyTopK::Count(k) => Ok(k),
            KeyTopK::Fraction(f) if !(f > 0.0 && f <= 1.0) => {
                bail!("select_keys: k fraction {f} must be in (0, 1]")
            }
            KeyTopK::Fraction(f) => Ok(((f * lk as f64).ceil() as usize).clamp(1, lk.max(1))),
        }
    }
}

/// The keys each query attends to.
#[derive(Debug, Clone)]
pub struct KeySelection {
    /// `u32 [B, H, L_q, k]`: per row, the selected key indices in increasing order, then
    /// [`SENTINEL`] padding. Never a duplicate.
    pub indices: Tensor,
    /// `u32 [B, H, L_q]`: how many entries of each row are real keys.
    pub counts: Tensor,
}

impl KeySelection {
    /// k, the row width.
    pub fn k(&self) -> usize {
        self.indices.dims().last().copied().unwrap_or(0)
    }

    /// Bytes this selection occupies (kept for backward).
    pub fn bytes(&self) -> usize {
        4 * (self.indices.elem_count() + self.counts.elem_count())
    }
}

/// A product-quantisation codebook `[G, S, C, d_codeword]`, `G` = 1 (shared) or H (per head).
#[derive(Debug, Clone)]
pub struct Codebook {
    centroids: Vec<f32>,
    groups: usize,
    n_subspaces: usize,
    n_codewords: usize,
    d_codeword: usize,
    /// Keys assigned to each codeword so far, `[G, S, C]` (mini-batch k-means step sizes):
    /// the fit's cluster sizes plus every mini-batch refresh.
    seen: Vec<f32>,
}

/// Index of the nearest of `dist.len()` codewords stored transposed (`t[j·C + c]`); ties go to the
/// lowest index, as [`kmeans::nearest`].
fn nearest_transposed(x: &[f32], t: &[f32], dist: &mut [f32]) -> usize {
    let nc = dist.len();
    dist.fill(0.0);
    for (j, &xj) in x.iter().enumerate() {
        for (a, &c) in dist.iter_mut().zip(&t[j * nc..(j + 1) * nc]) {
            let e = xj - c;
            *a += e * e;
        }
    }
    let mut best = (f32::INFINITY, 0usize);
    for (c, &v) in dist.iter().enumerate() {
        if v < best.0 {
            best = (v, c);
        }
    }
    best.1
}

fn host_keys(op: &str, keys: &Tensor) -> Result<(Vec<f32>, [usize; 4])> {
    let Ok((b, h, l, d)) = keys.dims4() else {
        bail!("{op}: keys are {:?}, expected [B, H, L, d]", keys.dims())
    };
    let v = keys
        .detach()
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok((v, [b, h, l, d]))
}

/// Refuses a non-finite value in `data`, naming where: centroids fitted to or refreshed from it
/// would be NaN, and a NaN centroid silently drops out of every nearest-codeword search.
fn finite(op: &str, what: &str, data: &[f32]) -> Result<()> {
    match data.iter().position(|x| !x.is_finite()) {
        Some(i) => bail!(
            "{op}: {what} hold a non-finite value ({} at flat index {i})",
            data[i]
        ),
        None => Ok(()),
    }
}

impl Codebook {
    /// Fits a codebook to key vectors `[B, H, L, d]` by k-means++ and Lloyd iterations on up to
    /// `cfg.max_samples` sampled keys per group. Deterministic under `cfg.seed`. Each codeword's
    /// count ([`Refresh::MiniBatch`]) starts at its cluster's size: the sampled keys nearest it.
    pub fn fit(keys: &Tensor, cfg: &PqConfig) -> Result<Self> {
        let (data, [b, h, l, d]) = host_keys("Codebook::fit", keys)?;
        let (s, c) = (cfg.n_subspaces, cfg.n_codewords);
        if s == 0 || d % s != 0 {
            bail!("Codebook::fit: n_subspaces = {s} must divide the head dimension d = {d}");
        }
        if c == 0 || c > 256 {
            bail!("Codebook::fit: n_codewords = {c}, expected 1..=256 (codes are u8)");
        }
        // Nothing to fit would give all-zero centroids, and every key the same code.
        if b * l == 0 || h == 0 || cfg.max_samples == 0 {
            bail!(
                "Codebook::fit: no keys to fit on (keys {:?}, max_samples {}); pass at least one key per head",
                keys.dims(),
                cfg.max_samples
            );
        }
        if d == 0 {
            bail!(
                "Codebook::fit: keys {:?} have head dimension 0; nothing to quantise",
                keys.dims()
            );
        }
        finite("Codebook::fit", "keys", &data)?;
        let dc = d / s;
        let groups = if cfg.per_head { h } else { 1 };
        let mut centroids = vec![0f32; groups * s * c * dc];
        let mut seen = vec![0f32; groups * s * c];
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        for g in 0..groups {
            // Rows (b, h, l) belonging to this group, sampled without replacement.
            let heads: Vec<usize> = if cfg.per_head { vec![g] } else { (0..h).collect() };
            let mut rows: Vec<usize> = (0..b)
                .flat_map(|bi| {
                    heads
                        .iter()
                        .flat_map(move |&hi| (0..l).map(move |li| (bi * h + hi) * l + li))
                })
                .collect();
            if rows.len() > cfg.max_samples {
                rows.partial_shuffle(&mut rng, cfg.max_samples);
                rows.truncate(cfg.max_samples);
            }
            for si in 0..s {
                let pts: Vec<f32> = rows
                    .iter()
                    .flat_map(|&r| &data[r * d + si * dc..r * d + (si + 1) * dc])
                    .copied()
                    .collect();
                let cen = kmeans::kmeans(&pts, dc, c, cfg.kmeans_iters, &mut rng);
                let off = ((g * s) + si) * c * dc;
                centroids[off..off + c * dc].copy_from_slice(&cen);
                // Without them the first mini-batch refresh would weigh its keys fully, as if
                // the fit had seen none.
                let sizes = kmeans::cluster_sizes(&pts, dc, &cen);
                let off = ((g * s) + si) * c;
                for (n, size) in seen[off..off + c].iter_mut().zip(sizes) {
                    *n = size as f32;
                }
            }
        }
        Ok(Self {
            centroids,
            groups,
            n_subspaces: s,
            n_codewords: c,
            d_codeword: dc,
            seen,
        })
    }

    /// A codebook from centroids `[S, C, d_codeword]` or `[H, S, C, d_codeword]`. Its
    /// mini-batch counts are 0 (see [`Refresh::MiniBatch`]); [`Codebook::set_counts`] restores
    /// saved ones.
    pub fn from_tensor(centroids: &Tensor) -> Result<Self> {
        let (groups, s, c, dc) = match *centroids.dims() {
            [s, c, dc] => (1, s, c, dc),
            [g, s, c, dc] => (g, s, c, dc),
            ref other => bail!(
                "Codebook: centroids are {other:?}, expected [S, C, d_codeword] or [H, S, C, d_codeword]"
            ),
        };
        if s == 0 || c == 0 || c > 256 || dc == 0 || groups == 0 {
            bail!(
                "Codebook: centroids are {:?}; need S, d_codeword, H ≥ 1 and 1 ≤ C ≤ 256",
                centroids.dims()
            );
        }
        let v = centroids.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        // A NaN centroid loses every distance comparison, so selection would run on the rest.
        finite("Codebook", "centroids", &v)?;
        Ok(Self {
            centroids: v,
            groups,
            n_subspaces: s,
            n_codewords: c,
            d_codeword: dc,
            seen: vec![0.0; groups * s * c],
        })
    }

    /// Centroids as a tensor `[G, S, C, d_codeword]` (for checkpoints).
    pub fn to_tensor(&self, dev: &Device) -> Result<Tensor> {
        Tensor::from_vec(
            self.centroids.clone(),
            (self.groups, self.n_subspaces, self.n_codewords, self.d_codeword),
            dev,
        )
    }

    /// The mini-batch k-means counts as a tensor `[G, S, C]` (f32): the keys each codeword has
    /// been fitted on and refreshed with (see [`Refresh::MiniBatch`]), for checkpoints.
    pub fn counts_tensor(&self, dev: &Device) -> Result<Tensor> {
        Tensor::from_vec(
            self.seen.clone(),
            (self.groups, self.n_subspaces, self.n_codewords),
            dev,
        )
    }

    /// Restores counts saved by [`Codebook::counts_tensor`]: `[G, S, C]` (this codebook's
    /// shape), finite and ≥ 0, so that a resumed run's mini-batch refreshes step as the
    /// uninterrupted run's do.
    pub fn set_counts(&mut self, counts: &Tensor) -> Result<()> {
        let want = [self.groups, self.n_subspaces, self.n_codewords];
        if counts.dims() != want {
            bail!(
                "Codebook::set_counts: counts are {:?}, expected [G, S, C] = {want:?} for this codebook",
                counts.dims()
            );
        }
        let v = counts.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        finite("Codebook::set_counts", "counts", &v)?;
        if let Some(i) = v.iter().position(|&n| n < 0.0) {
            bail!(
                "Codebook::set_counts: counts hold {} at flat index {i}; a count of keys is ≥ 0",
                v[i]
            );
        }
        self.seen = v;
        Ok(())
    }

    pub fn n_subspaces(&self) -> usize {
        self.n_subspaces
    }
    pub fn n_codewords(&self) -> usize {
        self.n_codewords
    }
    pub fn d_codeword(&self) -> usize {
        self.d_codeword
    }
    /// 1 for a shared codebook, H for per-head codebooks.
    pub fn groups(&self) -> usize {
        self.groups
    }
    /// Head dimension this codebook quantises.
    pub fn head_dim(&self) -> usize {
        self.n_subspaces * self.d_codeword
    }

    /// Codewords of group `g`, subspace `s`: `[C · d_codeword]`.
    pub(crate) fn sub(&self, g: usize, s: usize) -> &[f32] {
        let n = self.n_codewords * self.d_codeword;
        let off = (g * self.n_subspaces + s) * n;
        &self.centroids[off..off + n]
    }

    /// Checks a `[B, H, L, d]` tensor against this codebook.
    pub(crate) fn check(&self, op: &str, name: &str, t: &Tensor) -> Result<(usize, usize, usize, usize)> {
        let Ok((b, h, l, d)) = t.dims4() else {
            bail!("{op}: {name} is {:?}, expected [B, H, L, d]", t.dims())
        };
        if d != self.head_dim() {
            bail!(
                "{op}: {name} is {:?} with head dim {d}, but the codebook [{}, {}, {}, {}] quantises d = {}",
                t.dims(),
                self.groups,
                self.n_subspaces,
                self.n_codewords,
                self.d_codeword,
                self.head_dim()
            );
        }
        if self.groups != 1 && self.groups != h {
            bail!(
                "{op}: {name} has H = {h} heads but the codebook has {} per-head groups",
                self.groups
            );
        }
        Ok((b, h, l, d))
    }

    /// Group of head `h`.
    #[inline]
    pub(crate) fn group(&self, h: usize) -> usize {
        if self.groups == 1 {
            0
        } else {
            h
        }
    }

    /// Encodes keys `[B, H, L, d]` to `u8 [B, H, L, S]`: the nearest codeword (L2) per subspace.
    pub fn encode(&self, keys: &Tensor) -> Result<Tensor> {
        let (b, h, l, d) = self.check("Codebook::encode", "keys", keys)?;
        #[cfg(feature = "cuda")]
        if keys.device().is_cuda() {
            return cuda::encode(self, keys, (b, h, l, d));
        }
        let (data, _) = host_keys("Codebook::encode", keys)?;
        let (s, dc, nc) = (self.n_subspaces, self.d_codeword, self.n_codewords);
        // Codewords transposed per (group, subspace), [dc][C]: the distances to all C codewords
        // then accumulate side by side (C independent sums the compiler vectorises) instead of
        // one dependent chain per codeword. Same operations in the same order as `nearest`.
        let mut ct = vec![0f32; self.groups * s * dc * nc];
        for gs in 0..self.groups * s {
            let sub = self.sub(gs / s, gs % s);
            for c in 0..nc {
                for j in 0..dc {
                    ct[(gs * dc + j) * nc + c] = sub[c * dc + j];
                }
            }
        }
        let mut codes = vec![0u8; b * h * l * s];
        codes.par_chunks_mut(s.max(1) * 64).enumerate().for_each_init(
            || vec![0f32; nc],
            |dist, (blk, out)| {
                for (r, row) in out.chunks_mut(s).enumerate() {
                    let row_id = blk * 64 + r;
                    let g = self.group((row_id / l) % h);
                    let x = &data[row_id * d..(row_id + 1) * d];
                    for (si, code) in row.iter_mut().enumerate() {
                        let t = &ct[(g * s + si) * dc * nc..(g * s + si + 1) * dc * nc];
                        *code = nearest_transposed(&x[si * dc..(si + 1) * dc], t, dist) as u8;
                    }
                }
            },
        );
        Tensor::from_vec(codes, (b, h, l, s), keys.device())
    }

    /// Reconstructs vectors `[B, H, L, d]` (f32) from codes `u8 [B, H, L, S]`.
    pub fn decode(&self, codes: &Tensor) -> Result<Tensor> {
        let Ok((b, h, l, s)) = codes.dims4() else {
            bail!(
                "Codebook::decode: codes are {:?}, expected [B, H, L, S]",
                codes.dims()
            )
        };
        if s != self.n_subspaces || codes.dtype() != DType::U8 {
            bail!(
                "Codebook::decode: codes are {:?} {:?}, expected u8 with S = {}",
                codes.dims(),
                codes.dtype(),
                self.n_subspaces
            );
        }
        if self.groups != 1 && self.groups != h {
            bail!(
                "Codebook::decode: codes have H = {h} heads but the codebook has {} per-head groups",
                self.groups
            );
        }
        let c = codes.flatten_all()?.to_vec1::<u8>()?;
        let dc = self.d_codeword;
        let mut out = vec![0f32; b * h * l * s * dc];
        for (row, o) in out.chunks_mut(s * dc).enumerate() {
            let g = self.group((row / l) % h);
            for si in 0..s {
                let code = c[row * s + si] as usize;
                if code >= self.n_codewords {
                    bail!(
                        "Codebook::decode: code {code} at row {row}, subspace {si} exceeds C = {}",
                        self.n_codewords
                    );
                }
                o[si * dc..(si + 1) * dc].copy_from_slice(&self.sub(g, si)[code * dc..(code + 1) * dc]);
            }
        }
        Tensor::from_vec(out, (b, h, l, s * dc), codes.device())
    }

    /// Moves codewords toward fresh keys `[B, H, L, d]` (call it on the schedule you choose).
    pub fn refresh(&mut self, keys: &Tensor, rule: Refresh) -> Result<()> {
        let (b, h, l, d) = self.check("Codebook::refresh", "keys", keys)?;
        let (data, _) = host_keys("Codebook::refresh", keys)?;
        finite("Codebook::refresh", "keys", &data)?;
        let (s, c, dc) = (self.n_subspaces, self.n_codewords, self.d_codeword);
        if let Refresh::Ema { decay } = rule {
            if !(0.0..=1.0).contains(&decay) {
                bail!("Codebook::refresh: EMA decay {decay} must be in [0, 1]");
            }
        }
        let mut sums = vec![0f64; self.centroids.len()];
        let mut counts = vec![0f32; self.seen.len()];
        for row in 0..b * h * l {
            let g = self.group((row / l) % h);
            for si in 0..s {
                let x = &data[row * d + si * dc..row * d + (si + 1) * dc];
                let code = kmeans::nearest(x, self.sub(g, si), dc);
                let slot = (g * s + si) * c + code;
                counts[slot] += 1.0;
                for (t, &v) in x.iter().enumerate() {
                    sums[slot * dc + t] += v as f64;
                }
            }
        }
        for (slot, &n) in counts.iter().enumerate() {
            if n == 0.0 {
                continue;
            }
            let rate = match rule {
                Refresh::Ema { decay } => 1.0 - decay,
                Refresh::MiniBatch => {
                    self.seen[slot] += n;
                    n / self.seen[slot]
                }
            };
            for t in 0..dc {
                let mean = (sums[slot * dc + t] / n as f64) as f32;
                let cw = &mut self.centroids[slot * dc + t];
                *cw += rate * (mean - *cw);
            }
        }
        Ok(())
    }

    /// Mean squared distance between keys and their quantised reconstruction. The gradient
    /// reaches `keys` only if `grad_to_keys` is set; codebooks learn by [`Codebook::refresh`].
    pub fn quantization_loss(&self, keys: &Tensor, grad_to_keys: bool) -> Result<Tensor> {
        if keys.elem_count() == 0 {
            bail!(
                "Codebook::quantization_loss: keys {:?} hold no key to average over",
                keys.dims()
            );
        }
        let recon = self.decode(&self.encode(keys)?)?.to_dtype(keys.dtype())?;
        let k = if grad_to_keys { keys.clone() } else { keys.detach() };
        k.sub(&recon)?.sqr()?.mean_all()
    }
}

/// Encodes keys, selects the top-k keys per query by ADC, and runs sparse attention: the whole
/// SPT attention step for contiguous `[B, H, L, d]` inputs (f32 or f64 on the CPU; bf16 too on
/// CUDA). The selection is not differentiated.
/// [`pq_attention`] does the same for either [`Selection`] mode.
pub fn pq_sparse_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    codebook: &Codebook,
    topk: KeyTopK,
    mask: &AttentionMask,
    scale: f64,
) -> Result<Tensor> {
    let codes = codebook.encode(k)?;
    let sel = select_keys(q, &codes, codebook, topk, mask)?;
    crate::sparse_attention::sparse_attention(q, k, v, &sel, scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The transposed-codebook encode picks exactly the codeword `kmeans::nearest` picks, ties
    /// (a duplicated codeword, keys equal to codewords) included.
    #[test]
    fn encode_matches_nearest_per_subspace() {
        let keys = crate::gradcheck::randn_f64(&[2, 3, 70, 16], 5)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let cfg = PqConfig {
            n_subspaces: 4,
            n_codewords: 8,
            ..Default::default()
        };
        let mut book = Codebook::fit(&keys, &cfg).unwrap();
        // Codeword 5 duplicates codeword 2 in every subspace: ties must go to 2.
        let n = book.n_codewords * book.d_codeword;
        for gs in 0..book.groups * book.n_subspaces {
            let dc = book.d_codeword;
            let (src, dst) = (gs * n + 2 * dc, gs * n + 5 * dc);
            book.centroids.copy_within(src..src + dc, dst);
        }
        // Some keys sit exactly on codewords.
        let (mut data, _) = host_keys("test", &keys).unwrap();
        for r in 0..10 {
            let g = book.group((r / 70) % 3);
            data[r * 16..r * 16 + 4].copy_from_slice(&book.sub(g, 0)[8..12]);
        }
        let keys = Tensor::from_vec(data.clone(), (2, 3, 70, 16), &candle_core::Device::Cpu).unwrap();
        let codes = book
            .encode(&keys)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap();
        for (r, x) in data.chunks(16).enumerate() {
            let g = book.group((r / 70) % 3);
            for si in 0..4 {
                let want = kmeans::nearest(&x[si * 4..(si + 1) * 4], book.sub(g, si), 4);
                assert_eq!(codes[r * 4 + si] as usize, want, "row {r}, subspace {si}");
                assert_ne!(want, 5, "the duplicate never wins a tie");
            }
        }
    }
}
