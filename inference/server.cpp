#include "inference/server.hpp"

#include <httplib.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>

#include <atomic>
#include <condition_variable>
#include <ctime>
#include <deque>
#include <map>
#include <memory>
#include <mutex>

#include "core/log.hpp"
#include "inference/chat.hpp"

namespace hybrit {

using nlohmann::json;

namespace {

[[noreturn]] void bad(const std::string& param, const std::string& message) { throw RequestError{param, param.empty() ? message : param + ": " + message}; }

// A value as an error message quotes it: its JSON, cut to a short prefix (a field may hold
// megabytes, and the message goes back to the client and into the log).
std::string quote(const json& v) {
  if (v.is_array()) return cat("a list of ", v.size());
  if (v.is_object()) return cat("an object of ", v.size(), " fields");
  return shortened(v.dump(-1, ' ', false, json::error_handler_t::replace));
}

double number_field(const json& body, const char* key, double fallback) {
  if (!body.contains(key) || body[key].is_null()) return fallback;
  if (!body[key].is_number()) bad(key, cat("expected a number, got ", quote(body[key])));
  return body[key].get<double>();
}

int64_t integer_field(const json& body, const char* key, int64_t fallback) {
  if (!body.contains(key) || body[key].is_null()) return fallback;
  const json& v = body[key];
  if (!v.is_number_integer()) bad(key, cat("expected an integer, got ", quote(v)));
  return v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX) ? INT64_MAX : v.get<int64_t>();
}

std::vector<int32_t> token_list(const json& list, const char* what) {
  std::vector<int32_t> out;
  for (const json& t : list) {
    if (!t.is_number_integer()) bad("prompt", cat(what, ": expected token ids (integers), got ", quote(t)));
    const int64_t id = t.get<int64_t>();
    if (id < 0 || id > INT32_MAX) bad("prompt", cat(what, ": token ", id, " is out of range"));
    out.push_back(int32_t(id));
  }
  return out;
}

// Fields of OpenAI's completions API that hybrit does not implement, with what they must be.
bool has_default_value(const std::string& key, const json& v) {
  if (v.is_null()) return true;
  if (key == "n" || key == "best_of") return v.is_number_integer() && v.get<int64_t>() == 1;
  if (key == "echo") return v.is_boolean() && !v.get<bool>();
  if (key == "logprobs") return v.is_number_integer() && v.get<int64_t>() == 0;
  if (key == "presence_penalty" || key == "frequency_penalty") return v.is_number() && v.get<double>() == 0;
  if (key == "logit_bias") return v.is_object() && v.empty();
  if (key == "suffix") return v.is_string() && v.get<std::string>().empty();
  return false;
}

}  // namespace

json parse_request_body(const std::string& text) {
  // nlohmann's parser keeps its own stack, but dump() and the destructor recurse: a body nested
  // 100k levels deep would overflow the thread's stack. Real requests nest 3 levels.
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char ch = text[i];
    if (in_string) {
      if (ch == '\\') ++i;
      else if (ch == '"') in_string = false;
    } else if (ch == '"') {
      in_string = true;
    } else if (ch == '[' || ch == '{') {
      if (++depth > kMaxRequestDepth) bad("", cat("malformed JSON: nested deeper than ", kMaxRequestDepth, " levels (at byte ", i, ")"));
    } else if (ch == ']' || ch == '}') {
      --depth;
    }
  }
  try {
    return json::parse(text);
  } catch (const json::exception& e) {  // parse_error, and out_of_range for numbers such as 1e400
    bad("", cat("malformed JSON: ", shortened(e.what(), 200)));  // e.what() quotes the last token read: maybe the whole body
  }
}

namespace {

// Refuses a field outside `known` (or one of OpenAI's that hybrit does not implement, unless it
// holds its default), and checks the string fields.
void check_fields(const json& body, const std::vector<std::string>& known) {
  if (!body.is_object()) bad("", cat("expected a JSON object, got ", body.type_name()));
  static const char* unsupported[] = {"n", "best_of", "echo", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "suffix"};
  for (const auto& [key, value] : body.items()) {
    if (std::find(known.begin(), known.end(), key) != known.end()) continue;
    if (std::find(std::begin(unsupported), std::end(unsupported), key) != std::end(unsupported)) {
      if (!has_default_value(key, value)) bad(key, cat("not supported by hybrit (got ", quote(value), ")"));
      continue;
    }
    bad(shortened(key), "unknown field");
  }
  for (const char* key : {"model", "user"})
    if (body.contains(key) && !body[key].is_null() && !body[key].is_string()) bad(key, cat("expected a string, got ", quote(body[key])));
}

// The sampling fields every endpoint shares, the stop strings, the stream flags.
// `max_tokens_key`: the field holding max_tokens (the chat API's newer name is max_completion_tokens).
void parse_generation_fields(const json& body, const char* max_tokens_key, int64_t default_max_tokens, CompletionRequest& r);

}  // namespace

CompletionRequest parse_completion_request(const json& body, const Tokenizer& tokenizer, int64_t default_max_tokens) {
  check_fields(body, {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "stop", "seed", "stream",
                      "stream_options", "user"});
  CompletionRequest r;
  if (!body.contains("prompt") || body["prompt"].is_null()) bad("prompt", "required (a string, a list of strings, or token ids)");
  const json& prompt = body["prompt"];
  auto encode = [&](const std::string& text) {
    std::vector<int32_t> tokens;
    tokenizer.encode(text, tokens);
    return tokens;
  };
  if (prompt.is_string()) {
    r.prompts.push_back(encode(prompt.get<std::string>()));
  } else if (prompt.is_array() && !prompt.empty()) {
    if (prompt[0].is_number_integer()) {
      r.prompts.push_back(token_list(prompt, "prompt"));
    } else {
      for (size_t i = 0; i < prompt.size(); ++i) {
        const json& p = prompt[i];
        if (p.is_string()) r.prompts.push_back(encode(p.get<std::string>()));
        else if (p.is_array()) r.prompts.push_back(token_list(p, cat("prompt[", i, "]").c_str()));
        else bad("prompt", cat("prompt[", i, "]: expected a string or a list of token ids, got ", p.type_name()));
      }
    }
  } else {
    bad("prompt", cat("expected a string, a non-empty list of strings, or token ids, got ", quote(prompt)));
  }
  for (size_t i = 0; i < r.prompts.size(); ++i)
    if (r.prompts[i].empty()) bad("prompt", r.prompts.size() == 1 ? "empty (give at least one token)" : cat("prompt[", i, "] is empty"));

  parse_generation_fields(body, "max_tokens", default_max_tokens, r);
  return r;
}

CompletionRequest parse_chat_request(const json& body, const Tokenizer& tokenizer, int64_t default_max_tokens) {
  check_fields(body, {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                      "stop", "seed", "stream", "stream_options", "user"});
  if (!body.contains("messages") || body["messages"].is_null()) bad("messages", "required (a list of {role, content})");
  const json& list = body["messages"];
  if (!list.is_array() || list.empty()) bad("messages", cat("expected a non-empty list of {role, content}, got ", quote(list)));
  std::vector<ChatMessage> messages;
  for (size_t i = 0; i < list.size(); ++i) {
    const json& m = list[i];
    const std::string at = cat("messages[", i, "]");
    if (!m.is_object()) bad("messages", cat(at, ": expected an object {role, content}, got ", quote(m)));
    for (const auto& [key, value] : m.items())
      if (key != "role" && key != "content" && key != "name") bad("messages", cat(at, ": unknown field ", quote(key)));
    if (!m.contains("role") || !m["role"].is_string()) bad("messages", cat(at, ".role: expected a string (system, user or assistant)"));
    ChatMessage msg{m["role"].get<std::string>(), ""};
    const json content = m.value("content", json());
    if (content.is_string()) {
      msg.content = content.get<std::string>();
    } else if (content.is_array()) {  // OpenAI's content parts: text ones only
      for (const json& part : content) {
        if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") || !part["text"].is_string())
          bad("messages", cat(at, ".content: only text parts ({\"type\": \"text\", \"text\": ...}) are supported, got ", quote(part)));
        msg.content += part["text"].get<std::string>();
      }
    } else {
      bad("messages", cat(at, ".content: expected a string or a list of text parts, got ", quote(content)));
    }
    messages.push_back(std::move(msg));
  }
  CompletionRequest r;
  std::string prompt;
  try {
    prompt = chat_prompt(messages);
  } catch (const Error& e) {
    throw RequestError{e.field(), e.what()};
  }
  std::vector<int32_t> tokens;
  tokenizer.encode(prompt, tokens);
  r.prompts.push_back(std::move(tokens));
  if (body.contains("max_completion_tokens") && body.contains("max_tokens")) bad("max_completion_tokens", "give max_tokens or max_completion_tokens, not both");
  parse_generation_fields(body, body.contains("max_completion_tokens") ? "max_completion_tokens" : "max_tokens", default_max_tokens, r);
  for (const auto& stop : chat_stop_strings()) r.generation.stop.push_back(stop);
  return r;
}

namespace {

void parse_generation_fields(const json& body, const char* max_tokens_key, int64_t default_max_tokens, CompletionRequest& r) {
  GenerationRequest& g = r.generation;
  const SamplingParams defaults;  // the one set every front end shares
  g.max_tokens = integer_field(body, max_tokens_key, default_max_tokens);
  g.sampling.temperature = number_field(body, "temperature", defaults.temperature);
  g.sampling.top_p = number_field(body, "top_p", defaults.top_p);
  g.sampling.top_k = integer_field(body, "top_k", defaults.top_k);
  g.sampling.min_p = number_field(body, "min_p", defaults.min_p);
  g.sampling.repetition_penalty = number_field(body, "repetition_penalty", defaults.repetition_penalty);
  if (g.max_tokens < 1) bad(max_tokens_key, cat("expected an integer >= 1, got ", g.max_tokens));
  try {
    g.sampling.validate();
  } catch (const Error& e) {
    throw RequestError{e.field(), e.what()};  // the message names the field first, as the others do
  }
  if (body.contains("seed") && !body["seed"].is_null()) {
    if (!body["seed"].is_number_integer()) bad("seed", cat("expected an integer, got ", quote(body["seed"])));
    g.sampling.seed = body["seed"].is_number_unsigned() ? body["seed"].get<uint64_t>() : uint64_t(body["seed"].get<int64_t>());
    r.seeded = true;
  }
  if (body.contains("stop") && !body["stop"].is_null()) {
    const json& stop = body["stop"];
    if (stop.is_string()) g.stop.push_back(stop.get<std::string>());
    else if (stop.is_array())
      for (const json& s : stop) {
        if (!s.is_string()) bad("stop", cat("expected strings, got ", quote(s)));
        g.stop.push_back(s.get<std::string>());
      }
    else bad("stop", cat("expected a string or a list of strings, got ", quote(stop)));
    if (g.stop.size() > 16) bad("stop", cat("at most 16 stop strings, got ", g.stop.size()));
    for (const auto& s : g.stop)
      if (s.empty()) bad("stop", "an empty stop string would end every output at once");
  }
  if (body.contains("stream") && !body["stream"].is_null()) {
    if (!body["stream"].is_boolean()) bad("stream", cat("expected true or false, got ", quote(body["stream"])));
    r.stream = body["stream"].get<bool>();
  }
  if (body.contains("stream_options") && !body["stream_options"].is_null()) {
    const json& so = body["stream_options"];
    if (!r.stream) bad("stream_options", "only allowed with stream: true");
    if (!so.is_object()) bad("stream_options", "expected an object");
    for (const auto& [key, value] : so.items()) {
      if (key != "include_usage") bad("stream_options", cat("unknown field ", quote(key)));
      if (!value.is_boolean()) bad("stream_options", cat("include_usage: expected true or false, got ", quote(value)));
      r.include_usage = value.get<bool>();
    }
  }
}

const char* openai_finish_reason(FinishReason why) {
  switch (why) {
    case FinishReason::eos:
    case FinishReason::stop: return "stop";
    case FinishReason::length:
    case FinishReason::context: return "length";
    default: return to_string(why);  // cancelled, error: hybrit's own words
  }
}

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }  // a byte model may write invalid UTF-8

json finish_json(FinishReason why) { return why == FinishReason::none ? json(nullptr) : json(openai_finish_reason(why)); }

json choice_json(size_t index, const std::string& text, FinishReason why) {
  return {{"text", text}, {"index", index}, {"logprobs", nullptr}, {"finish_reason", finish_json(why)}};
}

// Chat choices: the whole message, or in a stream the delta (the role with the first piece).
json chat_choice_json(size_t index, const std::string& text, FinishReason why) {
  return {{"index", index}, {"message", {{"role", "assistant"}, {"content", text}}}, {"logprobs", nullptr}, {"finish_reason", finish_json(why)}};
}
json chat_delta_json(size_t index, const std::string& text, FinishReason why, bool first) {
  json delta = json::object();
  if (first) delta["role"] = "assistant";
  if (!text.empty() || first) delta["content"] = text;
  return {{"index", index}, {"delta", delta}, {"logprobs", nullptr}, {"finish_reason", finish_json(why)}};
}


json usage_json(int64_t prompt_tokens, int64_t completion_tokens) {
  return {{"prompt_tokens", prompt_tokens}, {"completion_tokens", completion_tokens}, {"total_tokens", prompt_tokens + completion_tokens}};
}

json error_body(const std::string& message, const char* type, const std::string& param = "") {
  return {{"error", {{"message", message}, {"type", type}, {"param", param.empty() ? json(nullptr) : json(param)}, {"code", nullptr}}}};
}

// The events of one HTTP request's choices, handed from the engine's thread to the handler's.
struct Completion {
  std::mutex mutex;
  std::condition_variable arrived;
  std::deque<std::pair<size_t, GenerationEvent>> events;  // (choice, event)
  std::vector<int64_t> ids;                                // engine request per choice
  size_t finished = 0;
};

// Counters the metrics page shows beside the engine's own.
struct HttpCounters {
  std::mutex mutex;
  std::map<std::pair<std::string, int>, int64_t> responses;  // (path, status) -> count
  std::atomic<int64_t> completions_cancelled_by_client{0};
  std::atomic<int64_t> open_streams{0};  // a stopping server lets these send their last events
};

std::string metrics_text(const BackgroundEngine::Snapshot& s, HttpCounters& http) {
  std::string out;
  auto metric = [&](const char* name, const char* type, const char* help, double value) {
    out += cat("# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n", name, " ", value, "\n");
  };
  const EngineStats& e = s.engine;
  metric("hybrit_tokens_per_second", "gauge", "Tokens generated per second over the last 10 seconds.", s.tokens_per_second);
  metric("hybrit_generated_tokens_total", "counter", "Tokens generated.", double(e.tokens_generated));
  metric("hybrit_prompt_tokens_computed_total", "counter", "Prompt tokens run through the model.", double(e.prompt_tokens_computed));
  metric("hybrit_prompt_tokens_cached_total", "counter", "Prompt tokens whose K and V came from the prefix cache.", double(e.prompt_tokens_cached));
  metric("hybrit_requests_running", "gauge", "Sequences in the running batch.", double(e.running));
  metric("hybrit_requests_waiting", "gauge", "Sequences queued for admission.", double(e.waiting));
  metric("hybrit_requests_finished_total", "counter", "Sequences finished (any reason).", double(e.finished));
  metric("hybrit_preemptions_total", "counter", "Sequences preempted for KV blocks and later recomputed.", double(e.preemptions));
  metric("hybrit_window_slides_total", "counter", "Times a sequence outgrew the context and was recomputed from its last tokens.", double(e.window_slides));
  metric("hybrit_engine_steps_total", "counter", "Forward passes over the running batch.", double(e.steps));
  metric("hybrit_kv_blocks_total", "gauge", "KV cache blocks of 16 positions.", double(e.kv.blocks));
  metric("hybrit_kv_blocks_in_use", "gauge", "KV blocks referenced by running sequences.", double(e.kv.in_use));
  metric("hybrit_kv_blocks_cached", "gauge", "Unreferenced KV blocks kept for prefix reuse.", double(e.kv.cached));
  metric("hybrit_kv_wasted_slots", "gauge", "Reserved but unfilled KV positions of running sequences.", double(e.wasted_slots));
  metric("hybrit_prefix_cache_hit_rate", "gauge", "Prefix block lookups that found a cached block.",
         e.kv.prefix_lookups ? double(e.kv.prefix_hits) / double(e.kv.prefix_lookups) : 0.0);
  metric("hybrit_client_disconnects_total", "counter", "Streams whose client went away; their requests were cancelled.",
         double(http.completions_cancelled_by_client.load()));
  metric("hybrit_uptime_seconds", "gauge", "Seconds since the server started.", s.uptime_seconds);
  out += "# HELP hybrit_http_responses_total HTTP responses by path and status.\n# TYPE hybrit_http_responses_total counter\n";
  std::lock_guard<std::mutex> lock(http.mutex);
  for (const auto& [key, count] : http.responses)
    out += cat("hybrit_http_responses_total{path=\"", key.first, "\",code=\"", key.second, "\"} ", count, "\n");
  return out;
}

// Set on the threads that take connections beyond the pool: their completions answer 429 at once.
thread_local bool t_over_capacity = false;

// httplib's thread pool queues connections without bound once every thread is taken, and a queued
// client waits in silence. This one hands a connection past `threads` to a few overflow threads
// that answer 429 (health and metrics still answer), so a burst hears "busy" instead of nothing.
class AdmissionQueue : public httplib::TaskQueue {
 public:
  AdmissionQueue(size_t threads, size_t overflow_threads) : capacity_(threads), main_(threads), overflow_(overflow_threads) {}
  void enqueue(std::function<void()> fn) override {
    if (taken_.fetch_add(1) < capacity_) {
      main_.enqueue([this, fn = std::move(fn)] {
        fn();
        taken_.fetch_sub(1);
      });
      return;
    }
    taken_.fetch_sub(1);
    overflow_.enqueue([fn = std::move(fn)] {
      t_over_capacity = true;
      fn();
      t_over_capacity = false;
    });
  }
  void shutdown() override {
    main_.shutdown();
    overflow_.shutdown();
  }

 private:
  const size_t capacity_;
  std::atomic<size_t> taken_{0};
  httplib::ThreadPool main_, overflow_;
};

class CompletionHandler {
 public:
  // chat: the /v1/chat/completions endpoint (messages in, chat.completion out).
  CompletionHandler(BackgroundEngine& engine, const InferenceModel& model, const ServerOptions& options, HttpCounters& http, bool chat)
      : engine_(engine), model_(model), options_(options), http_(http), chat_(chat), path_(chat ? "/v1/chat/completions" : "/v1/completions") {}

  void operator()(const httplib::Request& req, httplib::Response& res) {
    if (t_over_capacity) {
      res.set_header("Retry-After", "1");
      res.set_header("Connection", "close");
      return reply(res, 429, error_body("the server is busy: every connection thread is taken; retry later", "server_busy"));
    }
    CompletionRequest request;
    try {
      const json body = parse_request_body(req.body);
      request = chat_ ? parse_chat_request(body, model_.tokenizer(), options_.default_max_tokens)
                      : parse_completion_request(body, model_.tokenizer(), options_.default_max_tokens);
    } catch (const RequestError& e) {
      return reply(res, 400, error_body(e.message, "invalid_request_error", e.param));
    }
    if (!request.seeded) request.generation.sampling.seed = fresh_seed();

    if (int64_t(request.prompts.size()) > options_.engine.max_waiting)
      return reply(res, 400, error_body(cat("prompt: ", request.prompts.size(), " prompts are more than the server queues (", options_.engine.max_waiting, ")"),
                                        "invalid_request_error", "prompt"));
    auto completion = std::make_shared<Completion>();
    for (size_t i = 0; i < request.prompts.size(); ++i) {
      GenerationRequest g = request.generation;
      g.prompt = request.prompts[i];
      g.on_event = [completion, i](const GenerationEvent& e) {
        {
          std::lock_guard<std::mutex> lock(completion->mutex);
          completion->events.emplace_back(i, e);
        }
        completion->arrived.notify_all();
      };
      try {
        const int64_t id = engine_.submit(std::move(g));
        std::lock_guard<std::mutex> lock(completion->mutex);
        completion->ids.push_back(id);
      } catch (const Error& e) {
        for (int64_t id : completion->ids) engine_.cancel(id);
        const std::string m = e.what();
        if (e.kind() == ErrorKind::invalid_argument)  // the engine's checks: prompt length and token range
          return reply(res, 400, error_body(m, "invalid_request_error", e.field()));
        if (engine_.stopping()) return reply(res, 503, error_body(m, "server_shutting_down"));
        return reply(res, 429, error_body(m, "server_busy"));
      }
    }
    const std::string id = cat(chat_ ? "chatcmpl-" : "cmpl-", std::hex, next_id_.fetch_add(1) + 1);
    const int64_t created = int64_t(std::time(nullptr));
    int64_t prompt_tokens = 0;
    for (const auto& p : request.prompts) prompt_tokens += int64_t(p.size());
    if (request.stream) stream(res, completion, request, id, created, prompt_tokens);
    else collect(res, completion, request, id, created, prompt_tokens);
  }

 private:
  json chunk_header(const std::string& id, int64_t created, bool stream) const {
    const char* object = !chat_ ? "text_completion" : stream ? "chat.completion.chunk" : "chat.completion";
    return {{"id", id}, {"object", object}, {"created", created}, {"model", options_.model_name}};
  }

  void collect(httplib::Response& res, const std::shared_ptr<Completion>& c, const CompletionRequest& request, const std::string& id, int64_t created,
               int64_t prompt_tokens) {
    const size_t n = request.prompts.size();
    std::vector<std::string> texts(n);
    std::vector<FinishReason> reasons(n, FinishReason::none);
    int64_t completion_tokens = 0;
    {
      std::unique_lock<std::mutex> lock(c->mutex);
      while (c->finished < n) {
        c->arrived.wait(lock, [&] { return !c->events.empty(); });
        for (; !c->events.empty(); c->events.pop_front()) {
          const auto& [choice, e] = c->events.front();
          texts[choice] += e.text;
          completion_tokens += e.token >= 0;
          if (e.finished != FinishReason::none) reasons[choice] = e.finished, ++c->finished;
        }
      }
    }
    for (FinishReason why : reasons) {
      if (why == FinishReason::cancelled) return reply(res, 503, error_body("the server is shutting down; the request was cancelled", "server_shutting_down"));
      if (why == FinishReason::error) return reply(res, 500, error_body("the engine failed; see the server's log", "server_error"));
    }
    json out = chunk_header(id, created, false);
    out["choices"] = json::array();
    for (size_t i = 0; i < n; ++i) {
      bool at_start = true;
      if (chat_) drop_reply_space(texts[i], at_start);
      out["choices"].push_back(chat_ ? chat_choice_json(i, texts[i], reasons[i]) : choice_json(i, texts[i], reasons[i]));
    }
    out["usage"] = usage_json(prompt_tokens, completion_tokens);
    reply(res, 200, out);
  }

  void stream(httplib::Response& res, const std::shared_ptr<Completion>& c, const CompletionRequest& request, const std::string& id, int64_t created,
              int64_t prompt_tokens) {
    count(200);
    http_.open_streams.fetch_add(1);
    res.status = 200;
    res.set_header("Cache-Control", "no-cache");
    const size_t n = request.prompts.size();
    const bool include_usage = request.include_usage;
    auto completion_tokens = std::make_shared<int64_t>(0);
    const json header = chunk_header(id, created, true);
    const bool chat = chat_;
    // Per choice: no piece sent yet (a chat delta carries the role first), and still at the reply's start.
    auto first = std::make_shared<std::vector<char>>(n, 1), at_start = std::make_shared<std::vector<char>>(n, 1);
    res.set_chunked_content_provider(
        "text/event-stream",
        [c, n, include_usage, completion_tokens, header, prompt_tokens, chat, first, at_start](size_t, httplib::DataSink& sink) {
          std::deque<std::pair<size_t, GenerationEvent>> events;
          bool all_done = false;
          {
            std::unique_lock<std::mutex> lock(c->mutex);
            // Wake now and then to notice a client that went away while nothing was made.
            c->arrived.wait_for(lock, std::chrono::milliseconds(500), [&] { return !c->events.empty(); });
            events.swap(c->events);
            for (const auto& ev : events) c->finished += ev.second.finished != FinishReason::none;
            all_done = c->finished == n;
          }
          std::string out;
          for (const auto& [choice, e] : events) {
            *completion_tokens += e.token >= 0;
            std::string text = e.text;
            if (chat) {
              bool start = (*at_start)[choice];
              drop_reply_space(text, start);
              (*at_start)[choice] = start;
            }
            if (text.empty() && e.finished == FinishReason::none) continue;
            json chunk = header;
            if (chat) {
              chunk["choices"] = json::array({chat_delta_json(choice, text, e.finished, (*first)[choice])});
              (*first)[choice] = 0;
            } else {
              chunk["choices"] = json::array({choice_json(choice, text, e.finished)});
            }
            out += "data: " + dump(chunk) + "\n\n";
          }
          if (all_done) {
            if (include_usage) {
              json chunk = header;
              chunk["choices"] = json::array();
              chunk["usage"] = usage_json(prompt_tokens, *completion_tokens);
              out += "data: " + dump(chunk) + "\n\n";
            }
            out += "data: [DONE]\n\n";
          }
          if (!out.empty() && !sink.write(out.data(), out.size())) return false;
          if (out.empty() && !sink.is_writable()) return false;
          if (all_done) sink.done();
          return true;
        },
        [this, c, n](bool success) {
          http_.open_streams.fetch_sub(1);
          std::vector<int64_t> ids;
          {
            // Not held while cancelling: the engine's thread takes this mutex inside a step.
            std::lock_guard<std::mutex> lock(c->mutex);
            if (c->finished == n) return;
            ids = c->ids;
          }
          if (!success) http_.completions_cancelled_by_client.fetch_add(1);
          for (int64_t id : ids) engine_.cancel(id);  // ids already finished are ignored
        });
  }

  void reply(httplib::Response& res, int status, const json& body) {
    count(status);
    res.status = status;
    res.set_content(dump(body) + "\n", "application/json");
  }
  void count(int status) {
    std::lock_guard<std::mutex> lock(http_.mutex);
    ++http_.responses[{path_, status}];
  }

  BackgroundEngine& engine_;
  const InferenceModel& model_;
  const ServerOptions& options_;
  HttpCounters& http_;
  const bool chat_;
  const std::string path_;
  std::atomic<uint64_t> next_id_{0};
};

}  // namespace

void serve(InferenceModel& model, const ServerOptions& options, const std::function<void(int)>& on_listening) {
  // SIGINT and SIGTERM go to one watcher thread (every thread started below inherits the mask).
  sigset_t stop_signals, previous;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, &previous);

  BackgroundEngine engine(model, options.engine);
  HttpCounters http;
  CompletionHandler completions(engine, model, options, http, false), chats(engine, model, options, http, true);
  httplib::Server server;
  // A request holds its connection's thread while it runs or waits, so there are threads for
  // every request the engine can hold (the queue's 429 comes before the threads run out) and a
  // few for /health and /metrics.
  const size_t threads = size_t(options.engine.max_running + options.engine.max_waiting + 8);
  server.new_task_queue = [threads] { return new AdmissionQueue(threads, 4); };
  int listening_socket = -1;
  server.set_socket_options([&listening_socket](int sock) {
    // httplib's default is SO_REUSEPORT, which lets a second server share a taken port in silence.
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &yes, sizeof(yes));  // tokens go out as they are made
    listening_socket = sock;
  });
  server.set_payload_max_length(8 << 20);
  server.set_keep_alive_max_count(1000);
  server.set_keep_alive_timeout(2);  // an idle connection holds a thread (and a stopping server) this long

  server.Post("/v1/completions", [&](const httplib::Request& req, httplib::Response& res) { completions(req, res); });
  server.Post("/v1/chat/completions", [&](const httplib::Request& req, httplib::Response& res) { chats(req, res); });
  const int64_t started = int64_t(std::time(nullptr));
  server.Get("/v1/models", [&](const httplib::Request&, httplib::Response& res) {
    const ModelConfig& m = model.config();
    const json card = {{"id", options.model_name}, {"object", "model"}, {"created", started}, {"owned_by", "hybrit"},
                       {"context_length", m.context}, {"vocab_size", m.vocab_size}, {"quant", m.quant == ModelConfig::Quant::ternary ? "ternary" : "none"},
                       {"weights", model.packed() ? "packed 2-bit" : "f32"}};
    res.set_content(dump({{"object", "list"}, {"data", json::array({card})}}) + "\n", "application/json");
  });
  server.Get("/health", [&](const httplib::Request&, httplib::Response& res) {
    res.set_content(dump({{"status", "ok"}, {"model", options.model_name}}) + "\n", "application/json");
  });
  server.Get("/metrics", [&](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics_text(engine.snapshot(), http), "text/plain; version=0.0.4");
  });
  // A known path asked with the wrong method: 405 with the method it takes (RFC 9110's Allow).
  auto wrong_method = [&](const char* allowed) {
    return [allowed](const httplib::Request& req, httplib::Response& res) {
      res.status = 405;
      res.set_header("Allow", allowed);
      res.set_content(dump(error_body(cat(req.method, " ", req.path, ": method not allowed (use ", allowed, ")"), "method_not_allowed")) + "\n",
                      "application/json");
    };
  };
  for (const char* path : {"/v1/completions", "/v1/chat/completions"}) {
    server.Get(path, wrong_method("POST"));
    server.Put(path, wrong_method("POST"));
    server.Patch(path, wrong_method("POST"));
    server.Delete(path, wrong_method("POST"));
  }
  for (const char* path : {"/health", "/metrics", "/v1/models"}) {
    server.Post(path, wrong_method("GET"));
    server.Put(path, wrong_method("GET"));
    server.Patch(path, wrong_method("GET"));
    server.Delete(path, wrong_method("GET"));
  }
  server.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;  // our handlers' own error bodies
    const char* type = res.status == 404 ? "not_found" : res.status == 413 ? "request_too_large" : "invalid_request_error";
    const std::string message = res.status == 404 ? cat("no such endpoint: ", req.method, " ", req.path,
                                                         " (try POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics)")
                                                   : cat("HTTP ", res.status, " for ", req.method, " ", req.path);
    res.set_content(dump(error_body(message, type)) + "\n", "application/json");
  });
  server.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "unknown";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    log_line(LogLevel::error, cat("request failed: ", what));
    res.status = 500;
    res.set_content(dump(error_body(cat("internal error: ", what), "server_error")) + "\n", "application/json");
  });

  int port = options.port;
  if (port == 0) port = server.bind_to_any_port(options.host);
  else if (!server.bind_to_port(options.host, port)) port = -1;
  if (port <= 0) {
    pthread_sigmask(SIG_SETMASK, &previous, nullptr);
    fail(ErrorKind::io, "cannot listen on ", options.host, ":", options.port, " (is the port taken, or the host not an address of this machine?)");
  }
  // httplib listens with a backlog of 5 (compiled into Debian's libcpp-httplib, so its macro cannot
  // change it): a burst of clients then overflowed the accept queue into TCP resets before anyone
  // could answer them 429. listen() again on the bound socket sets a deeper queue (the kernel caps
  // it at net.core.somaxconn).
  if (listening_socket >= 0) ::listen(listening_socket, 1024);

  std::atomic<bool> serving{true};
  std::thread watcher([&] {
    const timespec tick{0, 200'000'000};
    while (serving.load()) {
      const int sig = sigtimedwait(&stop_signals, nullptr, &tick);
      if (sig != SIGINT && sig != SIGTERM) continue;  // the tick ran out
      log_info("hybrit serve: ", sig == SIGINT ? "SIGINT" : "SIGTERM", ": cancelling open requests and stopping");
      engine.shutdown();  // open requests get their final (cancelled) events, so their handlers return
      for (int i = 0; i < 500 && http.open_streams.load() > 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
      server.stop();
      return;
    }
  });
  on_listening(port);
  const bool listened = server.listen_after_bind();
  serving.store(false);
  watcher.join();
  engine.shutdown();
  const timespec now{0, 0};
  while (sigtimedwait(&stop_signals, nullptr, &now) > 0) {
  }  // a repeated Ctrl-C during shutdown must not kill the process once the mask is restored
  pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  if (!listened) fail(ErrorKind::io, "the server on ", options.host, ":", port, " stopped with an error");
}

}  // namespace hybrit
