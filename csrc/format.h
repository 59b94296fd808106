// Numbers in our error messages are formatted here rather than streamed: a
// number streamed from code compiled into this extension instantiates
// ostream::operator<<(long) locally, and on the GPU machine's image (torch
// 2.11, g++ 13) that local instance crashed inside libstdc++'s locale facets,
// turning a clear error into a segfault. std::to_string touches no locale,
// so every number goes through it (FLASH_CHECK in tensor.h joins strings).
#pragma once


#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>

#include "tensor.h"

namespace flash_attn_ext {

template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
std::string num(T value) {
  return std::to_string(value);
}

// %g: 1e-39 and 1e+39 stay readable (std::to_string prints fixed-point).
inline std::string num(double value) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", value);
  return buf;
}

// "(2, 4, 16, 16)", as torch prints sizes.
inline std::string shape(IntArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(sizes[i]);
  }
  return s + ")";
}

}  // namespace flash_attn_ext
