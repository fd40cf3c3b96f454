//! k-means++ seeding and Lloyd iterations on small dense point sets (one PQ subspace at a time).

use rand::{rngs::StdRng, Rng};

/// Squared L2 distance.
#[inline]
pub(crate) fn dist2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Index of the nearest centroid (ties go to the lowest index).
#[inline]
pub(crate) fn nearest(x: &[f32], centroids: &[f32], dim: usize) -> usize {
    let mut best = (f32::INFINITY, 0usize);
    for (c, cen) in centroids.chunks_exact(dim).enumerate() {
        let d = dist2(x, cen);
        if d < best.0 {
            best = (d, c);
        }
    }
    best.1
}

/// Clusters `n = points.len() / dim` points into `k` centroids: k-means++ seeding, then `iters`
/// Lloyd steps. An empty cluster is re-seeded with the point farthest from its centroid, so no
/// codeword is wasted. With fewer distinct points than `k`, the extra centroids repeat points.
pub(crate) fn kmeans(points: &[f32], dim: usize, k: usize, iters: usize, rng: &mut StdRng) -> Vec<f32> {
    let n = points.len() / dim;
    let mut cent = vec![0f32; k * dim];
    if n == 0 {
        return cent;
    }
    let pt = |i: usize| &points[i * dim..(i + 1) * dim];
    // k-means++: each new centre is drawn with probability ∝ squared distance to the chosen ones.
    let first = rng.random_range(0..n);
    cent[..dim].copy_from_slice(pt(first));
    let mut d2: Vec<f32> = (0..n).map(|i| dist2(pt(i), &cent[..dim])).collect();
    for c in 1..k {
        let total: f64 = d2.iter().map(|&v| v as f64).sum();
        // Distances past f32's range (keys near 1e19) sum to infinity, which no draw can take:
        // the farthest point is then the pick k-means++ would almost surely make.
        let pick = if total.is_infinite() {
            d2.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i)
        } else if total > 0.0 {
            let mut r = rng.random_range(0.0..total);
            let mut chosen = n - 1;
            for (i, &v) in d2.iter().enumerate() {
                r -= v as f64;
                if r < 0.0 {
                    chosen = i;
                    break;
                }
            }
            chosen
        } else {
            rng.random_range(0..n)
        };
        cent[c * dim..(c + 1) * dim].copy_from_slice(pt(pick));
        for (i, d) in d2.iter_mut().enumerate() {
            *d = d.min(dist2(pt(i), &cent[c * dim..(c + 1) * dim]));
        }
    }
    // Lloyd.
    let mut assign = vec![0usize; n];
    for _ in 0..iters {
        let mut changed = false;
        for (i, a) in assign.iter_mut().enumerate() {
            let c = nearest(pt(i), &cent, dim);
            changed |= *a != c;
            *a = c;
        }
        let mut sums = vec![0f64; k * dim];
        let mut counts = vec![0usize; k];
        for (i, &a) in assign.iter().enumerate() {
            counts[a] += 1;
            for (s, &x) in sums[a * dim..(a + 1) * dim].iter_mut().zip(pt(i)) {
                *s += x as f64;
            }
        }
        for c in 0..k {
            if counts[c] > 0 {
                for t in 0..dim {
                    cent[c * dim + t] = (sums[c * dim + t] / counts[c] as f64) as f32;
                }
            } else {
                // Re-seed with the point farthest from its current centroid.
                let far = (0..n)
                    .max_by(|&x, &y| {
                        let dx = dist2(pt(x), &cent[assign[x] * dim..(assign[x] + 1) * dim]);
                        let dy = dist2(pt(y), &cent[assign[y] * dim..(assign[y] + 1) * dim]);
                        dx.total_cmp(&dy).then(y.cmp(&x))
                    })
                    .unwrap_or(0);
                cent[c * dim..(c + 1) * dim].copy_from_slice(pt(far));
                assign[far] = c;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    cent
}

/// How many of the `points` are nearest to each of the `centroids` (ties to the lowest index):
/// the cluster sizes, which mini-batch k-means continues from.
pub(crate) fn cluster_sizes(points: &[f32], dim: usize, centroids: &[f32]) -> Vec<usize> {
    let mut sizes = vec![0usize; centroids.len() / dim.max(1)];
    for x in points.chunks_exact(dim) {
        sizes[nearest(x, centroids, dim)] += 1;
    }
    sizes
}
