// Text in: corpora of records read from files (four formats), the tokenizers (byte and BPE) and
// the binary token cache. Training, reduction and inference all read text through here.
#pragma once
#include <cstdint>
#include <iterator>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace hybrit {

// text: records are paragraphs (separated by blank lines); fortune: records are separated by
// lines holding only `%` (the fortune(6) format); jsonl: one JSON object per line, its "text";
// lines: every non-blank line is a record.
enum class CorpusFormat { text, fortune, jsonl, lines, count };
inline constexpr const char* kCorpusFormatNames[] = {"text", "fortune", "jsonl", "lines"};
static_assert(std::size(kCorpusFormatNames) == size_t(CorpusFormat::count));
const char* to_string(CorpusFormat format);
// The values data.format and reduce.format take: "auto" then every format's name.
std::vector<std::string> corpus_format_choices();

struct Corpus {
  // The files' common format; jsonl when they differ (it holds any record: what the reduced
  // corpus is then written as).
  CorpusFormat format = CorpusFormat::text;
  std::vector<std::string> files;          // what was read, in order
  std::vector<CorpusFormat> file_formats;  // each file's format (detected per file under auto)
  std::vector<std::string> file_reasons;   // why: "format: fortune in the config", "the .jsonl extension", ...
  std::vector<int64_t> file_records;       // records each file gave
  std::vector<std::string> records;        // non-empty records, in file order
  // One line per file (at most `max_files`, then a count): "my.txt: text (blank lines separate
  // paragraphs), 1 record". For messages that must say how the data was read.
  std::string describe(size_t max_files = 3) const;
};

// `sources`: files, folders (their regular files, recursively, sorted; hidden files skipped) and
// glob patterns. From folders and globs, `X.dat` beside `X` (a fortune strfile index) is skipped,
// and so is any file already read under another name (the fortunes package's `.u8` links). `format`: "text", "fortune",
// "jsonl", "lines" or "auto", decided per file: a .jsonl file is jsonl; a file with a line holding
// only `%` is fortune; one with a blank line is text; one of several lines and no blank line is
// lines (one record per line); otherwise text. Errors name the file and line.
Corpus read_corpus(const std::vector<std::string>& sources, const std::string& format = "auto");
// The default corpus: Debian's `fortunes` package.
inline const char* kDefaultCorpus = "/usr/share/games/fortunes";

// Text <-> tokens. Every tokenizer has an end-of-record token, appended after each record so a
// model learns where one stops, and decodes it as a newline.
class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::string kind() const = 0;  // "byte-v1" or "bpe"
  virtual int32_t vocab_size() const = 0;
  virtual int32_t end_of_record() const = 0;
  virtual void encode(std::string_view text, std::vector<int32_t>& out) const = 0;
  virtual std::string decode(const int32_t* tokens, size_t n) const = 0;
  // Changes whenever the tokenization could: part of the token cache's key.
  virtual uint64_t identity() const = 0;
  // The serialized model a checkpoint carries to rebuild this tokenizer (BPE: the sentencepiece
  // model's bytes; empty for the byte tokenizer, which has none).
  virtual const std::string& model_bytes() const {
    static const std::string none;
    return none;
  }
};

// Byte-level: tokens 0-255 are bytes, 256 ends a record. Any byte sequence round-trips.
struct ByteTokenizer final : Tokenizer {
  static constexpr int32_t kEndOfRecord = 256;
  static constexpr int32_t kVocabSize = 257;
  static constexpr const char* kName = "byte-v1";
  std::string kind() const override { return kName; }
  int32_t vocab_size() const override { return kVocabSize; }
  int32_t end_of_record() const override { return kEndOfRecord; }
  void encode(std::string_view text, std::vector<int32_t>& out) const override;
  std::string decode(const int32_t* tokens, size_t n) const override;
  uint64_t identity() const override { return 0x62797465ull; }
};

// BPE through sentencepiece, trained on the corpus's records with byte fallback (any byte still
// encodes), identity normalization and no whitespace rewriting, and decoded by hybrit (byte
// pieces to their bytes), so text round-trips exactly; the one exception is the character U+2581,
// sentencepiece's space marker, which comes back as a space.
// Token 0 is <unk> (never produced, thanks to byte fallback), 1 ends a record. The model file is
// written to `model_path` (the run keeps it as tokenizer.model).
std::unique_ptr<Tokenizer> train_bpe_tokenizer(const Corpus& corpus, int32_t vocab_size, const std::string& model_path);
std::unique_ptr<Tokenizer> load_bpe_tokenizer(const std::string& model_path);
// The same from the model's bytes (as a checkpoint carries them); `name` is for messages.
std::unique_ptr<Tokenizer> bpe_tokenizer_from_bytes(const std::string& model_bytes, const std::string& name);
// A BPE model's pieces in id order, for exports (GGUF's SPM vocabulary): the text (U+2581 for a
// space, <0xNN> for byte pieces), the merge score and the kind.
struct TokenizerPiece {
  enum class Kind { normal, unknown, control, byte };
  std::string text;
  float score = 0;
  Kind kind = Kind::normal;
};
std::vector<TokenizerPiece> bpe_pieces(const std::string& model_bytes, const std::string& name);

// Text for people: invalid UTF-8 sequences (a byte-level model can write any byte) and control
// characters other than newline and tab become U+FFFD, so terminals and UTF-8 readers are safe.
std::string printable_utf8(std::string_view bytes);

// A corpus as token streams: each record's tokens followed by the end-of-record token.
struct TokenizedCorpus {
  std::vector<int32_t> tokens;
  std::vector<int64_t> record_offsets;  // records + 1 entries: record r is [offsets[r], offsets[r + 1])
  int32_t vocab_size = ByteTokenizer::kVocabSize;
  int32_t end_of_record = ByteTokenizer::kEndOfRecord;
  int64_t records() const { return int64_t(record_offsets.size()) - 1; }
};

TokenizedCorpus tokenize(const Corpus& corpus, const Tokenizer& tokenizer = ByteTokenizer());
// A key for the cache: the tokenizer, the format, and every file's path, size and mtime.
uint64_t corpus_key(const Corpus& corpus, const Tokenizer& tokenizer = ByteTokenizer());
// Tokenizes through a binary cache at `cache_path` (written to a temporary file and renamed;
// a stale, damaged or foreign cache is rebuilt with a warning, never trusted). `*from_cache`
// says which happened.
TokenizedCorpus tokenize_cached(const Corpus& corpus, const std::string& cache_path, bool* from_cache = nullptr,
                                const Tokenizer& tokenizer = ByteTokenizer());

}  // namespace hybrit
