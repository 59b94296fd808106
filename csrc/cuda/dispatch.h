// Compile-time dispatch from runtime values (dtype, padded head dim, causal)
// to the launcher instantiations this build compiled. setup.py defines
// FLASH_ATTN_EXT_HDIM_<D> and FLASH_ATTN_EXT_DTYPE_<FP16|BF16> for the
// instantiations it compiles, so a restricted development build raises a
// clear error instead of failing to load with an undefined symbol.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "../format.h"
#include "../tensor.h"

namespace flash_attn_ext {

inline constexpr int kCompiledHeadDims[] = {
#ifdef FLASH_ATTN_EXT_HDIM_32
    32,
#endif
#ifdef FLASH_ATTN_EXT_HDIM_64
    64,
#endif
#ifdef FLASH_ATTN_EXT_HDIM_96
    96,
#endif
#ifdef FLASH_ATTN_EXT_HDIM_128
    128,
#endif
#ifdef FLASH_ATTN_EXT_HDIM_192
    192,
#endif
#ifdef FLASH_ATTN_EXT_HDIM_256
    256,
#endif
    0  // sentinel, keeps the array non-empty
};

// The smallest compiled head dim that holds `head_dim`; inputs are padded up to it.
inline int padded_head_dim(int head_dim) {
  for (int d : kCompiledHeadDims) {
    if (d >= head_dim) return d;
  }
  fail("flash_attn_ext: no CUDA kernel compiled for head dim ", num(head_dim),
              " in this build (rebuild with FLASH_ATTN_EXT_HDIMS including a head dim >= ", num(head_dim), ")");
}

template <typename Fn>
void dispatch_head_dim(int padded, Fn&& fn) {
#define FLASH_ATTN_EXT_TRY_HDIM(D) \
  if (padded == D) return fn(std::integral_constant<int, D>{});
#ifdef FLASH_ATTN_EXT_HDIM_32
  FLASH_ATTN_EXT_TRY_HDIM(32)
#endif
#ifdef FLASH_ATTN_EXT_HDIM_64
  FLASH_ATTN_EXT_TRY_HDIM(64)
#endif
#ifdef FLASH_ATTN_EXT_HDIM_96
  FLASH_ATTN_EXT_TRY_HDIM(96)
#endif
#ifdef FLASH_ATTN_EXT_HDIM_128
  FLASH_ATTN_EXT_TRY_HDIM(128)
#endif
#ifdef FLASH_ATTN_EXT_HDIM_192
  FLASH_ATTN_EXT_TRY_HDIM(192)
#endif
#ifdef FLASH_ATTN_EXT_HDIM_256
  FLASH_ATTN_EXT_TRY_HDIM(256)
#endif
#undef FLASH_ATTN_EXT_TRY_HDIM
  fail("flash_attn_ext: head dim ", num(padded), " is not compiled in this build");
}

template <typename Fn>
void dispatch_dtype(ScalarType dtype, Fn&& fn) {
#ifdef FLASH_ATTN_EXT_DTYPE_FP16
  if (dtype == ScalarType::Half) return fn(__half{});
#endif
#ifdef FLASH_ATTN_EXT_DTYPE_BF16
  if (dtype == ScalarType::BFloat16) return fn(__nv_bfloat16{});
#endif
  FLASH_CHECK(dtype == ScalarType::Half || dtype == ScalarType::BFloat16, "flash_attn_ext: the CUDA kernels support float16 and ",
              "bfloat16 only, got ", dtype_name(dtype), " (the CPU implementation also takes float32 and float64)");
  fail("flash_attn_ext: dtype ", dtype_name(dtype),
              " is not compiled in this build (rebuild with FLASH_ATTN_EXT_DTYPES including it)");
}

template <typename Fn>
void dispatch_bool(bool value, Fn&& fn) {
  if (value) return fn(std::true_type{});
  return fn(std::false_type{});
}

}  // namespace flash_attn_ext
