//! CPU references of the k-means and the cluster retrieval: the same f32 operations in the
//! same order as the kernels (see the [module docs](super)), so labels, members, centroids
//! and token lists are compared with `==`. Written for clarity, not speed. Every function
//! validates its arguments as the GPU plans do and never panics.

use super::{
    tf32_score_bound, validate_append, Combine, KmeansBuffers, KmeansOptions, KmeansShape, Metric, RetrieveOptions,
    RetrieveShape,
};
use crate::error::{check_shape, Error, Result};
use crate::tensor::{checked_numel, Float};

/// The label of a token that belongs to no cluster (not clustered yet).
pub const NO_LABEL: u32 = u32::MAX;

/// A k-means state on the host, laid out as [`super::ClusterState`] on the device.
pub type KmeansResult = KmeansBuffers<Vec<f32>, Vec<u32>>;

impl KmeansResult {
    /// The members of cluster `c` of head `h` (empty when out of range).
    pub fn members_of(&self, shape: &KmeansShape, h: usize, c: usize) -> &[u32] {
        let ip = h * (shape.clusters + 1) + c;
        match (self.indptr.get(ip), self.indptr.get(ip + 1)) {
            (Some(&s), Some(&e)) => {
                let row = h * shape.capacity;
                self.members.get(row + s as usize..row + e as usize).unwrap_or(&[])
            }
            _ => &[],
        }
    }
}

/// `a·b` as one fma chain over the elements in order, from `+0`.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0f32, |acc, (&x, &y)| x.mul_add(y, acc))
}

/// `1 / sqrt(Σ x_d²)` (the sum an fma chain), 0 for a zero (or infinite-norm) vector.
pub fn inv_norm(x: &[f32]) -> f32 {
    let ss = dot(x, x);
    if ss > 0.0 {
        1.0 / ss.sqrt()
    } else {
        0.0
    }
}

/// The first key of centroid `c` of head `h` in the seeded sample (module docs).
pub fn init_token(seed: u64, h: usize, c: usize, tokens: usize, clusters: usize) -> usize {
    let n = tokens as u64;
    let mut z = seed ^ 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(h as u64 + 1);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let offset = z % n;
    ((offset + (c as u64).wrapping_mul(n) / clusters as u64) % n) as usize
}

/// One head's centroids and their squared norms (L2 only).
struct Head {
    centroids: Vec<f32>,
    cnorm: Vec<f32>,
}

impl Head {
    /// Sets centroid `c` from an f32 row: normalized for cosine, `|c|²` for L2.
    fn store(&mut self, metric: Metric, c: usize, row: &[f32]) {
        let d = row.len();
        let out = &mut self.centroids[c * d..(c + 1) * d];
        match metric {
            Metric::Cosine => {
                let inv = inv_norm(row);
                for (o, &x) in out.iter_mut().zip(row) {
                    *o = x * inv;
                }
            }
            Metric::L2 => {
                out.copy_from_slice(row);
                self.cnorm[c] = dot(row, row);
            }
        }
    }

    /// The label of key `x`: the best score, ties to the lower index, NaN never winning.
    fn assign(&self, metric: Metric, x: &[f32]) -> u32 {
        let d = x.len();
        let mut best = (f32::NEG_INFINITY, NO_LABEL);
        for (c, cent) in self.centroids.chunks_exact(d).enumerate() {
            let dt = dot(x, cent);
            let s = match metric {
                Metric::Cosine => dt,
                Metric::L2 => -((-2.0f32).mul_add(dt, self.cnorm[c])),
            } + 0.0;
            let c = c as u32;
            if s > best.0 || (s == best.0 && c < best.1) {
                best = (s, c);
            }
        }
        if best.1 == NO_LABEL {
            0
        } else {
            best.1
        }
    }
}

/// Whether `got` is an admissible [`super::AssignPrecision::Tf32`] label of key `x` (`D`
/// values, widened to f32) among `centroids [C, D]` (f32, as the GPU holds them): `got` is
/// the f32 label of [`kmeans`]'s assignment, or it is below `C`, no lower-index centroid
/// equals it bit for bit, both scores are finite, and the f32 scores satisfy
/// `s(f32 label) − s(got) ≤ b(f32 label) + b(got)` with `b` = [`tf32_score_bound`] of the key's
/// and the centroid's norms; or `got` is 0 and no f32 score is above `−∞`. `false` for an
/// empty or misshapen `centroids`.
pub fn tf32_label_admissible(metric: Metric, x: &[f32], centroids: &[f32], got: u32) -> bool {
    let d = x.len();
    if d == 0 || centroids.is_empty() || centroids.len() % d != 0 {
        return false;
    }
    let mut head = Head { centroids: centroids.to_vec(), cnorm: vec![0.0; centroids.len() / d] };
    for (c, cent) in centroids.chunks_exact(d).enumerate() {
        head.cnorm[c] = dot(cent, cent);
    }
    let want = head.assign(metric, x);
    if got == want {
        return true;
    }
    let score = |c: &[f32], cn: f32| {
        let dt = dot(x, c);
        match metric {
            Metric::Cosine => dt,
            Metric::L2 => -((-2.0f32).mul_add(dt, cn)),
        }
    };
    // No score above -inf (every score NaN or -inf): the TF32 kernel's cluster 0.
    let none_above_neg_inf = centroids
        .chunks_exact(d)
        .zip(&head.cnorm)
        .all(|(c, &cn)| score(c, cn).partial_cmp(&f32::NEG_INFINITY) != Some(std::cmp::Ordering::Greater));
    if got == 0 && none_above_neg_inf {
        return true;
    }
    let (g, w) = (got as usize, want as usize);
    let Some(cg) = centroids.get(g * d..(g + 1) * d) else { return false };
    let cw = &centroids[w * d..(w + 1) * d];
    if centroids.chunks_exact(d).take(g).any(|c| c.iter().zip(cg).all(|(a, b)| a.to_bits() == b.to_bits())) {
        return false;
    }
    let (sw, sg) = (score(cw, head.cnorm[w]), score(cg, head.cnorm[g]));
    if !(sw.is_finite() && sg.is_finite()) {
        return false;
    }
    let norm = |v: &[f32]| v.iter().map(|&a| f64::from(a) * f64::from(a)).sum::<f64>().sqrt();
    let xn = norm(x);
    f64::from(sw) - f64::from(sg) <= tf32_score_bound(metric, xn, norm(cw)) + tf32_score_bound(metric, xn, norm(cg))
}

/// Counting sort of `labels` (labels `≥ C` belong to no cluster): `(sizes, indptr,
/// members)`, each cluster's members ascending.
fn sort_labels(labels: &[u32], clusters: usize) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let mut sizes = vec![0u32; clusters];
    for &l in labels {
        if let Some(s) = sizes.get_mut(l as usize) {
            *s += 1;
        }
    }
    let mut indptr = vec![0u32; clusters + 1];
    for c in 0..clusters {
        indptr[c + 1] = indptr[c] + sizes[c];
    }
    let mut cursor = indptr[..clusters].to_vec();
    let mut members = vec![0u32; indptr[clusters] as usize];
    for (t, &l) in labels.iter().enumerate() {
        if let Some(pos) = cursor.get_mut(l as usize) {
            members[*pos as usize] = t as u32;
            *pos += 1;
        }
    }
    (sizes, indptr, members)
}

fn check_keys<T>(shape: &KmeansShape, keys: &[T]) -> Result<()> {
    let n = checked_numel::<T>("keys", &shape.keys_shape())?;
    check_shape("keys", &[n], &[keys.len()])
}

fn widen<T: Float>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// The k-means of every head (see the [module docs](super) for the whole contract), on
/// `keys [H, Tcap, D]`. This is always the f32 path: with [`super::AssignPrecision::Tf32`]
/// it is the run the GPU's labels are checked against ([`tf32_label_admissible`]).
///
/// # Errors
/// As [`KmeansShape::validate`], [`KmeansOptions::validate`] and
/// [`KmeansOptions::validate_for`]; [`Error::Shape`] naming
/// `keys` for another length.
pub fn kmeans<T: Float>(shape: &KmeansShape, options: &KmeansOptions, keys: &[T]) -> Result<KmeansResult> {
    shape.validate()?;
    options.validate()?;
    options.validate_for(shape)?;
    check_keys(shape, keys)?;
    let KmeansShape { heads, tokens, capacity, clusters, head_dim: d } = *shape;
    let metric = options.metric;
    let mut out = KmeansResult {
        centroids: vec![0.0; heads * clusters * d],
        labels: vec![NO_LABEL; heads * capacity],
        sizes: vec![0; heads * clusters],
        indptr: vec![0; heads * (clusters + 1)],
        members: vec![NO_LABEL; heads * capacity],
        iterations: vec![0; heads],
    };
    for h in 0..heads {
        let x = widen(&keys[h * capacity * d..(h * capacity + tokens) * d]);
        let inv: Vec<f32> = x.chunks_exact(d).map(inv_norm).collect();
        let mut head = Head { centroids: vec![0.0; clusters * d], cnorm: vec![0.0; clusters] };
        for c in 0..clusters {
            let t = init_token(options.seed, h, c, tokens, clusters);
            head.store(metric, c, &x[t * d..(t + 1) * d]);
        }
        let labels = &mut out.labels[h * capacity..h * capacity + tokens];
        let mut sorted: Option<(Vec<u32>, Vec<u32>, Vec<u32>)> = None;
        for _ in 0..options.iterations {
            let mut moved = false;
            for (t, xt) in x.chunks_exact(d).enumerate() {
                let l = head.assign(metric, xt);
                moved |= labels[t] != l;
                labels[t] = l;
            }
            out.iterations[h] += 1;
            if options.stop_when_stable && !moved {
                break;
            }
            let (sizes, indptr, members) = sort_labels(labels, clusters);
            let mut row = vec![0.0f32; d];
            for c in 0..clusters {
                let m = &members[indptr[c] as usize..indptr[c + 1] as usize];
                if m.is_empty() {
                    continue;
                }
                for (dd, r) in row.iter_mut().enumerate() {
                    *r = match metric {
                        Metric::Cosine => {
                            m.iter().fold(0.0f32, |acc, &t| x[t as usize * d + dd].mul_add(inv[t as usize], acc))
                        }
                        Metric::L2 => m.iter().fold(0.0f32, |acc, &t| acc + x[t as usize * d + dd]) / m.len() as f32,
                    };
                }
                let ss = dot(&row, &row);
                if metric == Metric::Cosine && (ss.is_nan() || ss <= 0.0) {
                    continue;
                }
                head.store(metric, c, &row);
            }
            sorted = Some((sizes, indptr, members));
        }
        out.centroids[h * clusters * d..(h + 1) * clusters * d].copy_from_slice(&head.centroids);
        let (sizes, indptr, members) = sorted.ok_or_else(|| Error::internal("k-means ran no update"))?;
        write_csr(&mut out, shape, h, &sizes, &indptr, &members);
    }
    Ok(out)
}

fn write_csr(out: &mut KmeansResult, shape: &KmeansShape, h: usize, sizes: &[u32], indptr: &[u32], members: &[u32]) {
    let c = shape.clusters;
    out.sizes[h * c..(h + 1) * c].copy_from_slice(sizes);
    out.indptr[h * (c + 1)..(h + 1) * (c + 1)].copy_from_slice(indptr);
    out.members[h * shape.capacity..h * shape.capacity + members.len()].copy_from_slice(members);
}

/// Incremental assignment: labels tokens `from..to` of `keys [H, Tcap, D]` with the nearest
/// centroid of `state` (centroids unchanged) and rebuilds `sizes`, `indptr` and `members`
/// from the labels of `0..to`.
///
/// # Errors
/// As [`KmeansShape::validate`] and [`validate_append`]; [`Error::Shape`] naming `keys` or
/// a field of `state` (`centroids`, `labels`, `sizes`, `indptr`, `members`, `iterations`)
/// of another length.
pub fn assign_appended<T: Float>(
    shape: &KmeansShape,
    metric: Metric,
    keys: &[T],
    from: usize,
    to: usize,
    state: &mut KmeansResult,
) -> Result<()> {
    shape.validate()?;
    validate_append(shape, from, to)?;
    check_keys(shape, keys)?;
    let KmeansShape { heads, capacity, clusters, head_dim: d, .. } = *shape;
    check_shape("centroids", &[heads * clusters * d], &[state.centroids.len()])?;
    check_shape("labels", &[heads * capacity], &[state.labels.len()])?;
    check_shape("sizes", &[heads * clusters], &[state.sizes.len()])?;
    check_shape("indptr", &[heads * (clusters + 1)], &[state.indptr.len()])?;
    check_shape("members", &[heads * capacity], &[state.members.len()])?;
    check_shape("iterations", &[heads], &[state.iterations.len()])?;
    for h in 0..heads {
        let mut head = Head {
            centroids: state.centroids[h * clusters * d..(h + 1) * clusters * d].to_vec(),
            cnorm: vec![0.0; clusters],
        };
        if metric == Metric::L2 {
            for (c, cent) in head.centroids.chunks_exact(d).enumerate() {
                head.cnorm[c] = dot(cent, cent);
            }
        }
        for t in from..to {
            let x = widen(&keys[(h * capacity + t) * d..(h * capacity + t + 1) * d]);
            state.labels[h * capacity + t] = head.assign(metric, &x);
        }
        let (sizes, indptr, members) = sort_labels(&state.labels[h * capacity..h * capacity + to], clusters);
        write_csr(state, shape, h, &sizes, &indptr, &members);
    }
    Ok(())
}

/// The score of every cluster of list `l` (module docs): `[C]`.
fn list_scores<T: Float>(shape: &RetrieveShape, combine: Combine, q: &[T], centroids: &[f32], l: usize) -> Vec<f32> {
    let (d, g, c) = (shape.head_dim, shape.group(), shape.clusters);
    let (b, hk) = (l / shape.hkv, l % shape.hkv);
    let rows: Vec<Vec<f32>> = (0..shape.rows())
        .map(|r| {
            let (t, j) = (r / g, r % g);
            let row = (b * shape.q_tokens + t) * shape.hq + hk * g + j;
            widen(&q[row * d..(row + 1) * d])
        })
        .collect();
    (0..c)
        .map(|ci| {
            let cent = &centroids[(l * c + ci) * d..(l * c + ci + 1) * d];
            let mut s = 0.0f32;
            for (r, qr) in rows.iter().enumerate() {
                let v = dot(qr, cent);
                s = if r == 0 {
                    v
                } else {
                    match combine {
                        Combine::Sum => s + v,
                        Combine::Max if s.is_nan() || v.is_nan() => f32::NAN,
                        Combine::Max if v > s => v,
                        Combine::Max => s,
                    }
                };
            }
            s + 0.0
        })
        .collect()
}

/// The cluster scores `[B·Hkv, C]` of a retrieval (what the score kernel writes).
///
/// # Errors
/// As [`cpu_retrieve_checks`](retrieve)'s shape, options and length checks of `q` and
/// `centroids`.
pub fn scores<T: Float>(shape: &RetrieveShape, combine: Combine, q: &[T], centroids: &[f32]) -> Result<Vec<f32>> {
    shape.validate()?;
    let qn = checked_numel::<T>("q", &shape.q_shape())?;
    check_shape("q", &[qn], &[q.len()])?;
    check_shape("centroids", &[shape.n_lists() * shape.clusters * shape.head_dim], &[centroids.len()])?;
    Ok((0..shape.n_lists()).flat_map(|l| list_scores(shape, combine, q, centroids, l)).collect())
}

/// Cluster retrieval (see the [module docs](super)): the sorted CSR token lists
/// `(indptr [B·Hkv + 1], indices)` from `q [B, Tq, Hq, D]`, the k-means state of the
/// `B·Hkv` lists (`centroids`, `cluster_indptr`, `members`) and `seq_lens [B]`.
///
/// # Errors
/// As [`RetrieveShape::validate`] and [`RetrieveOptions::validate`]; [`Error::Shape`]
/// naming `q`, `centroids`, `cluster_indptr`, `members` or `seq_lens` of another length.
#[allow(clippy::too_many_arguments)]
pub fn retrieve<T: Float>(
    shape: &RetrieveShape,
    options: &RetrieveOptions,
    q: &[T],
    centroids: &[f32],
    cluster_indptr: &[u32],
    members: &[u32],
    seq_lens: &[u32],
) -> Result<(Vec<u32>, Vec<u32>)> {
    options.validate()?;
    let all = scores(shape, options.combine, q, centroids)?;
    let (n_lists, c, cap) = (shape.n_lists(), shape.clusters, shape.capacity);
    check_shape("cluster_indptr", &[n_lists * (c + 1)], &[cluster_indptr.len()])?;
    check_shape("members", &[n_lists * cap], &[members.len()])?;
    check_shape("seq_lens", &[shape.batch], &[seq_lens.len()])?;
    let (_, ranked) = crate::select::cpu::topk(&all, n_lists, c, c, None)?;
    let bc = options.cluster_budget();
    let mut indptr = vec![0u32];
    let mut indices = Vec::new();
    for l in 0..n_lists {
        let len = (seq_lens[l / shape.hkv] as usize).min(cap);
        let mut keep = vec![false; len];
        keep.iter_mut().take(options.sinks).for_each(|k| *k = true);
        keep.iter_mut().skip(len.saturating_sub(options.window)).for_each(|k| *k = true);
        let ip = &cluster_indptr[l * (c + 1)..(l + 1) * (c + 1)];
        let row = &members[l * cap..(l + 1) * cap];
        let mut left = bc;
        for &cl in &ranked[l * c..(l + 1) * c] {
            if left == 0 {
                break;
            }
            let cl = cl as usize;
            let e = (ip[cl + 1] as usize).min(cap);
            let s = (ip[cl] as usize).min(e);
            let take = (e - s).min(left);
            for &t in &row[s..s + take] {
                if let Some(k) = keep.get_mut(t as usize) {
                    *k = true;
                }
            }
            left -= take;
        }
        indices.extend(keep.iter().enumerate().filter(|(_, &k)| k).map(|(t, _)| t as u32));
        indptr
            .push(u32::try_from(indices.len()).map_err(|_| Error::too_large("indices", "more than u32::MAX tokens"))?);
    }
    Ok((indptr, indices))
}
