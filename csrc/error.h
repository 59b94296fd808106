// Errors raised by our C++ code: FLASH_CHECK(cond, parts...) throws a
// std::runtime_error whose message is the parts (C strings, std::strings;
// numbers go through num() in format.h) joined, which reaches Python as a
// RuntimeError (the stable ABI carries no richer error types). No ostream is
// involved: a number streamed from code compiled into this extension once
// crashed inside libstdc++'s locale facets on the GPU machine's image.
// Free of torch headers, so CUDA kernel files can include it cheaply.
#pragma once

#include <stdexcept>
#include <string>
#include <string_view>

namespace flash_attn_ext {

inline void append_parts(std::string&) {}
template <typename... Rest>
void append_parts(std::string& s, std::string_view first, const Rest&... rest) {
  s.append(first);
  append_parts(s, rest...);
}

template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::string message;
  append_parts(message, parts...);
  throw std::runtime_error(message);
}

}  // namespace flash_attn_ext

// The message parts are evaluated only when the check fails.
#define FLASH_CHECK(cond, ...)                        \
  do {                                                \
    if (!(cond)) ::flash_attn_ext::fail(__VA_ARGS__); \
  } while (0)
