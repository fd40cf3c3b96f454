//! Token → block routing: top-k selection per token and the deterministic counting sort that
//! groups the routed (token, slot) pairs by block.

use candle_core::{bail, Device, Result, Tensor};

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
/// block `e` owns a contiguous range of rows and, inside it, every token chunk of
/// [`CHUNK_TOKENS`] tokens owns a contiguous sub-range (a *group*).
#[derive(Debug, Clone)]
pub struct Routing {
    n_tokens: usize,
    n_blocks: usize,
    k: usize,
    n_chunks: usize,
    /// `[T·k]`: block of (token t, slot j) at `t·k + j`, slots in descending score order.
    blocks: Vec<u32>,
    /// `[R]`: token of each routed row.
    row_token: Vec<u32>,
    /// `[R]`: the (token, slot) pair `t·k + j` of each routed row.
    row_src: Vec<u32>,
    /// `[n_blocks·n_chunks + 1]`: first routed row of group `e·n_chunks + c`.
    group_starts: Vec<usize>,
    /// Row maps for the composed path's row moves, built on first use.
    pub(crate) row_maps: super::rows::RowMaps,
}

impl Routing {
    /// Routing from explicit block choices: `blocks[t·k + j]` is token t's j-th block. A token
    /// may not pick a block twice.
    pub fn from_blocks(n_tokens: usize, n_blocks: usize, k: usize, blocks: Vec<u32>) -> Result<Self> {
        if n_blocks == 0 {
            bail!("routed_ffn: n_blocks must be at least 1");
        }
        if k == 0 || k > n_blocks {
            bail!("routed_ffn: top-k is {k}, expected 1 ≤ k ≤ n_blocks = {n_blocks}");
        }
        if blocks.len() != n_tokens * k {
            bail!(
                "routed_ffn: routing has {} block choices, expected T·k = {n_tokens}·{k}",
                blocks.len()
            );
        }
        if n_tokens.saturating_mul(n_blocks) > u32::MAX as usize {
            bail!("routed_ffn: {n_tokens} tokens × {n_blocks} blocks exceed the u32 index range");
        }
        for (t, sel) in blocks.chunks(k).enumerate() {
            for (j, &e) in sel.iter().enumerate() {
                if e as usize >= n_blocks {
                    bail!("routed_ffn: token {t} picks block {e}, expected < n_blocks = {n_blocks}");
                }
                if sel[..j].contains(&e) {
                    bail!("routed_ffn: token {t} picks block {e} twice");
                }
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
            blocks,
            row_token,
            row_src,
            group_starts,
            row_maps: Default::default(),
        })
    }

    /// Top-k routing from router scores `[T, n_blocks]` (row-major): each token keeps its `k`
    /// highest-scoring blocks, ties broken toward the lower block index; NaN ranks lowest.
    pub fn top_k(scores: &[f64], n_tokens: usize, n_blocks: usize, k: usize) -> Result<Self> {
        if scores.len() != n_tokens * n_blocks {
            bail!(
                "routed_ffn: {} router scores, expected T·n_blocks = {n_tokens}·{n_blocks}",
                scores.len()
            );
        }
        if k == 0 || k > n_blocks {
            bail!("routed_ffn: top-k is {k}, expected 1 ≤ k ≤ n_blocks = {n_blocks}");
        }
        let mut blocks = Vec::with_capacity(n_tokens * k);
        let mut order: Vec<u32> = Vec::with_capacity(n_blocks);
        let key = |v: f64| if v.is_nan() { f64::NEG_INFINITY } else { v };
        for row in scores.chunks(n_blocks.max(1)).take(n_tokens) {
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
            blocks.extend_from_slice(&order[..k]);
        }
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
        self.row_token.len()
    }

    /// `[T·k]`: token t's j-th block at `t·k + j`.
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// `[R]`: the token of each routed row.
    pub fn row_token(&self) -> &[u32] {
        &self.row_token
    }

    /// `[R]`: the (token, slot) index `t·k + j` of each routed row.
    pub fn row_src(&self) -> &[u32] {
        &self.row_src
    }

    /// Routed rows of block `e`.
    pub fn block_rows(&self, e: usize) -> std::ops::Range<usize> {
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

    /// The first token when the routed rows `rows` (of one block) are consecutive tokens, as
    /// when every token of a chunk runs the block (the dense `linear`, `forward_dense`): the
    /// kernels then read and write those token rows in place instead of gathering and
    /// scattering them. A block's tokens ascend strictly, so the ends decide.
    pub(crate) fn token_run(&self, rows: std::ops::Range<usize>) -> Option<usize> {
        if rows.is_empty() {
            return None;
        }
        let (t0, t1) = (self.row_token[rows.start], self.row_token[rows.end - 1]);
        ((t1 - t0) as usize == rows.len() - 1).then_some(t0 as usize)
    }

    /// Routed rows of group `g = e·n_chunks + c`.
    pub(crate) fn group_rows(&self, g: usize) -> std::ops::Range<usize> {
        self.group_starts[g]..self.group_starts[g + 1]
    }

    /// `row_src` as a u32 tensor, for gathering per-(token, slot) values into routed-row order.
    pub fn row_src_tensor(&self, device: &Device) -> Result<Tensor> {
        Tensor::from_slice(&self.row_src, self.row_src.len(), device)
    }

    /// `[T·k]` u32 indices `t·n_blocks + e` of the kept (token, block) pairs in slot order, for
    /// gathering from flattened `[T, n_blocks]` scores.
    pub fn kept_score_index(&self, device: &Device) -> Result<Tensor> {
        let idx: Vec<u32> = self
            .blocks
            .iter()
            .enumerate()
            .map(|(i, &e)| ((i / self.k) * self.n_blocks) as u32 + e)
            .collect();
        Tensor::from_vec(idx, self.blocks.len(), device)
    }
}
