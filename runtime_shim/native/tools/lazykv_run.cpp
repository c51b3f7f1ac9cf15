// lazykv_run: greedy generation through the lazykv C++ runtime, like `lazykv generate`.
//
//   lazykv_run model.pte --prompt-len 64 --new-tokens 200 --policy step:256 --json
//
// The options of `lazykv generate` and, with --json, its document (schema
// "lazykv-generate" version 1, generate.h: to_json); with --prompt-tokens both run the
// same prompt and print the same tokens. Messages go to stderr; with --json stdout holds
// only the JSON object. Exit codes: 0 ok, 1 a refused run (the message names the
// problem), 2 a usage error.
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <lazykv/lazykv.h>

#include "generate.h"
#include "host.h"

namespace {

const char* kUsage =
    "usage: lazykv_run PTE [--prompt-len N] [--new-tokens N] [--policy P] [--max-bytes B]\n"
    "                      [--sessions N] [--shared-prefix P] [--method NAME[,NAME]] [--seed N]\n"
    "                      [--prompt-tokens 1,2,3] [--json] [--quiet] [--logits FILE]\n"
    "                      [--save-session FILE]\n";

const char* kHelp =
    "\n"
    "Greedy generation from a seeded random prompt (or --prompt-tokens) through the lazykv\n"
    "C++ runtime; reports KV memory like `lazykv generate`, with the same options.\n"
    "\n"
    "  --prompt-len N       tokens in the random prompt (default 16)\n"
    "  --new-tokens N       tokens to generate greedily (default 64)\n"
    "  --policy P           doubling, step:N, hybrid[:start=N,linear_after=B,increment=B],\n"
    "                       preallocate (N: positions) (default doubling)\n"
    "  --max-bytes B        cap on each session's lazy KV storage: bytes, 64MiB (2^20) or\n"
    "                       64MB (10^6)\n"
    "  --sessions N         independent sessions, interleaved token by token (default 1)\n"
    "  --shared-prefix P    the first P prompt tokens are the same in every session:\n"
    "                       computed once, then forked into the others (lazy programs)\n"
    "  --method NAME[,NAME] method for prompt and new tokens, or PREFILL,DECODE\n"
    "                       (default: forward, else prefill,decode)\n"
    "  --seed N             seed of the random prompt (a C++ generator: not Python's tokens)\n"
    "  --prompt-tokens IDS  the prompt as token ids, e.g. 1,2,3 (overrides --prompt-len)\n"
    "  --json               print only a JSON object on stdout (below)\n"
    "  --quiet              no summary on stderr\n"
    "  --logits FILE        every call's last-position logits of session 0 (float32)\n"
    "  --save-session FILE  save session 0 (Python's session-file format)\n"
    "\n"
    "KV bytes count what the program holds as `lazykv inspect` does: a static program's\n"
    "planned KV cache from load on (held once, shared by its sessions), plus each\n"
    "session's lazy storage.\n"
    "\n"
    "--json prints the document of `lazykv generate --json` (schema \"lazykv-generate\",\n"
    "version 1; every key present whatever --sessions is):\n"
    "  schema, version, program, lazy, policy, methods {prefill, decode}, prompt_len,\n"
    "  new_tokens, max_positions, bytes_per_position (lazy, per session),\n"
    "  planned_kv_bytes (static, shared), kv_bytes_at_max_context,\n"
    "  sessions: [{index, prompt, tokens, positions_filled, kv_bytes_after_prefill,\n"
    "              kv_bytes_end, peak_kv_bytes, grows, buffer_grow_events,\n"
    "              bytes_copied}]   (bytes: the session's own lazy storage),\n"
    "  totals: {sessions, kv_bytes_after_load, kv_bytes_after_prefill, kv_bytes_end,\n"
    "           peak_kv_bytes, grows, bytes_copied, prefill_seconds, decode_seconds,\n"
    "           decode_tokens, decode_tokens_per_s}   (bytes: planned + all sessions),\n"
    "  shared_prefix: null, or with --shared-prefix {positions, prefill_seconds,\n"
    "           fork_seconds, bytes_copied, prefill_seconds_unshared_estimate,\n"
    "           seconds_saved, positions_saved, bytes_saved}\n"
    "`grows` counts enlargements of a session's storage (all buffers at once count\n"
    "once); `buffer_grow_events` counts them per buffer.\n"
    "\n"
    "Exit codes:\n"
    "  0  generated\n"
    "  1  lazykv refused the run (e.g. more positions than the program holds, a KV\n"
    "     budget exceeded, an unknown method) or the runtime failed; the message says why\n"
    "  2  usage error (a bad option or value)\n";

struct Args {
  std::string pte;
  lazykv::gen::Options gen;
  std::string policy = "doubling";
  std::string max_bytes;
  bool json = false;
  bool quiet = false;
  std::string logits;
};

int usage_error(const std::string& message) {
  std::fprintf(stderr, "%sTry 'lazykv_run --help' for help.\n\nError: %s\n", kUsage, message.c_str());
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

// 0 to run, -1 after --help, else the exit code of a usage error.
int parse_args(int argc, char** argv, Args* a) {
  lazykv::gen::Options& g = a->gen;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const char* v = nullptr;
    auto value = [&]() {
      if (i + 1 >= argc) return false;
      v = argv[++i];
      return true;
    };
    if (arg == "-h" || arg == "--help") {
      std::fputs(kUsage, stdout);
      std::fputs(kHelp, stdout);
      return -1;
    } else if (arg == "--json") {
      a->json = true;
    } else if (arg == "--quiet") {
      a->quiet = true;
    } else if (arg == "--prompt-len" || arg == "--new-tokens" || arg == "--sessions" || arg == "--seed" ||
               arg == "--shared-prefix") {
      int64_t n = 0;
      if (!value() || !to_int(v, &n)) return usage_error(arg + " needs an integer");
      if (arg == "--prompt-len") {
        if (n < 1) return usage_error("--prompt-len must be >= 1");
        g.prompt_len = n;
      } else if (arg == "--new-tokens") {
        if (n < 0) return usage_error("--new-tokens must be >= 0");
        g.new_tokens = n;
      } else if (arg == "--sessions") {
        if (n < 1) return usage_error("--sessions must be >= 1");
        g.sessions = n;
      } else if (arg == "--shared-prefix") {
        if (n < 0) return usage_error("--shared-prefix must be >= 0");
        g.shared_prefix = n;
      } else {
        g.seed = static_cast<uint64_t>(n);
      }
    } else if (arg == "--policy" || arg == "--max-bytes" || arg == "--method" || arg == "--logits" ||
               arg == "--save-session") {
      if (!value()) return usage_error(arg + " needs a value");
      if (arg == "--policy") a->policy = v;
      else if (arg == "--max-bytes") a->max_bytes = v;
      else if (arg == "--method") g.method = v;
      else if (arg == "--logits") a->logits = v;
      else g.save_session = v;
    } else if (arg == "--prompt-tokens") {
      if (!value()) return usage_error("--prompt-tokens needs a list like 1,2,3");
      const std::string s = v;
      size_t pos = 0;
      while (pos <= s.size()) {
        size_t comma = s.find(',', pos);
        if (comma == std::string::npos) comma = s.size();
        const std::string item = s.substr(pos, comma - pos);
        int64_t t = 0;
        if (!to_int(item.c_str(), &t)) return usage_error("--prompt-tokens: '" + item + "' is not an integer");
        g.prompt_tokens.push_back(t);
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
  if (!g.prompt_tokens.empty()) g.prompt_len = static_cast<int64_t>(g.prompt_tokens.size());
  if (g.shared_prefix > g.prompt_len) {
    return usage_error("--shared-prefix " + std::to_string(g.shared_prefix) + " is longer than --prompt-len " +
                       std::to_string(g.prompt_len) + (g.prompt_tokens.empty() ? "" : " (the number of --prompt-tokens)"));
  }
  const std::string& m = g.method;
  if (!m.empty()) {
    const size_t comma = m.find(',');
    const bool bad = m.front() == ',' || m.back() == ',' ||
                     (comma != std::string::npos && m.find(',', comma + 1) != std::string::npos);
    if (bad) return usage_error("--method: give one method name or PREFILL,DECODE");
  }
  return 0;
}

int fail(const lazykv::Status& s) {
  std::fprintf(stderr, "Error: %s\n", s.to_string().c_str());
  return 1;
}

std::string with_commas(int64_t n) {
  std::string s = std::to_string(n < 0 ? -n : n);
  for (int i = static_cast<int>(s.size()) - 3; i > 0; i -= 3) s.insert(static_cast<size_t>(i), ",");
  return (n < 0 ? "-" : "") + s;
}

void summary(const lazykv::gen::GenerationResult& r) {
  const size_t n = r.sessions.size();
  if (r.prefill_method != r.decode_method) {
    std::fprintf(stderr, "methods: prompt through '%s', new tokens through '%s'\n", r.prefill_method.c_str(),
                 r.decode_method.c_str());
  }
  std::fprintf(stderr, "prefill %zu x %zu: %.3f s; decode: %.1f tokens/s\n", r.sessions[0].prompt.size(), n,
               r.prefill_seconds, r.decode_tokens_per_s());
  std::fprintf(stderr, "KV bytes: after load %s, after prefill %s, end %s, peak %s\n",
               with_commas(r.kv_bytes_after_load).c_str(), with_commas(r.kv_bytes_after_prefill).c_str(),
               with_commas(r.kv_bytes_end).c_str(), with_commas(r.peak_kv_bytes).c_str());
  if (r.planned_kv_bytes) {
    std::fprintf(stderr, "  of which planned (static KV cache, held from load on, shared by the sessions): %s\n",
                 with_commas(r.planned_kv_bytes).c_str());
  }
  if (r.lazy) {
    std::fprintf(stderr, "a static program would hold %s bytes of KV (%zu x %s); the sessions grew %lld times, "
                         "copying %s bytes\n",
                 with_commas(r.kv_bytes_at_max_context * static_cast<int64_t>(n)).c_str(), n,
                 with_commas(r.kv_bytes_at_max_context).c_str(), (long long)r.grows(),
                 with_commas(r.bytes_copied()).c_str());
  }
  if (r.has_shared_prefix) {
    const auto& sp = r.shared_prefix;
    std::fprintf(stderr, "shared prefix %lld tokens: computed once in %.3f s, forked %zu x in %.3f s (%s bytes "
                         "copied); computing it in every session: ~%.3f s\n",
                 (long long)sp.positions, sp.prefill_seconds, n - 1, sp.fork_seconds,
                 with_commas(sp.bytes_copied).c_str(), sp.prefill_seconds_unshared_estimate);
  }
  for (size_t k = 0; k < n; ++k) {
    const auto& t = r.sessions[k].tokens;
    std::string s;
    for (size_t i = 0; i < t.size() && i < 32; ++i) s += (i ? ", " : "") + std::to_string(t[i]);
    std::fprintf(stderr, "session %zu: [%s]%s\n", k, s.c_str(), t.size() > 32 ? " ..." : "");
  }
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
    if (!mb.ok()) return usage_error("--max-bytes: " + mb.status().message());
    options.max_bytes = mb.get();
  }
  const std::string ops = lazykv::host::load_custom_ops();
  if (!ops.empty()) std::fprintf(stderr, "lazykv_run: custom ops not loaded (%s)\n", ops.c_str());

  const auto t_load = std::chrono::steady_clock::now();
  auto loaded = lazykv::Program::load(a.pte, options);
  if (!loaded.ok()) return fail(loaded.status());
  std::shared_ptr<lazykv::Program> program = loaded.get();
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_load).count();
  if (!a.quiet) {
    const std::string what =
        program->lazy() ? "lazy KV, " + std::to_string(program->buffers().size()) + " buffers" : "no lazy KV buffers";
    std::fprintf(stderr, "loaded %s in %.2f s (%s); policy %s\n", a.pte.c_str(), load_s, what.c_str(),
                 options.policy.spec().c_str());
  }
  std::vector<float> logits;
  if (!a.logits.empty()) a.gen.logits = &logits;
  auto result = lazykv::gen::greedy_generate(*program, a.gen);
  if (!result.ok()) return fail(result.status());
  if (!a.logits.empty()) {
    FILE* f = std::fopen(a.logits.c_str(), "wb");
    if (f == nullptr || std::fwrite(logits.data(), sizeof(float), logits.size(), f) != logits.size()) {
      if (f) std::fclose(f);
      return fail(lazykv::Status(lazykv::ErrorKind::IoError, a.logits + ": cannot write the logits"));
    }
    std::fclose(f);
  }
  if (a.json) std::printf("%s\n", lazykv::gen::to_json(result.get()).c_str());
  if (!a.quiet) summary(result.get());
  return 0;
}
