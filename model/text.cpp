#include "model/text.hpp"

#include <glob.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>

#include "core/error.hpp"
#include "core/hash.hpp"
#include "core/log.hpp"
#include "core/names.hpp"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

namespace hybrit {

namespace fs = std::filesystem;

const char* to_string(CorpusFormat format) { return size_t(format) < std::size(kCorpusFormatNames) ? kCorpusFormatNames[size_t(format)] : "?"; }

std::vector<std::string> corpus_format_choices() {
  std::vector<std::string> out = {"auto"};
  out.insert(out.end(), std::begin(kCorpusFormatNames), std::end(kCorpusFormatNames));
  return out;
}

std::string Corpus::describe(size_t max_files) const {
  std::string out;
  for (size_t i = 0; i < files.size() && i < max_files; ++i)
    out += cat(i ? "; " : "", files[i], ": ", to_string(file_formats[i]), " (", file_reasons[i], "), ", file_records[i], file_records[i] == 1 ? " record" : " records");
  if (files.size() > max_files) out += cat("; and ", files.size() - max_files, " more files");
  return out;
}

namespace {

// Length of the valid UTF-8 sequence starting at s[i] (no overlongs, surrogates or code points
// above U+10FFFF), or 0 where s[i] starts none.
size_t utf8_sequence_length(std::string_view s, size_t i) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) return 1;
  size_t len = 0;
  unsigned char lo = 0x80, hi = 0xbf;
  if (c >= 0xc2 && c <= 0xdf) len = 2;
  else if (c >= 0xe0 && c <= 0xef) len = 3, lo = c == 0xe0 ? 0xa0 : 0x80, hi = c == 0xed ? 0x9f : 0xbf;
  else if (c >= 0xf0 && c <= 0xf4) len = 4, lo = c == 0xf0 ? 0x90 : 0x80, hi = c == 0xf4 ? 0x8f : 0xbf;
  if (len == 0 || i + len > s.size()) return 0;
  for (size_t k = 1; k < len; ++k) {
    const unsigned char b = static_cast<unsigned char>(s[i + k]);
    if (k == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xbf)) return 0;
  }
  return len;
}

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

// A file's format under `auto`, and why, in words for messages.
std::pair<CorpusFormat, std::string> detect_format(const std::string& path, std::string_view text) {
  if (fs::path(path).extension() == ".jsonl") return {CorpusFormat::jsonl, "the .jsonl extension"};
  const std::vector<std::string_view> lines = split_lines(text);
  int64_t separators = 0, blanks = 0, filled = 0;
  for (std::string_view line : lines) {
    separators += line == "%";
    if (blank(line)) ++blanks;
    else ++filled;
  }
  if (separators > 0) return {CorpusFormat::fortune, cat("auto: ", separators, " lines holding only %")};
  if (blanks > 0 && filled > 0) return {CorpusFormat::text, "auto: blank lines separate paragraphs"};
  if (filled > 1) return {CorpusFormat::lines, "auto: no blank lines, so one record per line"};
  return {CorpusFormat::text, "auto: a single line"};
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
  if (source.empty()) fail(ErrorKind::invalid_argument, "an empty path among the data sources");
  const fs::file_status st = fs::status(source, ec);
  if (fs::exists(st)) {  // there, but neither a file nor a folder: reading a FIFO or device would block or never end
    const char* kind = st.type() == fs::file_type::fifo ? "a FIFO" : st.type() == fs::file_type::character ? "a character device"
                       : st.type() == fs::file_type::block ? "a block device" : st.type() == fs::file_type::socket ? "a socket" : "not a regular file";
    fail(ErrorKind::invalid_argument, source, ": ", kind, ", not a file or folder of text");
  }
  fail(ErrorKind::io, source, ": no such file or folder");
}

}  // namespace

Corpus read_corpus(const std::vector<std::string>& sources, const std::string& format) {
  if (sources.empty()) fail(ErrorKind::invalid_argument, "corpus: no source files given");
  std::optional<CorpusFormat> pinned;  // none: auto, decided per file
  if (format != "auto") {
    const std::vector<std::string> choices = corpus_format_choices();
    if (std::find(choices.begin(), choices.end(), format) == choices.end()) {
      std::string all;
      for (size_t i = 0; i < choices.size(); ++i) all += (i == 0 ? "" : i + 1 == choices.size() ? " or " : ", ") + choices[i];
      fail(ErrorKind::invalid_argument, "corpus format: expected ", all, ", got '", format, "'");
    }
    pinned = parse_name<CorpusFormat>(kCorpusFormatNames, format, "corpus format");
  }
  Corpus corpus;
  std::set<std::string> seen;  // canonical paths: a link to a file already read is skipped
  for (const auto& source : sources)
    for (const auto& file : expand(source)) {
      std::error_code ec;
      const std::string canonical = fs::canonical(file, ec).string();
      if (!seen.insert(ec ? file : canonical).second) continue;
      const std::string contents = read_file(file);
      auto [f, why] = pinned ? std::pair{*pinned, cat("format: ", format, " in the config")} : detect_format(file, contents);
      const size_t before = corpus.records.size();
      switch (f) {
        case CorpusFormat::jsonl: read_jsonl(file, contents, corpus.records); break;
        case CorpusFormat::fortune: records_by_separator(contents, [](std::string_view l) { return l == "%"; }, corpus.records); break;
        case CorpusFormat::text: records_by_separator(contents, blank, corpus.records); break;
        case CorpusFormat::lines:
          for (std::string_view line : split_lines(contents))
            if (!blank(line)) corpus.records.emplace_back(line);
          break;
        case CorpusFormat::count: break;
      }
      corpus.files.push_back(file);
      corpus.file_formats.push_back(f);
      corpus.file_reasons.push_back(why);
      corpus.file_records.push_back(int64_t(corpus.records.size() - before));
    }
  corpus.format = corpus.file_formats.empty() ? CorpusFormat::text : corpus.file_formats[0];
  for (CorpusFormat f : corpus.file_formats)
    if (f != corpus.format) corpus.format = CorpusFormat::jsonl;
  if (corpus.records.empty()) fail(ErrorKind::invalid_argument, "the corpus holds no records: ", corpus.describe());
  return corpus;
}

void ByteTokenizer::encode(std::string_view text, std::vector<int32_t>& out) const {
  for (unsigned char c : text) out.push_back(int32_t(c));
}

namespace {

class BpeTokenizer final : public Tokenizer {
 public:
  // `name` names the model in messages (its file, or the checkpoint that carries it).
  BpeTokenizer(const std::string& model_bytes, const std::string& name) : path_(name), model_bytes_(model_bytes) {
    const auto status = sp_.LoadFromSerializedProto(model_bytes);
    if (!status.ok()) fail(ErrorKind::corrupt_data, name, ": not a sentencepiece model (", status.ToString(), ")");
    if (sp_.eos_id() != 1) fail(ErrorKind::corrupt_data, name, ": expected the end-of-record token at id 1, got ", sp_.eos_id());
    for (int b = 0; b < 256; ++b) {
      char piece[8];
      std::snprintf(piece, sizeof piece, "<0x%02X>", b);
      byte_ids_[b] = sp_.PieceToId(piece);
      if (!sp_.IsByte(byte_ids_[b])) fail(ErrorKind::corrupt_data, name, ": no byte-fallback piece ", piece, " (train with byte fallback)");
    }
    identity_ = fnv1a64(model_bytes.data(), model_bytes.size());
  }
  std::string kind() const override { return "bpe"; }
  int32_t vocab_size() const override { return sp_.GetPieceSize(); }
  int32_t end_of_record() const override { return 1; }
  // sentencepiece would turn bytes that are not UTF-8 into U+FFFD before encoding: valid runs go
  // through it, stray bytes go straight to their byte pieces.
  void encode(std::string_view text, std::vector<int32_t>& out) const override {
    size_t run_start = 0, i = 0;
    auto flush = [&](size_t end) {
      if (end > run_start)
        for (int id : sp_.EncodeAsIds(text.substr(run_start, end - run_start))) out.push_back(id);
    };
    while (i < text.size()) {
      const size_t len = utf8_sequence_length(text, i);
      if (len > 0) {
        i += len;
        continue;
      }
      flush(i);
      out.push_back(byte_ids_[static_cast<unsigned char>(text[i])]);
      run_start = ++i;
    }
    flush(text.size());
  }
  // Decoded here rather than by sentencepiece, which turns byte pieces that are not valid UTF-8
  // into U+FFFD: byte pieces <0xNN> become their byte, other pieces are copied with the space
  // marker U+2581 turned back into a space.
  std::string decode(const int32_t* tokens, size_t n) const override {
    std::string s;
    for (size_t i = 0; i < n; ++i) {
      if (tokens[i] == 1) {
        s += '\n';
        continue;
      }
      if (tokens[i] <= 0 || tokens[i] >= sp_.GetPieceSize()) continue;  // <unk> or out of range: nothing
      const std::string& piece = sp_.IdToPiece(tokens[i]);
      if (sp_.IsByte(tokens[i]) && piece.size() == 6) {
        s += char(std::stoi(piece.substr(3, 2), nullptr, 16));
        continue;
      }
      for (size_t k = 0; k < piece.size(); ++k) {
        if (piece.compare(k, 3, "\xe2\x96\x81") == 0) {
          s += ' ';
          k += 2;
        } else {
          s += piece[k];
        }
      }
    }
    return s;
  }
  uint64_t identity() const override { return identity_; }
  const std::string& model_bytes() const override { return model_bytes_; }

 private:
  std::string path_, model_bytes_;
  sentencepiece::SentencePieceProcessor sp_;
  int32_t byte_ids_[256] = {};
  uint64_t identity_ = 0;
};

}  // namespace

std::unique_ptr<Tokenizer> load_bpe_tokenizer(const std::string& model_path) {
  return std::make_unique<BpeTokenizer>(read_file(model_path), model_path);
}
std::vector<TokenizerPiece> bpe_pieces(const std::string& model_bytes, const std::string& name) {
  sentencepiece::SentencePieceProcessor sp;
  const auto status = sp.LoadFromSerializedProto(model_bytes);
  if (!status.ok()) fail(ErrorKind::corrupt_data, name, ": not a sentencepiece model (", status.ToString(), ")");
  std::vector<TokenizerPiece> out(size_t(sp.GetPieceSize()));
  for (int id = 0; id < sp.GetPieceSize(); ++id) {
    TokenizerPiece& p = out[size_t(id)];
    p.text = sp.IdToPiece(id), p.score = sp.GetScore(id);
    p.kind = sp.IsUnknown(id) ? TokenizerPiece::Kind::unknown : sp.IsControl(id) ? TokenizerPiece::Kind::control
             : sp.IsByte(id)  ? TokenizerPiece::Kind::byte
                              : TokenizerPiece::Kind::normal;
  }
  return out;
}

std::unique_ptr<Tokenizer> bpe_tokenizer_from_bytes(const std::string& model_bytes, const std::string& name) {
  return std::make_unique<BpeTokenizer>(model_bytes, name);
}

std::unique_ptr<Tokenizer> train_bpe_tokenizer(const Corpus& corpus, int32_t vocab_size, const std::string& model_path) {
  if (vocab_size < 320 || vocab_size > 65536)
    fail(ErrorKind::invalid_argument, "data.vocab_size: BPE needs 320 to 65536 tokens (256 byte fallbacks among them), got ", vocab_size);
  // sentencepiece reads sentences from a file, one a line: the records' lines.
  const fs::path prefix = fs::path(model_path).replace_extension();
  const std::string input = prefix.string() + ".train.txt";
  {
    std::ofstream out(input, std::ios::binary);
    for (const auto& r : corpus.records)
      for (std::string_view line : split_lines(r))
        if (!blank(line)) out << line << '\n';
    if (!out) fail(ErrorKind::io, input, ": cannot write the tokenizer's training text");
  }
  const std::string args = cat("--input=", input, " --model_prefix=", prefix.string(), " --model_type=bpe --vocab_size=", vocab_size,
                               " --character_coverage=1.0 --byte_fallback=true --normalization_rule_name=identity --add_dummy_prefix=false",
                               " --remove_extra_whitespaces=false --allow_whitespace_only_pieces=true --split_digits=true",
                               " --unk_id=0 --eos_id=1 --bos_id=-1 --pad_id=-1 --max_sentence_length=65536 --num_threads=2 --minloglevel=2",
                               " --hard_vocab_limit=false");
  const auto status = sentencepiece::SentencePieceTrainer::Train(args);
  std::error_code ec;
  fs::remove(input, ec);
  fs::remove(prefix.string() + ".vocab", ec);
  if (!status.ok()) fail(ErrorKind::invalid_argument, "BPE training failed: ", status.ToString());
  fs::rename(prefix.string() + ".model", model_path, ec);
  if (ec) fail(ErrorKind::io, model_path, ": cannot write the tokenizer model (", ec.message(), ")");
  return load_bpe_tokenizer(model_path);
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
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    const size_t len = utf8_sequence_length(s, i);
    if (len == 0 || (len == 1 && ((c < 0x20 && c != '\n' && c != '\t') || c == 0x7f))) {
      out += kReplacement;
      ++i;
    } else {
      out.append(s.substr(i, len));
      i += len;
    }
  }
  return out;
}

TokenizedCorpus tokenize(const Corpus& corpus, const Tokenizer& tok) {
  TokenizedCorpus t;
  t.vocab_size = tok.vocab_size();
  t.end_of_record = tok.end_of_record();
  t.record_offsets.reserve(corpus.records.size() + 1);
  t.record_offsets.push_back(0);
  for (const auto& record : corpus.records) {
    tok.encode(record, t.tokens);
    t.tokens.push_back(tok.end_of_record());
    t.record_offsets.push_back(int64_t(t.tokens.size()));
  }
  return t;
}

namespace {
constexpr char kCacheMagic[8] = {'H', 'Y', 'B', 'T', 'O', 'K', 'S', '1'};

struct CacheHeader {
  char magic[8];
  uint64_t key;
  uint64_t records;
  uint64_t tokens;
};
}  // namespace

uint64_t corpus_key(const Corpus& corpus, const Tokenizer& tokenizer) {
  std::string desc = cat(tokenizer.kind(), ":", tokenizer.identity());
  for (size_t i = 0; i < corpus.files.size(); ++i) {
    const std::string& f = corpus.files[i];
    struct stat st {};
    stat(f.c_str(), &st);
    desc += cat("|", f, ":", st.st_size, ":", st.st_mtim.tv_sec, ".", st.st_mtim.tv_nsec, ":", to_string(corpus.file_formats[i]));
  }
  return fnv1a64(desc.data(), desc.size());
}

TokenizedCorpus tokenize_cached(const Corpus& corpus, const std::string& cache_path, bool* from_cache, const Tokenizer& tokenizer) {
  const uint64_t key = corpus_key(corpus, tokenizer);
  if (from_cache) *from_cache = false;
  // Layout: header, record offsets (records + 1 x i64), tokens (u16: byte vocab), FNV-1a checksum.
  if (std::ifstream in{cache_path, std::ios::binary}) {
    auto reject = [&](const std::string& why) { log_warn("token cache ", cache_path, ": ", why, "; rebuilding it"); };
    CacheHeader h{};
    if (!in.read(reinterpret_cast<char*>(&h), sizeof h) || std::memcmp(h.magic, kCacheMagic, 8) != 0) {
      reject("not a hybrit token cache");
    } else if (h.key != key) {
      log_info("token cache ", cache_path, " was made from other files or another tokenizer; rebuilding it");
    } else if (std::error_code ec; h.records >= (uint64_t(1) << 40) || h.tokens >= (uint64_t(1) << 40) ||
               fs::file_size(cache_path, ec) != sizeof h + (h.records + 1) * sizeof(int64_t) + h.tokens * sizeof(uint16_t) + sizeof(uint64_t)) {
      reject("its size does not match its header (truncated or damaged)");  // checked before the header's counts allocate anything
    } else {
      TokenizedCorpus t;
      t.record_offsets.resize(h.records + 1);
      std::vector<uint16_t> packed(h.tokens);
      uint64_t checksum = 0;
      in.read(reinterpret_cast<char*>(t.record_offsets.data()), std::streamsize(t.record_offsets.size() * sizeof(int64_t)));
      in.read(reinterpret_cast<char*>(packed.data()), std::streamsize(packed.size() * sizeof(uint16_t)));
      in.read(reinterpret_cast<char*>(&checksum), sizeof checksum);
      uint64_t expect = fnv1a64(&h, sizeof h);
      expect = fnv1a64(t.record_offsets.data(), t.record_offsets.size() * sizeof(int64_t), expect);
      expect = fnv1a64(packed.data(), packed.size() * sizeof(uint16_t), expect);
      if (!in || checksum != expect || t.record_offsets.back() != int64_t(h.tokens)) {
        reject("truncated or damaged (checksum mismatch)");
      } else {
        t.tokens.assign(packed.begin(), packed.end());
        t.vocab_size = tokenizer.vocab_size();
        t.end_of_record = tokenizer.end_of_record();
        if (from_cache) *from_cache = true;
        return t;
      }
    }
  }
  TokenizedCorpus t = tokenize(corpus, tokenizer);
  if (t.vocab_size > 65536) return t;  // the cache stores 16-bit tokens
  CacheHeader h{};
  std::memcpy(h.magic, kCacheMagic, 8);
  h.key = key;
  h.records = uint64_t(t.records());
  h.tokens = t.tokens.size();
  std::vector<uint16_t> packed(t.tokens.begin(), t.tokens.end());
  uint64_t checksum = fnv1a64(&h, sizeof h);
  checksum = fnv1a64(t.record_offsets.data(), t.record_offsets.size() * sizeof(int64_t), checksum);
  checksum = fnv1a64(packed.data(), packed.size() * sizeof(uint16_t), checksum);
  const std::string tmp = cache_path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(&h), sizeof h);
    out.write(reinterpret_cast<const char*>(t.record_offsets.data()), std::streamsize(t.record_offsets.size() * sizeof(int64_t)));
    out.write(reinterpret_cast<const char*>(packed.data()), std::streamsize(packed.size() * sizeof(uint16_t)));
    out.write(reinterpret_cast<const char*>(&checksum), sizeof checksum);
    out.close();
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

}  // namespace hybrit
