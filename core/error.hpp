// The one exception family of hybrit. The CLI turns it into one line and a non-zero exit; the
// Python module into ValueError / OSError / RuntimeError / MemoryError by kind.
#pragma once
#include <sstream>
#include <stdexcept>
#include <iterator>
#include <string>

namespace hybrit {

enum class ErrorKind { invalid_argument, io, corrupt_data, unsupported, out_of_memory, count };
// In enum order; the count is checked where to_string is defined (core/tensor.cpp).
inline constexpr const char* kErrorKindNames[] = {"invalid argument", "I/O error", "corrupt data", "unsupported", "out of memory"};

const char* to_string(ErrorKind kind);

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message, std::string field = "") : std::runtime_error(message), kind_(kind), field_(std::move(field)) {}
  ErrorKind kind() const noexcept { return kind_; }
  // The request field or option the error is about ("top_p"), when one is; front ends that answer
  // per field (the server's 400 `param`) read it here rather than from the message.
  const std::string& field() const noexcept { return field_; }

 private:
  ErrorKind kind_;
  std::string field_;
};

// At most `max` characters of `text`, for a message that quotes a value (a value may be megabytes
// long, and the message goes to a terminal, a log or an HTTP client): its start and "...".
inline std::string shortened(const std::string& text, size_t max = 60) { return text.size() <= max ? text : text.substr(0, max - 3) + "..."; }

// Concatenates anything that has operator<< into one string; used to build error messages.
template <class... Parts>
std::string cat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

template <class... Parts>
[[noreturn]] void fail(ErrorKind kind, const Parts&... parts) {
  throw Error(kind, cat(parts...));
}

// An invalid value of one field: the message is "field: ...", and Error::field() names it.
template <class... Parts>
[[noreturn]] void fail_field(const std::string& field, const Parts&... parts) {
  throw Error(ErrorKind::invalid_argument, cat(field, ": ", parts...), field);
}

}  // namespace hybrit
