#include "core/yaml_schema.hpp"

#include <sys/stat.h>

#include <charconv>

#include <cctype>
#include <cerrno>
#include <string_view>
#include <cstring>
#include <fstream>
#include <sstream>

namespace hybrit::schema {

std::string yaml_number(double value) {
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, value);
  return std::string(buf, r.ptr);
}

std::string yaml_number(float value) {
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, value);
  return std::string(buf, r.ptr);
}

std::string Origins::where(const YAML::Node& n, const std::string& key) const {
  // A key set by --set, or inside a section that --set made or replaced, names that --set.
  for (std::string k = key;;) {
    if (auto it = of_key.find(k); it != of_key.end()) return it->second;
    const size_t dot = k.rfind('.');
    if (dot == std::string::npos) break;
    k.resize(dot);
  }
  return n.Mark().line >= 0 ? cat(file, ":", n.Mark().line + 1) : file;
}

namespace {
std::string number_text(double v) {
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  return cat(v);
}
}  // namespace

std::string Range::text() const {
  const bool no_lo = std::isinf(lo), no_hi = std::isinf(hi);
  if (no_lo && no_hi) return "a number";
  if (no_hi) return cat("a number ", lo_open ? "> " : ">= ", number_text(lo));
  if (no_lo) return cat("a number ", hi_open ? "< " : "<= ", number_text(hi));
  return cat("a number in ", lo_open ? "(" : "[", number_text(lo), ", ", number_text(hi), hi_open ? ")" : "]");
}

[[noreturn]] void bad(const std::string& where, const std::string& key, const std::string& what) {
  fail(ErrorKind::invalid_argument, where, ": ", key, ": ", what);
}

// A value as messages quote it: at most 60 characters (a scalar may be megabytes long).
std::string scalar_text(const YAML::Node& n) {
  if (!n.IsScalar()) return n.IsSequence() ? "a list" : n.IsMap() ? "a mapping" : "nothing";
  return shortened(n.Scalar());
}

int64_t as_int(const YAML::Node& n, const std::string& key, const Origins& o, int64_t min_value, int64_t max_value) {
  int64_t v = 0;
  if (!n.IsScalar() || !YAML::convert<int64_t>::decode(n, v)) {
    double d = 0;  // 1e9 or 2.5: say what an integer looks like
    const bool number = n.IsScalar() && YAML::convert<double>::decode(n, d);
    bad(o.where(n, key), key, cat("expected an integer, got '", scalar_text(n), "'", number ? " (write it out in digits)" : ""));
  }
  if (v < min_value || v > max_value)
    bad(o.where(n, key), key,
        max_value == std::numeric_limits<int64_t>::max() ? cat("expected an integer >= ", min_value, ", got ", v)
                                                         : cat("expected an integer in [", min_value, ", ", max_value, "], got ", v));
  return v;
}

double as_double(const YAML::Node& n, const std::string& key, const Origins& o, const Range& range) {
  double v = 0;
  if (!n.IsScalar() || !YAML::convert<double>::decode(n, v) || !std::isfinite(v))
    bad(o.where(n, key), key, cat("expected ", range.text(), ", got '", scalar_text(n), "'"));
  if (!range.holds(v)) bad(o.where(n, key), key, cat("expected ", range.text(), ", got ", v));
  return v;
}

bool as_bool(const YAML::Node& n, const std::string& key, const Origins& o) {
  bool v = false;
  if (!n.IsScalar() || !YAML::convert<bool>::decode(n, v)) bad(o.where(n, key), key, cat("expected true or false, got '", scalar_text(n), "'"));
  return v;
}

std::string as_string(const YAML::Node& n, const std::string& key, const Origins& o) {
  if (!n.IsScalar()) bad(o.where(n, key), key, cat("expected a single value, got ", scalar_text(n)));
  return n.Scalar();
}

std::string as_choice(const YAML::Node& n, const std::string& key, const Origins& o, const std::vector<std::string>& choices) {
  const std::string v = as_string(n, key, o);
  std::string all;
  for (const auto& c : choices) {
    if (v == c) return v;
    all += (all.empty() ? "" : ", ") + c;
  }
  bad(o.where(n, key), key, cat("expected one of ", all, ", got '", scalar_text(n), "'"));
}

void walk(const YAML::Node& map, const std::string& prefix, const Origins& o, const std::map<std::string, Handler>& keys) {
  if (!map.IsMap()) bad(o.where(map, prefix), prefix.empty() ? "(top)" : prefix, cat("expected a mapping, got ", scalar_text(map)));
  std::map<std::string, int> first_line;
  for (const auto& kv : map) {
    if (!kv.first.IsScalar())
      bad(o.where(kv.first, prefix), prefix.empty() ? "(top)" : prefix, cat("a key must be a plain name, got ", scalar_text(kv.first)));
    const std::string key = kv.first.Scalar(), full = prefix.empty() ? scalar_text(kv.first) : prefix + "." + scalar_text(kv.first);
    auto it = keys.find(key);
    if (it == keys.end()) {
      std::string all;
      for (const auto& [name, _] : keys) all += (all.empty() ? "" : ", ") + name;
      bad(o.where(kv.first, full), full, cat("unknown key (expected one of: ", all, ")"));
    }
    // yaml-cpp keeps both copies of a repeated key and lookups see the first: refuse it, since
    // which one the author meant is a guess (a second `train:` section would merge in silence).
    if (auto seen = first_line.find(key); seen != first_line.end())
      bad(o.where(kv.first, full), full, cat("given twice (first at line ", seen->second, ")"));
    first_line[key] = kv.first.Mark().line + 1;
    it->second(kv.second, full);
  }
}

void apply_set(YAML::Node& root, const std::string& assignment, Origins& o) {
  const size_t eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0) fail(ErrorKind::invalid_argument, "--set ", assignment, ": expected key=value");
  const std::string path = assignment.substr(0, eq), text = assignment.substr(eq + 1);
  YAML::Node value;
  try {
    value = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    fail(ErrorKind::invalid_argument, "--set ", assignment, ": the value is not valid YAML (", e.msg, ")");
  }
  std::vector<std::string> parts;
  std::stringstream ss(path);
  for (std::string p; std::getline(ss, p, '.');) parts.push_back(p);
  const bool empty_part = path.front() == '.' || path.back() == '.' || path.find("..") != std::string::npos;
  for (const auto& p : parts)
    if (p.empty() || empty_part) fail(ErrorKind::invalid_argument, "--set ", assignment, ": the key has an empty part (expected section.key=value)");
  std::vector<YAML::Node> chain{root};
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    YAML::Node next = chain.back()[parts[i]];
    if (!next.IsDefined() || next.IsNull()) next = YAML::Node(YAML::NodeType::Map);
    if (!next.IsMap()) fail(ErrorKind::invalid_argument, "--set ", assignment, ": ", parts[i], " is not a section");
    chain.back()[parts[i]] = next;
    chain.push_back(next);
  }
  chain.back()[parts.back()] = value;
  o.of_key[path] = "--set " + assignment;
}

std::vector<std::string> as_path_list(const YAML::Node& n, const std::string& key, const Origins& o) {
  std::vector<std::string> paths;
  if (n.IsScalar()) paths.push_back(n.Scalar());
  else if (n.IsSequence()) for (const auto& s : n) paths.push_back(as_string(s, key, o));
  else bad(o.where(n, key), key, "expected a path or a list of paths");
  if (paths.empty()) bad(o.where(n, key), key, "expected at least one path");
  for (const auto& p : paths)
    if (p.empty()) bad(o.where(n, key), key, "an empty path");
  return paths;
}

std::string read_config_file(const std::string& path) {
  if (path.empty()) fail(ErrorKind::io, "the config path is empty");
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) fail(ErrorKind::io, path, ": cannot open config file (", std::strerror(errno), ")");
  if (!S_ISREG(st.st_mode))
    fail(ErrorKind::io, path, ": not a regular file (", S_ISDIR(st.st_mode) ? "a folder" : S_ISFIFO(st.st_mode) ? "a FIFO" : S_ISCHR(st.st_mode) ? "a character device" : "not a file",
         "); a config is a YAML file");
  std::ifstream in(path);
  if (!in) fail(ErrorKind::io, path, ": cannot open config file (", std::strerror(errno), ")");
  std::stringstream text;
  text << in.rdbuf();
  if (in.bad()) fail(ErrorKind::io, path, ": cannot read config file");
  return text.str();
}

YAML::Node load_yaml(const std::string& yaml_text, const std::string& file_name, const std::vector<std::string>& sets, Origins& o) {
  // A second document would be ignored in silence by YAML::Load. (YAML::LoadAll is no way to
  // count them: yaml-cpp 0.7's never returns on input such as ", a".) A document marker at the
  // start of a line after some content starts a second one.
  bool content = false, ended = false;  // content seen; a "..." end marker seen after it
  int line_number = 0;
  for (size_t at = 0; at < yaml_text.size(); ++line_number) {
    const size_t end = std::min(yaml_text.find('\n', at), yaml_text.size());
    const std::string_view line(yaml_text.data() + at, end - at);
    at = end + 1;
    auto is_marker = [&](const char* m) { return line.rfind(m, 0) == 0 && (line.size() == 3 || std::isspace((unsigned char)line[3])); };
    const size_t first = line.find_first_not_of(" \t\r");
    const bool blank = first == std::string_view::npos || line[first] == '#';
    if ((is_marker("---") && content) || (ended && !blank && !is_marker("...")))
      fail(ErrorKind::invalid_argument, file_name, ":", line_number + 1, ": a second YAML document (after ", ended ? "..." : "---", "); a config is one document");
    if (is_marker("...")) ended = content;
    else if (!is_marker("---") && !blank && line[first] != '%') content = true;
  }
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::ParserException& e) {
    fail(ErrorKind::invalid_argument, file_name, ":", e.mark.line + 1, ": YAML syntax error: ", e.msg);
  }
  if (!root.IsDefined() || root.IsNull()) {
    // yaml-cpp 0.7 reads some malformed text (", a") as nothing at all rather than an error.
    if (content) fail(ErrorKind::invalid_argument, file_name, ": not a YAML mapping of sections (model:, data:, ...); nothing could be read from it");
    root = YAML::Node(YAML::NodeType::Map);
  }
  if (!root.IsMap())
    fail(ErrorKind::invalid_argument, file_name, ":", root.Mark().line + 1, ": expected a mapping of sections at the top (model:, data:, ...), got ",
         root.IsSequence() ? "a list" : cat("the value '", scalar_text(root), "'"));
  o.file = file_name;
  for (const auto& s : sets) apply_set(root, s, o);
  return root;
}

}  // namespace hybrit::schema
