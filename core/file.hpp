// Whole-file writes that are checked and atomic: the run folder's small files (config.yaml,
// tokenizer.json, metrics.jsonl rewritten on resume, sample.txt) go through here, so a full disk
// or a crash mid-write leaves the previous file whole and says what failed.
#pragma once
#include <string>
#include <string_view>

namespace hybrit {

// Writes `bytes` to `path` through `path.tmp`: every write checked, the data fsynced, then renamed
// over `path`. On failure an Error (ErrorKind::io) naming the file and the reason; `path` is
// untouched and the temporary is removed.
void write_file_atomically(const std::string& path, std::string_view bytes);

}  // namespace hybrit
