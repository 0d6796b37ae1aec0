#include "training/data.hpp"

#include <glob.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/error.hpp"
#include "core/log.hpp"
#include "core/rng.hpp"

namespace hybrit {

namespace fs = std::filesystem;

const char* to_string(CorpusFormat format) {
  switch (format) {
    case CorpusFormat::text: return "text";
    case CorpusFormat::fortune: return "fortune";
    case CorpusFormat::jsonl: return "jsonl";
  }
  return "?";
}

namespace {

// Streams of the counter-based generator, so the split and the batches never share draws.
constexpr uint64_t kSplitStream = 0x53504c4954ull;  // "SPLIT"
constexpr uint64_t kBatchStream = 0x4241544348ull;  // "BATCH"

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(ErrorKind::io, path, ": cannot read (", std::strerror(errno), ")");
  std::ostringstream s;
  s << in.rdbuf();
  if (in.bad()) fail(ErrorKind::io, path, ": read error");
  return s.str();
}

// Lines without their terminator (a trailing \r is dropped too, for files from Windows).
std::vector<std::string_view> split_lines(std::string_view text) {
  std::vector<std::string_view> lines;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(start, end - start);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    lines.push_back(line);
    start = end + 1;
  }
  return lines;
}

bool blank(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isspace(c); });
}

// Records made of lines, ended by lines for which `is_separator` holds.
template <class IsSeparator>
void records_by_separator(std::string_view text, const IsSeparator& is_separator, std::vector<std::string>& out) {
  std::string record;
  auto flush = [&] {
    if (!blank(record)) out.push_back(record);
    record.clear();
  };
  for (std::string_view line : split_lines(text)) {
    if (is_separator(line)) {
      flush();
      continue;
    }
    if (!record.empty()) record += '\n';
    record += line;
  }
  flush();
}

void read_jsonl(const std::string& path, std::string_view text, std::vector<std::string>& out) {
  size_t line_no = 0;
  for (std::string_view line : split_lines(text)) {
    ++line_no;
    if (blank(line)) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::parse_error& e) {
      fail(ErrorKind::corrupt_data, path, ":", line_no, ": not valid JSON (", e.what(), ")");
    }
    if (!j.is_object() || !j.contains("text") || !j["text"].is_string())
      fail(ErrorKind::corrupt_data, path, ":", line_no, ": expected an object with a string field \"text\"");
    const std::string record = j["text"].get<std::string>();
    if (!blank(record)) out.push_back(record);
  }
}

bool has_fortune_separator(std::string_view text) {
  for (std::string_view line : split_lines(text))
    if (line == "%") return true;
  return false;
}

// `X.dat` beside a file `X` is the strfile(1) index of a fortune file, not text.
bool is_strfile_index(const fs::path& p) {
  std::error_code ec;
  return p.extension() == ".dat" && fs::is_regular_file(fs::path(p).replace_extension(), ec);
}

// Files of one source: a file, a folder (recursively, sorted) or a glob pattern.
std::vector<std::string> expand(const std::string& source) {
  std::vector<std::string> files;
  std::error_code ec;
  if (fs::is_directory(source, ec)) {
    for (const auto& entry : fs::recursive_directory_iterator(source, fs::directory_options::skip_permission_denied, ec)) {
      const std::string name = entry.path().filename().string();
      if (name.empty() || name[0] == '.') continue;
      if (!entry.is_regular_file()) continue;  // follows links; duplicates are removed later
      if (is_strfile_index(entry.path())) continue;
      files.push_back(entry.path().string());
    }
    if (ec) fail(ErrorKind::io, source, ": cannot list folder (", ec.message(), ")");
    std::sort(files.begin(), files.end());
    if (files.empty()) fail(ErrorKind::invalid_argument, source, ": folder holds no readable files");
    return files;
  }
  if (fs::is_regular_file(source, ec)) return {source};
  if (source.find_first_of("*?[") != std::string::npos) {
    glob_t g{};
    const int rc = glob(source.c_str(), 0, nullptr, &g);
    for (size_t i = 0; rc == 0 && i < g.gl_pathc; ++i)
      if (fs::is_regular_file(g.gl_pathv[i], ec) && !is_strfile_index(g.gl_pathv[i])) files.push_back(g.gl_pathv[i]);
    globfree(&g);
    if (files.empty()) fail(ErrorKind::invalid_argument, source, ": the pattern matches no files");
    return files;
  }
  fail(ErrorKind::io, source, ": no such file or folder");
}

}  // namespace

Corpus read_corpus(const std::vector<std::string>& sources, const std::string& format) {
  if (sources.empty()) fail(ErrorKind::invalid_argument, "corpus: no source files given");
  if (format != "auto" && format != "text" && format != "fortune" && format != "jsonl")
    fail(ErrorKind::invalid_argument, "corpus format: expected auto, text, fortune or jsonl, got '", format, "'");
  Corpus corpus;
  std::set<std::string> seen;  // canonical paths: a link to a file already read is skipped
  std::vector<std::string> contents;
  for (const auto& source : sources)
    for (const auto& file : expand(source)) {
      std::error_code ec;
      const std::string canonical = fs::canonical(file, ec).string();
      if (!seen.insert(ec ? file : canonical).second) continue;
      corpus.files.push_back(file);
      contents.push_back(read_file(file));
    }
  if (format == "auto") {
    const bool any_jsonl = std::any_of(corpus.files.begin(), corpus.files.end(), [](const std::string& f) { return fs::path(f).extension() == ".jsonl"; });
    const bool any_fortune = std::any_of(contents.begin(), contents.end(), [](const std::string& c) { return has_fortune_separator(c); });
    corpus.format = any_jsonl ? CorpusFormat::jsonl : any_fortune ? CorpusFormat::fortune : CorpusFormat::text;
  } else {
    corpus.format = format == "jsonl" ? CorpusFormat::jsonl : format == "fortune" ? CorpusFormat::fortune : CorpusFormat::text;
  }
  for (size_t i = 0; i < corpus.files.size(); ++i) {
    switch (corpus.format) {
      case CorpusFormat::jsonl: read_jsonl(corpus.files[i], contents[i], corpus.records); break;
      case CorpusFormat::fortune: records_by_separator(contents[i], [](std::string_view l) { return l == "%"; }, corpus.records); break;
      case CorpusFormat::text: records_by_separator(contents[i], blank, corpus.records); break;
    }
  }
  if (corpus.records.empty()) fail(ErrorKind::invalid_argument, "corpus (", corpus.files.size(), " files, format ", to_string(corpus.format), ") holds no records");
  return corpus;
}

void ByteTokenizer::encode(std::string_view text, std::vector<int32_t>& out) const {
  for (unsigned char c : text) out.push_back(int32_t(c));
}

std::string ByteTokenizer::decode(const int32_t* tokens, size_t n) const {
  std::string s;
  s.reserve(n);
  for (size_t i = 0; i < n; ++i) s += tokens[i] == kEndOfRecord ? '\n' : char(uint8_t(tokens[i]));
  return s;
}

std::string printable_utf8(std::string_view s) {
  static const char kReplacement[] = "\xef\xbf\xbd";
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      if (c < 0x20 && c != '\n' && c != '\t') out += kReplacement;
      else if (c == 0x7f) out += kReplacement;
      else out += char(c);
      ++i;
      continue;
    }
    // Length and the allowed range of the second byte (no overlongs, surrogates or > U+10FFFF).
    int len = 0;
    unsigned char lo = 0x80, hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf) len = 2;
    else if (c >= 0xe0 && c <= 0xef) len = 3, lo = c == 0xe0 ? 0xa0 : 0x80, hi = c == 0xed ? 0x9f : 0xbf;
    else if (c >= 0xf0 && c <= 0xf4) len = 4, lo = c == 0xf0 ? 0x90 : 0x80, hi = c == 0xf4 ? 0x8f : 0xbf;
    bool ok = len > 0 && i + size_t(len) <= s.size();
    for (int k = 1; ok && k < len; ++k) {
      const unsigned char b = static_cast<unsigned char>(s[i + size_t(k)]);
      ok = k == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xbf);
    }
    if (ok) {
      out.append(s.substr(i, size_t(len)));
      i += size_t(len);
    } else {
      out += kReplacement;
      ++i;
    }
  }
  return out;
}

TokenizedCorpus tokenize(const Corpus& corpus) {
  TokenizedCorpus t;
  const ByteTokenizer tok;
  t.record_offsets.reserve(corpus.records.size() + 1);
  t.record_offsets.push_back(0);
  for (const auto& record : corpus.records) {
    tok.encode(record, t.tokens);
    t.tokens.push_back(ByteTokenizer::kEndOfRecord);
    t.record_offsets.push_back(int64_t(t.tokens.size()));
  }
  return t;
}

namespace {
uint64_t fnv1a(const void* data, size_t n, uint64_t h = 1469598103934665603ull) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

constexpr char kCacheMagic[8] = {'H', 'Y', 'B', 'T', 'O', 'K', 'S', '1'};

struct CacheHeader {
  char magic[8];
  uint64_t key;
  uint64_t records;
  uint64_t tokens;
};
}  // namespace

uint64_t corpus_key(const Corpus& corpus) {
  std::string desc = cat(ByteTokenizer::kName, "|", to_string(corpus.format));
  for (const auto& f : corpus.files) {
    struct stat st {};
    stat(f.c_str(), &st);
    desc += cat("|", f, ":", st.st_size, ":", st.st_mtim.tv_sec, ".", st.st_mtim.tv_nsec);
  }
  return fnv1a(desc.data(), desc.size());
}

TokenizedCorpus tokenize_cached(const Corpus& corpus, const std::string& cache_path, bool* from_cache) {
  const uint64_t key = corpus_key(corpus);
  if (from_cache) *from_cache = false;
  // Layout: header, record offsets (records + 1 x i64), tokens (u16: byte vocab), FNV-1a checksum.
  if (std::ifstream in{cache_path, std::ios::binary}) {
    auto reject = [&](const std::string& why) { log_warn("token cache ", cache_path, ": ", why, "; rebuilding it"); };
    CacheHeader h{};
    if (!in.read(reinterpret_cast<char*>(&h), sizeof h) || std::memcmp(h.magic, kCacheMagic, 8) != 0) {
      reject("not a hybrit token cache");
    } else if (h.key != key) {
      log_info("token cache ", cache_path, " was made from other files or another tokenizer; rebuilding it");
    } else {
      TokenizedCorpus t;
      t.record_offsets.resize(h.records + 1);
      std::vector<uint16_t> packed(h.tokens);
      uint64_t checksum = 0;
      in.read(reinterpret_cast<char*>(t.record_offsets.data()), std::streamsize(t.record_offsets.size() * sizeof(int64_t)));
      in.read(reinterpret_cast<char*>(packed.data()), std::streamsize(packed.size() * sizeof(uint16_t)));
      in.read(reinterpret_cast<char*>(&checksum), sizeof checksum);
      uint64_t expect = fnv1a(&h, sizeof h);
      expect = fnv1a(t.record_offsets.data(), t.record_offsets.size() * sizeof(int64_t), expect);
      expect = fnv1a(packed.data(), packed.size() * sizeof(uint16_t), expect);
      if (!in || checksum != expect || t.record_offsets.back() != int64_t(h.tokens)) {
        reject("truncated or damaged (checksum mismatch)");
      } else {
        t.tokens.assign(packed.begin(), packed.end());
        if (from_cache) *from_cache = true;
        return t;
      }
    }
  }
  TokenizedCorpus t = tokenize(corpus);
  CacheHeader h{};
  std::memcpy(h.magic, kCacheMagic, 8);
  h.key = key;
  h.records = uint64_t(t.records());
  h.tokens = t.tokens.size();
  std::vector<uint16_t> packed(t.tokens.begin(), t.tokens.end());
  uint64_t checksum = fnv1a(&h, sizeof h);
  checksum = fnv1a(t.record_offsets.data(), t.record_offsets.size() * sizeof(int64_t), checksum);
  checksum = fnv1a(packed.data(), packed.size() * sizeof(uint16_t), checksum);
  const std::string tmp = cache_path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(&h), sizeof h);
    out.write(reinterpret_cast<const char*>(t.record_offsets.data()), std::streamsize(t.record_offsets.size() * sizeof(int64_t)));
    out.write(reinterpret_cast<const char*>(packed.data()), std::streamsize(packed.size() * sizeof(uint16_t)));
    out.write(reinterpret_cast<const char*>(&checksum), sizeof checksum);
    if (!out) {
      log_warn("token cache ", tmp, ": cannot write (", std::strerror(errno), "); continuing without a cache");
      return t;
    }
  }
  std::error_code ec;
  fs::rename(tmp, cache_path, ec);
  if (ec) log_warn("token cache ", cache_path, ": cannot replace (", ec.message(), "); continuing without a cache");
  return t;
}

Split split_by_record(const TokenizedCorpus& corpus, double val_fraction, uint64_t seed) {
  if (!(val_fraction >= 0.0 && val_fraction < 1.0))
    fail(ErrorKind::invalid_argument, "val_fraction: expected a number in [0, 1), got ", val_fraction);
  const int64_t n = corpus.records();
  const Rng rng(seed, kSplitStream);
  std::vector<double> draw(static_cast<size_t>(n));
  std::vector<char> is_val(static_cast<size_t>(n));
  for (int64_t r = 0; r < n; ++r) {
    draw[r] = double(rng.block(uint64_t(r))[0]) * 0x1p-32;
    is_val[r] = draw[r] < val_fraction;
  }
  const int64_t val_count = std::count(is_val.begin(), is_val.end(), 1);
  if (val_fraction > 0 && n >= 2 && val_count == 0) is_val[std::min_element(draw.begin(), draw.end()) - draw.begin()] = 1;
  if (n >= 2 && val_count == n) is_val[std::max_element(draw.begin(), draw.end()) - draw.begin()] = 0;
  Split s;
  for (int64_t r = 0; r < n; ++r) {
    auto& stream = is_val[r] ? s.val : s.train;
    stream.insert(stream.end(), corpus.tokens.begin() + corpus.record_offsets[r], corpus.tokens.begin() + corpus.record_offsets[r + 1]);
    (is_val[r] ? s.val_records : s.train_records) += 1;
  }
  return s;
}

void draw_batch(const std::vector<int32_t>& stream, int64_t step, int batch, int context, uint64_t seed, int32_t* inputs,
                int32_t* targets) {
  if (batch <= 0 || context <= 0) fail(ErrorKind::invalid_argument, "draw_batch: batch and context must be positive, got ", batch, " and ", context);
  if (int64_t(stream.size()) < int64_t(context) + 1)
    fail(ErrorKind::invalid_argument, "the token stream holds ", stream.size(), " tokens, fewer than context + 1 = ", context + 1);
  const uint64_t starts = uint64_t(stream.size()) - uint64_t(context);  // offsets 0 .. size - context - 1
  const Rng rng(seed, kBatchStream);
  for (int row = 0; row < batch; ++row) {
    const auto b = rng.block(uint64_t(step) * uint64_t(batch) + uint64_t(row));
    const uint64_t r64 = (uint64_t(b[0]) << 32) | b[1];
    const uint64_t offset = uint64_t((unsigned __int128)r64 * starts >> 64);
    std::copy_n(stream.begin() + int64_t(offset), context, inputs + int64_t(row) * context);
    std::copy_n(stream.begin() + int64_t(offset) + 1, context, targets + int64_t(row) * context);
  }
}

}  // namespace hybrit
