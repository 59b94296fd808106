// Attention dropout, written once for every kernel (CUDA sm80 and sm90,
// forward and backward, and the CPU): the Philox4x32-7 counter-based
// generator, which score of which (batch, head) it keeps, and the 1/(1 - p)
// scale. Semantics as flash-attn 2.8: out = (P ∘ keep / (1 - p)) V with the
// softmax denominator over every key (softmax_lse does not see dropout); the
// backward regenerates the same keep-mask from (seed, offset, batch, head,
// query row, key column) and never stores it.
//
// The stream. rng_state is two int64 in the op's device memory, [seed,
// offset], drawn by the Python entry points with torch.randint (so that
// torch.manual_seed reproduces a run and CUDA graph capture works: the
// kernel reads them at run time). One Philox call with
//   key     = (seed_lo, seed_hi + offset_hi)
//   counter = (key group, query pair, batch * nheads + head, offset_lo)
// gives 128 bits: eight 16-bit draws for the 2 x 4 scores
//   rows {q, q + 8} x columns {c, c + 1, c + 8, c + 9}
// of one 16 x 16 tile, where q = 16 * (row / 16) + row % 8 is the query pair
// and c = 16 * (col / 16) + 2 * ((col / 2) % 4) the key group. That is the
// set of scores one thread holds in the accumulator fragment of mma.sync
// m16n8k16 and of wgmma (the forwards, with queries as rows), and, split
// over two threads, in the transposed fragments of the backwards (keys as
// rows; those threads compute a draw of which they use half). Draw
// (row, col) is word 2 * ((row / 8) % 2) + (col / 8) % 2, its low half for
// an even column, its high half for an odd one; the score is kept when the
// draw is below threshold = round((1 - p) * 2^16) (clamped to [0, 2^16 - 1]:
// the keep probability is (1 - p) to within 2^-17). Kept probabilities are
// multiplied by 1 / (1 - p) in fp32.
//
// The CPU uses the same function of (seed, offset, batch, head, row, col),
// so its masks are bit-identical to the GPU's.
#pragma once

#include <cstdint>

#include "flash_params.h"
#include "host_device.h"

namespace flash {

// Philox4x32 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC 2011): rounds of two 32x32 -> 64-bit products and xors, the key bumped
// by the Weyl constants between rounds. kRounds = 7, the fewest the authors
// found to pass TestU01's BigCrush (they default to 10 for a safety margin;
// flash-attn 2 and PyTorch's flash backend use 7): the draws are most of
// what dropout costs in the kernels (one call per 8 scores against an EX2
// per score), and 10 rounds made a dropout forward +77% over a plain one
// (H200, hd 128, 8k). tests/test_dropout.py checks the rounds against an
// independent Python Philox, itself checked against the authors'
// known-answer vector for 10 rounds.
struct Philox4x32 {
  static constexpr int kRounds = 7;
  static constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  static constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;

  FLASH_HOST_DEVICE static void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
    lo = a * b;
    hi = __umulhi(a, b);
#else
    const uint64_t prod = static_cast<uint64_t>(a) * b;
    lo = static_cast<uint32_t>(prod);
    hi = static_cast<uint32_t>(prod >> 32);
#endif
  }

  // ctr in, the 128 random bits out (in place).
  FLASH_HOST_DEVICE static void run(uint32_t (&c)[4], uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int round = 0; round < kRounds; ++round) {
      uint32_t hi0, lo0, hi1, lo1;
      mulhilo(kM0, c[0], hi0, lo0);
      mulhilo(kM1, c[2], hi1, lo1);
      const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
      c[0] = n0, c[1] = lo1, c[2] = n2, c[3] = lo0;
      k0 += kW0, k1 += kW1;
    }
  }
};

// The dropout of one (batch, head) of a call: off (on == false) unless
// params.dropout_p > 0, when params.rng_state must point at [seed, offset].
struct Dropout {
  uint32_t key0 = 0, key1 = 0, ctr2 = 0, ctr3 = 0;
  // A draw d (16 bits) is kept when d < threshold; kept_hi compares the
  // draw in the high half of a word in place: word < threshold << 16.
  uint32_t threshold_hi = 0;
  float scale = 1.f;      // 1 / (1 - p)
  float keep_prob = 1.f;  // 1 - p
  bool on = false;

  FLASH_HOST_DEVICE Dropout() {}
  FLASH_HOST_DEVICE Dropout(const FlashFwdParams& p, int64_t batch, int64_t head) {
    on = p.dropout_p > 0;
    if (!on) return;
    const uint64_t seed = static_cast<uint64_t>(p.rng_state[0]);
    const uint64_t offset = static_cast<uint64_t>(p.rng_state[1]);
    key0 = static_cast<uint32_t>(seed);
    key1 = static_cast<uint32_t>(seed >> 32) + static_cast<uint32_t>(offset >> 32);
    ctr2 = static_cast<uint32_t>(batch * p.nheads + head);
    ctr3 = static_cast<uint32_t>(offset);
    threshold_hi = threshold(p.dropout_p) << 16;
    keep_prob = static_cast<float>(1.0 - p.dropout_p);
    scale = static_cast<float>(1.0 / (1.0 - p.dropout_p));
  }

  FLASH_HOST_DEVICE static uint32_t threshold(double dropout_p) {
    const double t = (1.0 - dropout_p) * 65536.0 + 0.5;
    return t >= 65535.0 ? 65535u : static_cast<uint32_t>(t);
  }

  // Counter words of the draw that holds (row, col).
  FLASH_HOST_DEVICE static uint32_t key_group(int col) {
    return (static_cast<uint32_t>(col) >> 4 << 2) | ((static_cast<uint32_t>(col) >> 1) & 3u);
  }
  FLASH_HOST_DEVICE static uint32_t query_pair(int row) {
    return (static_cast<uint32_t>(row) >> 4 << 3) | (static_cast<uint32_t>(row) & 7u);
  }
  // The draw of key group `kg` and query pair `qp` (as key_group and
  // query_pair give them): w[2 * row_half + col_half].
  FLASH_HOST_DEVICE void draw(uint32_t kg, uint32_t qp, uint32_t (&w)[4]) const {
    w[0] = kg, w[1] = qp, w[2] = ctr2, w[3] = ctr3;
    Philox4x32::run(w, key0, key1);
  }
  // Whether the score whose draw sits in `word` is kept: the low half for
  // an even column (odd_col false), the high half for an odd one.
  FLASH_HOST_DEVICE bool kept(uint32_t word, bool odd_col) const {
    return (odd_col ? word : word << 16) < threshold_hi;
  }
  // The backward's mark of a probability (score_rule.h, score_grad_dropout):
  // P / (1 - p) where kept, -P where dropped.
  FLASH_HOST_DEVICE float mark(float prob, bool keep) const { return keep ? prob * scale : -prob; }

  // One score (slow: a whole draw per score): the mask op and the tests.
  FLASH_HOST_DEVICE bool keep(int row, int col) const {
    uint32_t w[4];
    draw(key_group(col), query_pair(row), w);
    return kept(w[((row >> 3) & 1) * 2 + ((col >> 3) & 1)], (col & 1) != 0);
  }

  // fn(col, kept) for the keys [col_begin, col_end) of query `row`, one draw
  // per four of them (the CPU kernels, row by row).
  template <typename Fn>
  FLASH_HOST_DEVICE void for_row(int row, int col_begin, int col_end, Fn&& fn) const {
    const uint32_t qp = query_pair(row);
    const int row_half = (row >> 3) & 1;
    for (int tile = col_begin & ~15; tile < col_end; tile += 16) {
      for (int pair = 0; pair < 4; ++pair) {
        uint32_t w[4];
        draw(key_group(tile + 2 * pair), qp, w);
        for (int col_half = 0; col_half < 2; ++col_half) {
          for (int odd = 0; odd < 2; ++odd) {
            const int col = tile + 8 * col_half + 2 * pair + odd;
            if (col >= col_begin && col < col_end) fn(col, kept(w[row_half * 2 + col_half], odd != 0));
          }
        }
      }
    }
  }
};

}  // namespace flash
