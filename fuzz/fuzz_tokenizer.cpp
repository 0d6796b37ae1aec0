// libFuzzer target: the byte tokenizer round trip, printable_utf8, and a BPE model loaded from
// arbitrary bytes (a checkpoint's tokenizer_model). Round trips must be exact; bad model bytes
// must be one hybrit::Error.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "model/text.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  static const hybrit::ByteTokenizer bytes;
  std::vector<int32_t> ids;
  bytes.encode(text, ids);
  if (bytes.decode(ids.data(), ids.size()) != text) __builtin_trap();
  const std::string shown = hybrit::printable_utf8(text);
  if (hybrit::printable_utf8(shown) != shown) __builtin_trap();  // printable text stays as it is
  try {
    const auto bpe = hybrit::bpe_tokenizer_from_bytes(text, "fuzz.model");
    bpe->encode("The quick brown fox", ids);
    for (int32_t id : ids)
      if (id < 0 || id >= bpe->vocab_size()) __builtin_trap();
    bpe->decode(ids.data(), ids.size());
  } catch (const hybrit::Error&) {
  }
  return 0;
}
