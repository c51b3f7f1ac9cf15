// Greedy generation over a lazykv::Program (see generate.h; runtime_shim/generate.py).
#include "generate.h"

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <memory>
#include <random>
#include <set>

#include <executorch/extension/tensor/tensor_ptr.h>
#include <executorch/extension/tensor/tensor_ptr_maker.h>

#include "../src/json.h"
#include "host.h"

namespace lazykv {
namespace gen {

namespace {

using executorch::aten::ScalarType;
using executorch::extension::TensorPtr;
using executorch::runtime::EValue;
using Clock = std::chrono::steady_clock;

double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// "['a', 'b']", sorted, as Python prints sorted(names).
std::string name_list(const Program& program) {
  std::set<std::string> names(program.method_names().begin(), program.method_names().end());
  std::string s;
  for (const auto& n : names) s += (s.empty() ? "'" : ", '") + n + "'";
  return "[" + s + "]";
}

bool has_method(const Program& program, const std::string& name) {
  const auto& names = program.method_names();
  return std::find(names.begin(), names.end(), name) != names.end();
}

// Which inputs hold the tokens and the start position: the fill rule of a lazy method or
// the cache write found in the graph, else ExecuTorch Llama's (tokens [1, S], input_pos [1]).
int token_input(const MethodInfo& info) { return info.length_input >= 0 ? info.length_input : 0; }
int position_input(const MethodInfo& info) { return info.position_input >= 0 ? info.position_input : 1; }

TensorPtr int_tensor(std::vector<int> sizes, const std::vector<int64_t>& v, int scalar_type) {
  if (scalar_type == static_cast<int>(ScalarType::Int)) {
    return executorch::extension::make_tensor_ptr(std::move(sizes), std::vector<int32_t>(v.begin(), v.end()));
  }
  return executorch::extension::make_tensor_ptr(std::move(sizes), std::vector<int64_t>(v));
}

// A decoder method as this generator drives it.
struct Decoder {
  std::string name;
  const MethodInfo* info = nullptr;

  // The user inputs for `tokens` starting at `pos` (kept alive in `keep`).
  std::vector<EValue> inputs(const std::vector<int64_t>& tokens, int64_t pos, std::vector<TensorPtr>* keep) const {
    const InputSpec& pos_spec = info->inputs[static_cast<size_t>(position_input(*info))];
    const InputSpec& tok_spec = info->inputs[static_cast<size_t>(token_input(*info))];
    TensorPtr tok = int_tensor({1, static_cast<int>(tokens.size())}, tokens, tok_spec.scalar_type);
    TensorPtr p;
    if (pos_spec.sizes.size() == 1 && pos_spec.sizes[0] == 1 && !pos_spec.dynamic) {
      p = int_tensor({1}, {pos}, pos_spec.scalar_type);
    } else {  // cache_position-style: one position per token
      std::vector<int64_t> ps;
      for (size_t i = 0; i < tokens.size(); ++i) ps.push_back(pos + static_cast<int64_t>(i));
      p = int_tensor({static_cast<int>(ps.size())}, ps, pos_spec.scalar_type);
    }
    std::vector<EValue> v(2);
    v[static_cast<size_t>(token_input(*info))] = EValue(*tok);
    v[static_cast<size_t>(position_input(*info))] = EValue(*p);
    keep->clear();
    keep->push_back(std::move(tok));
    keep->push_back(std::move(p));
    return v;
  }
};

Result<Decoder> decoder(const Program& program, const std::string& name) {
  auto info = program.method_info(name);
  if (!info.ok()) return info.status();
  const MethodInfo& mi = *info.get();
  if (mi.inputs.size() != 2 || mi.inputs[0].kind != InputSpec::Kind::Tensor ||
      mi.inputs[1].kind != InputSpec::Kind::Tensor) {
    return Status(ErrorKind::InvalidInput, "generate drives decoders taking (tokens, positions); '" + name +
                                               "' takes " + std::to_string(mi.inputs.size()) + " inputs");
  }
  return Decoder{name, &mi};
}

// Runs one call and returns the argmax of its last position (keeping the logits if asked).
Result<int64_t> step(Session& s, const Decoder& d, const std::vector<int64_t>& tokens, int64_t pos,
                     std::vector<float>* keep) {
  std::vector<TensorPtr> hold;
  auto out = s.run(d.name, d.inputs(tokens, pos, &hold));
  if (!out.ok()) return out.status();
  if (out->empty() || !out.get()[0].isTensor() || out.get()[0].toTensor().scalar_type() != ScalarType::Float ||
      out.get()[0].toTensor().dim() < 1) {
    return Status(ErrorKind::ExecutionFailed, "'" + d.name + "': its first output is not float logits");
  }
  const std::vector<float> logits = host::last_logits(out.get()[0]);
  if (keep != nullptr) keep->insert(keep->end(), logits.begin(), logits.end());
  return host::argmax(logits);
}

// Python's vocab_size: get_vocab_size, else the embedding table the decode method
// indexes, else the logits' last dimension of one call in a throwaway session.
Result<int64_t> vocab_size(Program& program, const Decoder& decode) {
  if (has_method(program, "get_vocab_size")) return program.constant_int("get_vocab_size");
  for (const auto& tv : decode.info->token_inputs) {
    if (tv.second > 0) return tv.second;
  }
  auto s = program.session();
  if (!s.ok()) return s.status();
  std::vector<TensorPtr> hold;
  auto out = s.get()->run(decode.name, decode.inputs({0}, 0, &hold));
  if (!out.ok()) return out.status();
  if (out->empty() || !out.get()[0].isTensor() || out.get()[0].toTensor().dim() < 1) {
    return Status(ErrorKind::ExecutionFailed, "'" + decode.name + "': its first output is not logits");
  }
  const auto& t = out.get()[0].toTensor();
  return static_cast<int64_t>(t.size(t.dim() - 1));
}

// A double as a JSON number that reads back as a float (Python's json.dumps of a float).
std::string json_float(double v) {
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof(buf), v);
  std::string s(buf, r.ptr);
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
  return s;
}

std::string json_ints(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

// Writes one JSON object's members in order: {"a": 1, "b": ...}.
class Obj {
 public:
  Obj& raw(const char* key, const std::string& value) {
    s_ += (s_.size() > 1 ? ", " : "") + json::quote(key) + ": " + value;
    return *this;
  }
  Obj& i(const char* key, int64_t v) { return raw(key, std::to_string(v)); }
  Obj& f(const char* key, double v) { return raw(key, json_float(v)); }
  Obj& str(const char* key, const std::string& v) { return raw(key, json::quote(v)); }
  Obj& b(const char* key, bool v) { return raw(key, v ? "true" : "false"); }
  std::string done() const { return s_ + "}"; }

 private:
  std::string s_ = "{";
};

}  // namespace

int64_t GenerationResult::grows() const {
  int64_t n = 0;
  for (const auto& s : sessions) n += s.grows;
  return n;
}

int64_t GenerationResult::bytes_copied() const {
  int64_t n = 0;
  for (const auto& s : sessions) n += s.bytes_copied;
  return n;
}

double GenerationResult::decode_tokens_per_s() const {
  const double n = static_cast<double>(decode_steps) * static_cast<double>(sessions.size());
  return decode_seconds > 0 ? n / decode_seconds : NAN;
}

Result<std::pair<std::string, std::string>> decoder_methods(const Program& program, const std::string& method) {
  if (method.empty()) {
    if (has_method(program, "forward")) return std::make_pair(std::string("forward"), std::string("forward"));
    if (has_method(program, "prefill") && has_method(program, "decode")) {
      return std::make_pair(std::string("prefill"), std::string("decode"));
    }
    return Status(ErrorKind::UnknownMethod,
                  program.source() + ": no method 'forward' and no 'prefill' + 'decode' pair to generate with; it has " +
                      name_list(program) + ". Name one (--method NAME) or a pair (--method PREFILL,DECODE)");
  }
  std::vector<std::string> parts;
  size_t pos = 0;
  while (true) {
    const size_t comma = method.find(',', pos);
    parts.push_back(method.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  for (auto& p : parts) {
    const size_t a = p.find_first_not_of(" \t"), z = p.find_last_not_of(" \t");
    p = a == std::string::npos ? "" : p.substr(a, z - a + 1);
  }
  if (parts.size() > 2 || std::any_of(parts.begin(), parts.end(), [](const std::string& p) { return p.empty(); })) {
    return Status(ErrorKind::InvalidInput, "--method: give one method name or PREFILL,DECODE, got '" + method + "'");
  }
  if (parts.size() == 1) parts.push_back(parts[0]);
  for (const auto& m : parts) {
    if (!has_method(program, m)) {
      return Status(ErrorKind::UnknownMethod, program.source() + ": no method '" + m + "'; it has " + name_list(program));
    }
  }
  return std::make_pair(parts[0], parts[1]);
}

Result<GenerationResult> greedy_generate(Program& program, const Options& o) {
  auto methods = decoder_methods(program, o.method);
  if (!methods.ok()) return methods.status();
  const int64_t prompt_len = o.prompt_tokens.empty() ? o.prompt_len : static_cast<int64_t>(o.prompt_tokens.size());
  const int64_t K = o.sessions;
  if (prompt_len < 1 || o.new_tokens < 0 || K < 1) {
    return Status(ErrorKind::InvalidInput, "need prompt_len >= 1, new_tokens >= 0, sessions >= 1; got " +
                                               std::to_string(prompt_len) + ", " + std::to_string(o.new_tokens) +
                                               ", " + std::to_string(K));
  }
  const int64_t P = o.shared_prefix;
  if (P < 0 || P > prompt_len) {
    return Status(ErrorKind::InvalidInput, "shared_prefix must be from 0 to prompt_len (" +
                                               std::to_string(prompt_len) + "); got " + std::to_string(P));
  }
  if (P > 0 && !program.lazy()) {
    return Status(ErrorKind::InvalidInput,
                  program.source() + " has no lazy KV buffers: its sessions cannot be forked to share a prefix; "
                                     "drop --shared-prefix or export with --lazy-kv-cache");
  }
  auto prefill_d = decoder(program, methods->first);
  if (!prefill_d.ok()) return prefill_d.status();
  auto decode_d = decoder(program, methods->second);
  if (!decode_d.ok()) return decode_d.status();
  const Decoder& prefill = prefill_d.get();
  const Decoder& decode = decode_d.get();
  // Positions the KV cache holds: the lazy bound, or the static cache the graph writes.
  const int64_t need = prompt_len + std::max<int64_t>(o.new_tokens - 1, 0);
  const int64_t bound = program.lazy() ? program.max_positions() : prefill.info->cache_positions;
  if (bound >= 0 && need > bound) {
    return Status(ErrorKind::ContextOverflow,
                  "a prompt of " + std::to_string(prompt_len) + " + " + std::to_string(o.new_tokens) +
                      " new tokens needs " + std::to_string(need) + " positions; " + program.source() +
                      " holds at most " + std::to_string(bound) +
                      ": use a shorter prompt or fewer new tokens, or export with a larger max context");
  }
  const int64_t planned = program.kv_figures().planned_bytes;
  // Tokens per prefill call: up to the dynamic bound, or exactly the static size.
  const InputSpec& tok_spec = prefill.info->inputs[static_cast<size_t>(token_input(*prefill.info))];
  if (tok_spec.sizes.size() < 2) {
    return Status(ErrorKind::InvalidInput,
                  "'" + prefill.name + "': its token input is not [1, S] (" + tok_spec.describe() + ")");
  }
  const int64_t chunk = tok_spec.sizes[1];
  if (chunk < 1 || (!tok_spec.dynamic && prompt_len % chunk != 0)) {
    return Status(ErrorKind::InvalidInput, "'" + prefill.name + "' takes exactly " + std::to_string(chunk) +
                                               " tokens per call; use a prompt length that is a multiple of " +
                                               std::to_string(chunk));
  }
  auto vocab_r = vocab_size(program, decode);
  if (!vocab_r.ok()) return vocab_r.status();
  const int64_t vocab = vocab_r.get();
  // Prompts: given, or seeded random ones (a C++ generator: not the tokens of Python's
  // torch.randint for the same seed; pass --prompt-tokens to compare).
  std::mt19937_64 rng(o.seed);
  auto random_tokens = [&](int64_t n) {
    std::vector<int64_t> v;
    for (int64_t i = 0; i < n; ++i) v.push_back(static_cast<int64_t>(rng() % static_cast<uint64_t>(vocab)));
    return v;
  };
  std::vector<std::vector<int64_t>> prompts;
  if (!o.prompt_tokens.empty()) {
    for (int64_t t : o.prompt_tokens) {
      if (t < 0 || t >= vocab) {
        return Status(ErrorKind::InvalidInput, "prompt token " + std::to_string(t) + " is outside the vocabulary [0, " +
                                                   std::to_string(vocab) + ") of " + program.source());
      }
    }
    prompts.assign(static_cast<size_t>(K), o.prompt_tokens);
  } else if (P > 0) {
    const std::vector<int64_t> head = random_tokens(P);
    for (int64_t k = 0; k < K; ++k) {
      std::vector<int64_t> p = head;
      const std::vector<int64_t> rest = random_tokens(prompt_len - P);
      p.insert(p.end(), rest.begin(), rest.end());
      prompts.push_back(std::move(p));
    }
  } else {
    for (int64_t k = 0; k < K; ++k) prompts.push_back(random_tokens(prompt_len));
  }

  std::vector<std::unique_ptr<Session>> ss;
  for (int64_t k = 0; k < (P > 0 ? 1 : K); ++k) {
    auto s = program.session();
    if (!s.ok()) return s.status();
    ss.push_back(std::move(s.get()));
  }
  auto kv = [&]() {
    int64_t n = planned;
    for (const auto& s : ss) n += s->kv_bytes();
    return n;
  };
  GenerationResult r;
  r.kv_bytes_after_load = kv();
  int64_t peak = r.kv_bytes_after_load;
  // Feeds prompt[pos:] to s in chunks; the argmax of the last call (or `next` if none).
  auto feed = [&](Session& s, const std::vector<int64_t>& prompt, int64_t pos, int64_t end, int64_t next,
                  std::vector<float>* keep) -> Result<int64_t> {
    while (pos < end) {
      const int64_t n = std::min(chunk, end - pos);
      std::vector<int64_t> piece(prompt.begin() + pos, prompt.begin() + pos + n);
      auto t = step(s, prefill, piece, pos, keep);
      if (!t.ok()) return t.status();
      next = t.get();
      pos += n;
    }
    return next;
  };

  std::vector<int64_t> next(static_cast<size_t>(K), -1), after_prefill(static_cast<size_t>(K), 0);
  const auto t0 = Clock::now();
  int64_t head_next = -1;
  if (P > 0) {
    auto h = feed(*ss[0], prompts[0], 0, P, -1, o.logits);
    if (!h.ok()) return h.status();
    head_next = h.get();
    const double t_head = since(t0);
    const auto t1 = Clock::now();
    for (int64_t k = 1; k < K; ++k) {
      auto f = ss[0]->fork();
      if (!f.ok()) return f.status();
      ss.push_back(std::move(f.get()));
    }
    const double t_fork = since(t1);
    const int64_t kv_prefix = P * program.bytes_per_position();
    SharedPrefix& sp = r.shared_prefix;
    r.has_shared_prefix = true;
    sp.positions = P;
    sp.prefill_seconds = t_head;
    sp.fork_seconds = t_fork;
    sp.bytes_copied = (K - 1) * kv_prefix;
    sp.prefill_seconds_unshared_estimate = static_cast<double>(K) * t_head;
    sp.seconds_saved = static_cast<double>(K - 1) * t_head - t_fork;
    sp.positions_saved = (K - 1) * P;
    sp.bytes_saved = (K - 1) * kv_prefix;
  }
  for (size_t k = 0; k < ss.size(); ++k) {
    auto t = feed(*ss[k], prompts[k], P, prompt_len, head_next, k == 0 ? o.logits : nullptr);
    if (!t.ok()) return t.status();
    next[k] = t.get();
    after_prefill[k] = ss[k]->kv_bytes();
    peak = std::max(peak, kv());
  }
  r.prefill_seconds = since(t0);
  r.kv_bytes_after_prefill = kv();
  std::vector<std::vector<int64_t>> generated(ss.size());
  if (o.new_tokens > 0) {
    for (size_t k = 0; k < ss.size(); ++k) generated[k].push_back(next[k]);
  }
  r.decode_steps = std::max<int64_t>(o.new_tokens - 1, 0);
  const auto t1 = Clock::now();
  for (int64_t i = 0; i < r.decode_steps; ++i) {
    for (size_t k = 0; k < ss.size(); ++k) {
      auto t = step(*ss[k], decode, {generated[k].back()}, prompt_len + i, k == 0 ? o.logits : nullptr);
      if (!t.ok()) return t.status();
      generated[k].push_back(t.get());
    }
    peak = std::max(peak, kv());
  }
  r.decode_seconds = since(t1);
  if (!o.save_session.empty()) {
    auto saved = ss[0]->save(o.save_session);
    if (!saved.ok()) return saved.status();
  }
  int64_t session_peaks = 0;
  for (size_t k = 0; k < ss.size(); ++k) {
    const SessionStats st = ss[k]->stats();
    SessionResult s;
    s.prompt = prompts[k];
    s.tokens = generated[k];
    s.positions_filled = ss[k]->offset();
    s.kv_bytes_after_prefill = after_prefill[k];
    s.kv_bytes_end = ss[k]->kv_bytes();
    s.peak_kv_bytes = st.peak_bytes;
    s.grows = st.grows;
    s.buffer_grow_events = st.grow_events;
    s.bytes_copied = st.bytes_copied;
    session_peaks += st.peak_bytes;
    r.sessions.push_back(std::move(s));
  }
  r.program = program.source();
  r.lazy = program.lazy();
  r.policy = program.policy().spec();
  r.prefill_method = prefill.name;
  r.decode_method = decode.name;
  r.max_positions = program.max_positions();
  r.bytes_per_position = program.bytes_per_position();
  r.planned_kv_bytes = planned;
  r.kv_bytes_at_max_context = program.kv_figures().at_max_context;
  r.kv_bytes_end = kv();
  r.peak_kv_bytes = std::max(peak, planned + session_peaks);
  return r;
}

std::string to_json(const GenerationResult& r) {
  std::string sessions = "[";
  for (size_t k = 0; k < r.sessions.size(); ++k) {
    const SessionResult& s = r.sessions[k];
    sessions += (k ? ", " : "") + Obj()
                                      .i("index", static_cast<int64_t>(k))
                                      .raw("prompt", json_ints(s.prompt))
                                      .raw("tokens", json_ints(s.tokens))
                                      .i("positions_filled", s.positions_filled)
                                      .i("kv_bytes_after_prefill", s.kv_bytes_after_prefill)
                                      .i("kv_bytes_end", s.kv_bytes_end)
                                      .i("peak_kv_bytes", s.peak_kv_bytes)
                                      .i("grows", s.grows)
                                      .i("buffer_grow_events", s.buffer_grow_events)
                                      .i("bytes_copied", s.bytes_copied)
                                      .done();
  }
  sessions += "]";
  const double tps = r.decode_tokens_per_s();
  const std::string totals = Obj()
                                 .i("sessions", static_cast<int64_t>(r.sessions.size()))
                                 .i("kv_bytes_after_load", r.kv_bytes_after_load)
                                 .i("kv_bytes_after_prefill", r.kv_bytes_after_prefill)
                                 .i("kv_bytes_end", r.kv_bytes_end)
                                 .i("peak_kv_bytes", r.peak_kv_bytes)
                                 .i("grows", r.grows())
                                 .i("bytes_copied", r.bytes_copied())
                                 .f("prefill_seconds", r.prefill_seconds)
                                 .f("decode_seconds", r.decode_seconds)
                                 .i("decode_tokens", r.decode_steps * static_cast<int64_t>(r.sessions.size()))
                                 .raw("decode_tokens_per_s", std::isnan(tps) ? "null" : json_float(tps))
                                 .done();
  std::string shared = "null";
  if (r.has_shared_prefix) {
    const SharedPrefix& p = r.shared_prefix;
    shared = Obj()
                 .i("positions", p.positions)
                 .f("prefill_seconds", p.prefill_seconds)
                 .f("fork_seconds", p.fork_seconds)
                 .i("bytes_copied", p.bytes_copied)
                 .f("prefill_seconds_unshared_estimate", p.prefill_seconds_unshared_estimate)
                 .f("seconds_saved", p.seconds_saved)
                 .i("positions_saved", p.positions_saved)
                 .i("bytes_saved", p.bytes_saved)
                 .done();
  }
  const SessionResult* first = r.sessions.empty() ? nullptr : &r.sessions[0];
  return Obj()
      .str("schema", kJsonSchema)
      .i("version", kJsonVersion)
      .str("program", r.program)
      .b("lazy", r.lazy)
      .str("policy", r.policy)
      .raw("methods", Obj().str("prefill", r.prefill_method).str("decode", r.decode_method).done())
      .i("prompt_len", first ? static_cast<int64_t>(first->prompt.size()) : 0)
      .i("new_tokens", first ? static_cast<int64_t>(first->tokens.size()) : 0)
      .i("max_positions", r.max_positions)
      .i("bytes_per_position", r.bytes_per_position)
      .i("planned_kv_bytes", r.planned_kv_bytes)
      .i("kv_bytes_at_max_context", r.kv_bytes_at_max_context)
      .raw("sessions", sessions)
      .raw("totals", totals)
      .raw("shared_prefix", shared)
      .done();
}

}  // namespace gen
}  // namespace lazykv
