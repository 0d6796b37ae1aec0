// libFuzzer target: `hybrit serve`'s request parsing, body bytes to a CompletionRequest. Any input
// must give a request or one RequestError (the server's 400); never a crash or another exception.
#include <cstddef>
#include <cstdint>
#include <string>

#include "inference/server.hpp"
#include "model/text.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const hybrit::ByteTokenizer tokenizer;
  const std::string body(reinterpret_cast<const char*>(data), size);
  try {
    const hybrit::CompletionRequest r = hybrit::parse_completion_request(hybrit::parse_request_body(body), tokenizer, 16);
    if (r.prompts.empty() || r.generation.max_tokens < 1) __builtin_trap();  // the parser's own promises
  } catch (const hybrit::RequestError& e) {
    if (e.message.size() > 4096) __builtin_trap();  // messages quote short prefixes only
  }
  return 0;
}
