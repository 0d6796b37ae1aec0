// Enum <-> text through one name table per enum (in enum order, its size checked against the
// enum's count with a static_assert where the table is defined), as ggml's GGML_OP_NAME: what a
// config or file holds, what errors list and what is printed come from the same strings.
#pragma once
#include <cstddef>
#include <string>

#include "core/error.hpp"

namespace hybrit {

// The enum value whose name is `text`; else an Error "what: expected a, b or c, got 'text'".
template <class Enum, size_t N>
Enum parse_name(const char* const (&names)[N], const std::string& text, const std::string& what) {
  std::string all;
  for (size_t i = 0; i < N; ++i) {
    if (text == names[i]) return static_cast<Enum>(i);
    all += std::string(i == 0 ? "" : i + 1 == N ? " or " : ", ") + names[i];
  }
  fail(ErrorKind::invalid_argument, what, ": expected ", all, ", got '", text, "'");
}

}  // namespace hybrit
