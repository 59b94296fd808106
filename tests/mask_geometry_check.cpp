// A brute-force check of csrc/mask.h's MaskGeometry against its own
// definition of a visible score, compiled and run by
// tests/test_mask_geometry.py with the host C++ compiler (no torch, no GPU).
// The kernels trust these helpers to skip work: a key block outside
// [n_block_begin, n_block_end), a query block outside [m_block_begin,
// m_block_end), a tile that tile_fully_visible() calls unmasked, or a row
// outside rows_seeing() (the Hopper backward's tiles on the mask's edge)
// would silently drop or keep scores. Here every (row, key) of every small
// geometry is checked: lengths 0-20 on both sides, windows from none to
// wider than the sequences, block sizes 1-8, and query blocks aligned to
// the sequence's start or to its end (rows before 0, as the head dim 64
// Hopper forward's WsFwdTraits::kAlignEnd tiles start).
//
// Prints "checked <n> mismatches <m>" and the first mismatches; exits 1 if
// there is any.
#include <cstdio>
#include <initializer_list>

#include "mask.h"

namespace {

long long g_checked = 0, g_mismatches = 0;

void fail(const char* what, int sq, int sk, int wl, int wr, int a, int b) {
  if (++g_mismatches <= 10) {
    std::printf("mismatch: %s (seqlen_q %d, seqlen_k %d, window (%d, %d)) at %d, %d\n", what, sq, sk, wl, wr, a, b);
  }
}

void check_geometry(int sq, int sk, int wl, int wr) {
  FlashFwdParams p{};
  p.window_left = wl;
  p.window_right = wr;
  const flash::MaskGeometry geo(p, flash::SeqInfo::of_lengths(sq, sk));
  // The definition: a score exists and its key is in the row's range.
  auto visible = [&](int r, int c) { return r >= 0 && r < sq && c >= 0 && c < sk && geo.keys(r).contains(c); };
  for (int r = 0; r < sq; ++r) {
    const flash::KeyRange keys = geo.keys(r);
    if (keys.begin < 0 || keys.end > sk) fail("keys() outside [0, seqlen_k)", sq, sk, wl, wr, r, keys.end);
  }
  // rows_seeing: exactly the rows that see the key, within [0, seqlen_q].
  for (int c = 0; c < sk + 3; ++c) {
    int lo = -7, hi = -7;
    geo.rows_seeing(c, &lo, &hi);
    if (lo < 0 || hi < 0 || lo > sq || hi > sq) fail("rows_seeing() outside [0, seqlen_q]", sq, sk, wl, wr, c, lo);
    for (int r = 0; r < sq; ++r) {
      ++g_checked;
      if ((r >= lo && r < hi) != visible(r, c)) fail("rows_seeing()", sq, sk, wl, wr, r, c);
    }
  }
  const int sizes[] = {1, 3, 4, 8};
  for (int bm : sizes) {
    for (int bn : sizes) {
      const int num_m = (sq + bm - 1) / bm, num_n = (sk + bn - 1) / bn;
      // Query blocks from row 0, and aligned to the end (shift rows before 0).
      for (int shift : {0, num_m * bm - sq}) {
        for (int m = 0; m < num_m; ++m) {
          const int row0 = m * bm - shift;
          const int nb = geo.n_block_begin(row0, bn), ne = geo.n_block_end(row0, bm, bn);
          for (int r = row0; r < row0 + bm; ++r) {
            for (int c = 0; c < sk; ++c) {
              ++g_checked;
              if (visible(r, c) && (c / bn < nb || c / bn >= ne)) fail("n_block range", sq, sk, wl, wr, r, c);
            }
          }
          // A tile called fully visible needs no mask: every score of it is visible.
          for (int n = 0; n < num_n; ++n) {
            if (row0 < 0 || !geo.tile_fully_visible(row0, bm, n * bn, bn)) continue;
            for (int r = row0; r < row0 + bm; ++r) {
              for (int c = n * bn; c < n * bn + bn; ++c) {
                ++g_checked;
                if (!visible(r, c)) fail("tile_fully_visible()", sq, sk, wl, wr, r, c);
              }
            }
          }
        }
      }
      // The backward's query blocks of each key block.
      for (int n = 0; n < num_n; ++n) {
        const int mb = geo.m_block_begin(n * bn, bm), me = geo.m_block_end(n * bn, bn, bm);
        for (int c = n * bn; c < n * bn + bn && c < sk; ++c) {
          for (int r = 0; r < sq; ++r) {
            ++g_checked;
            if (visible(r, c) && (r / bm < mb || r / bm >= me)) fail("m_block range", sq, sk, wl, wr, r, c);
          }
        }
      }
    }
  }
}

}  // namespace

int main() {
  const int windows[] = {-1, 0, 1, 2, 3, 5, 8, 13, 21};
  for (int sq = 0; sq <= 20; ++sq) {
    for (int sk = 0; sk <= 20; ++sk) {
      for (int wl : windows) {
        for (int wr : windows) check_geometry(sq, sk, wl, wr);
      }
    }
  }
  std::printf("checked %lld mismatches %lld\n", g_checked, g_mismatches);
  return g_mismatches == 0 ? 0 : 1;
}
