// The YAML schema checks shared by every config file hybrit reads (training runs, data reduction):
// typed readers and a walker that refuses unknown keys, every error one line naming the file,
// the line and the dotted key ("run.yaml:7: model.dim: expected an integer >= 1, got 0").
#pragma once
#include <yaml-cpp/yaml.h>

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "core/error.hpp"

namespace hybrit::schema {

// Where each key came from, for messages: "run.yaml:7" or "--set model.dim=50".
struct Origins {
  std::string file;
  std::map<std::string, std::string> of_key;
  std::string where(const YAML::Node& n, const std::string& key) const {
    if (auto it = of_key.find(key); it != of_key.end()) return it->second;
    return n.Mark().line >= 0 ? cat(file, ":", n.Mark().line + 1) : file;
  }
};

[[noreturn]] void bad(const std::string& where, const std::string& key, const std::string& what);
std::string scalar_text(const YAML::Node& n);
int64_t as_int(const YAML::Node& n, const std::string& key, const Origins& o, int64_t min_value);
double as_double(const YAML::Node& n, const std::string& key, const Origins& o);
bool as_bool(const YAML::Node& n, const std::string& key, const Origins& o);
std::string as_string(const YAML::Node& n, const std::string& key, const Origins& o);
std::string as_choice(const YAML::Node& n, const std::string& key, const Origins& o, const std::vector<std::string>& choices);

// A path or a list of paths, at least one.
std::vector<std::string> as_path_list(const YAML::Node& n, const std::string& key, const Origins& o);
// The text of a config file (ErrorKind::io naming it when it cannot be read).
std::string read_config_file(const std::string& path);

using Handler = std::function<void(const YAML::Node&, const std::string&)>;
// Walks a mapping with one handler per allowed key; anything else is an unknown key.
void walk(const YAML::Node& map, const std::string& prefix, const Origins& o, const std::map<std::string, Handler>& keys);
// `a.b.c=value` into the tree, the value parsed as YAML (so numbers, booleans and lists work);
// records the assignment as the key's origin.
void apply_set(YAML::Node& root, const std::string& assignment, Origins& o);
// The text parsed (syntax errors name file:line), `sets` applied; an empty file is an empty mapping.
YAML::Node load_yaml(const std::string& yaml_text, const std::string& file_name, const std::vector<std::string>& sets, Origins& o);

}  // namespace hybrit::schema
