// libFuzzer target: the YAML config parsers (training and reduction), `--set` included. Any input
// must give a config or one hybrit::Error; never a crash, a hang, another exception or a leak.
#include <cstddef>
#include <cstdint>
#include <string>

#include "clustering/reduce.hpp"
#include "model/config.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // The input's first line, when it starts with "set ", is one --set assignment; the rest is the file.
  std::string text(reinterpret_cast<const char*>(data), size);
  std::vector<std::string> sets;
  if (text.rfind("set ", 0) == 0) {
    const size_t end = text.find('\n');
    sets.push_back(text.substr(4, end == std::string::npos ? std::string::npos : end - 4));
    text = end == std::string::npos ? "" : text.substr(end + 1);
  }
  try {
    const hybrit::TrainConfig c = hybrit::parse_train_config(text, "fuzz.yaml", sets);
    hybrit::parse_train_config(c.to_yaml(), "resolved.yaml");  // what a run writes must read back
  } catch (const hybrit::Error&) {
  }
  try {
    hybrit::parse_reduce_config(text, "fuzz.yaml", sets);
  } catch (const hybrit::Error&) {
  }
  return 0;
}
