// `hybrit serve`: an OpenAI-style completions endpoint over HTTP (cpp-httplib) in front of a
// BackgroundEngine. Every request's prompts join the engine's continuous batch; a full queue
// answers 429, bad JSON or fields answer 400 naming the field, and SIGINT/SIGTERM end the server
// after telling every open request it was cancelled.
//
//   POST /v1/completions  prompt (string, list of strings, token list, list of token lists),
//                         max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, stop,
//                         seed, stream (server-sent events), stream_options.include_usage
//   POST /v1/chat/completions  messages (role system|user|assistant, content a string or text
//                         parts), the same sampling fields, stream; the conversation becomes one
//                         prompt through inference/chat.hpp's template, the reply stops before
//                         the model's "\nUser:"
//   GET  /v1/models       the one model served, as OpenAI lists models
//   GET  /health          {"status": "ok"} while serving
//   GET  /metrics         Prometheus text: tokens/s, requests running and waiting, KV blocks, ...
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "inference/engine.hpp"

namespace hybrit {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8000;                  // 0: any free port (the one taken is passed to on_listening)
  // engine.max_waiting bounds the queue (beyond it, 429). The server keeps a connection thread
  // for every request it holds, so its queue is shorter than a bare engine's.
  EngineOptions engine = [] {
    EngineOptions e;
    e.max_waiting = 64;
    return e;
  }();
  std::string model_name = "hybrit";  // "model" in every response
  int64_t default_max_tokens = 16;  // OpenAI's default when a request has no max_tokens
};

// A bad request: `param` is the JSON field at fault ("" for the body as a whole).
struct RequestError {
  std::string param, message;
};

// What one POST /v1/completions body asks for. Throws RequestError.
struct CompletionRequest {
  std::vector<std::vector<int32_t>> prompts;  // one choice per prompt, in order
  GenerationRequest generation;               // everything but the prompt and the callback
  bool seeded = false;                        // false: a fresh random seed per request
  bool stream = false, include_usage = false;
};
// A request body as JSON: at most kMaxRequestDepth levels of nesting, numbers within double's
// range. Throws RequestError (param "") for anything else.
inline constexpr int kMaxRequestDepth = 64;
nlohmann::json parse_request_body(const std::string& text);
CompletionRequest parse_completion_request(const nlohmann::json& body, const Tokenizer& tokenizer, int64_t default_max_tokens);
// A /v1/chat/completions body: `messages` instead of `prompt`, `max_completion_tokens` as another
// name for max_tokens. Throws RequestError.
CompletionRequest parse_chat_request(const nlohmann::json& body, const Tokenizer& tokenizer, int64_t default_max_tokens);

// Serves until SIGINT or SIGTERM, then returns. on_listening(port) runs once the socket is bound.
// Errors (the address is taken, say) are thrown before serving starts.
void serve(InferenceModel& model, const ServerOptions& options, const std::function<void(int port)>& on_listening);

}  // namespace hybrit
