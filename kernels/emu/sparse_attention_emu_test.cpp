// sparse_attention_emu_test.cpp: runs the f32 row kernels of kernels/sparse_attention.cu (the
// forward, and the backward's per-row pass: dq, p, ds) on host threads (cuda_emu.hpp) against an
// f64 reference of the same formulas. Selections are random ascending key lists padded with
// SPT_SENTINEL, including empty rows, full rows and lists longer than a warp's 32 keys; widths
// that take the float4 path and widths that do not. One query row holds a NaN: its output, lse,
// dq, p and ds must be NaN (as on the CPU, where a diverged row is not a masked row) and no other
// row may change.
//
// Built and run by the spt-ops test cuda_emulated.rs:
//   g++ -std=c++20 -O2 -pthread -DSPT_EMU -I kernels kernels/emu/sparse_attention_emu_test.cpp
#include "sparse_attention.cu"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <random>

namespace {

struct Case {
  int bh, lq, lk, d, dv, kk;
  bool nan_row;
  unsigned seed;
};

// Worst |got − want| over a tensor, relative to its largest |want|; NaN must sit exactly where
// the reference has NaN.
bool close(const char* what, const std::vector<float>& got, const std::vector<double>& want) {
  double worst = 0, scale = 1e-30;
  for (double w : want)
    if (!std::isnan(w) && std::isfinite(w)) scale = std::max(scale, std::abs(w));
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(want[i]) != std::isnan(double(got[i]))) {
      std::printf("    %s[%zu]: got %g, want %g  FAIL\n", what, i, double(got[i]), want[i]);
      return false;
    }
    if (std::isnan(want[i])) continue;
    if (std::isinf(want[i])) {
      if (double(got[i]) != want[i]) {
        std::printf("    %s[%zu]: got %g, want %g  FAIL\n", what, i, double(got[i]), want[i]);
        return false;
      }
      continue;
    }
    worst = std::max(worst, std::abs(double(got[i]) - want[i]) / scale);
  }
  const bool ok = worst < 2e-5;
  std::printf("    %-3s worst %.2e of max|want| %.3g%s\n", what, worst, scale, ok ? "" : "  FAIL");
  return ok;
}

bool run_case(const Case& c) {
  std::mt19937 rng(c.seed);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  const int rows = c.bh * c.lq;
  std::vector<float> q(size_t(rows) * c.d), k(size_t(c.bh) * c.lk * c.d), v(size_t(c.bh) * c.lk * c.dv),
      g(size_t(rows) * c.dv);
  for (auto* t : {&q, &k, &v, &g})
    for (auto& x : *t) x = uni(rng);
  const int nan_at = c.nan_row ? rows / 3 : -1;
  if (nan_at >= 0) q[size_t(nan_at) * c.d + c.d / 2] = std::nanf("");

  // Row r keeps a random number of distinct keys (0 and kk included), ascending, then padding.
  std::vector<uint32_t> idx(size_t(rows) * c.kk, SPT_SENTINEL);
  for (int r = 0; r < rows; ++r) {
    const int n = r % 7 == 0 ? 0 : r % 7 == 1 ? c.kk : int(rng() % (c.kk + 1));
    std::vector<uint32_t> keys(c.lk);
    for (int j = 0; j < c.lk; ++j) keys[j] = uint32_t(j);
    std::shuffle(keys.begin(), keys.end(), rng);
    std::sort(keys.begin(), keys.begin() + n);
    std::copy(keys.begin(), keys.begin() + n, idx.begin() + size_t(r) * c.kk);
  }
  const float scale = 1.0f / std::sqrt(float(c.d));
  const int vec4 = c.d % 4 == 0 && c.dv % 4 == 0;

  std::vector<float> o(size_t(rows) * c.dv), lse(rows), dq(size_t(rows) * c.d), p(size_t(rows) * c.kk),
      ds(size_t(rows) * c.kk);
  const unsigned blocks = unsigned((rows + SA_WARPS - 1) / SA_WARPS);
  emu_launch(blocks, 1, SA_WARPS * 32, 0, [&] {
    sparse_attn_fwd_f32(q.data(), k.data(), v.data(), idx.data(), o.data(), lse.data(), rows, c.lq, c.lk, c.d, c.dv,
                        c.kk, scale, vec4);
  });
  emu_launch(blocks, 1, SA_WARPS * 32, 0, [&] {
    sparse_attn_bwd_rows_f32(q.data(), k.data(), v.data(), o.data(), lse.data(), g.data(), idx.data(), dq.data(),
                             p.data(), ds.data(), rows, c.lq, c.lk, c.d, c.dv, c.kk, scale, vec4);
  });

  // The f64 reference, from the same inputs (the backward's o and lse are the kernel's, as on a GPU).
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  std::vector<double> o_w(o.size(), 0.0), lse_w(rows), dq_w(dq.size(), 0.0), p_w(p.size(), 0.0),
      ds_w(ds.size(), 0.0);
  for (int r = 0; r < rows; ++r) {
    const int b = r / c.lq;
    const float* qi = &q[size_t(r) * c.d];
    const uint32_t* sel = &idx[size_t(r) * c.kk];
    int n = 0;
    while (n < c.kk && sel[n] != SPT_SENTINEL) ++n;
    std::vector<double> s(n);
    bool has_nan = false;
    double m = -inf;
    for (int t = 0; t < n; ++t) {
      const float* kj = &k[(size_t(b) * c.lk + sel[t]) * c.d];
      double a = 0;
      for (int x = 0; x < c.d; ++x) a += double(qi[x]) * kj[x];
      s[t] = scale * a;
      has_nan = has_nan || std::isnan(s[t]);
      if (!std::isnan(s[t])) m = std::max(m, s[t]);
    }
    double l = 0;
    for (int t = 0; t < n; ++t) l += std::exp(s[t] - m);
    lse_w[r] = has_nan ? nan : n == 0 ? -inf : m + std::log(l);
    for (int t = 0; t < n; ++t) {
      const float* vj = &v[(size_t(b) * c.lk + sel[t]) * c.dv];
      const double w = has_nan ? nan : std::exp(s[t] - m) / l;
      for (int x = 0; x < c.dv; ++x) o_w[size_t(r) * c.dv + x] += w * vj[x];
    }
    if (has_nan)
      for (int x = 0; x < c.dv; ++x) o_w[size_t(r) * c.dv + x] = nan;
    // Backward rows: delta = do·o, p = exp(s − lse), ds = p (do·v − delta), dq = scale Σ ds k.
    double delta = 0;
    for (int x = 0; x < c.dv; ++x) delta += double(g[size_t(r) * c.dv + x]) * o[size_t(r) * c.dv + x];
    for (int t = 0; t < n; ++t) {
      const float* vj = &v[(size_t(b) * c.lk + sel[t]) * c.dv];
      const float* kj = &k[(size_t(b) * c.lk + sel[t]) * c.d];
      double gv = 0;
      for (int x = 0; x < c.dv; ++x) gv += double(g[size_t(r) * c.dv + x]) * vj[x];
      const double pv = std::exp(s[t] - double(lse[r]));
      const double dsv = pv * (gv - delta);
      p_w[size_t(r) * c.kk + t] = pv;
      ds_w[size_t(r) * c.kk + t] = dsv;
      for (int x = 0; x < c.d; ++x) dq_w[size_t(r) * c.d + x] += scale * dsv * kj[x];
    }
  }
  bool ok = close("o", o, o_w);
  ok = close("lse", lse, lse_w) && ok;
  ok = close("dq", dq, dq_w) && ok;
  ok = close("p", p, p_w) && ok;
  ok = close("ds", ds, ds_w) && ok;
  if (nan_at >= 0) {
    // The reference's own check: the NaN row is NaN throughout, and only that row.
    bool row_nan = std::isnan(lse_w[nan_at]);
    for (int x = 0; x < c.dv; ++x) row_nan = row_nan && std::isnan(o_w[size_t(nan_at) * c.dv + x]);
    int nan_rows = 0;
    for (int r = 0; r < rows; ++r) nan_rows += std::isnan(lse_w[r]);
    ok = ok && row_nan && nan_rows == 1;
    std::printf("    NaN row %d: o and lse NaN, %d NaN row(s) in all%s\n", nan_at, nan_rows,
                row_nan && nan_rows == 1 ? "" : "  FAIL");
  }
  return ok;
}

}  // namespace

int main() {
  const Case cases[] = {
      // bh, lq, lk, d, dv, kk, nan_row, seed
      {3, 37, 50, 40, 24, 40, false, 1},  // float4 path, lists longer than a warp
      {2, 20, 70, 33, 33, 70, false, 2},  // scalar path, every key selectable, three chunks
      {1, 9, 64, 128, 128, 64, false, 3}, // the widest rows
      {3, 37, 50, 40, 24, 40, true, 4},   // a NaN in one query row
      {2, 13, 35, 33, 17, 35, true, 5},
  };
  bool all = true;
  for (const Case& c : cases) {
    std::printf("BH %d Lq %d Lk %d d %d dv %d k %d%s\n", c.bh, c.lq, c.lk, c.d, c.dv, c.kk,
                c.nan_row ? " NaN row" : "");
    all = run_case(c) && all;
  }
  std::printf("%s\n", all ? "sparse_attention emulated: all cases pass" : "sparse_attention emulated: FAILED");
  return all ? 0 : 1;
}
