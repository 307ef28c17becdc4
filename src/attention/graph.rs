//! The Graph-KV mask builder: segments and target → source edges become a [`BlockMask`]
//! with token-exact masks on the blocks that are only partly visible.

use std::ops::Range;

use super::{BlockMask, MaskHeads, NO_TOKEN_MASK};
use crate::error::{to_u32, Error, Result};

/// One sequence of a Graph-KV prefill (queries and keys are the same `seq_len` tokens).
///
/// Query token `i` in segment `t` sees key token `j` iff `j` lies in a source segment `s` of
/// an edge `t → s`, or `j` lies in `t` itself with `j ≤ i` (causal self-attention).
/// Tokens outside every segment see nothing (their rows give 0 and `lse = -inf`) and are seen
/// by nobody. The edges need not point backwards; when they all do, the mask is a subset of
/// the causal one and running with `causal = true` changes nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GraphKv {
    /// Tokens in the sequence (`Tq = Tk`).
    pub seq_len: usize,
    /// Token ranges, non-empty, inside `0..seq_len`, pairwise disjoint (any order).
    pub segments: Vec<Range<usize>>,
    /// `(target, source)` segment indices; duplicates are merged, self-edges are errors
    /// (self-attention is implicit and causal).
    pub edges: Vec<(usize, usize)>,
}

/// Most tokens of one graph (the kernels index tokens in `i32`).
pub const MAX_SEQ_LEN: usize = i32::MAX as usize;

impl GraphKv {
    fn validate(&self) -> Result<()> {
        if self.seq_len > MAX_SEQ_LEN {
            return Err(Error::too_large("seq_len", format!("{} tokens; at most {MAX_SEQ_LEN}", self.seq_len)));
        }
        let mut order: Vec<usize> = (0..self.segments.len()).collect();
        order.sort_by_key(|&s| self.segments[s].start);
        for (x, &s) in order.iter().enumerate() {
            let r = &self.segments[s];
            if r.start >= r.end || r.end > self.seq_len {
                return Err(Error::invalid(
                    "segments",
                    format!("segment {s} = {r:?} is empty or outside 0..{}", self.seq_len),
                ));
            }
            if x > 0 {
                let p = order[x - 1];
                if self.segments[p].end > r.start {
                    return Err(Error::invalid(
                        "segments",
                        format!("segments {p} = {:?} and {s} = {r:?} overlap", self.segments[p]),
                    ));
                }
            }
        }
        for (e, &(t, s)) in self.edges.iter().enumerate() {
            if t >= self.segments.len() || s >= self.segments.len() {
                return Err(Error::invalid(
                    "edges",
                    format!("edge {e} = ({t}, {s}) names a segment past {}", self.segments.len()),
                ));
            }
            if t == s {
                return Err(Error::invalid(
                    "edges",
                    format!("edge {e} = ({t}, {s}) is a self-edge; a segment always sees itself causally"),
                ));
            }
        }
        Ok(())
    }

    /// The segment of each token (`None` outside every segment). The graph must be valid.
    ///
    /// # Errors
    /// [`Error::TooLarge`] naming `seq_len` when the table cannot be allocated.
    fn segment_of(&self) -> Result<Vec<Option<usize>>> {
        let mut seg = try_filled(self.seq_len, None, "seq_len")?;
        for (s, r) in self.segments.iter().enumerate() {
            for x in &mut seg[r.clone()] {
                *x = Some(s);
            }
        }
        Ok(seg)
    }

    /// Sorted, disjoint key ranges of each target segment's sources.
    fn source_ranges(&self) -> Vec<Vec<Range<usize>>> {
        let mut src: Vec<Vec<Range<usize>>> = vec![Vec::new(); self.segments.len()];
        for &(t, s) in &self.edges {
            src[t].push(self.segments[s].clone());
        }
        for list in &mut src {
            list.sort_by_key(|r| r.start);
            list.dedup();
        }
        src
    }

    /// The definition, token by token: whether query `i` sees key `j` (both `< seq_len`).
    ///
    /// # Errors
    /// The validation errors of [`graph_kv_mask`]; [`Error::TooLarge`] naming `seq_len` when
    /// the `seq_len²` table cannot be allocated.
    pub fn visible_pairs(&self) -> Result<Vec<bool>> {
        self.validate()?;
        let n = self.seq_len;
        let pairs = crate::error::checked_mul("seq_len", n, n)?;
        let mut out = try_filled(pairs, false, "seq_len")?;
        let seg = self.segment_of()?;
        let src = self.source_ranges();
        for i in 0..n {
            let Some(t) = seg[i] else { continue };
            for r in &src[t] {
                for j in r.clone() {
                    out[i * n + j] = true;
                }
            }
            for j in self.segments[t].start..=i {
                out[i * n + j] = true;
            }
        }
        Ok(out)
    }
}

/// `n` copies of `x`, or [`Error::TooLarge`] naming `arg` when they cannot be allocated.
fn try_filled<T: Clone>(n: usize, x: T, arg: &'static str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Error::too_large(arg, format!("a table of {n} entries")))?;
    v.resize(n, x);
    Ok(v)
}

/// `cu_seqlens` (for both queries and keys) of a batch of graphs.
///
/// # Errors
/// [`Error::TooLarge`] naming `graphs` when the total exceeds `u32`.
pub fn graph_cu_seqlens(graphs: &[GraphKv]) -> Result<Vec<u32>> {
    let mut cu = vec![0u32];
    let mut total = 0usize;
    for g in graphs {
        total = total.checked_add(g.seq_len).ok_or_else(|| Error::too_large("graphs", "token count overflows"))?;
        cu.push(to_u32("graphs", total)?);
    }
    Ok(cu)
}

/// Builds the block mask of a batch of Graph-KV sequences (one BSR per sequence, shared by all
/// heads), with `BR = block_rows`, `BC = block_cols`.
///
/// A block is listed when any of its pairs is visible. A listed block gets a token mask unless
/// every pair of it inside the sequence (`i, j < seq_len`) is visible, so the mask is exact at
/// token granularity. Use it with `cu_seqlens_q = cu_seqlens_k = `[`graph_cu_seqlens`]`(graphs)`
/// and `causal = false` (or `true` when every edge points backwards).
///
/// # Errors
/// [`Error::InvalidArgument`] naming `block_rows` / `block_cols` (not 64 or 128),
/// `segments` (empty, out of range, overlapping) or `edges` (unknown segment, self-edge);
/// [`Error::TooLarge`] naming `seq_len` above [`MAX_SEQ_LEN`] or `graphs` when the batch
/// overflows `u32` tokens.
pub fn graph_kv_mask(graphs: &[GraphKv], block_rows: usize, block_cols: usize) -> Result<BlockMask> {
    super::check_block_sizes(block_rows, block_cols)?;
    let (br, bc) = (block_rows, block_cols);
    let words_per_row = bc / 32;
    let mut indptr = Vec::new();
    let mut indices = Vec::new();
    let mut ids = Vec::new();
    let mut token_masks: Vec<u32> = Vec::new();
    let mut intervals: Vec<Range<usize>> = Vec::new();
    for g in graphs {
        g.validate()?;
        let n = g.seq_len;
        let seg = g.segment_of()?;
        let src = g.source_ranges();
        let n_cb = n.div_ceil(bc);
        let mut count = vec![0usize; n_cb];
        // The visible key ranges of query i, sorted and disjoint (sources and the causal
        // prefix of its own segment never overlap: segments are disjoint).
        let row_intervals = |i: usize, out: &mut Vec<Range<usize>>| {
            out.clear();
            if let Some(t) = seg[i] {
                out.extend(src[t].iter().cloned());
                out.push(g.segments[t].start..i + 1);
            }
        };
        indptr.push(to_u32("graphs", indices.len())?);
        for rb in 0..n.div_ceil(br) {
            let rows = rb * br..((rb + 1) * br).min(n);
            count.iter_mut().for_each(|c| *c = 0);
            for i in rows.clone() {
                row_intervals(i, &mut intervals);
                for r in &intervals {
                    let first = r.start / bc;
                    for (cb, n) in count.iter_mut().enumerate().take((r.end - 1) / bc + 1).skip(first) {
                        *n += r.end.min((cb + 1) * bc) - r.start.max(cb * bc);
                    }
                }
            }
            for (cb, &c) in count.iter().enumerate() {
                if c == 0 {
                    continue;
                }
                indices.push(to_u32("graphs", cb)?);
                let cols = ((cb + 1) * bc).min(n) - cb * bc;
                if c == rows.len() * cols {
                    ids.push(NO_TOKEN_MASK);
                    continue;
                }
                ids.push(to_u32("graphs", token_masks.len() / (br * words_per_row))?);
                let base = token_masks.len();
                token_masks.resize(base + br * words_per_row, 0);
                for i in rows.clone() {
                    row_intervals(i, &mut intervals);
                    let row_words = &mut token_masks[base + (i - rows.start) * words_per_row..][..words_per_row];
                    for r in &intervals {
                        let lo = r.start.max(cb * bc);
                        let hi = r.end.min((cb + 1) * bc);
                        for j in lo..hi.max(lo) {
                            let c = j - cb * bc;
                            row_words[c / 32] |= 1 << (c % 32);
                        }
                    }
                }
            }
            indptr.push(to_u32("graphs", indices.len())?);
        }
    }
    let any_token_mask = ids.iter().any(|&x| x != NO_TOKEN_MASK);
    Ok(BlockMask {
        block_rows: br,
        block_cols: bc,
        heads: MaskHeads::Shared,
        indptr,
        indices,
        token_mask_ids: if any_token_mask { ids } else { Vec::new() },
        token_masks,
    })
}
