//! Token → block routing: top-k selection per token and the deterministic counting sort that
//! groups the routed (token, slot) pairs by block. Built on the host, or on the GPU from scores
//! that live there ([`Routing::from_scores`]); both give the same routing, row for row.

use candle_core::{bail, DType, Device, Result, Tensor};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Tokens per chunk of the token-parallel kernels. A fixed constant (not the thread count), so
/// that every result is the same whatever the number of threads. A chunk's rows of one block are
/// one GEMM: 512 (from 256) made those GEMMs twice as tall and the ffn bench's 50 %-kept case
/// 0.126 -> 0.102 s at d384 and 0.369 -> 0.349 s at d768 (1024: 0.117 and 0.340 s).
pub(crate) const CHUNK_TOKENS: usize = 512;

/// How many FFN blocks each token keeps (routed FFN). Not [`KeyTopK`](crate::pq::KeyTopK), the
/// keys per query of sparse attention, whose fraction rounds up.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockTopK {
    /// Exactly this many blocks.
    Count(usize),
    /// This fraction of the blocks, rounded to the nearest count (`0.5` of 24 blocks is 12).
    Fraction(f64),
}

impl BlockTopK {
    /// The block count for `n_blocks` blocks, or a named error if it is 0 or above `n_blocks`.
    pub fn resolve(self, n_blocks: usize) -> Result<usize> {
        let k = match self {
            BlockTopK::Count(k) => k,
            BlockTopK::Fraction(f) => {
                if !(f > 0.0 && f <= 1.0) {
                    bail!("routed_ffn: top-k fraction must be in (0, 1], got {f}");
                }
                (f * n_blocks as f64).round() as usize
            }
        };
        if k == 0 || k > n_blocks {
            bail!("routed_ffn: top-k is {k} ({self:?}), expected 1 ≤ k ≤ n_blocks = {n_blocks}");
        }
        Ok(k)
    }
}

/// The routing of one forward pass: which blocks each token uses, and the routed rows grouped by
/// block.
///
/// A *routed row* is one (token, slot) pair; there are `R = T·k` of them. Rows are ordered by
/// block, then by token (a stable counting sort of the (token, slot) pairs in token order), so
/// block `e` owns a contiguous range of rows and, inside it, every chunk of 512 consecutive
/// tokens owns a contiguous sub-range (a *group*).
///
/// Where the index arrays live: a routing built on the host ([`from_blocks`](Self::from_blocks),
/// [`top_k`](Self::top_k)) has them in host memory. One built on a GPU
/// ([`from_scores`](Self::from_scores) with scores on CUDA) keeps them on the device; only the
/// per-group row counts come to the host (the GEMM launches need them), and the arrays are copied
/// to the host on the first call of an accessor that returns them as slices.
#[derive(Debug, Clone)]
pub struct Routing {
    n_tokens: usize,
    n_blocks: usize,
    k: usize,
    n_chunks: usize,
    /// `[n_blocks·n_chunks + 1]`: first routed row of group `e·n_chunks + c`.
    group_starts: Vec<usize>,
    /// The index arrays in host memory (set at construction, or copied from `device`).
    host: OnceLock<HostIndex>,
    /// The index arrays on a device, for a routing built there.
    device: Option<DeviceIndex>,
    /// Row maps for the composed path's row moves, built on first use.
    pub(crate) row_maps: super::rows::RowMaps,
}

#[derive(Debug, Clone)]
struct HostIndex {
    /// `[T·k]`: block of (token t, slot j) at `t·k + j`, slots in descending score order.
    blocks: Vec<u32>,
    /// `[R]`: token of each routed row.
    row_token: Vec<u32>,
    /// `[R]`: the (token, slot) pair `t·k + j` of each routed row.
    row_src: Vec<u32>,
}

/// A routing's index arrays as u32 tensors on its device: those of [`HostIndex`] and
/// `token_rows [T·k]`, the routed row of each (token, slot) pair (the inverse of `row_src`).
#[derive(Debug, Clone)]
pub(crate) struct DeviceIndex {
    pub(crate) blocks: Tensor,
    pub(crate) row_token: Tensor,
    pub(crate) row_src: Tensor,
    pub(crate) token_rows: Tensor,
}

impl Routing {
    /// Routing from explicit block choices: `blocks[t·k + j]` is token t's j-th block. A token
    /// may not pick a block twice.
    pub fn from_blocks(n_tokens: usize, n_blocks: usize, k: usize, blocks: Vec<u32>) -> Result<Self> {
        check_counts(n_blocks, k)?;
        if n_tokens.checked_mul(k) != Some(blocks.len()) {
            bail!(
                "routed_ffn: routing has {} block choices, expected T·k = {n_tokens}·{k}",
                blocks.len()
            );
        }
        if n_tokens.saturating_mul(n_blocks) > u32::MAX as usize {
            bail!("routed_ffn: {n_tokens} tokens × {n_blocks} blocks exceed the u32 index range");
        }
        // seen[e] = t + 1 once token t picked e: O(T·k), not O(T·k²).
        let mut seen = vec![0u32; n_blocks];
        for (t, sel) in blocks.chunks(k).enumerate() {
            for &e in sel {
                let Some(s) = seen.get_mut(e as usize) else {
                    bail!("routed_ffn: token {t} picks block {e}, expected < n_blocks = {n_blocks}");
                };
                if *s == t as u32 + 1 {
                    bail!("routed_ffn: token {t} picks block {e} twice");
                }
                *s = t as u32 + 1;
            }
        }
        let n_chunks = n_tokens.div_ceil(CHUNK_TOKENS);
        let n_groups = n_blocks * n_chunks;
        // Counting sort by group key e·n_chunks + chunk(t), stable in (t, j) order.
        let mut counts = vec![0usize; n_groups + 1];
        for (i, &e) in blocks.iter().enumerate() {
            let t = i / k;
            counts[e as usize * n_chunks + t / CHUNK_TOKENS + 1] += 1;
        }
        for g in 0..n_groups {
            counts[g + 1] += counts[g];
        }
        let group_starts = counts.clone();
        let mut next = counts;
        let r_total = n_tokens * k;
        let mut row_token = vec![0u32; r_total];
        let mut row_src = vec![0u32; r_total];
        for (i, &e) in blocks.iter().enumerate() {
            let t = i / k;
            let key = e as usize * n_chunks + t / CHUNK_TOKENS;
            let r = next[key];
            next[key] += 1;
            row_token[r] = t as u32;
            row_src[r] = i as u32;
        }
        Ok(Self {
            n_tokens,
            n_blocks,
            k,
            n_chunks,
            group_starts,
            host: OnceLock::from(HostIndex {
                blocks,
                row_token,
                row_src,
            }),
            device: None,
            row_maps: Default::default(),
        })
    }

    /// Top-k routing from router scores `[T, n_blocks]` (any float dtype, any device), by the
    /// rules of [`top_k`](Self::top_k). On CUDA (f32 or bf16 scores, up to 64 blocks) the
    /// selection, the counting sort and the row maps run on the device and only the per-group
    /// row counts come to the host; elsewhere the scores are copied to the host.
    pub fn from_scores(scores: &Tensor, k: usize) -> Result<Self> {
        let (t, n) = match scores.dims() {
            &[t, n] => (t, n),
            d => bail!("routed_ffn: router scores are {d:?}, expected [T, n_blocks]"),
        };
        #[cfg(feature = "cuda")]
        if scores.device().is_cuda() && matches!(scores.dtype(), DType::F32 | DType::BF16) && t > 0 {
            check_counts(n, k)?;
            if n <= super::cuda::MAX_DEVICE_BLOCKS {
                let (device, group_starts) = super::cuda::route(scores, k)?;
                return Ok(Self {
                    n_tokens: t,
                    n_blocks: n,
                    k,
                    n_chunks: t.div_ceil(CHUNK_TOKENS),
                    group_starts,
                    host: OnceLock::new(),
                    device: Some(device),
                    row_maps: Default::default(),
                });
            }
        }
        let host: Vec<f64> = scores.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        Self::top_k(&host, t, n, k)
    }

    /// Top-k routing from router scores `[T, n_blocks]` (row-major): each token keeps its `k`
    /// highest-scoring blocks, ties broken toward the lower block index; NaN ranks lowest.
    pub fn top_k(scores: &[f64], n_tokens: usize, n_blocks: usize, k: usize) -> Result<Self> {
        if n_tokens.checked_mul(n_blocks) != Some(scores.len()) {
            bail!(
                "routed_ffn: {} router scores, expected T·n_blocks = {n_tokens}·{n_blocks}",
                scores.len()
            );
        }
        check_counts(n_blocks, k)?;
        let mut blocks = vec![0u32; n_tokens * k];
        let key = |v: f64| if v.is_nan() { f64::NEG_INFINITY } else { v };
        // Tokens are independent: in parallel, each thread with its own scratch order.
        blocks
            .par_chunks_mut(k)
            .zip(scores.par_chunks(n_blocks))
            .for_each_init(Vec::new, |order: &mut Vec<u32>, (out, row)| {
                order.clear();
                order.extend(0..n_blocks as u32);
                let cmp = |a: &u32, b: &u32| {
                    key(row[*b as usize])
                        .total_cmp(&key(row[*a as usize]))
                        .then(a.cmp(b))
                };
                if k < n_blocks {
                    order.select_nth_unstable_by(k - 1, cmp);
                }
                order[..k].sort_by(cmp);
                out.copy_from_slice(&order[..k]);
            });
        Self::from_blocks(n_tokens, n_blocks, k, blocks)
    }

    /// Number of tokens T.
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    /// Number of blocks.
    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    /// Blocks kept per token.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Number of routed rows, `T·k`.
    pub fn n_rows(&self) -> usize {
        self.n_tokens * self.k
    }

    /// The host index arrays, copied from the device on first use for a routing built there.
    fn host(&self) -> Result<&HostIndex> {
        if let Some(h) = self.host.get() {
            return Ok(h);
        }
        let Some(d) = &self.device else {
            bail!("routed_ffn: routing has no index arrays"); // every constructor sets one
        };
        let h = HostIndex {
            blocks: d.blocks.to_vec1()?,
            row_token: d.row_token.to_vec1()?,
            row_src: d.row_src.to_vec1()?,
        };
        Ok(self.host.get_or_init(|| h))
    }

    /// The index arrays on the device, for a routing built there.
    pub(crate) fn device_index(&self) -> Option<&DeviceIndex> {
        self.device.as_ref()
    }

    /// The device the routing was built on: `None` for a host routing.
    pub fn device(&self) -> Option<&Device> {
        self.device.as_ref().map(|d| d.blocks.device())
    }

    /// `[T·k]`: token t's j-th block at `t·k + j` (copied from the device on first use).
    pub fn blocks(&self) -> Result<&[u32]> {
        Ok(&self.host()?.blocks)
    }

    /// `[R]`: the token of each routed row (copied from the device on first use).
    pub fn row_token(&self) -> Result<&[u32]> {
        Ok(&self.host()?.row_token)
    }

    /// `[R]`: the (token, slot) index `t·k + j` of each routed row (copied from the device on
    /// first use).
    pub fn row_src(&self) -> Result<&[u32]> {
        Ok(&self.host()?.row_src)
    }

    /// `[T, k]` u32 tensor of the kept blocks on `device`: the device's own array for a routing
    /// built there, else an upload.
    pub fn blocks_tensor(&self, device: &Device) -> Result<Tensor> {
        let shape = (self.n_tokens, self.k);
        match &self.device {
            Some(d) if d.blocks.device().same_device(device) => d.blocks.reshape(shape),
            _ => Tensor::from_slice(self.blocks()?, shape, device),
        }
    }

    /// Routed rows of block `e` (none for `e ≥ n_blocks`).
    pub fn block_rows(&self, e: usize) -> std::ops::Range<usize> {
        if e >= self.n_blocks {
            return 0..0;
        }
        self.group_starts[e * self.n_chunks]..self.group_starts[(e + 1) * self.n_chunks]
    }

    /// Tokens routed to each block.
    pub fn block_counts(&self) -> Vec<usize> {
        (0..self.n_blocks).map(|e| self.block_rows(e).len()).collect()
    }

    pub(crate) fn n_chunks(&self) -> usize {
        self.n_chunks
    }

    pub(crate) fn chunk_tokens(&self) -> usize {
        CHUNK_TOKENS
    }

    pub(crate) fn group_starts(&self) -> &[usize] {
        &self.group_starts
    }

    /// Routed rows of group `g = e·n_chunks + c`.
    pub(crate) fn group_rows(&self, g: usize) -> std::ops::Range<usize> {
        self.group_starts[g]..self.group_starts[g + 1]
    }
}

/// The most blocks a routing may have (2^20; FFNs have far fewer hidden units).
pub const MAX_BLOCKS: usize = 1 << 20;

/// At least one block and at most [`MAX_BLOCKS`], and 1 ≤ k ≤ n_blocks.
fn check_counts(n_blocks: usize, k: usize) -> Result<()> {
    if n_blocks == 0 {
        bail!("routed_ffn: n_blocks must be at least 1");
    }
    // Tables of n_blocks entries are made up front: an absurd count would abort on allocation.
    if n_blocks > MAX_BLOCKS {
        bail!(
            "routed_ffn: n_blocks = {n_blocks} exceeds {MAX_BLOCKS} (a block holds at least one of the FFN's hidden units)"
        );
    }
    if k == 0 || k > n_blocks {
        bail!("routed_ffn: top-k is {k}, expected 1 ≤ k ≤ n_blocks = {n_blocks}");
    }
    Ok(())
}

/// The first token when the routed rows `rows` (of one block) are consecutive tokens, as when
/// every token of a chunk runs the block (the dense `linear`, `forward_dense`): the kernels then
/// read and write those token rows in place instead of gathering and scattering them. A block's
/// tokens ascend strictly, so the ends decide. `row_token` is [`Routing::row_token`].
pub(crate) fn token_run(row_token: &[u32], rows: std::ops::Range<usize>) -> Option<usize> {
    if rows.is_empty() {
        return None;
    }
    let (t0, t1) = (row_token[rows.start], row_token[rows.end - 1]);
    ((t1 - t0) as usize == rows.len() - 1).then_some(t0 as usize)
}
