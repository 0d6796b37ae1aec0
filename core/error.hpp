// The one exception family of hybrit. The CLI turns it into one line and a non-zero exit; the
// Python module into ValueError / OSError / RuntimeError / MemoryError by kind.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace hybrit {

enum class ErrorKind { invalid_argument, io, corrupt_data, unsupported, out_of_memory };

const char* to_string(ErrorKind kind);

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

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

}  // namespace hybrit
