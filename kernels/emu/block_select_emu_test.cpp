// block_select_emu_test.cpp: runs kernels/block_select.cu's device code on host threads
// (cuda_emu.hpp) and compares the selected block lists with a brute-force reference that scores
// every block key by key (no codeword histograms, no tables): integer-valued queries and
// codewords, so every sum is exact and the lists must match exactly, ties (to the lower block)
// included. Both block scores, causal and key-padding masks, tiles and blocks that do not divide
// L, per-head codebooks.
//
// Built and run by the spt-ops test cuda_emulated.rs:
//   g++ -std=c++20 -O2 -pthread -DSPT_EMU -I kernels kernels/emu/block_select_emu_test.cpp
#include "block_select.cu"

#include <algorithm>
#include <cstdio>
#include <random>

namespace {

struct Case {
  int b, h, lq, lk, s, c, dc, groups, qt, kb, width;
  bool causal, padding, upper_bound;
  unsigned seed;
};

bool run_case(const Case& k) {
  const int bh = k.b * k.h, d = k.s * k.dc;
  const int nt = (k.lq + k.qt - 1) / k.qt, nb = (k.lk + k.kb - 1) / k.kb;
  std::mt19937 rng(k.seed);
  auto ints = [&](size_t n, int a) {
    std::vector<float> v(n);
    for (auto& x : v) x = float(int(rng() % (2 * a + 1)) - a);
    return v;
  };
  const auto q = ints(size_t(bh) * k.lq * d, 3);
  const auto cen = ints(size_t(k.groups) * k.s * k.c * k.dc, 2);
  std::vector<uint8_t> codes(size_t(bh) * k.lk * k.s);
  for (auto& x : codes) x = uint8_t(rng() % k.c);
  std::vector<uint8_t> pad;
  if (k.padding) {
    pad.resize(size_t(k.b) * k.lk);
    for (auto& x : pad) x = rng() % 4 != 0;
    for (int j = 0; j < std::min(k.lk, k.kb + 3); ++j) pad[j] = 0;  // batch 0: a whole empty block
  }
  const uint8_t* pp = k.padding ? pad.data() : nullptr;

  std::vector<uint32_t> hist(size_t(bh) * nb * k.s * k.c), nkeys(size_t(bh) * nb);
  std::vector<uint32_t> blocks(size_t(bh) * nt * k.width), counts(size_t(bh) * nt);
  emu_launch(nb, bh, 128, 0,
             [&] { block_hist_u8(codes.data(), pp, hist.data(), nkeys.data(), k.h, k.lk, k.s, k.c, k.kb); });
  emu_launch(nt, bh, 128, 4 * size_t(d + k.s * k.c + 3 * nb), [&] {
    block_select_f32(q.data(), cen.data(), hist.data(), nkeys.data(), blocks.data(), counts.data(), k.h, k.lq, k.lk,
                     d, k.groups, k.s, k.c, k.dc, k.qt, k.kb, k.width, k.causal, k.upper_bound);
  });

  bool ok = true;
  int shown = 0;
  for (int x = 0; x < bh; ++x) {
    const int bb = x / k.h, g = k.groups == 1 ? 0 : x % k.h;
    for (int t = 0; t < nt; ++t) {
      const int t0 = t * k.qt, t1 = std::min(t0 + k.qt, k.lq);
      std::vector<double> qbar(d, 0.0);
      for (int i = t0; i < t1; ++i)
        for (int e = 0; e < d; ++e) qbar[e] += q[(size_t(x) * k.lq + i) * d + e];
      // ⟨qbar_s, codeword(g, s, code)⟩ for key j, subspace s.
      auto part = [&](int j, int s) {
        const int code = codes[(size_t(x) * k.lk + j) * k.s + s];
        double a = 0;
        for (int e = 0; e < k.dc; ++e) a += qbar[s * k.dc + e] * cen[((size_t(g) * k.s + s) * k.c + code) * k.dc + e];
        return a;
      };
      const int end = std::min(t1, k.lk);
      const int dlo = k.causal && t0 < end ? t0 / k.kb : 0, dhi = k.causal && t0 < end ? (end - 1) / k.kb + 1 : 0;
      std::vector<int> want;
      std::vector<std::pair<float, int>> cand;
      for (int blk = 0; blk < nb; ++blk) {
        std::vector<int> keys;
        for (int j = blk * k.kb; j < std::min((blk + 1) * k.kb, k.lk); ++j)
          if (!k.padding || pad[size_t(bb) * k.lk + j]) keys.push_back(j);
        if (keys.empty()) continue;
        if (blk >= dlo && blk < dhi) {
          want.push_back(blk);
          continue;
        }
        if (k.causal && blk * k.kb > t1 - 1) continue;  // entirely in the tile's future
        double sc = 0;
        if (k.upper_bound) {
          for (int s = 0; s < k.s; ++s) {
            double m = -INFINITY;
            for (int j : keys) m = std::max(m, part(j, s));
            sc += m;
          }
          cand.push_back({float(sc), blk});
        } else {
          for (int j : keys)
            for (int s = 0; s < k.s; ++s) sc += part(j, s);
          cand.push_back({float(sc) / float(keys.size()), blk});
        }
      }
      std::sort(cand.begin(), cand.end(),
                [](auto a, auto b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
      const int room = k.width - int(want.size());
      for (int i = 0; i < room && i < int(cand.size()); ++i) want.push_back(cand[i].second);
      std::sort(want.begin(), want.end());
      const uint32_t* got = &blocks[(size_t(x) * nt + t) * k.width];
      bool same = int(counts[size_t(x) * nt + t]) == int(want.size());
      for (int i = 0; i < k.width; ++i) same = same && got[i] == (i < int(want.size()) ? uint32_t(want[i]) : SPT_SENTINEL);
      if (!same && shown++ < 3) {
        std::printf("    bh %d tile %d: got", x, t);
        for (int i = 0; i < k.width; ++i) std::printf(" %d", int(got[i]));
        std::printf(" (count %u), want", counts[size_t(x) * nt + t]);
        for (int w : want) std::printf(" %d", w);
        std::printf("  FAIL\n");
      }
      ok = ok && same;
    }
  }
  std::printf("    %s\n", ok ? "lists identical" : "lists differ");
  return ok;
}

}  // namespace

int main() {
  const Case cases[] = {
      // b, h, lq, lk, S, C, dc, groups, qt, kb, width, causal, padding, upper_bound, seed
      {2, 2, 333, 333, 4, 16, 2, 1, 64, 64, 3, false, false, false, 1},
      {2, 2, 333, 333, 4, 16, 2, 1, 64, 64, 3, true, false, false, 2},
      {2, 3, 300, 300, 4, 16, 2, 3, 32, 16, 6, true, true, false, 3},
      {2, 1, 250, 250, 8, 16, 2, 1, 50, 40, 4, false, true, true, 4},
      {1, 2, 333, 333, 4, 16, 2, 1, 64, 64, 3, true, true, true, 5},
      {1, 1, 200, 260, 3, 7, 3, 1, 64, 32, 5, false, false, false, 6},
  };
  bool all = true;
  for (const Case& c : cases) {
    std::printf("B%d H%d Lq %d Lk %d S %d C %d G %d tiles %d/%d top %d%s%s %s\n", c.b, c.h, c.lq, c.lk, c.s, c.c,
                c.groups, c.qt, c.kb, c.width, c.causal ? " causal" : "", c.padding ? " padding" : "",
                c.upper_bound ? "upper-bound" : "mean");
    all = run_case(c) && all;
  }
  std::printf("%s\n", all ? "block_select emulated: all cases pass" : "block_select emulated: FAILED");
  return all ? 0 : 1;
}
