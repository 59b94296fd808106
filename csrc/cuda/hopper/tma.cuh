// The Tensor Memory Accelerator (TMA, sm_90) for the Hopper kernels: tensor
// maps encoded on the host, and the device instruction that copies one box
// of a tensor into shared memory, completing an mbarrier (sync.cuh).
//
// Host. A tensor map (CUtensorMap, 128 opaque bytes) describes a global
// tensor, the box one copy moves and the shared-memory swizzle. It is
// encoded by the driver's cuTensorMapEncodeTiled, which this file obtains at
// run time through the runtime's cudaGetDriverEntryPoint(ByVersion): the
// extension links libcudart only, never libcuda, so that the package still
// imports on machines without a GPU driver (CI). A driver without the entry
// point makes the encoder null and the kernels that need it fall back
// (flash_fwd_sm90_ws's launcher). Maps travel to the kernel by value, inside
// a __grid_constant__ parameter, which keeps them valid under CUDA graphs.
//
// The maps here describe a (batch, seqlen, heads, dim) tensor of 16-bit
// elements with a contiguous last dim (flash_params.h's layout), as 4-D
// tensors {dim, seqlen, heads, batch} (innermost first) with the params'
// strides, and boxes of 64 columns (128 bytes) x `box_rows` rows of one
// (head, batch), written with CU_TENSOR_MAP_SWIZZLE_128B. Into a
// 1024-byte-aligned destination that is exactly one panel of wgmma.cuh's
// SW128 layout: row r at r * 128 bytes, its 16-byte chunk c at c ^ (r % 8).
// A tile of kCols columns is kCols / 64 boxes, panel after panel. Rows past
// seqlen (the last block of a sequence) are outside the tensor, and the TMA
// unit zero-fills them; they still count toward the barrier's bytes.
#pragma once

#include <cuda.h>  // CUtensorMap and its enums (types only: no libcuda symbol is referenced)
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "wgmma.cuh"

namespace flash {
namespace sm90 {

// ---------------------------------------------------------------- host

using TensorMapEncodeTiled = PFN_cuTensorMapEncodeTiled_v12000;

// The driver's cuTensorMapEncodeTiled, looked up once per process; null
// when the driver does not provide it.
inline TensorMapEncodeTiled tensor_map_encoder() {
  static const TensorMapEncodeTiled encoder = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    // The ABI of the 12.0 version of the symbol, whatever the driver's own.
    const cudaError_t status = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                                cudaEnableDefault, &found);
#else
    const cudaError_t status = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &found);
#endif
    if (status != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();  // not sticky, but a later launch check must not report it
      return TensorMapEncodeTiled(nullptr);
    }
    return reinterpret_cast<TensorMapEncodeTiled>(fn);
  }();
  return encoder;
}

// A (batch, seqlen, heads, dim) tensor of `dtype` (`elem_bytes` bytes an
// element) as a TMA map (see the file comment; boxes 128 bytes wide: 64
// 16-bit or 32 fp32 columns); strides in elements, the last dim contiguous.
// Returns null on success, else why TMA cannot describe the tensor (the
// caller falls back): a base or a stride that is not a multiple of 16
// bytes, a stride of 2^40 bytes or more, a dim that is not a multiple of a
// box's columns, or a size over 2^32. The stride of a dim of size 1 is never
// used and is replaced by a valid one (such dims may carry any stride in
// PyTorch).
inline const char* encode_bshd_map_of(CUtensorMap* map, const void* base, CUtensorMapDataType dtype,
                                      int64_t elem_bytes, int64_t batch, int64_t seqlen, int64_t heads, int64_t dim,
                                      int64_t batch_stride, int64_t row_stride, int64_t head_stride, int box_rows) {
  const TensorMapEncodeTiled encode = tensor_map_encoder();
  if (encode == nullptr) return "the CUDA driver does not provide cuTensorMapEncodeTiled";
  const int64_t box_cols = kLineBytes / elem_bytes;
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0) return "a tensor's data pointer is not 16-byte aligned";
  if (dim % box_cols != 0) return "the head dim is not a multiple of a box's columns";
  if (box_rows < 1 || box_rows > 256) return "a TMA box has more than 256 rows";
  const int64_t sizes[4] = {dim, seqlen, heads, batch};
  int64_t strides[4] = {1, row_stride, head_stride, batch_stride};
  const int64_t fallback_stride = seqlen > 1 ? row_stride : (heads > 1 ? head_stride : dim);
  for (int i = 1; i < 4; ++i) {
    if (sizes[i] <= 1) strides[i] = fallback_stride;
  }
  cuuint64_t global_dim[4];
  cuuint64_t global_strides[3];
  for (int i = 0; i < 4; ++i) {
    if (sizes[i] < 1 || sizes[i] > (int64_t(1) << 32)) return "a tensor dim is empty or larger than 2^32";
    global_dim[i] = static_cast<cuuint64_t>(sizes[i]);
  }
  for (int i = 1; i < 4; ++i) {
    const int64_t bytes = strides[i] * elem_bytes;
    if (bytes <= 0 || bytes % 16 != 0 || bytes >= (int64_t(1) << 40)) {
      return "a tensor stride is not a positive multiple of 16 bytes below 2^40";
    }
    global_strides[i - 1] = static_cast<cuuint64_t>(bytes);
  }
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  // L2 promotion of 128 B: each box row is one 128-byte line (the choice of
  // FlashAttention-3 and CUTLASS for such boxes); zero fill out of bounds.
  const CUresult result =
      encode(map, dtype, 4, const_cast<void*>(base),
             global_dim, global_strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
             CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return result == CUDA_SUCCESS ? nullptr : "cuTensorMapEncodeTiled rejected the tensor";
}

// The 16-bit inputs (the file comment's maps).
inline const char* encode_bshd_map(CUtensorMap* map, const void* base, bool bf16, int64_t batch, int64_t seqlen,
                                   int64_t heads, int64_t dim, int64_t batch_stride, int64_t row_stride,
                                   int64_t head_stride, int box_rows) {
  return encode_bshd_map_of(map, base, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
                            batch, seqlen, heads, dim, batch_stride, row_stride, head_stride, box_rows);
}

// The map of Element's type: 16-bit inputs as above; e4m3 (the FP8
// forward) as bytes, whose 128-byte boxes are 128 columns (the TMA unit only
// moves them, so UINT8 describes them exactly).
template <typename Element>
inline const char* encode_bshd_map_for(CUtensorMap* map, const void* base, int64_t batch, int64_t seqlen,
                                       int64_t heads, int64_t dim, int64_t batch_stride, int64_t row_stride,
                                       int64_t head_stride, int box_rows) {
  if constexpr (kIsFp8<Element>) {
    return encode_bshd_map_of(map, base, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, batch, seqlen, heads, dim, batch_stride,
                              row_stride, head_stride, box_rows);
  } else {
    return encode_bshd_map(map, base, std::is_same_v<Element, __nv_bfloat16>, batch, seqlen, heads, dim,
                           batch_stride, row_stride, head_stride, box_rows);
  }
}

// An fp32 (batch, seqlen, heads, dim) tensor (the backward's dq_accum),
// boxes of 32 columns: what the TMA reduction adds into.
inline const char* encode_bshd_map_f32(CUtensorMap* map, const void* base, int64_t batch, int64_t seqlen,
                                       int64_t heads, int64_t dim, int64_t batch_stride, int64_t row_stride,
                                       int64_t head_stride, int box_rows) {
  return encode_bshd_map_of(map, base, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, batch, seqlen, heads, dim, batch_stride,
                            row_stride, head_stride, box_rows);
}

// -------------------------------------------------------------- device

// The box at coordinates (c0 = column, c1 = row, c2 = head, c3 = batch),
// innermost first, into shared memory at `dst` (1024-byte aligned for the
// SW128 layout), completing `box bytes` of transactions on mbarrier `bar`.
// `map` is the address of a __grid_constant__ kernel parameter.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1, int c2,
                                            int c3) {
#ifdef FLASH_SM90_ENABLED
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
#endif
}

// Pulls a tensor map into the TMA unit's descriptor cache ahead of its
// first use.
__device__ __forceinline__ void tma_prefetch_map(const CUtensorMap* map) {
#ifdef FLASH_SM90_ENABLED
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
#endif
}

}  // namespace sm90
}  // namespace flash
