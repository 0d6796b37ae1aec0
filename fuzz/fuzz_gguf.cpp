// libFuzzer target: the GGUF reader behind `hybrit generate/serve -m MODEL.gguf`. The input is the
// whole file (the seed is a small model hybrit exported); the reader must give a model or one
// hybrit::Error, never read past the end, overflow or allocate beyond what the file backs.
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

#include "inference/gguf.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = (std::filesystem::temp_directory_path() / ("hybrit-fuzz-" + std::to_string(::getpid()) + ".gguf")).string();
  static hybrit::Dispatcher dispatcher;  // one arena for the whole run
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), std::streamsize(size));
  }
  try {
    hybrit::read_gguf_model(dispatcher, path);
  } catch (const hybrit::Error&) {
  }
  return 0;
}
