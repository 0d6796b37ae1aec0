#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>

#include "core/log.hpp"
#include "test_support.hpp"
#include "model/text.hpp"
#include "training/batches.hpp"

namespace hybrit::test {
namespace {

namespace fs = std::filesystem;


std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

TEST(Corpus, ReadsTheDebianFortunesPackage) {
  if (!fs::is_directory(kDefaultCorpus)) GTEST_SKIP() << kDefaultCorpus << " is missing: apt-get install fortunes";
  const Corpus c = read_corpus({kDefaultCorpus});
  EXPECT_EQ(c.format, CorpusFormat::fortune);
  // About 14,400 records in about 40 category files; the .dat indexes and .u8 links are not read.
  EXPECT_GT(c.records.size(), 10000u);
  EXPECT_LT(c.records.size(), 20000u);
  EXPECT_GT(c.files.size(), 30u);
  for (const auto& f : c.files) {
    EXPECT_NE(fs::path(f).extension(), ".dat") << f;
    EXPECT_NE(fs::path(f).extension(), ".u8") << f;  // links to a file already read
  }
  for (const auto& r : c.records) ASSERT_EQ(r.find("\n%\n"), std::string::npos);
}

TEST(Corpus, FortuneTextAndJsonlRecords) {
  TempDir dir;
  const std::string fortune = dir.write("a", "first\nrecord\n%\n%\nsecond\r\n%\r\n  \n%\nthird");
  Corpus c = read_corpus({fortune});
  EXPECT_EQ(c.format, CorpusFormat::fortune);
  EXPECT_EQ(c.records, (std::vector<std::string>{"first\nrecord", "second", "third"}));

  const std::string text = dir.write("b.txt", "para one\nstill one\n\n \t\npara two\n");
  c = read_corpus({text});
  EXPECT_EQ(c.format, CorpusFormat::text);
  EXPECT_EQ(c.records, (std::vector<std::string>{"para one\nstill one", "para two"}));

  const std::string jsonl = dir.write("c.jsonl", "{\"text\": \"caf\\u00e9\\n\"}\n\n{\"text\": \"two\", \"id\": 2}\n");
  c = read_corpus({jsonl});
  EXPECT_EQ(c.format, CorpusFormat::jsonl);
  EXPECT_EQ(c.records, (std::vector<std::string>{"caf\xc3\xa9\n", "two"}));
}

TEST(Corpus, AutoDecidesPerFileAndSaysWhy) {
  TempDir dir;
  const std::string fortune = dir.write("f", "one\n%\ntwo\n%\n");
  const std::string paragraphs = dir.write("p.txt", "alpha\nbeta\n\ngamma\n");
  const std::string lines = dir.write("l.txt", "first line\nsecond line\n\xc3\xa9 third\n");
  const std::string jsonl = dir.write("j.jsonl", "{\"text\": \"from json\"}\n");
  const Corpus c = read_corpus({fortune, paragraphs, lines, jsonl});
  EXPECT_EQ(c.file_formats, (std::vector<CorpusFormat>{CorpusFormat::fortune, CorpusFormat::text, CorpusFormat::lines, CorpusFormat::jsonl}));
  EXPECT_EQ(c.file_records, (std::vector<int64_t>{2, 2, 3, 1}));
  EXPECT_EQ(c.records, (std::vector<std::string>{"one", "two", "alpha\nbeta", "gamma", "first line", "second line", "\xc3\xa9 third", "from json"}));
  const std::string d = c.describe(4);
  EXPECT_NE(d.find(fortune + ": fortune (auto: 2 lines holding only %), 2 records"), std::string::npos) << d;
  EXPECT_NE(d.find(lines + ": lines (auto: no blank lines, so one record per line), 3 records"), std::string::npos) << d;
  EXPECT_NE(d.find(jsonl + ": jsonl (the .jsonl extension), 1 record"), std::string::npos) << d;
  EXPECT_NE(c.describe(2).find("and 2 more files"), std::string::npos);
  // A pinned format applies to every file, and says so.
  const Corpus pinned = read_corpus({lines}, "fortune");
  EXPECT_EQ(pinned.records.size(), 1u);
  EXPECT_NE(pinned.describe().find("fortune (format: fortune in the config), 1 record"), std::string::npos) << pinned.describe();
  EXPECT_EQ(read_corpus({lines}, "lines").records.size(), 3u);
  EXPECT_NE(error_of([&] { read_corpus({lines}, "csv"); }).find("expected auto, text, fortune, jsonl or lines, got 'csv'"), std::string::npos);
}

TEST(Corpus, FoldersGlobsAndLinks) {
  TempDir dir;
  dir.write("set/x1", "a\n%\nb\n");
  dir.write("set/x2", "c\n");
  dir.write("set/x2.dat", std::string("\0\1\2", 3));
  dir.write("set/.hidden", "never\n%\n");
  fs::create_symlink(dir.path / "set/x1", dir.path / "set/x1.u8");
  const Corpus c = read_corpus({(dir.path / "set").string()});
  // Each file by its own content: x1 has `%` lines, x2 is one line of text; mixed, so the
  // corpus as a whole is jsonl (what a reduced copy of it is written as).
  EXPECT_EQ(c.file_formats, (std::vector<CorpusFormat>{CorpusFormat::fortune, CorpusFormat::text}));
  EXPECT_EQ(c.format, CorpusFormat::jsonl);
  EXPECT_EQ(c.records, (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(c.files.size(), 2u);
  // By glob: x1 and x2 again (x1.u8 is x1 under another name, x2.dat is x2's index).
  const Corpus g = read_corpus({(dir.path / "set/x*").string()}, "text");
  EXPECT_EQ(g.files.size(), 2u);
  EXPECT_EQ(g.records, (std::vector<std::string>{"a\n%\nb", "c"}));  // as plain text, `%` is content
}

TEST(Corpus, BadInputNamesFileLineAndProblem) {
  TempDir dir;
  const std::string bad = dir.write("bad.jsonl", "{\"text\": \"ok\"}\n{\"text\": 3}\n");
  EXPECT_EQ(error_of([&] { read_corpus({bad}); }), bad + ":2: expected an object with a string field \"text\"");
  const std::string broken = dir.write("broken.jsonl", "{\"text\": \"ok\"}\n\n{\"text\": \"no end\n");
  EXPECT_NE(error_of([&] { read_corpus({broken}); }).find(broken + ":3: not valid JSON"), std::string::npos);
  EXPECT_EQ(error_of([&] { read_corpus({(dir.path / "missing.txt").string()}); }), (dir.path / "missing.txt").string() + ": no such file or folder");
  EXPECT_EQ(error_of([&] { read_corpus({(dir.path / "*.none").string()}); }), (dir.path / "*.none").string() + ": the pattern matches no files");
  EXPECT_EQ(error_of([&] { read_corpus({"/dev/null"}); }), "/dev/null: a character device, not a file or folder of text");
  const std::string fifo = dir.file("fifo");
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  EXPECT_EQ(error_of([&] { read_corpus({fifo}); }), fifo + ": a FIFO, not a file or folder of text");  // refused, not waited on
  EXPECT_EQ(error_of([&] { read_corpus({""}); }), "an empty path among the data sources");
  const std::string empty = dir.write("empty.txt", "\n \n");
  EXPECT_NE(error_of([&] { read_corpus({empty}); }).find("holds no records"), std::string::npos);
  EXPECT_EQ(error_of([&] { read_corpus({empty}, "yaml"); }), "corpus format: expected auto, text, fortune, jsonl or lines, got 'yaml'");
}

TEST(Tokenizer, EveryByteSequenceRoundTrips) {
  Rng rng(run_seed(), 31);
  std::string text(5000, '\0');
  for (auto& ch : text) ch = char(rng.below(256));
  std::vector<int32_t> tokens;
  ByteTokenizer tok;
  tok.encode(text, tokens);
  ASSERT_EQ(tokens.size(), text.size());
  for (int32_t t : tokens) ASSERT_TRUE(t >= 0 && t < 256);
  EXPECT_EQ(tok.decode(tokens.data(), tokens.size()), text);
}

TEST(Tokenizer, PrintableTextIsValidUtf8) {
  EXPECT_EQ(printable_utf8("caf\xc3\xa9 \xe2\x82\xac\n\tok"), "caf\xc3\xa9 \xe2\x82\xac\n\tok");  // valid text is kept
  EXPECT_EQ(printable_utf8("a\xff" "b"), "a\xef\xbf\xbd" "b");                      // a stray byte
  EXPECT_EQ(printable_utf8("\xc3"), "\xef\xbf\xbd");                                // truncated sequence
  EXPECT_EQ(printable_utf8("\xc0\xaf"), "\xef\xbf\xbd\xef\xbf\xbd");              // overlong '/'
  EXPECT_EQ(printable_utf8("\xed\xa0\x80"), "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");  // a surrogate
  EXPECT_EQ(printable_utf8("x\x08y\x1b"), "x\xef\xbf\xbdy\xef\xbf\xbd");          // backspace, escape
  // Any bytes at all come out as valid UTF-8 that decodes back to itself.
  Rng rng(run_seed(), 32);
  std::string junk(4000, '\0');
  for (auto& ch : junk) ch = char(rng.below(256));
  const std::string clean = printable_utf8(junk);
  EXPECT_EQ(printable_utf8(clean), clean);
}

TEST(Bpe, TrainedOnTheCorpusAndEveryRecordRoundTrips) {
  if (!fs::is_directory(kDefaultCorpus)) GTEST_SKIP() << kDefaultCorpus << " is missing: apt-get install fortunes";
  TempDir dir;
  Corpus c = read_corpus({(fs::path(kDefaultCorpus) / "computers").string()}, "fortune");
  c.records.push_back("bytes no text has: \xff\xfe\x01 and an emoji \xf0\x9f\x98\x80 end");
  const auto tok = train_bpe_tokenizer(c, 400, (dir.path / "tokenizer.model").string());
  EXPECT_EQ(tok->kind(), "bpe");
  EXPECT_LE(tok->vocab_size(), 400);
  EXPECT_EQ(tok->end_of_record(), 1);
  size_t bytes = 0, tokens = 0;
  for (const auto& r : c.records) {
    std::vector<int32_t> ids;
    tok->encode(r, ids);
    for (int32_t id : ids) ASSERT_TRUE(id > 1 && id < tok->vocab_size()) << id;  // never <unk>, never end-of-record
    ASSERT_EQ(tok->decode(ids.data(), ids.size()), r);
    bytes += r.size(), tokens += ids.size();
  }
  EXPECT_LT(double(tokens), 0.8 * double(bytes));  // it does compress
  // The tokenizer is part of the cache key; a reloaded model is the same tokenizer.
  const auto again = load_bpe_tokenizer((dir.path / "tokenizer.model").string());
  EXPECT_EQ(again->identity(), tok->identity());
  EXPECT_NE(corpus_key(c, *tok), corpus_key(c, ByteTokenizer()));
  const TokenizedCorpus t = tokenize(c, *tok);
  EXPECT_EQ(t.end_of_record, 1);
  EXPECT_EQ(t.vocab_size, tok->vocab_size());
  EXPECT_EQ(tok->decode(t.tokens.data(), size_t(t.record_offsets[2])), c.records[0] + "\n" + c.records[1] + "\n");
  // Bad input.
  const std::string junk = dir.write("junk.model", "not a model");
  try {
    load_bpe_tokenizer(junk);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::corrupt_data);
    EXPECT_NE(std::string(e.what()).find(junk + ": not a sentencepiece model"), std::string::npos) << e.what();
  }
  EXPECT_THROW(train_bpe_tokenizer(c, 100, (dir.path / "small.model").string()), Error);
}

TEST(TokenCache, ReusedWhenValidRebuiltWhenStaleOrDamaged) {
  TempDir dir;
  const std::string file = dir.write("c.txt", "alpha\n\nbeta gamma\n\ndelta\n");
  const Corpus c = read_corpus({file});
  const std::string cache = (dir.path / "tokens.bin").string();
  bool cached = true;
  const TokenizedCorpus first = tokenize_cached(c, cache, &cached);
  EXPECT_FALSE(cached);
  EXPECT_EQ(first.records(), 3);
  EXPECT_EQ(first.tokens.size(), 5u + 1 + 10 + 1 + 5 + 1);
  EXPECT_EQ(first.tokens[5], ByteTokenizer::kEndOfRecord);
  const TokenizedCorpus second = tokenize_cached(c, cache, &cached);
  EXPECT_TRUE(cached);
  EXPECT_EQ(second.tokens, first.tokens);
  EXPECT_EQ(second.record_offsets, first.record_offsets);

  // A flipped byte in the cache: detected by the checksum, rebuilt, the result unchanged.
  {
    std::fstream f(cache, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-10, std::ios::end);
    f.put('\x55');
  }
  const TokenizedCorpus third = tokenize_cached(c, cache, &cached);
  EXPECT_FALSE(cached);
  EXPECT_EQ(third.tokens, first.tokens);

  // A header whose counts claim more than the file holds: refused before anything is allocated.
  {
    std::fstream f(cache, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(16);  // magic (8) and key (8), then the record count
    const uint64_t huge = uint64_t(1) << 39;
    f.write(reinterpret_cast<const char*>(&huge), sizeof huge);
  }
  const TokenizedCorpus fifth = tokenize_cached(c, cache, &cached);
  EXPECT_FALSE(cached);
  EXPECT_EQ(fifth.tokens, first.tokens);

  // The source file changes: the cache key changes and the cache is rebuilt.
  dir.write("c.txt", "alpha\n\nbeta gamma\n\ndelta epsilon\n");
  const Corpus changed = read_corpus({file});
  const TokenizedCorpus fourth = tokenize_cached(changed, cache, &cached);
  EXPECT_FALSE(cached);
  EXPECT_EQ(fourth.tokens.size(), first.tokens.size() + 8);
}

TEST(Split, DeterministicDisjointAndNearTheRequestedFraction) {
  Corpus c;
  Rng rng(run_seed(), 41);
  for (int i = 0; i < 4000; ++i) c.records.push_back(std::string(1 + rng.below(20), char('a' + i % 26)));
  const TokenizedCorpus t = tokenize(c);
  const uint64_t seed = run_seed();
  const Split a = split_by_record(t, 0.1, seed), b = split_by_record(t, 0.1, seed);
  EXPECT_EQ(a.train, b.train);
  EXPECT_EQ(a.val, b.val);
  EXPECT_EQ(a.train_records + a.val_records, 4000);
  EXPECT_EQ(a.train.size() + a.val.size(), t.tokens.size());
  // Binomial(4000, 0.1): sd 19; 6 sd either side.
  EXPECT_NEAR(double(a.val_records), 400.0, 114.0);
  const Split other = split_by_record(t, 0.1, seed + 1);
  EXPECT_NE(other.val, a.val);
  // Each stream is whole records, each ending with the end-of-record token.
  EXPECT_EQ(a.val.back(), ByteTokenizer::kEndOfRecord);
  EXPECT_EQ(std::count(a.val.begin(), a.val.end(), ByteTokenizer::kEndOfRecord), a.val_records);
  // Tiny corpora still get both sides.
  Corpus two;
  two.records = {"x", "y"};
  const Split s2 = split_by_record(tokenize(two), 0.01, seed);
  EXPECT_EQ(s2.train_records, 1);
  EXPECT_EQ(s2.val_records, 1);
  EXPECT_THROW(split_by_record(t, 1.0, seed), Error);
}

TEST(Batches, AreAPureFunctionOfSeedAndStep) {
  std::vector<int32_t> stream(10000);
  for (size_t i = 0; i < stream.size(); ++i) stream[i] = int32_t(i);  // token = its position
  const int batch = 6, context = 32;
  std::vector<int32_t> in1(batch * context), tg1(batch * context), in2(batch * context), tg2(batch * context);
  const uint64_t seed = run_seed();
  draw_batch(stream, 17, batch, context, seed, in1.data(), tg1.data());
  // Drawn again later (a resumed run) the same step gives the same batch.
  draw_batch(stream, 5, batch, context, seed, in2.data(), tg2.data());
  draw_batch(stream, 17, batch, context, seed, in2.data(), tg2.data());
  EXPECT_EQ(in1, in2);
  EXPECT_EQ(tg1, tg2);
  for (int r = 0; r < batch; ++r)
    for (int j = 0; j < context; ++j) {
      ASSERT_EQ(tg1[r * context + j], in1[r * context + j] + 1);  // targets are the next tokens
      if (j > 0) {
        ASSERT_EQ(in1[r * context + j], in1[r * context + j - 1] + 1);  // windows are contiguous
      }
      ASSERT_LT(tg1[r * context + j], int32_t(stream.size()));
    }
  draw_batch(stream, 18, batch, context, seed, in2.data(), tg2.data());
  EXPECT_NE(in1, in2);
  // Offsets cover the whole stream, the last window included.
  std::set<int32_t> starts;
  std::vector<int32_t> one(1), next(1);
  std::vector<int32_t> small = {0, 1, 2, 3};
  for (int step = 0; step < 400; ++step) {
    draw_batch(small, step, 1, 1, seed, one.data(), next.data());
    starts.insert(one[0]);
  }
  EXPECT_EQ(starts, (std::set<int32_t>{0, 1, 2}));
  EXPECT_NE(error_of([&] { draw_batch(small, 0, 1, 4, seed, one.data(), next.data()); }).find("fewer than context + 1 = 5"), std::string::npos);
}

}  // namespace
}  // namespace hybrit::test
