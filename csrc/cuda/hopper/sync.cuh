// Hopper (sm_90a) synchronisation for warp-specialized kernels, as raw PTX:
// shared-memory mbarriers (the transaction-counting barriers that TMA loads
// complete), named barriers a subset of the block's warps meets at, and
// setmaxnreg, which moves registers between warpgroups of one block.
//
// mbarrier phases. A barrier counts arrivals (and, with expect_tx, bytes);
// when both reach zero its current phase completes and the next begins.
// Waiters name the phase by its parity: try_wait.parity(P) returns true once
// the phase of parity P is complete, and at once when P is the parity of
// the phase before the current one. A ring of N stages used round after
// round therefore waits, on its k-th use of a stage, for parity k & 1 on the
// "full" barrier (consumers) and for parity (k & 1) ^ 1 on the "empty"
// barrier (the producer, whose first round passes without a wait).
//
// Like wgmma.cuh, the instructions compile only for sm_90a
// (FLASH_SM90_ENABLED); elsewhere the wrappers are empty, and the kernels
// using them are launched only on compute capability 9.0.
#pragma once

#include <cstdint>

#include "wgmma.cuh"

namespace flash {
namespace sm90 {

// One 8-byte mbarrier in shared memory, by its shared-space address.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t arrivals) {
#ifdef FLASH_SM90_ENABLED
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
#endif
}

// After the initialising thread's mbar_init calls and before the barrier
// (a __syncthreads) that lets other threads, and the TMA unit, use them.
__device__ __forceinline__ void fence_mbar_init() {
#ifdef FLASH_SM90_ENABLED
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// One arrival that also announces `bytes` more transaction bytes for the
// current phase (the TMA loads issued next complete them).
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#ifdef FLASH_SM90_ENABLED
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#endif
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#ifdef FLASH_SM90_ENABLED
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#endif
}

// Spins until the phase of parity `parity` is complete. try_wait suspends
// the thread for a system-dependent time before it returns false, so the
// loop does not hammer shared memory. Acquire semantics (the default
// .acquire.cta): the TMA writes that completed the phase are visible after.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#ifdef FLASH_SM90_ENABLED
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
#endif
}

// Named barriers 1..15 (0 is __syncthreads'): `threads` (a multiple of 32)
// arrivals complete one. bar.sync arrives and waits; bar.arrive only
// arrives, which is how one group of warps signals another without waiting.
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// named_barrier_sync(id, threads): wgmma.cuh.

// setmaxnreg: the calling warpgroup's per-thread register budget becomes
// kRegs (a multiple of 8 in [24, 256]); all four warps of the warpgroup must
// execute it. dec hands registers back to the block's pool, inc blocks
// until the pool has them, so the block's total at launch (registers per
// thread x threads, what ptxas reports) must cover the sum of the budgets.
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg: 24..256 in steps of 8");
#ifdef FLASH_SM90_ENABLED
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg: 24..256 in steps of 8");
#ifdef FLASH_SM90_ENABLED
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}

}  // namespace sm90
}  // namespace flash
