// Hopper (sm_90a) building blocks: warpgroup MMA (wgmma) on operands in
// 128-byte-swizzled shared memory, and the cp.async loads / fragment stores
// that produce that layout. Compiled to real instructions only for sm_90a
// (__CUDA_ARCH_FEAT_SM90_ALL); the kernels that use them are launched only on
// compute capability 9.0 (see flash_bwd_launch.cuh).
//
// Shared-memory layout ("SW128 panels"). A tile of R rows x C columns of
// 16-bit elements (C a multiple of 64) is stored as C/64 panels; panel p holds
// columns [64p, 64p + 64) of every row, one 128-byte line per row, panels one
// after another (R * 128 bytes each). Inside each 8-row, 1024-byte atom the
// 16-byte chunk c of row r lives at chunk c ^ (r % 8): the 8 rows an MMA
// reads together fall in distinct banks. One physical layout serves both
// ways the backward reads a tile:
//   K-major   (the product's reduction dim runs along the row, e.g. K in K Q^T):
//             rows are 128 B apart, 8-row groups 1024 B (SBO); a k16 step is
//             +32 B inside the line, the next 64 columns are the next panel.
//   MN-major  (the reduction dim runs down the rows, e.g. K in dS K):
//             a k16 step is +16 rows (2048 B, SBO = 1024 B per 8 rows); the
//             next 64 output columns are the next panel (LBO = panel bytes).
//
// FP8 (e4m3, the FP8 forward): the same 128-byte lines hold 128 elements,
// and a wgmma reduces over k = 32 (32 bytes, as k = 16 of 16-bit types), so
// the byte offsets of K-major k-steps are unchanged. 8-bit operands must be
// K-major on both sides (no transpose immediates): V is read as V^T (see
// flash_fwd_sm90_ws_kernel.cuh).
//
// wgmma accumulator fragments (m64nN, fp32) are those of mma.sync per warp:
// warp w of the warpgroup owns rows 16w..16w+15, lane (g = lane/4, t = lane%4)
// holds acc[j][0..1] at (16w + g, 8j + 2t + {0,1}) and acc[j][2..3] at
// (16w + g + 8, same columns). A register A operand (m64k16) uses the
// mma.sync A fragment, so accumulators of one product convert into the A
// operand of the next without data movement.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

#include "../primitives.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FLASH_SM90_ENABLED 1
#endif

namespace flash {
namespace sm90 {

constexpr int kPanelCols = 64;      // 16-bit elements per 128-byte line
constexpr int kLineBytes = 128;

// The FP8 element type of the FP8 forward (float8_e4m3fn).
template <typename Element>
inline constexpr bool kIsFp8 = std::is_same_v<Element, __nv_fp8_e4m3>;
// Reduction elements of one wgmma: 32 bytes of a K-major line either way.
template <typename Element>
inline constexpr int kKStep = kIsFp8<Element> ? 32 : 16;

// Byte offset of element (row, col) of a tile with `rows` rows in SW128 panels.
__device__ __forceinline__ int swizzled_offset(int rows, int row, int col) {
  const int panel = col / kPanelCols, chunk = (col % kPanelCols) / 8;
  return panel * rows * kLineBytes + row * kLineBytes + ((chunk ^ (row % 8)) << 4) + (col % 8) * 2;
}

// Rows [row0, row0 + kRows) x kCols of a row-major global matrix into SW128
// panels at `smem`; rows at or past `nrows` are zero-filled (not read).
// Consecutive threads copy consecutive 16-byte chunks of a row (coalesced).
template <int kRows, int kCols, int kNThreads, typename Element>
__device__ __forceinline__ void load_tile_sw128(char* smem, const Element* gmem, int64_t row_stride, int row0,
                                                int nrows, int tid) {
  constexpr int kChunksPerRow = kCols / 8;
  static_assert(kNThreads % kChunksPerRow == 0 && kRows % (kNThreads / kChunksPerRow) == 0, "threads must tile rows");
  constexpr int kRowStep = kNThreads / kChunksPerRow;
  const int c = tid % kChunksPerRow, r = tid / kChunksPerRow;
  const Element* src = gmem + int64_t(row0 + r) * row_stride + c * 8;
#pragma unroll
  for (int i = 0; i < kRows / kRowStep; ++i) {
    const int row = r + i * kRowStep;
    cp_async_16(smem + swizzled_offset(kRows, row, c * 8), src, row0 + row < nrows);
    src += kRowStep * row_stride;
  }
}

// Accumulator fragments of a 16 x kN strip (rows row0.., columns col0..) into
// an SW128 tile with `rows` rows, rounded to Element (4-byte stores; the
// swizzle makes the 8 rows of one store instruction hit distinct banks).
template <int kN, typename Element>
__device__ __forceinline__ void store_frag_sw128(char* smem, int rows, int row0, int col0, const float (&c)[kN / 8][4],
                                                 int lane) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int j = 0; j < kN / 8; ++j) {
    const int col = col0 + 8 * j + 2 * t;
    *reinterpret_cast<uint32_t*>(smem + swizzled_offset(rows, row0 + g, col)) = pack2<Element>(c[j][0], c[j][1]);
    *reinterpret_cast<uint32_t*>(smem + swizzled_offset(rows, row0 + g + 8, col)) = pack2<Element>(c[j][2], c[j][3]);
  }
}

// Shared-memory matrix descriptor for a 128-byte-swizzled operand starting at
// `addr` (a shared-space byte address; the atom it starts in must be
// 1024-byte aligned, which the panel layout guarantees for every start the
// kernels use). lbo / sbo in bytes (see the layout notes above).
__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return (uint64_t(1) << 62)                           // 128-byte swizzle
         | (uint64_t((sbo >> 4) & 0x3FFF) << 32)       // stride byte offset
         | (uint64_t((lbo >> 4) & 0x3FFF) << 16)       // leading byte offset
         | uint64_t((addr >> 4) & 0x3FFF);             // start address
}

// The descriptor of the operand `bytes` (a multiple of 16) past the one of
// `desc`: an add to the start-address field, which cannot carry out of its
// 14 bits (shared-memory addresses are below 2^18 bytes). Loops over
// k-slices advance one base descriptor instead of building each slice's
// from its address, which ptxas otherwise keeps as a loop-invariant
// register per slice (and spilled in the warp-specialized backward).
// The add is done on the low word (the address field cannot carry into the
// leading-byte-offset field above it either), so that it is one 32-bit add.
__device__ __forceinline__ uint64_t desc_advance(uint64_t desc, uint32_t bytes) {
  const uint32_t lo = static_cast<uint32_t>(desc) + (bytes >> 4), hi = static_cast<uint32_t>(desc >> 32);
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

__device__ __forceinline__ void wgmma_fence() {
#ifdef FLASH_SM90_ENABLED
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef FLASH_SM90_ENABLED
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Waits until at most N committed wgmma groups of this warpgroup are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#ifdef FLASH_SM90_ENABLED
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Generic-proxy writes to shared memory (st.shared, cp.async) made visible to
// the async proxy that wgmma reads through; before the barrier that publishes them.
__device__ __forceinline__ void fence_proxy_async() {
#ifdef FLASH_SM90_ENABLED
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Barrier over `threads` threads (a warpgroup) with its own id (1..15; 0 is __syncthreads).
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// The compiler sees a wgmma as an ordinary asm statement that reads/writes its
// registers at issue time. These empty volatile asms pin the registers: placed
// after wgmma_wait they keep reads of the accumulators (and the lifetime of a
// register A operand) after the wait.
template <int kN>
__device__ __forceinline__ void fence_regs(float (&acc)[kN][4]) {
#pragma unroll
  for (int j = 0; j < kN; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(acc[j][e])::"memory");
  }
}
template <int kN>
__device__ __forceinline__ void fence_regs(uint32_t (&a)[kN][4]) {
#pragma unroll
  for (int j = 0; j < kN; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[j][e])::"memory");
  }
}

#define FLASH_ACC4(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define FLASH_ACC_N32 FLASH_ACC4(0), FLASH_ACC4(1), FLASH_ACC4(2), FLASH_ACC4(3)
#define FLASH_ACC_N64 \
  FLASH_ACC4(0), FLASH_ACC4(1), FLASH_ACC4(2), FLASH_ACC4(3), FLASH_ACC4(4), FLASH_ACC4(5), FLASH_ACC4(6), FLASH_ACC4(7)
#define FLASH_ACC_N128                                                                                            \
  FLASH_ACC_N64, FLASH_ACC4(8), FLASH_ACC4(9), FLASH_ACC4(10), FLASH_ACC4(11), FLASH_ACC4(12), FLASH_ACC4(13), \
      FLASH_ACC4(14), FLASH_ACC4(15)
// N = 80: the key blocks of the forward's plain head dim 256 tiles (launch_ws.cuh).
#define FLASH_ACC_N80 FLASH_ACC_N64, FLASH_ACC4(8), FLASH_ACC4(9)
#define FLASH_REGS_16 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define FLASH_REGS_32                                                                                            \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define FLASH_REGS_40                                                                                            \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39}"
#define FLASH_REGS_64                                                                                              \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "   \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, " \
  "%45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// D (64 x N) (+)= A (64 x 16) * B (16 x N), A and B from shared memory.
// kTransA / kTransB: 0 for K-major operands, 1 for MN-major ones.
// accumulate = false overwrites D (the first k-step of a product).
// The accumulators are operands %0..%(N/2 - 1); the inputs follow, and their
// operand numbers are spelled out per N.
#define FLASH_WGMMA_SS(N, TY, REGS, ACC, DA, DB, SC, TA, TB)                                               \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SC ", 0;\n"                                              \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " REGS ", " DA ", " DB ", p, 1, 1, " \
               TA ", " TB ";\n}\n"                                                                           \
               : ACC                                                                                       \
               : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)), "n"(kTransA), "n"(kTransB))
// Register A operand (m64k16 fragment, 4 x 32-bit per thread).
#define FLASH_WGMMA_RS(N, TY, REGS, ACC, A0, A1, A2, A3, DB, SC, TB)                                            \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SC ", 0;\n"                                                  \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " REGS ", {" A0 ", " A1 ", " A2 \
               ", " A3 "}, " DB ", p, 1, 1, " TB ";\n}\n"                                                       \
               : ACC                                                                                           \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(int(accumulate)), "n"(kTransB))

// The e4m3 forms (k32): no transpose immediates, both operands K-major.
#define FLASH_WGMMA_SS_E4M3(N, REGS, ACC, DA, DB, SC)                                                     \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SC ", 0;\n"                                             \
               "wgmma.mma_async.sync.aligned.m64n" #N "k32.f32.e4m3.e4m3 " REGS ", " DA ", " DB ", p, 1, 1;\n}\n" \
               : ACC                                                                                      \
               : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)))
#define FLASH_WGMMA_RS_E4M3(N, REGS, ACC, A0, A1, A2, A3, DB, SC)                                                  \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SC ", 0;\n"                                                     \
               "wgmma.mma_async.sync.aligned.m64n" #N "k32.f32.e4m3.e4m3 " REGS ", {" A0 ", " A1 ", " A2 ", " A3 \
               "}, " DB ", p, 1, 1;\n}\n"                                                                        \
               : ACC                                                                                              \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(int(accumulate)))

template <typename Element, int kN, int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_ss(float (&d)[kN / 8][4], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  static_assert(kN == 32 || kN == 64 || kN == 80 || kN == 128, "wgmma_ss: N must be 32, 64, 80 or 128");
  static_assert(kN != 80 || (!kIsFp8<Element> && kTransA == 0 && kTransB == 0),
                "wgmma_ss: N = 80 is the forward's 16-bit K-major S product");
  static_assert(!kIsFp8<Element> || (kTransA == 0 && kTransB == 0 && kN >= 64),
                "wgmma_ss: e4m3 operands are K-major, N 64 or 128");
#ifdef FLASH_SM90_ENABLED
  constexpr bool kBf16 = std::is_same_v<Element, __nv_bfloat16>;
  if constexpr (kIsFp8<Element>) {
    if constexpr (kN == 64) FLASH_WGMMA_SS_E4M3(64, FLASH_REGS_32, FLASH_ACC_N64, "%32", "%33", "%34");
    else FLASH_WGMMA_SS_E4M3(128, FLASH_REGS_64, FLASH_ACC_N128, "%64", "%65", "%66");
  } else if constexpr (kN == 32) {
    if constexpr (kBf16) FLASH_WGMMA_SS(32, "bf16", FLASH_REGS_16, FLASH_ACC_N32, "%16", "%17", "%18", "%19", "%20");
    else FLASH_WGMMA_SS(32, "f16", FLASH_REGS_16, FLASH_ACC_N32, "%16", "%17", "%18", "%19", "%20");
  } else if constexpr (kN == 64) {
    if constexpr (kBf16) FLASH_WGMMA_SS(64, "bf16", FLASH_REGS_32, FLASH_ACC_N64, "%32", "%33", "%34", "%35", "%36");
    else FLASH_WGMMA_SS(64, "f16", FLASH_REGS_32, FLASH_ACC_N64, "%32", "%33", "%34", "%35", "%36");
  } else if constexpr (kN == 80) {
    if constexpr (kBf16) FLASH_WGMMA_SS(80, "bf16", FLASH_REGS_40, FLASH_ACC_N80, "%40", "%41", "%42", "%43", "%44");
    else FLASH_WGMMA_SS(80, "f16", FLASH_REGS_40, FLASH_ACC_N80, "%40", "%41", "%42", "%43", "%44");
  } else {
    if constexpr (kBf16) FLASH_WGMMA_SS(128, "bf16", FLASH_REGS_64, FLASH_ACC_N128, "%64", "%65", "%66", "%67", "%68");
    else FLASH_WGMMA_SS(128, "f16", FLASH_REGS_64, FLASH_ACC_N128, "%64", "%65", "%66", "%67", "%68");
  }
#endif
}

template <typename Element, int kN, int kTransB>
__device__ __forceinline__ void wgmma_rs(float (&d)[kN / 8][4], const uint32_t (&a)[4], uint64_t desc_b,
                                         bool accumulate) {
  static_assert(kN == 64 || kN == 128, "wgmma_rs: N must be 64 or 128");
  static_assert(!kIsFp8<Element> || kTransB == 0, "wgmma_rs: e4m3 B is K-major");
#ifdef FLASH_SM90_ENABLED
  constexpr bool kBf16 = std::is_same_v<Element, __nv_bfloat16>;
  if constexpr (kIsFp8<Element>) {
    if constexpr (kN == 64) FLASH_WGMMA_RS_E4M3(64, FLASH_REGS_32, FLASH_ACC_N64, "%32", "%33", "%34", "%35", "%36", "%37");
    else FLASH_WGMMA_RS_E4M3(128, FLASH_REGS_64, FLASH_ACC_N128, "%64", "%65", "%66", "%67", "%68", "%69");
  } else if constexpr (kN == 64) {
    if constexpr (kBf16)
      FLASH_WGMMA_RS(64, "bf16", FLASH_REGS_32, FLASH_ACC_N64, "%32", "%33", "%34", "%35", "%36", "%37", "%38");
    else FLASH_WGMMA_RS(64, "f16", FLASH_REGS_32, FLASH_ACC_N64, "%32", "%33", "%34", "%35", "%36", "%37", "%38");
  } else {
    if constexpr (kBf16)
      FLASH_WGMMA_RS(128, "bf16", FLASH_REGS_64, FLASH_ACC_N128, "%64", "%65", "%66", "%67", "%68", "%69", "%70");
    else FLASH_WGMMA_RS(128, "f16", FLASH_REGS_64, FLASH_ACC_N128, "%64", "%65", "%66", "%67", "%68", "%69", "%70");
  }
#endif
}

// acc (64 x kN) = A B^T over a reduction dim of kK: A (64 rows) and B (kN
// rows) both K-major in SW128 panels starting at a / b, whose 128-byte
// panels (64 16-bit or 128 e4m3 columns) are a_panel / b_panel bytes apart
// (k-steps of 32 bytes inside a line, the next panel every 4 steps).
// Issues the wgmmas, no commit.
template <typename Element, int kN, int kK>
__device__ __forceinline__ void wgmma_abt_kmajor(float (&acc)[kN / 8][4], uint32_t a, uint32_t a_panel, uint32_t b,
                                                 uint32_t b_panel) {
  const uint64_t desc_a = make_desc(a, 16, 8 * kLineBytes), desc_b = make_desc(b, 16, 8 * kLineBytes);
#pragma unroll
  for (int s = 0; s < kK / kKStep<Element>; ++s) {
    wgmma_ss<Element, kN, 0, 0>(acc, desc_advance(desc_a, (s / 4) * a_panel + (s % 4) * 32),
                                desc_advance(desc_b, (s / 4) * b_panel + (s % 4) * 32), s > 0);
  }
}

// Accumulator fragments of 16-column slices -> packed A fragments (one per
// k-slice of 16), as the register A operand of a following wgmma.
template <typename Element, int kSlices>
__device__ __forceinline__ void pack_a_frags(uint32_t (&a)[kSlices][4], const float (&c)[2 * kSlices][4]) {
#pragma unroll
  for (int s = 0; s < kSlices; ++s) {
    a[s][0] = pack2<Element>(c[2 * s][0], c[2 * s][1]);
    a[s][1] = pack2<Element>(c[2 * s][2], c[2 * s][3]);
    a[s][2] = pack2<Element>(c[2 * s + 1][0], c[2 * s + 1][1]);
    a[s][3] = pack2<Element>(c[2 * s + 1][2], c[2 * s + 1][3]);
  }
}

// Four fp32 values to e4m3 bytes (round to nearest, saturating at 448), the
// first in the lowest byte: cvt's e4m3x2 puts its first operand in the high
// byte.
__device__ __forceinline__ uint32_t pack4_e4m3(float x0, float x1, float x2, float x3) {
  uint16_t lo = 0, hi = 0;
#ifdef FLASH_SM90_ENABLED
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(lo) : "f"(x1), "f"(x0));
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(hi) : "f"(x3), "f"(x2));
#endif
  return uint32_t(lo) | (uint32_t(hi) << 16);
}

// The e4m3 form: accumulator fragments of 32-column slices -> the A
// operand of a k32 wgmma, WITHOUT moving data between threads. The k32
// A fragment of lane (g, t) holds row g at k-positions 4t..4t+3 and
// 16+4t..16+4t+3 (registers 0 and 2; row g + 8 in 1 and 3), while the
// accumulator gives it columns 2t, 2t+1 of each of the slice's four n-tiles.
// So position 16h + 4t + 2i + e of the slice carries key (column)
// 16h + 8i + 2t + e (h, i, e in {0, 1}): a fixed permutation of the 32 keys
// of every slice, the same for every lane. O += P V is unchanged when V's
// keys are permuted alike, which the FP8 forward's V^T layout does
// (flash_attn_ext/fp8.py, transpose_v): no shuffle, no byte_perm.
template <int kSlices>
__device__ __forceinline__ void pack_a_frags_e4m3(uint32_t (&a)[kSlices][4], const float (&c)[4 * kSlices][4]) {
#pragma unroll
  for (int s = 0; s < kSlices; ++s) {
    a[s][0] = pack4_e4m3(c[4 * s][0], c[4 * s][1], c[4 * s + 1][0], c[4 * s + 1][1]);
    a[s][1] = pack4_e4m3(c[4 * s][2], c[4 * s][3], c[4 * s + 1][2], c[4 * s + 1][3]);
    a[s][2] = pack4_e4m3(c[4 * s + 2][0], c[4 * s + 2][1], c[4 * s + 3][0], c[4 * s + 3][1]);
    a[s][3] = pack4_e4m3(c[4 * s + 2][2], c[4 * s + 2][3], c[4 * s + 3][2], c[4 * s + 3][3]);
  }
}

// acc (64 x kN) += A B^T over a reduction dim of 32 kSlices: A the packed
// e4m3 register fragments (pack_a_frags_e4m3), B (kN rows) K-major in one
// SW128 panel of 128 keys a line starting at b (k-slice s 32 bytes further
// along the lines). Issues the wgmmas, no commit.
template <int kN, int kSlices>
__device__ __forceinline__ void wgmma_rs_e4m3_b_kmajor(float (&acc)[kN / 8][4], const uint32_t (&a)[kSlices][4],
                                                       uint32_t b) {
  static_assert(kSlices * 32 <= kLineBytes, "the keys of one B line");
  const uint64_t desc_b = make_desc(b, 16, 8 * kLineBytes);
#pragma unroll
  for (int s = 0; s < kSlices; ++s) {
    wgmma_rs<__nv_fp8_e4m3, kN, 0>(acc, a[s], desc_advance(desc_b, s * 32), true);
  }
}

// acc (64 x kN) += A B over a reduction dim of 16 kSlices: A the packed
// register fragments, B MN-major in SW128 panels of `panel` bytes starting
// at b (k-slice s 16 lines further). Issues the wgmmas, no commit.
template <typename Element, int kN, int kSlices>
__device__ __forceinline__ void wgmma_rs_b_mn(float (&acc)[kN / 8][4], const uint32_t (&a)[kSlices][4], uint32_t b,
                                              uint32_t panel) {
  const uint64_t desc_b = make_desc(b, panel, 8 * kLineBytes);
#pragma unroll
  for (int s = 0; s < kSlices; ++s) {
    wgmma_rs<Element, kN, 1>(acc, a[s], desc_advance(desc_b, s * 16 * kLineBytes), true);
  }
}

// acc (64 x kN) += A B over a reduction dim of 16 kSlices: A K-major in
// one SW128 panel at a (64 rows of 128 bytes; k-slice s 32 bytes further),
// B MN-major in SW128 panels of `panel` bytes starting at b (k-slice s 16
// lines further). The backwards' dV += P^T dO and dK += dS^T Q where P^T
// and dS^T meet in shared memory (head dim 256). Issues the wgmmas, no
// commit.
template <typename Element, int kN, int kSlices>
__device__ __forceinline__ void wgmma_ss_a_kmajor_b_mn(float (&acc)[kN / 8][4], uint32_t a, uint32_t b,
                                                       uint32_t panel) {
#pragma unroll
  for (int s = 0; s < kSlices; ++s) {
    wgmma_ss<Element, kN, 0, 1>(acc, make_desc(a + s * 32, 16, 8 * kLineBytes),
                                make_desc(b + s * 16 * kLineBytes, panel, 8 * kLineBytes), true);
  }
}

#undef FLASH_WGMMA_SS
#undef FLASH_WGMMA_RS
#undef FLASH_WGMMA_SS_E4M3
#undef FLASH_WGMMA_RS_E4M3
#undef FLASH_REGS_16
#undef FLASH_REGS_32
#undef FLASH_REGS_64
#undef FLASH_ACC_N32
#undef FLASH_ACC_N64
#undef FLASH_ACC_N128
#undef FLASH_ACC4

}  // namespace sm90
}  // namespace flash
