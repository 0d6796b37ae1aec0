"""`hybrit serve`: completions over HTTP agree with hybrit.Generator, streaming (SSE) sends the same
text, bad requests get 400 naming the field, a full queue gets 429, a client that goes away
cancels its request, /metrics counts what happened, and SIGTERM stops the server cleanly."""
import http.client
import json
import os
import re
import select
import signal
import subprocess
import threading

import pytest

import hybrit

PROMPTS = ["The ", "A man walks into a bar", "Q: What is the meaning of life?\nA:", "Never"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = {"seed": 5, "model": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "context": 256, "quant": "ternary"},
           "train": {"batch": 4, "sample_tokens": 0}}
    trainer = hybrit.Trainer(cfg)
    for _ in range(40):
        trainer.step()
    path = str(tmp_path_factory.mktemp("serve") / "model.h5")
    trainer.save(path)
    return path


@pytest.fixture(scope="module")
def generator(checkpoint):
    return hybrit.Generator(checkpoint)


class Server:
    def __init__(self, cli, checkpoint, *args):
        env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIT_")}
        self.proc = subprocess.Popen([cli, "serve", "--checkpoint", checkpoint, "--port", "0", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else ""
        if "built without cpp-httplib" in line + (self.proc.stderr.read() if self.proc.poll() is not None else ""):
            pytest.skip("hybrit was built without cpp-httplib (libcpp-httplib-dev)")
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, f"no listening line from hybrit serve: {line!r}"
        self.port = int(match.group(1))

    def connection(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def post(self, body, raw=None, path="/v1/completions"):
        c = self.connection()
        c.request("POST", path, body=raw if raw is not None else json.dumps(body), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        payload = json.loads(r.read())
        c.close()
        return r.status, payload

    def get(self, path):
        c = self.connection()
        c.request("GET", path)
        r = c.getresponse()
        text = r.read().decode()
        c.close()
        return r.status, text

    def metrics(self):
        status, text = self.get("/metrics")
        assert status == 200
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, out, err


@pytest.fixture(scope="module")
def server(cli, checkpoint):
    s = Server(cli, checkpoint, "--max-running", "4", "--max-waiting", "8")
    yield s
    rc, _, err = s.stop()
    assert rc == 0, err


def read_events(response):
    """The `data:` payloads of a server-sent event stream, as they arrive."""
    for line in response:
        line = line.decode().rstrip("\n")
        if line.startswith("data: "):
            yield line[len("data: "):]
        else:
            assert line == "", f"unexpected line in the event stream: {line!r}"


def stream(server, body, path="/v1/completions"):
    c = server.connection()
    c.request("POST", path, body=json.dumps(dict(body, stream=True)), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/event-stream")
    events = list(read_events(r))
    c.close()
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_health_and_a_greedy_completion_match_the_generator(server, generator):
    status, text = server.get("/health")
    assert status == 200 and json.loads(text)["status"] == "ok"
    status, r = server.post({"model": "anything", "prompt": "The ", "max_tokens": 30, "temperature": 0})
    assert status == 200, r
    expect = generator.generate("The ", max_tokens=30, temperature=0)
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-") and r["model"] == "model"
    [choice] = r["choices"]
    assert choice["text"] == expect["text"] and choice["index"] == 0
    assert choice["finish_reason"] == ("length" if expect["finish_reason"] == "length" else "stop")
    assert r["usage"] == {"prompt_tokens": 4, "completion_tokens": len(expect["tokens"]), "total_tokens": 4 + len(expect["tokens"])}


def test_a_list_of_prompts_gives_one_choice_each_in_order(server, generator):
    token_prompt = generator.encode("Never")
    status, r = server.post({"prompt": PROMPTS[:3] + [token_prompt], "max_tokens": 25, "temperature": 0})
    assert status == 200, r
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    for prompt, choice in zip(PROMPTS[:3] + ["Never"], r["choices"]):
        assert choice["text"] == generator.generate(prompt, max_tokens=25, temperature=0)["text"]
    status, single = server.post({"prompt": token_prompt, "max_tokens": 25, "temperature": 0})
    assert single["choices"][0]["text"] == r["choices"][3]["text"]


def test_streaming_sends_the_same_text_as_a_plain_request(server):
    body = {"prompt": PROMPTS[:2], "max_tokens": 40, "temperature": 0.9, "top_p": 0.95, "seed": 11}
    status, plain = server.post(body)
    assert status == 200
    chunks = stream(server, dict(body, stream_options={"include_usage": True}))
    texts, finished = ["", ""], [None, None]
    for chunk in chunks[:-1]:
        [c] = chunk["choices"]
        assert finished[c["index"]] is None, "a chunk came after its choice finished"
        texts[c["index"]] += c["text"]
        finished[c["index"]] = c["finish_reason"]
    assert texts == [c["text"] for c in plain["choices"]]
    assert finished == [c["finish_reason"] for c in plain["choices"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    assert len(chunks) > 10, "the text should arrive in many events, not at the end"


def chat_reference(generator, prompt, **kwargs):
    """What a chat request should answer: the generator's continuation of the template, cut
    before the model's next "\nUser:", without the space after "Assistant:"."""
    out = generator.generate(prompt, stop=["\nUser:"], **kwargs)
    text = out["text"][1:] if out["text"].startswith(" ") else out["text"]
    return text, out


CONVERSATION = [{"role": "system", "content": "Fortunes, one per answer."},
                {"role": "user", "content": "Tell me my fortune."},
                {"role": "assistant", "content": "You will travel."},
                {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "then?"}]}]
TEMPLATE = "Fortunes, one per answer.\n\nUser: Tell me my fortune.\nAssistant: You will travel.\nUser: And then?\nAssistant:"


def test_chat_completions_follow_the_documented_template(server, generator):
    status, r = server.post({"model": "model", "messages": CONVERSATION, "max_tokens": 40, "temperature": 0}, path="/v1/chat/completions")
    assert status == 200, r
    want, out = chat_reference(generator, TEMPLATE, max_tokens=40, temperature=0)
    assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
    [choice] = r["choices"]
    assert choice["message"] == {"role": "assistant", "content": want}
    assert choice["finish_reason"] == ("length" if out["finish_reason"] == "length" else "stop")
    assert r["usage"]["prompt_tokens"] == len(generator.encode(TEMPLATE)) and r["usage"]["completion_tokens"] == len(out["tokens"])
    # max_completion_tokens is the newer name for max_tokens
    status, r2 = server.post({"messages": CONVERSATION, "max_completion_tokens": 40, "temperature": 0}, path="/v1/chat/completions")
    assert status == 200 and r2["choices"] == r["choices"]


def test_chat_streams_deltas_that_add_up_to_the_message(server):
    body = {"messages": CONVERSATION[:2], "max_tokens": 40, "temperature": 0.9, "seed": 4}
    status, plain = server.post(body, path="/v1/chat/completions")
    assert status == 200, plain
    chunks = stream(server, body, path="/v1/chat/completions")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:])
    assert "".join(d.get("content", "") for d in deltas) == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]


@pytest.mark.parametrize("body, message", [
    ({}, "messages: required"),
    ({"messages": []}, "expected a non-empty list"),
    ({"messages": ["hi"]}, "messages[0]: expected an object"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role: expected system, user or assistant"),
    ({"messages": [{"role": "user"}]}, "messages[0].content: expected a string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "only text parts"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "a system message may only come first"),
    ({"messages": [{"role": "user", "content": "a", "colour": 1}]}, "unknown field"),
    ({"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 0}, "max_completion_tokens: expected an integer >= 1"),
    ({"messages": [{"role": "user", "content": "a"}], "prompt": "x"}, "prompt: unknown field"),
])
def test_bad_chat_bodies_answer_400_naming_the_field(server, body, message):
    status, r = server.post(body, path="/v1/chat/completions")
    assert status == 400 and message in r["error"]["message"], r


def test_models_lists_the_served_model(server):
    status, text = server.get("/v1/models")
    assert status == 200
    r = json.loads(text)
    assert r["object"] == "list" and [m["id"] for m in r["data"]] == ["model"]
    assert r["data"][0]["object"] == "model" and r["data"][0]["context_length"] == 256


def test_a_prompt_longer_than_the_context_keeps_its_end(server, generator):
    long = "y" * 300 + "The "
    status, r = server.post({"prompt": long, "max_tokens": 20, "temperature": 0})
    assert status == 200, r
    assert r["choices"][0]["text"] == generator.generate(long, max_tokens=20, temperature=0)["text"]
    # max_tokens past the context: the window slides (only the end of a record stops it early)
    status, r = server.post({"prompt": "The ", "max_tokens": 400, "temperature": 0})
    assert status == 200, r
    made, why = r["usage"]["completion_tokens"], r["choices"][0]["finish_reason"]
    assert (made, why) == (400, "length") or (why == "stop" and made < 400), r


def test_the_same_seed_gives_the_same_text_and_no_seed_varies(server):
    body = {"prompt": "You will", "max_tokens": 40, "temperature": 1.0}
    a = server.post(dict(body, seed=3))[1]["choices"][0]["text"]
    b = server.post(dict(body, seed=3))[1]["choices"][0]["text"]
    assert a == b
    unseeded = {server.post(body)[1]["choices"][0]["text"] for _ in range(4)}
    assert len(unseeded) > 1


def test_stop_strings_end_the_text_before_them(server, generator):
    full = generator.generate("The ", max_tokens=40, temperature=0)["text"]
    stop = full[10:13]
    status, r = server.post({"prompt": "The ", "max_tokens": 40, "temperature": 0, "stop": [stop, "\x01never"]})
    assert status == 200
    assert r["choices"][0]["text"] == full[:full.index(stop)] and r["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("body, param, message", [
    ({"prompt": "x", "temperature": -1}, "temperature", "expected a number >= 0"),
    ({"prompt": "x", "top_p": 0}, "top_p", "expected a number in (0, 1]"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "expected an integer >= 1"),
    ({"prompt": "x", "max_tokens": "ten"}, "max_tokens", "expected an integer"),
    ({"prompt": "x", "max_token": 5}, "max_token", "unknown field"),
    ({"prompt": "x", "n": 2}, "n", "not supported"),
    ({"prompt": "x", "stop": ["a", 3]}, "stop", "expected strings"),
    ({"prompt": "x", "stream": "yes"}, "stream", "expected true or false"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream"),
    ({"max_tokens": 3}, "prompt", "required"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": []}, "prompt", "non-empty list"),
    ({"prompt": [5, 300]}, "prompt", "token 300 is outside [0, 257)"),
    ({"prompt": ["ok", 7.5]}, "prompt", "prompt[1]"),
])
def test_bad_fields_answer_400_naming_the_field(server, body, param, message):
    status, r = server.post(body)
    assert status == 400
    assert r["error"]["param"] == param and message in r["error"]["message"], r


def test_malformed_bodies_and_unknown_paths(server):
    status, r = server.post(None, raw='{"prompt": "x",')
    assert status == 400 and r["error"]["message"].startswith("malformed JSON") and "column" in r["error"]["message"]
    status, r = server.post(None, raw="[1, 2]")
    assert status == 400 and "expected a JSON object" in r["error"]["message"]
    status, text = server.get("/v1/nothing")
    assert status == 404 and "no such endpoint" in json.loads(text)["error"]["message"]


@pytest.mark.parametrize("field", ["temperature", "seed", "stop", "n", "prompt"])
def test_deeply_nested_json_answers_400_and_the_server_lives(server, field):
    # 100k levels: dump() or the destructor recursing that deep overflows the stack (SIGSEGV).
    raw = '{"prompt": "a", "%s": %s1%s}' % (field, "[" * 100_000, "]" * 100_000) if field != "prompt" else \
        '{"prompt": %s1%s}' % ("[" * 100_000, "]" * 100_000)
    status, r = server.post(None, raw=raw)
    assert status == 400 and "nested deeper than 64 levels" in r["error"]["message"], r
    assert server.get("/health")[0] == 200


def test_error_messages_quote_a_short_prefix_of_a_value(server):
    status, r = server.post({"prompt": "a", "temperature": "x" * 100_000})
    assert status == 400 and r["error"]["param"] == "temperature" and len(r["error"]["message"]) < 200, r
    status, r = server.post({"prompt": "a", "stop": [[1] * 50_000]})
    assert status == 400 and "a list of 50000" in r["error"]["message"] and len(r["error"]["message"]) < 200, r


@pytest.mark.parametrize("raw, message", [
    ('{"prompt": "a", "temperature": 1e400}', "number overflow"),
    ('{"prompt": "a", "max_tokens": -1e999}', "number overflow"),
])
def test_numbers_beyond_double_answer_400(server, raw, message):
    status, r = server.post(None, raw=raw)
    assert status == 400 and message in r["error"]["message"] and r["error"]["type"] == "invalid_request_error", r


@pytest.mark.parametrize("key, value", [("user", 5), ("model", ["m"])])
def test_string_fields_are_type_checked(server, key, value):
    status, r = server.post({"prompt": "a", key: value})
    assert status == 400 and r["error"]["param"] == key and "expected a string" in r["error"]["message"]


@pytest.mark.parametrize("method, path, allowed", [
    ("GET", "/v1/completions", "POST"), ("PUT", "/v1/completions", "POST"), ("DELETE", "/v1/completions", "POST"),
    ("POST", "/health", "GET"), ("POST", "/metrics", "GET"),
])
def test_a_known_path_with_the_wrong_method_answers_405(server, method, path, allowed):
    c = server.connection()
    c.request(method, path, body="{}" if method in ("PUT", "POST") else None)
    r = c.getresponse()
    body = json.loads(r.read())
    c.close()
    assert r.status == 405 and r.getheader("Allow") == allowed and "method not allowed" in body["error"]["message"]


def test_a_burst_of_clients_hears_429_not_a_reset(cli, checkpoint):
    # 150 streams at once against 1 running + 1 waiting slot (12 connection threads): every client
    # gets an HTTP answer; none is reset by a full listen backlog or left waiting unanswered.
    s = Server(cli, checkpoint, "--max-running", "1", "--max-waiting", "1")
    try:
        statuses, failures = [], []
        start = threading.Barrier(150)
        def client():
            start.wait()
            try:
                c = s.connection()
                c.request("POST", "/v1/completions", body=json.dumps({"prompt": "The ", "max_tokens": 100, "stream": True}))
                r = c.getresponse()
                r.read()
                statuses.append(r.status)
                c.close()
            except OSError as e:
                failures.append(repr(e))
        threads = [threading.Thread(target=client) for _ in range(150)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == [], failures[:5]
        assert set(statuses) <= {200, 429} and statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    finally:
        rc, _, err = s.stop()
    assert rc == 0, err


def test_a_full_queue_answers_429_and_the_rest_finish(cli, checkpoint):
    s = Server(cli, checkpoint, "--max-running", "1", "--max-waiting", "1")
    try:
        results = [None] * 8
        start = threading.Barrier(8)
        def client(i):
            start.wait()
            results[i] = s.post({"prompt": PROMPTS[i % 4], "max_tokens": 200, "temperature": 0})
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        busy = [r for status, r in results if status == 429]
        done = [r for status, r in results if status == 200]
        assert len(busy) + len(done) == 8
        assert len(done) >= 1 and len(busy) >= 1, "one runs, one waits: 8 requests at once cannot all be taken"
        assert all("queue full" in r["error"]["message"] and r["error"]["type"] == "server_busy" for r in busy)
        assert all(r["choices"][0]["finish_reason"] in ("length", "stop") for r in done)
        m = s.metrics()
        assert m['hybrit_http_responses_total{path="/v1/completions",code="429"}'] == len(busy)
        assert m['hybrit_http_responses_total{path="/v1/completions",code="200"}'] == len(done)
        assert m["hybrit_requests_running"] == 0 and m["hybrit_requests_waiting"] == 0 and m["hybrit_kv_blocks_in_use"] == 0
    finally:
        rc, _, err = s.stop()
    assert rc == 0, err


def test_a_client_that_goes_away_cancels_its_stream(cli, checkpoint):
    s = Server(cli, checkpoint, "--max-running", "1")
    try:
        before = s.metrics()["hybrit_generated_tokens_total"]
        c = s.connection()
        c.request("POST", "/v1/completions", body=json.dumps({"prompt": "x", "max_tokens": 250, "temperature": 0, "stream": True}))
        r = c.getresponse()
        first = next(read_events(r))
        assert json.loads(first)["choices"][0]["finish_reason"] is None
        c.sock.shutdown(2)
        c.close()
        # The next write fails, the request is cancelled and its blocks are freed; a later request runs at once.
        status, after = s.post({"prompt": "The ", "max_tokens": 5, "temperature": 0})
        assert status == 200
        m = s.metrics()
        assert m["hybrit_client_disconnects_total"] == 1
        assert m["hybrit_generated_tokens_total"] - before < 250 + 5
        assert m["hybrit_requests_running"] == 0 and m["hybrit_kv_blocks_in_use"] == 0
    finally:
        rc, _, err = s.stop()
    assert rc == 0, err


def test_metrics_count_tokens_and_requests(server):
    before = server.metrics()
    usage = [server.post({"prompt": p, "max_tokens": 20, "temperature": 0})[1]["usage"] for p in PROMPTS]
    m = server.metrics()
    assert m["hybrit_generated_tokens_total"] - before["hybrit_generated_tokens_total"] == sum(u["completion_tokens"] for u in usage)
    computed = m["hybrit_prompt_tokens_computed_total"] - before["hybrit_prompt_tokens_computed_total"]
    cached = m["hybrit_prompt_tokens_cached_total"] - before["hybrit_prompt_tokens_cached_total"]
    assert computed + cached == sum(u["prompt_tokens"] for u in usage)
    assert m["hybrit_tokens_per_second"] > 0 and m["hybrit_kv_blocks_total"] > 0
    assert m["hybrit_requests_running"] == 0 and m["hybrit_kv_blocks_in_use"] == 0


def test_sigterm_ends_open_requests_and_exits_cleanly(cli, checkpoint):
    s = Server(cli, checkpoint, "--max-running", "1")
    c = s.connection()
    c.request("POST", "/v1/completions", body=json.dumps({"prompt": ["x", "y", "z"], "max_tokens": 250, "temperature": 0, "stream": True}))
    r = c.getresponse()
    events = read_events(r)
    next(events)
    s.proc.send_signal(signal.SIGTERM)
    rest = list(events)
    rc, out, err = s.stop()
    assert rc == 0 and "server stopped" in out and "SIGTERM" in err
    assert rest[-1] == "[DONE]"
    reasons = [json.loads(e)["choices"][0]["finish_reason"] for e in rest[:-1]]
    assert "cancelled" in reasons, "three 250-token requests on one running slot cannot all be done yet"


def test_a_taken_port_is_a_clear_error(cli, checkpoint, server):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIT_")}
    r = subprocess.run([cli, "serve", "--checkpoint", checkpoint, "--port", str(server.port)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and f"cannot listen on 127.0.0.1:{server.port}" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--max-waiting", "0"], "--max-waiting: Value 0 not in range 1 to 4096"),
    (["--max-running", "5000"], "--max-running: Value 5000 not in range 1 to 4096"),
    (["--port", "70000"], "--port: Value 70000 not in range 0 to 65535"),
])
def test_bad_serve_options_are_one_line_errors(cli, checkpoint, args, message):
    r = subprocess.run([cli, "serve", "--checkpoint", checkpoint, *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.splitlines()[0] == message
