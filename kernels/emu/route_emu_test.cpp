// route_emu_test.cpp: runs the routing kernels of kernels/routed_ffn.cu on host threads
// (cuda_emu.hpp) and compares them with a reference written like the host's Routing (router.rs):
// top-k by f64::total_cmp order with ties to the lower block and NaN lowest, then a stable
// counting sort by group (block, token chunk). Scores are small integers (many ties), with NaN,
// −∞, +0 and −0 mixed in. Every index array must match exactly: blocks, row_token, row_src,
// token_rows, the group counts, and the four maps of the padded layout. One case routes, then
// moves rows with route_gather / route_sum and checks them against plain loops.
//
// Built and run by the spt-ops test cuda_emulated.rs:
//   g++ -std=c++20 -O2 -pthread -DSPT_EMU -I kernels kernels/emu/route_emu_test.cpp
#include "routed_ffn.cu"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <numeric>
#include <random>

namespace {

constexpr int kChunk = 512;  // CHUNK_TOKENS in router.rs

struct Case {
  int t, n, k;
  unsigned seed;
};

// The host's order: higher score first (f64::total_cmp, NaN as −∞), then the lower block.
std::vector<uint32_t> reference_topk(const std::vector<float>& s, int t_n, int n, int k) {
  std::vector<uint32_t> out;
  for (int t = 0; t < t_n; ++t) {
    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    auto key = [&](int e) {
      double v = s[size_t(t) * n + e];
      if (std::isnan(v)) v = -std::numeric_limits<double>::infinity();
      return v;
    };
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
      const double x = key(a), y = key(b);
      if (x != y) return x > y;
      return std::signbit(y) && !std::signbit(x);  // +0 above −0; equal otherwise (stable: lower block)
    });
    for (int j = 0; j < k; ++j) out.push_back(uint32_t(order[j]));
  }
  return out;
}

template <typename T>
bool same(const char* what, const std::vector<T>& got, const std::vector<T>& want) {
  if (got == want) return true;
  size_t i = 0;
  while (i < got.size() && i < want.size() && got[i] == want[i]) ++i;
  std::printf("    %s differs at %zu (sizes %zu, %zu)  FAIL\n", what, i, got.size(), want.size());
  return false;
}

bool run_case(const Case& c, bool moves) {
  std::mt19937 rng(c.seed);
  const int t_n = c.t, n = c.n, k = c.k, pairs = t_n * k, nc = (t_n + kChunk - 1) / kChunk;
  std::vector<float> scores(size_t(t_n) * n);
  for (auto& v : scores) {
    const unsigned r = rng() % 40;
    v = r == 0 ? std::nanf("") : r == 1 ? -INFINITY : r == 2 ? 0.0f : r == 3 ? -0.0f : float(int(rng() % 7) - 3);
  }

  // Device side: top-k, ranks, the host's prefix of the counts, placement, padded maps.
  std::vector<uint32_t> blocks(pairs), rank(pairs), counts(size_t(n) * nc);
  emu_launch(3, 1, 128, 0, [&] { route_topk_f32(scores.data(), blocks.data(), t_n, n, k); });
  emu_launch(nc, 1, kChunk, 4 * kChunk, [&] { route_rank(blocks.data(), rank.data(), counts.data(), t_n, n, k); });
  std::vector<uint32_t> starts(counts.size() + 1, 0);
  for (size_t g = 0; g < counts.size(); ++g) starts[g + 1] = starts[g] + counts[g];
  std::vector<uint32_t> row_token(pairs), row_src(pairs), token_rows(pairs);
  emu_launch(2, 1, 128, 0, [&] {
    route_place(blocks.data(), rank.data(), starts.data(), row_token.data(), row_src.data(), token_rows.data(), pairs,
                k, kChunk, nc);
  });
  std::vector<uint32_t> block_starts(n + 1);
  uint32_t rmax = 0;
  for (int e = 0; e <= n; ++e) block_starts[e] = starts[size_t(e) * nc];
  for (int e = 0; e < n; ++e) rmax = std::max(rmax, block_starts[e + 1] - block_starts[e]);
  std::vector<uint32_t> padded_src(n * rmax), padded_copies(pairs), unpad_src(pairs), unpad_copies(n * rmax);
  emu_launch(2, 1, 128, 0, [&] {
    route_pad(blocks.data(), row_src.data(), row_token.data(), token_rows.data(), block_starts.data(),
              padded_src.data(), padded_copies.data(), unpad_src.data(), unpad_copies.data(), pairs, n, int(rmax));
  });

  // Reference: router.rs's counting sort, and rows.rs's padded maps.
  const auto want_blocks = reference_topk(scores, t_n, n, k);
  std::vector<uint32_t> want_counts(size_t(n) * nc, 0);
  for (int p = 0; p < pairs; ++p) ++want_counts[size_t(want_blocks[p]) * nc + p / k / kChunk];
  std::vector<uint32_t> next(want_counts.size() + 1, 0);
  for (size_t g = 0; g < want_counts.size(); ++g) next[g + 1] = next[g] + want_counts[g];
  std::vector<uint32_t> want_token(pairs), want_src(pairs), want_rows(pairs);
  for (int p = 0; p < pairs; ++p) {
    const uint32_t r = next[size_t(want_blocks[p]) * nc + p / k / kChunk]++;
    want_token[r] = uint32_t(p / k);
    want_src[r] = uint32_t(p);
    want_rows[p] = r;
  }
  std::vector<uint32_t> want_psrc(n * rmax, SPT_SENTINEL), want_ucopies(n * rmax, SPT_SENTINEL), want_usrc(pairs);
  for (int r = 0; r < pairs; ++r) {
    const uint32_t e = want_blocks[want_src[r]];
    const uint32_t p = e * rmax + uint32_t(r) - block_starts[e];
    want_usrc[r] = p;
    want_psrc[p] = want_token[r];
    want_ucopies[p] = uint32_t(r);
  }
  std::vector<uint32_t> want_pcopies(pairs);
  for (int p = 0; p < pairs; ++p) want_pcopies[p] = want_usrc[want_rows[p]];

  bool ok = same("blocks", blocks, want_blocks) && same("group counts", counts, want_counts) &&
            same("row_token", row_token, want_token) && same("row_src", row_src, want_src) &&
            same("token_rows", token_rows, want_rows) && same("padded src", padded_src, want_psrc) &&
            same("padded copies", padded_copies, want_pcopies) && same("unpad src", unpad_src, want_usrc) &&
            same("unpad copies", unpad_copies, want_ucopies);

  if (ok && moves) {  // x [T, d] → routed rows, and their per-token sum back
    const int d = 5;
    std::vector<float> x(size_t(t_n) * d), xg(size_t(pairs) * d), back(size_t(t_n) * d);
    for (auto& v : x) v = float(int(rng() % 9) - 4);
    emu_launch(pairs, 1, 32, 0, [&] { route_gather_f32(x.data(), row_token.data(), xg.data(), d); });
    emu_launch(t_n, 1, 32, 0, [&] { route_sum_f32(xg.data(), token_rows.data(), back.data(), k, d); });
    std::vector<float> want_xg(size_t(pairs) * d), want_back(size_t(t_n) * d);
    for (int r = 0; r < pairs; ++r)
      for (int c2 = 0; c2 < d; ++c2) want_xg[size_t(r) * d + c2] = x[size_t(want_token[r]) * d + c2];
    for (size_t i = 0; i < x.size(); ++i) want_back[i] = float(k) * x[i];
    ok = same("gathered rows", xg, want_xg) && same("summed rows", back, want_back);
  }
  std::printf("    %s\n", ok ? "identical" : "differ");
  return ok;
}

}  // namespace

int main() {
  const Case cases[] = {
      // T, n_blocks, k, seed
      {1, 1, 1, 1}, {7, 4, 2, 2}, {511, 8, 4, 3}, {512, 8, 8, 4}, {1300, 8, 2, 5},
      {1100, 24, 12, 6}, {600, 64, 5, 7}, {520, 64, 64, 8}, {2100, 3, 1, 9},
  };
  bool all = true;
  for (const Case& c : cases) {
    std::printf("T %d n_blocks %d k %d\n", c.t, c.n, c.k);
    all = run_case(c, c.t == 1300) && all;
  }
  std::printf("%s\n", all ? "routing emulated: all cases pass" : "routing emulated: FAILED");
  return all ? 0 : 1;
}
