// lazykv_run: greedy generation through the lazykv C++ runtime, like `lazykv generate`.
//
//   lazykv_run model.pte --prompt-len 64 --new-tokens 200 --policy step:256 --json
//
// The same options and the same --json keys as `lazykv generate`; with --prompt-tokens
// both run the same prompt and print the same tokens. Messages go to stderr, stdout
// holds only the JSON object with --json. Exit codes: 0 ok, 1 a refused run (the
// message names the problem), 2 a usage error.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <executorch/extension/tensor/tensor_ptr.h>
#include <executorch/extension/tensor/tensor_ptr_maker.h>

#include <lazykv/lazykv.h>

#include "host.h"

namespace {

using executorch::aten::ScalarType;
using executorch::runtime::EValue;

const char* kUsage =
    "usage: lazykv_run PTE [--prompt-len N] [--new-tokens N] [--policy P] [--max-bytes B]\n"
    "                      [--sessions N] [--method NAME] [--seed N] [--prompt-tokens 1,2,3]\n"
    "                      [--json] [--quiet] [--logits FILE] [--save-session FILE]\n"
    "Greedy generation from a seeded random prompt (or --prompt-tokens) through the lazykv\n"
    "C++ runtime; reports KV memory like `lazykv generate`. --logits writes every call's\n"
    "last-position logits (float32, session 0) to FILE; --save-session saves session 0.\n";

struct Args {
  std::string pte;
  int64_t prompt_len = 16;
  int64_t new_tokens = 64;
  std::string policy = "doubling";
  std::string max_bytes;
  int64_t sessions = 1;
  std::string method = "forward";
  uint64_t seed = 0;
  std::vector<int64_t> prompt_tokens;
  bool json = false;
  bool quiet = false;
  std::string logits;
  std::string save_session;
};

int usage_error(const std::string& message) {
  std::fprintf(stderr, "%sError: %s\n", kUsage, message.c_str());
  return 2;
}

bool to_int(const char* s, int64_t* out) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(s, &end, 10);
  if (errno != 0 || end == s || *end != '\0') return false;
  *out = v;
  return true;
}

int parse_args(int argc, char** argv, Args* a) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&](const char** out) {
      if (i + 1 >= argc) return false;
      *out = argv[++i];
      return true;
    };
    const char* v = nullptr;
    if (arg == "-h" || arg == "--help") {
      std::fputs(kUsage, stdout);
      return -1;
    } else if (arg == "--json") {
      a->json = true;
    } else if (arg == "--quiet") {
      a->quiet = true;
    } else if (arg == "--prompt-len" || arg == "--new-tokens" || arg == "--sessions" || arg == "--seed") {
      int64_t n = 0;
      if (!value(&v) || !to_int(v, &n)) return usage_error(arg + " needs an integer");
      if (arg == "--prompt-len") {
        if (n < 1) return usage_error("--prompt-len must be >= 1");
        a->prompt_len = n;
      } else if (arg == "--new-tokens") {
        if (n < 0) return usage_error("--new-tokens must be >= 0");
        a->new_tokens = n;
      } else if (arg == "--sessions") {
        if (n < 1) return usage_error("--sessions must be >= 1");
        a->sessions = n;
      } else {
        a->seed = static_cast<uint64_t>(n);
      }
    } else if (arg == "--policy" || arg == "--max-bytes" || arg == "--method" || arg == "--logits" ||
               arg == "--save-session") {
      if (!value(&v)) return usage_error(arg + " needs a value");
      if (arg == "--policy") a->policy = v;
      else if (arg == "--max-bytes") a->max_bytes = v;
      else if (arg == "--method") a->method = v;
      else if (arg == "--logits") a->logits = v;
      else a->save_session = v;
    } else if (arg == "--prompt-tokens") {
      if (!value(&v)) return usage_error("--prompt-tokens needs a list like 1,2,3");
      std::string s = v;
      size_t pos = 0;
      while (pos <= s.size()) {
        size_t comma = s.find(',', pos);
        if (comma == std::string::npos) comma = s.size();
        const std::string item = s.substr(pos, comma - pos);
        int64_t t = 0;
        if (!to_int(item.c_str(), &t)) return usage_error("--prompt-tokens: '" + item + "' is not an integer");
        a->prompt_tokens.push_back(t);
        pos = comma + 1;
      }
    } else if (!arg.empty() && arg[0] == '-') {
      return usage_error("no such option: " + arg);
    } else if (a->pte.empty()) {
      a->pte = arg;
    } else {
      return usage_error("unexpected argument: " + arg);
    }
  }
  if (a->pte.empty()) return usage_error("missing the .pte to run");
  if (!a->prompt_tokens.empty()) a->prompt_len = static_cast<int64_t>(a->prompt_tokens.size());
  return 0;
}

int fail(const lazykv::Status& s) {
  std::fprintf(stderr, "Error: %s\n", s.to_string().c_str());
  return 1;
}

// Index of the largest last-position logit; keeps the logits if asked.
int64_t argmax_last(const executorch::runtime::EValue& out, std::vector<float>* keep) {
  const std::vector<float> logits = lazykv::host::last_logits(out);
  if (keep != nullptr) keep->insert(keep->end(), logits.begin(), logits.end());
  return lazykv::host::argmax(logits);
}

struct Inputs {
  executorch::extension::TensorPtr tokens;
  executorch::extension::TensorPtr pos;
};

// The user inputs of a decoder method for `tokens` starting at `pos`: the fill rule
// names them for a lazy program, else ExecuTorch Llama's (tokens [1, S], input_pos [1]).
int token_input(const lazykv::MethodInfo& info) { return info.length_input >= 0 ? info.length_input : 0; }
int position_input(const lazykv::MethodInfo& info) { return info.position_input >= 0 ? info.position_input : 1; }

executorch::extension::TensorPtr int_tensor(std::vector<int> sizes, const std::vector<int64_t>& v, int scalar_type) {
  if (scalar_type == static_cast<int>(ScalarType::Int)) {
    return executorch::extension::make_tensor_ptr(std::move(sizes), std::vector<int32_t>(v.begin(), v.end()));
  }
  return executorch::extension::make_tensor_ptr(std::move(sizes), std::vector<int64_t>(v));
}

Inputs make_inputs(const lazykv::MethodInfo& info, const std::vector<int64_t>& tokens, int64_t pos) {
  const lazykv::InputSpec& pos_spec = info.inputs[static_cast<size_t>(position_input(info))];
  const lazykv::InputSpec& tok_spec = info.inputs[static_cast<size_t>(token_input(info))];
  Inputs in;
  in.tokens = int_tensor({1, static_cast<int>(tokens.size())}, tokens, tok_spec.scalar_type);
  if (pos_spec.sizes.size() == 1 && pos_spec.sizes[0] == 1 && !pos_spec.dynamic) {
    in.pos = int_tensor({1}, {pos}, pos_spec.scalar_type);
  } else {  // cache_position-style: one position per token
    std::vector<int64_t> p;
    for (size_t i = 0; i < tokens.size(); ++i) p.push_back(pos + static_cast<int64_t>(i));
    in.pos = int_tensor({static_cast<int>(p.size())}, p, pos_spec.scalar_type);
  }
  return in;
}

std::vector<EValue> ordered(const lazykv::MethodInfo& info, const Inputs& in) {
  std::vector<EValue> v(2);
  v[static_cast<size_t>(token_input(info))] = EValue(*in.tokens);
  v[static_cast<size_t>(position_input(info))] = EValue(*in.pos);
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  const int parsed = parse_args(argc, argv, &a);
  if (parsed != 0) return parsed < 0 ? 0 : parsed;
  auto policy = lazykv::Policy::parse(a.policy);
  if (!policy.ok()) return usage_error(policy.status().message());
  lazykv::LoadOptions options;
  options.policy = policy.get();
  if (!a.max_bytes.empty()) {
    auto mb = lazykv::parse_bytes(a.max_bytes);
    if (!mb.ok()) return usage_error(mb.status().message());
    options.max_bytes = mb.get();
  }
  const std::string ops = lazykv::host::load_custom_ops();
  if (!ops.empty()) std::fprintf(stderr, "lazykv_run: custom ops not loaded (%s)\n", ops.c_str());

  const auto t_load = std::chrono::steady_clock::now();
  auto loaded = lazykv::Program::load(a.pte, options);
  if (!loaded.ok()) return fail(loaded.status());
  std::shared_ptr<lazykv::Program> program = loaded.get();
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_load).count();
  auto info_r = program->method_info(a.method);
  if (!info_r.ok()) return fail(info_r.status());
  const lazykv::MethodInfo& info = *info_r.get();
  if (info.inputs.size() != 2 || info.inputs[0].kind != lazykv::InputSpec::Kind::Tensor ||
      info.inputs[1].kind != lazykv::InputSpec::Kind::Tensor) {
    return fail(lazykv::Status(lazykv::ErrorKind::InvalidInput,
                               "lazykv_run drives decoders taking (tokens, positions); '" + a.method + "' takes " +
                                   std::to_string(info.inputs.size()) + " inputs"));
  }
  if (!a.quiet) {
    std::fprintf(stderr, "loaded %s in %.2f s (%s); policy %s\n", a.pte.c_str(), load_s,
                 program->lazy() ? (std::to_string(program->buffers().size()) + " lazy KV buffers").c_str()
                                 : "no lazy KV buffers",
                 options.policy.spec().c_str());
  }
  if (program->lazy() && a.prompt_len + std::max<int64_t>(a.new_tokens - 1, 0) > program->max_positions()) {
    return fail(lazykv::Status(lazykv::ErrorKind::ContextOverflow,
                               "prompt " + std::to_string(a.prompt_len) + " + " + std::to_string(a.new_tokens) +
                                   " new tokens needs " + std::to_string(a.prompt_len + a.new_tokens - 1) +
                                   " positions; " + a.pte + " holds at most " +
                                   std::to_string(program->max_positions())));
  }
  int64_t vocab = -1;
  for (const auto& n : program->method_names()) {
    if (n == "get_vocab_size") {
      auto v = program->constant_int(n);
      if (!v.ok()) return fail(v.status());
      vocab = v.get();
    }
  }
  if (vocab < 0) {
    for (const auto& tv : info.token_inputs) vocab = tv.second;
  }
  if (vocab <= 0 && a.prompt_tokens.empty()) {
    return fail(lazykv::Status(lazykv::ErrorKind::InvalidInput,
                               "cannot tell the vocabulary size (no get_vocab_size method); pass --prompt-tokens"));
  }
  // Prompts: given, or seeded random ones (a C++ generator: not the same tokens as
  // Python's torch.randint for the same seed; pass --prompt-tokens to compare).
  std::mt19937_64 rng(a.seed);
  std::vector<std::vector<int64_t>> prompts;
  for (int64_t k = 0; k < a.sessions; ++k) {
    if (!a.prompt_tokens.empty()) {
      prompts.push_back(a.prompt_tokens);
      continue;
    }
    std::vector<int64_t> p;
    for (int64_t i = 0; i < a.prompt_len; ++i) p.push_back(static_cast<int64_t>(rng() % static_cast<uint64_t>(vocab)));
    prompts.push_back(p);
  }
  const lazykv::InputSpec& tok_spec = info.inputs[static_cast<size_t>(token_input(info))];
  const int64_t chunk = tok_spec.dynamic && tok_spec.sizes.size() == 2 ? tok_spec.sizes[1] : a.prompt_len;
  std::vector<std::unique_ptr<lazykv::Session>> ss;
  for (int64_t k = 0; k < a.sessions; ++k) {
    auto s = program->session();
    if (!s.ok()) return fail(s.status());
    ss.push_back(std::move(s.get()));
  }
  auto kv = [&ss]() {
    int64_t n = 0;
    for (const auto& s : ss) n += s->kv_bytes();
    return n;
  };
  std::vector<float> logits;
  std::vector<float>* keep = a.logits.empty() ? nullptr : &logits;
  int64_t peak = kv();
  const int64_t kv_after_load = peak;
  std::vector<std::vector<int64_t>> generated(ss.size());
  const auto t0 = std::chrono::steady_clock::now();
  for (size_t k = 0; k < ss.size(); ++k) {
    int64_t pos = 0;
    int64_t next = -1;
    while (pos < a.prompt_len) {
      const int64_t n = std::min(chunk, a.prompt_len - pos);
      std::vector<int64_t> piece(prompts[k].begin() + pos, prompts[k].begin() + pos + n);
      Inputs in = make_inputs(info, piece, pos);
      auto out = ss[k]->run(a.method, ordered(info, in));
      if (!out.ok()) return fail(out.status());
      if (out->empty() || !out.get()[0].isTensor() || out.get()[0].toTensor().scalar_type() != ScalarType::Float) {
        return fail(lazykv::Status(lazykv::ErrorKind::ExecutionFailed, "the method's first output is not float logits"));
      }
      next = argmax_last(out.get()[0], k == 0 ? keep : nullptr);
      pos += n;
    }
    if (a.new_tokens > 0) generated[k].push_back(next);
    peak = std::max(peak, kv());
  }
  const double prefill_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const int64_t kv_after_prefill = kv();
  const int64_t steps = std::max<int64_t>(a.new_tokens - 1, 0);
  const auto t1 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < steps; ++i) {
    for (size_t k = 0; k < ss.size(); ++k) {
      Inputs in = make_inputs(info, {generated[k].back()}, a.prompt_len + i);
      auto out = ss[k]->run(a.method, ordered(info, in));
      if (!out.ok()) return fail(out.status());
      generated[k].push_back(argmax_last(out.get()[0], k == 0 ? keep : nullptr));
    }
    peak = std::max(peak, kv());
  }
  const double decode_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  int64_t grow = 0, copied = 0, stat_peak = 0;
  for (const auto& s : ss) {
    const lazykv::SessionStats st = s->stats();
    grow += st.grow_events;
    copied += st.bytes_copied;
    stat_peak += st.peak_bytes;
  }
  peak = std::max(peak, stat_peak);
  if (!a.save_session.empty()) {
    auto saved = ss[0]->save(a.save_session);
    if (!saved.ok()) return fail(saved.status());
  }
  if (keep != nullptr) {
    FILE* f = std::fopen(a.logits.c_str(), "wb");
    if (f == nullptr || std::fwrite(logits.data(), sizeof(float), logits.size(), f) != logits.size()) {
      if (f) std::fclose(f);
      return fail(lazykv::Status(lazykv::ErrorKind::IoError, a.logits + ": cannot write the logits"));
    }
    std::fclose(f);
  }
  const double tps = decode_s > 0 ? static_cast<double>(steps * a.sessions) / decode_s : NAN;
  auto token_list = [](const std::vector<int64_t>& t) {
    std::string s = "[";
    for (size_t i = 0; i < t.size(); ++i) s += (i ? ", " : "") + std::to_string(t[i]);
    return s + "]";
  };
  std::string tokens_json;
  if (ss.size() == 1) {
    tokens_json = token_list(generated[0]);
  } else {
    tokens_json = "[";
    for (size_t k = 0; k < generated.size(); ++k) tokens_json += (k ? ", " : "") + token_list(generated[k]);
    tokens_json += "]";
  }
  if (a.json) {
    char tps_s[64];
    if (std::isnan(tps)) std::snprintf(tps_s, sizeof(tps_s), "NaN");
    else std::snprintf(tps_s, sizeof(tps_s), "%.17g", tps);
    std::printf(
        "{\"kv_bytes_after_load\": %lld, \"kv_bytes_after_prefill\": %lld, \"kv_bytes_end\": %lld, "
        "\"peak_kv_bytes\": %lld, \"decode_tokens_per_s\": %s, \"tokens\": %s, \"sessions\": %lld, "
        "\"prompt_len\": %lld, \"new_tokens\": %lld, \"prefill_seconds\": %.17g, \"decode_seconds\": %.17g, "
        "\"bytes_per_position\": %lld, \"max_positions\": %lld, \"policy\": \"%s\", \"grow_events\": %lld, "
        "\"bytes_copied\": %lld}\n",
        (long long)kv_after_load, (long long)kv_after_prefill, (long long)kv(), (long long)peak, tps_s,
        tokens_json.c_str(), (long long)a.sessions, (long long)a.prompt_len,
        (long long)(generated[0].empty() ? 0 : steps + 1), prefill_s, decode_s,
        (long long)(program->bytes_per_position() * a.sessions), (long long)program->max_positions(),
        options.policy.spec().c_str(), (long long)grow, (long long)copied);
  }
  if (!a.quiet) {
    std::fprintf(stderr, "prefill %lld x %lld: %.3f s; decode: %.1f tokens/s\n", (long long)a.prompt_len,
                 (long long)a.sessions, prefill_s, tps);
    std::fprintf(stderr, "KV bytes: after load %lld, after prefill %lld, end %lld, peak %lld\n",
                 (long long)kv_after_load, (long long)kv_after_prefill, (long long)kv(), (long long)peak);
    if (!a.json) {
      for (size_t k = 0; k < generated.size(); ++k) {
        std::fprintf(stderr, "session %zu: %s\n", k, token_list(generated[k]).c_str());
      }
    }
  }
  return 0;
}
