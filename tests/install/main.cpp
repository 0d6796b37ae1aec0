// Parses the installed tiny.yaml, builds its model and takes one forward pass through the
// installed libraries. Prints "dim <d> params <n> loss <x>".
#include <cstdio>
#include <vector>

#include "model/config.hpp"
#include "model/model.hpp"

int main() {
  const hybrit::TrainConfig cfg = hybrit::load_train_config(HYBRIT_CONFIGS_DIR "/tiny.yaml");
  hybrit::Dispatcher dispatcher;
  hybrit::Model model(cfg.model, dispatcher, cfg.seed);
  std::vector<int32_t> tokens(size_t(cfg.model.context)), targets(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = int32_t(i % 200), targets[i] = int32_t((i + 1) % 200);
  const double loss = model.forward(tokens.data(), targets.data(), 1, cfg.model.context);
  std::printf("dim %lld params %lld loss %.3f\n", static_cast<long long>(cfg.model.dim),
              static_cast<long long>(hybrit::Model::parameter_count(cfg.model)), loss);
  return loss > 0 ? 0 : 1;
}
