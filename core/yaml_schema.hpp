// The YAML schema checks shared by every config file hybrit reads (training runs, data reduction,
// the dispatch section): typed readers with ranges and a walker that refuses unknown and repeated
// keys, every error one line naming the file, the line and the dotted key
// ("run.yaml:7: model.dim: expected an integer in [1, 65536], got 0"), or the `--set` it came from.
#pragma once
#include <yaml-cpp/yaml.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "core/error.hpp"

namespace hybrit::schema {

// Where each key came from, for messages: "run.yaml:7" or "--set model.dim=50".
struct Origins {
  std::string file;
  std::map<std::string, std::string> of_key;
  std::string where(const YAML::Node& n, const std::string& key) const;
};

// The values a number may take: [lo, hi], either end open. text() writes it as the messages do.
struct Range {
  double lo = -std::numeric_limits<double>::infinity(), hi = std::numeric_limits<double>::infinity();
  bool lo_open = false, hi_open = false;
  bool holds(double v) const { return (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi); }
  std::string text() const;
};
inline Range at_least(double lo) { return {lo, std::numeric_limits<double>::infinity(), false, false}; }
inline Range above(double lo) { return {lo, std::numeric_limits<double>::infinity(), true, false}; }
inline Range closed(double lo, double hi) { return {lo, hi, false, false}; }
inline Range closed_open(double lo, double hi) { return {lo, hi, false, true}; }
inline Range open_closed(double lo, double hi) { return {lo, hi, true, false}; }
inline Range open_interval(double lo, double hi) { return {lo, hi, true, true}; }

[[noreturn]] void bad(const std::string& where, const std::string& key, const std::string& what);
std::string scalar_text(const YAML::Node& n);
// An integer in [min_value, max_value], range-checked before it is narrowed anywhere.
int64_t as_int(const YAML::Node& n, const std::string& key, const Origins& o, int64_t min_value,
               int64_t max_value = std::numeric_limits<int64_t>::max());
// A finite number within `range`.
double as_double(const YAML::Node& n, const std::string& key, const Origins& o, const Range& range = {});
bool as_bool(const YAML::Node& n, const std::string& key, const Origins& o);
std::string as_string(const YAML::Node& n, const std::string& key, const Origins& o);
// A number as the shortest text that reads back as the same value (0.05, not
// 0.050000000000000003): what resolved configs write.
std::string yaml_number(double value);
std::string yaml_number(float value);

std::string as_choice(const YAML::Node& n, const std::string& key, const Origins& o, const std::vector<std::string>& choices);

// A path or a list of paths, at least one.
std::vector<std::string> as_path_list(const YAML::Node& n, const std::string& key, const Origins& o);
// The text of a config file: ErrorKind::io naming it when it is missing, not a regular file (a
// FIFO would block forever, a folder or device is no config) or unreadable.
std::string read_config_file(const std::string& path);

using Handler = std::function<void(const YAML::Node&, const std::string&)>;
// Walks a mapping with one handler per allowed key; anything else, a key given twice or a key
// that is not a plain scalar is an error naming it.
void walk(const YAML::Node& map, const std::string& prefix, const Origins& o, const std::map<std::string, Handler>& keys);
// `a.b.c=value` into the tree, the value parsed as YAML (so numbers, booleans and lists work);
// records the assignment as the key's origin.
void apply_set(YAML::Node& root, const std::string& assignment, Origins& o);
// The text parsed (syntax errors name file:line), `sets` applied; an empty file is an empty mapping.
// Exactly one document whose top is a mapping of sections, else an error naming the file.
YAML::Node load_yaml(const std::string& yaml_text, const std::string& file_name, const std::vector<std::string>& sets, Origins& o);

}  // namespace hybrit::schema
