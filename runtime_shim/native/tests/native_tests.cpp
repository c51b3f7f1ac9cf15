// The C++ tests of the lazykv native runtime, one executable driven by
// tests/test_native.py (which also runs it under AddressSanitizer + UBSan).
//
//   lazykv_native_tests unit                      no program needed
//   lazykv_native_tests model LAZY.pte STATIC.pte lazy vs static, every policy
//   lazykv_native_tests save LAZY.pte FILE N      prefill N tokens 1..N, save, print next logits
//   lazykv_native_tests restore LAZY.pte FILE T   restore, run token T at its position, print logits
//   lazykv_native_tests reference STATIC TOKENS STEPS OUT   greedy on ExecuTorch's own Module:
//                                                 every call's last logits (float32) to OUT
//   lazykv_native_tests fuzz-worker VOCAB         one .pte path per stdin line -> one result line
//                                                 (tests/fuzz_native.py drives it)
//   lazykv_native_tests policy                    lines "SPEC NEEDED BOUND BPP" on stdin -> capacities
//                                                 (compared with policy.py)
//   lazykv_native_tests bytes                     one size a line on stdin -> bytes (compared with
//                                                 lazykv.units.parse_size)
//
// Each check prints "ok NAME" or "FAIL NAME: why"; the exit code is the failure count.
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <ucontext.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor_ptr_maker.h>

#include <lazykv/lazykv.h>

#include "../src/json.h"
#include "../src/pte_format.h"
#include "../src/sha256.h"
#include "../tools/host.h"

namespace {

using lazykv::host::argmax;
using lazykv::host::last_logits;
using executorch::aten::ScalarType;
using executorch::extension::make_tensor_ptr;
using executorch::runtime::EValue;

int g_failures = 0;

void check(bool ok, const std::string& name, const std::string& why = "") {
  if (ok) {
    std::printf("ok %s\n", name.c_str());
  } else {
    ++g_failures;
    std::printf("FAIL %s: %s\n", name.c_str(), why.c_str());
  }
  std::fflush(stdout);
}

template <typename T>
void check_err(const lazykv::Result<T>& r, lazykv::ErrorKind kind, const std::string& name) {
  check(!r.ok() && r.status().kind() == kind, name,
        r.ok() ? "succeeded" : r.status().to_string());
}

int unit() {
  // sha256 against known digests.
  lazykv::Sha256 h;
  check(h.hexdigest() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "sha256 empty");
  lazykv::Sha256 h2;
  h2.update("abc", 3);
  check(h2.hexdigest() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "sha256 abc");
  lazykv::Sha256 h3;
  std::string million(1000000, 'a');
  h3.update(million.data(), 333);
  h3.update(million.data() + 333, million.size() - 333);
  check(h3.hexdigest() == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0", "sha256 million a");
  // JSON.
  auto v = lazykv::json::parse("{\"a\": [1, -2, 3.5, \"x\\u00e9\\ud83d\\ude00\", true, null], \"b\": {}}");
  check(v.get("a") && v.get("a")->a.size() == 6 && v.get("a")->a[1].i == -2 && v.get("a")->a[3].s == "x\xc3\xa9\xf0\x9f\x98\x80",
        "json parse");
  for (const char* bad : {"", "{", "[1,]", "{\"a\" 1}", "\"\\x\"", "01x", "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]"}) {
    bool threw = false;
    try {
      lazykv::json::parse(bad);
    } catch (const lazykv::json::JsonError&) {
      threw = true;
    }
    check(threw, std::string("json refuses ") + std::string(bad).substr(0, 12));
  }
  // Policies.
  auto p = lazykv::Policy::parse("hybrid:start=4,linear_after=1KiB,increment=512");
  check(p.ok() && p->start == 4 && p->linear_after == 1024 && p->increment == 512, "policy parse hybrid");
  check(p.ok() && p->spec() == "hybrid:start=4,linear_after=1024,increment=512", "policy spec hybrid", p.ok() ? p->spec() : "");
  check_err(lazykv::Policy::parse("step:0"), lazykv::ErrorKind::PolicyError, "policy step:0 refused");
  check_err(lazykv::Policy::parse("fibonacci"), lazykv::ErrorKind::PolicyError, "policy unknown refused");
  check_err(lazykv::Policy::parse("doubling:1,2"), lazykv::ErrorKind::PolicyError, "policy too many values");
  check_err(lazykv::parse_bytes("12XB"), lazykv::ErrorKind::PolicyError, "bytes refused");
  auto d = lazykv::Policy::parse("doubling");
  check(d.ok() && d->capacity(17, 4096, 512) == 32 && d->capacity(0, 4096, 512) == 0 && d->capacity(5000, 4096, 512) == 4096,
        "doubling arithmetic");
  // The flatbuffer reader on garbage: throws Corrupt, never reads out of bounds.
  std::vector<uint8_t> junk(256);
  uint32_t state = 1;
  int refused = 0;
  for (int round = 0; round < 2000; ++round) {
    for (auto& b : junk) {
      state = state * 1664525u + 1013904223u;
      b = static_cast<uint8_t>(state >> 24);
    }
    junk[0] = static_cast<uint8_t>(round % 64);
    junk[1] = junk[2] = junk[3] = 0;
    try {
      lazykv::fb::parse_program(junk.data(), junk.size());
    } catch (const lazykv::fb::Corrupt&) {
      ++refused;
    }
  }
  check(refused > 1000, "flatbuffer reader refuses random bytes", std::to_string(refused));
  // A file that is not a program.
  const char* path = "/tmp/lazykv-native-not-a-pte";
  std::ofstream(path) << "definitely not a program, just some bytes";
  check_err(lazykv::Program::load(path), lazykv::ErrorKind::InvalidProgram, "load refuses a non-pte");
  check_err(lazykv::Program::load("/nonexistent/x.pte"), lazykv::ErrorKind::InvalidProgram, "load refuses a missing file");
  return g_failures;
}

struct Tok {
  executorch::extension::TensorPtr tokens, pos;
  std::vector<EValue> evalues() const { return {EValue(*tokens), EValue(*pos)}; }
};

Tok make(const std::vector<int64_t>& tokens, int64_t pos) {
  return {make_tensor_ptr({1, static_cast<int>(tokens.size())}, std::vector<int64_t>(tokens)),
          make_tensor_ptr({1}, std::vector<int64_t>{pos})};
}

float max_diff(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  float m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

// The static program on ExecuTorch's own C++ Module: the reference every policy must match.
std::vector<std::vector<float>> reference(const std::string& static_pte, const std::vector<int64_t>& prompt, int steps,
                                          std::vector<int64_t>* tokens) {
  executorch::extension::Module module(static_pte, executorch::extension::Module::LoadMode::Mmap);
  std::vector<std::vector<float>> out;
  auto r = module.execute("forward", make(prompt, 0).evalues());
  if (!r.ok()) return out;
  out.push_back(last_logits(r.get()[0]));
  tokens->push_back(argmax(out.back()));
  for (int i = 0; i < steps; ++i) {
    auto s = module.execute("forward", make({tokens->back()}, static_cast<int64_t>(prompt.size()) + i).evalues());
    if (!s.ok()) return {};
    out.push_back(last_logits(s.get()[0]));
    tokens->push_back(argmax(out.back()));
  }
  return out;
}

// Session::fork on a session that ran `prompt` (16 tokens) and 24 greedy steps of the
// reference: a fork of the first 16 positions continues the reference bit for bit; a
// fork of everything and its source, given the same token, give the same logits and
// stay independent; refusals leave the source unchanged.
void fork_checks(lazykv::Program& prog, lazykv::Session& sess, const std::vector<std::vector<float>>& ref,
                 const std::vector<int64_t>& ref_tokens, const std::string& spec) {
  const int64_t bpp = prog.bytes_per_position(), filled = sess.offset();
  const lazykv::SessionStats before = sess.stats();
  auto part = sess.fork(16);
  check(part.ok(), spec + ": fork(16)", part.ok() ? "" : part.status().to_string());
  if (!part.ok()) return;
  lazykv::Session& p = *part.get();
  const int64_t want_cap = std::max(std::min(prog.policy().capacity(16, prog.max_positions(), bpp), prog.max_positions()),
                                    int64_t(16));
  const lazykv::SessionStats ps = p.stats();
  check(p.offset() == 16 && ps.capacity_positions == want_cap && ps.bytes_copied == 16 * bpp &&
            p.kv_bytes() == want_cap * bpp,
        spec + ": a fork holds the policy's capacity and copies only the prefix",
        std::to_string(ps.capacity_positions) + " positions, " + std::to_string(ps.bytes_copied) + " bytes copied");
  float diff = 0;
  bool ran = true;
  for (int i = 0; i < 8; ++i) {
    auto o = p.run("forward", make({ref_tokens[static_cast<size_t>(i)]}, 16 + i).evalues());
    if (!o.ok()) {
      ran = false;
      break;
    }
    diff = std::max(diff, max_diff(last_logits(o.get()[0]), ref[static_cast<size_t>(i) + 1]));
  }
  check(ran && diff == 0.0f, spec + ": a fork of a prefix continues the static program's logits bit for bit",
        "max diff " + std::to_string(diff));
  const lazykv::SessionStats after = sess.stats();
  check(sess.offset() == filled && after.capacity_positions == before.capacity_positions &&
            after.bytes_copied == before.bytes_copied && sess.kv_bytes() == before.current_bytes,
        spec + ": forking leaves the source unchanged");
  auto whole = sess.fork();
  check(whole.ok() && whole.get()->offset() == filled, spec + ": fork() copies every filled position");
  if (whole.ok()) {
    auto a = whole.get()->run("forward", make({5}, filled).evalues());
    const std::vector<float> from_fork = a.ok() ? last_logits(a.get()[0]) : std::vector<float>{};
    auto b = sess.run("forward", make({5}, filled).evalues());
    check(a.ok() && b.ok() && max_diff(from_fork, last_logits(b.get()[0])) == 0.0f,
          spec + ": a fork and its source give the same logits for the same token");
    auto c = whole.get()->run("forward", make({9}, filled + 1).evalues());
    check(c.ok() && sess.offset() == filled + 1 && whole.get()->offset() == filled + 2,
          spec + ": a fork runs independently of its source");
    sess.trim(1);
  }
  check_err(sess.fork(filled + 1), lazykv::ErrorKind::InvalidInput, spec + ": fork past the filled positions refused");
  check_err(sess.fork(-2), lazykv::ErrorKind::InvalidInput, spec + ": fork of negative positions refused");
  auto none = sess.fork(0);
  check(none.ok() && none.get()->offset() == 0 && none.get()->stats().bytes_copied == 0, spec + ": fork(0)");
  check(sess.offset() == filled, spec + ": refused forks leave the source as it was");
}

int model(const std::string& lazy_pte, const std::string& static_pte) {
  std::vector<int64_t> prompt;
  for (int i = 0; i < 16; ++i) prompt.push_back((i * 37 + 11) % 512);
  const int steps = 24;
  std::vector<int64_t> ref_tokens;
  const auto ref = reference(static_pte, prompt, steps, &ref_tokens);
  check(ref.size() == static_cast<size_t>(steps + 1), "static program runs on ExecuTorch's Module");
  for (const char* spec : {"doubling", "step:8", "hybrid:start=4,linear_after=16KiB,increment=8KiB", "preallocate"}) {
    lazykv::LoadOptions opt;
    opt.policy = lazykv::Policy::parse(spec).get();
    auto prog = lazykv::Program::load(lazy_pte, opt);
    check(prog.ok(), std::string(spec) + ": load", prog.ok() ? "" : prog.status().to_string());
    if (!prog.ok()) continue;
    auto s = prog.get()->session();
    check(s.ok(), std::string(spec) + ": session");
    if (!s.ok()) continue;
    lazykv::Session& sess = *s.get();
    const int64_t bound = prog.get()->max_positions() * prog.get()->bytes_per_position();
    const bool pre = std::string(spec) == "preallocate";
    check(sess.kv_bytes() == (pre ? bound : 0), std::string(spec) + ": KV bytes after load",
          std::to_string(sess.kv_bytes()));
    float diff = 0;
    bool same = true;
    auto r = sess.run("forward", make(prompt, 0).evalues());
    if (!r.ok()) {
      check(false, std::string(spec) + ": prefill", r.status().to_string());
      continue;
    }
    std::vector<int64_t> toks{argmax(last_logits(r.get()[0]))};
    diff = std::max(diff, max_diff(last_logits(r.get()[0]), ref[0]));
    for (int i = 0; i < steps; ++i) {
      auto o = sess.run("forward", make({toks.back()}, static_cast<int64_t>(prompt.size()) + i).evalues());
      if (!o.ok()) {
        same = false;
        break;
      }
      diff = std::max(diff, max_diff(last_logits(o.get()[0]), ref[static_cast<size_t>(i) + 1]));
      toks.push_back(argmax(last_logits(o.get()[0])));
    }
    check(same && toks == ref_tokens && diff == 0.0f, std::string(spec) + ": tokens and logits equal the static program's",
          "max diff " + std::to_string(diff));
    const lazykv::SessionStats st = sess.stats();
    check(st.positions_filled == 16 + steps && st.capacity_positions >= st.positions_filled, std::string(spec) + ": stats");
    check(st.grows >= 1 && st.grows <= st.grow_events, std::string(spec) + ": grows count the storage, not buffers",
          std::to_string(st.grows) + " / " + std::to_string(st.grow_events));
    fork_checks(*prog.get(), sess, ref, ref_tokens, spec);
    // Refusals leave the session usable.
    check_err(sess.run("forward", make({1}, 3).evalues()), lazykv::ErrorKind::InvalidInput, std::string(spec) + ": gap refused");
    check_err(sess.run("forward", make({100000}, 40).evalues()), lazykv::ErrorKind::InvalidInput, std::string(spec) + ": token out of range");
    check_err(sess.run("forward", {EValue(*make({1}, 40).tokens)}), lazykv::ErrorKind::InvalidInput, std::string(spec) + ": wrong count");
    auto wrong_dtype = make_tensor_ptr({1, 1}, std::vector<float>{1.0f});
    check_err(sess.run("forward", {EValue(*wrong_dtype), EValue(*make({1}, 40).pos)}), lazykv::ErrorKind::InvalidInput,
              std::string(spec) + ": wrong dtype refused");
    check_err(sess.run("nope", make({1}, 40).evalues()), lazykv::ErrorKind::UnknownMethod, std::string(spec) + ": unknown method");
    auto freed = sess.trim(8);
    check(freed.ok() && freed->positions == 8 && sess.offset() == 32, std::string(spec) + ": trim");
    auto again = sess.run("forward", make({ref_tokens[32 - 16]}, 32).evalues());
    check(again.ok() && max_diff(last_logits(again.get()[0]), ref[32 - 16 + 1]) == 0.0f, std::string(spec) + ": trim then run bit-exact");
    auto reset = sess.reset();
    check(reset.ok() && sess.offset() == 0 && sess.kv_bytes() == (pre ? bound : 0), std::string(spec) + ": reset gives storage back");
    // A second session over the same program, interleaved with the first: independent.
    auto s2 = prog.get()->session();
    auto a = sess.run("forward", make(prompt, 0).evalues());
    auto b = s2.get()->run("forward", make({prompt[0]}, 0).evalues());
    auto c = sess.run("forward", make({ref_tokens[0]}, 16).evalues());
    check(a.ok() && b.ok() && c.ok() && max_diff(last_logits(c.get()[0]), ref[1]) == 0.0f,
          std::string(spec) + ": two sessions interleaved stay independent");
    sess.close();
    check_err(sess.run("forward", make({1}, 0).evalues()), lazykv::ErrorKind::SessionClosed, std::string(spec) + ": closed");
    check_err(sess.fork(), lazykv::ErrorKind::SessionClosed, std::string(spec) + ": fork of a closed session");
  }
  // A static program's state lives inside the runtime: no fork.
  auto static_prog = lazykv::Program::load(static_pte);
  if (static_prog.ok()) {
    auto s = static_prog.get()->session();
    check(s.ok(), "static program: session");
    if (s.ok()) check_err(s.get()->fork(), lazykv::ErrorKind::InvalidProgram, "static program: fork refused");
  }
  // A program held in memory (Program::load_bytes, what Python's bytes sources use):
  // segments read in place, the same logits and digest as the file; the raw method.
  {
    std::ifstream in(lazy_pte, std::ios::binary);
    const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    auto mem = lazykv::Program::load_bytes(bytes.data(), bytes.size(), "<bytes>");
    check(mem.ok(), "load_bytes", mem.ok() ? "" : mem.status().to_string());
    if (mem.ok()) {
      auto file = lazykv::Program::load(lazy_pte);
      auto dm = mem.get()->digest();
      check(file.ok() && dm.ok() && file.get()->digest().ok() && dm.get() == file.get()->digest().get(),
            "load_bytes: the digest of the bytes is the file's");
      auto s = mem.get()->session();
      auto r = s.get()->run("forward", make(prompt, 0).evalues());
      check(r.ok() && max_diff(last_logits(r.get()[0]), ref[0]) == 0.0f, "load_bytes: the prompt's logits are the static program's");
      auto m = mem.get()->raw_method("forward");
      check(m.ok() && m.get() != nullptr, "raw_method");
      check_err(mem.get()->raw_method("nope"), lazykv::ErrorKind::UnknownMethod, "raw_method: unknown method");
      auto again = s.get()->run("forward", make({ref_tokens[0]}, 16).evalues());  // rebinds its storage
      check(again.ok() && max_diff(last_logits(again.get()[0]), ref[1]) == 0.0f, "a session after raw_method");
    }
    auto half = lazykv::Program::load_bytes(bytes.data(), bytes.size() / 2, "<half>");
    check_err(half, lazykv::ErrorKind::InvalidProgram, "load_bytes refuses a truncated buffer");
  }
  // Budget and bound.
  lazykv::LoadOptions opt;
  opt.max_bytes = 8 * 1024;
  auto prog = lazykv::Program::load(lazy_pte, opt);
  if (prog.ok()) {
    auto s = prog.get()->session();
    check_err(s.get()->run("forward", make(prompt, 0).evalues()), lazykv::ErrorKind::MemoryBudgetExceeded, "max_bytes refused");
    check(s.get()->kv_bytes() == 0 && s.get()->offset() == 0, "max_bytes leaves the session unchanged");
    auto small = s.get()->run("forward", make({prompt[0]}, 0).evalues());
    check(small.ok(), "max_bytes: a call within the budget runs", small.ok() ? "" : small.status().to_string());
  }
  return g_failures;
}

int reference_run(const std::string& static_pte, const std::string& csv, int steps, const std::string& out) {
  std::vector<int64_t> prompt;
  size_t pos = 0;
  while (pos <= csv.size()) {
    size_t comma = csv.find(',', pos);
    if (comma == std::string::npos) comma = csv.size();
    prompt.push_back(std::atoll(csv.substr(pos, comma - pos).c_str()));
    pos = comma + 1;
  }
  std::vector<int64_t> tokens;
  const auto logits = reference(static_pte, prompt, steps, &tokens);
  if (logits.size() != static_cast<size_t>(steps) + 1) return std::printf("FAIL reference run\n"), 1;
  FILE* f = std::fopen(out.c_str(), "wb");
  if (f == nullptr) return 1;
  for (const auto& l : logits) std::fwrite(l.data(), sizeof(float), l.size(), f);
  std::fclose(f);
  std::printf("tokens");
  for (int64_t t : tokens) std::printf(" %lld", (long long)t);
  std::printf("\n");
  return 0;
}

void print_logits(const std::vector<float>& v) {
  std::printf("logits");
  for (float x : v) std::printf(" %.9g", x);
  std::printf("\n");
}

int save(const std::string& lazy_pte, const std::string& file, int n) {
  auto prog = lazykv::Program::load(lazy_pte);
  if (!prog.ok()) return std::printf("FAIL load: %s\n", prog.status().to_string().c_str()), 1;
  auto s = prog.get()->session();
  std::vector<int64_t> prompt;
  for (int i = 1; i <= n; ++i) prompt.push_back(i);
  auto r = s.get()->run("forward", make(prompt, 0).evalues());
  if (!r.ok()) return std::printf("FAIL run: %s\n", r.status().to_string().c_str()), 1;
  auto saved = s.get()->save(file, {{"by", "c++"}});
  if (!saved.ok()) return std::printf("FAIL save: %s\n", saved.status().to_string().c_str()), 1;
  auto next = s.get()->run("forward", make({7}, n).evalues());
  if (!next.ok()) return std::printf("FAIL next: %s\n", next.status().to_string().c_str()), 1;
  print_logits(last_logits(next.get()[0]));
  return 0;
}

int restore(const std::string& lazy_pte, const std::string& file, int64_t token) {
  auto prog = lazykv::Program::load(lazy_pte);
  if (!prog.ok()) return std::printf("FAIL load: %s\n", prog.status().to_string().c_str()), 1;
  auto s = prog.get()->restore(file);
  if (!s.ok()) return std::printf("FAIL restore: %s\n", s.status().to_string().c_str()), 1;
  auto next = s.get()->run("forward", make({token}, s.get()->offset()).evalues());
  if (!next.ok()) return std::printf("FAIL next: %s\n", next.status().to_string().c_str()), 1;
  print_logits(last_logits(next.get()[0]));
  return 0;
}

// -- fuzz worker ---------------------------------------------------------------------------

// Which object a crash happened in: the first frame after the signal trampoline that is
// outside libc, libstdc++ and libgcc and not an abort helper (ExecuTorch's
// runtime_abort/pal_abort), named by dladdr; a call through a null pointer (PC 0) is
// named by its return address. This executable holds lazykv's code (liblazykv.a); it
// exports its symbols (ENABLE_EXPORTS) so that frames in it are named too.
bool skipped(const Dl_info& info) {
  const char* f = info.dli_fname;
  if (std::strstr(f, "libc.so") || std::strstr(f, "libstdc++") || std::strstr(f, "libgcc")) return true;
  return info.dli_sname != nullptr && std::strstr(info.dli_sname, "abort") != nullptr;
}

void on_crash(int sig, siginfo_t*, void* context) {
  // The faulting PC and, if it is not code (a null function pointer), the return address.
  const ucontext_t* uc = static_cast<const ucontext_t*>(context);
  void* pc = reinterpret_cast<void*>(uc->uc_mcontext.gregs[REG_RIP]);
  void* ret = *reinterpret_cast<void**>(uc->uc_mcontext.gregs[REG_RSP]);
  Dl_info info;
  const char* where = "unknown";
  const char* symbol = "?";
  void* candidates[66];
  int m = 0;
  if (sig == SIGSEGV || sig == SIGBUS || sig == SIGFPE || sig == SIGILL) {
    candidates[m++] = pc;
    candidates[m++] = ret;
  } else {  // an abort: unwind (never from a wild PC: the unwinder would fault itself)
    void* frames[64];
    const int n = backtrace(frames, 64);
    bool past_trampoline = false;
    for (int i = 1; i < n; ++i) {  // frame 0 is this handler
      if (!past_trampoline) {
        past_trampoline = dladdr(frames[i], &info) != 0 && info.dli_fname && std::strstr(info.dli_fname, "libc.so");
        continue;
      }
      candidates[m++] = frames[i];
    }
  }
  for (int i = 0; i < m; ++i) {
    if (dladdr(candidates[i], &info) == 0 || info.dli_fname == nullptr || skipped(info)) continue;
    where = info.dli_fname;
    symbol = info.dli_sname ? info.dli_sname : "?";
    break;
  }
  char line[1024];
  const int len = std::snprintf(line, sizeof(line), "crash signal=%d object=%s symbol=%.300s\n", sig, where, symbol);
  if (len > 0) (void)!write(1, line, static_cast<size_t>(len));
  _exit(128 + sig);
}

void result(const std::string& text) {
  std::string line = text;
  for (char& c : line) {
    if (c == '\n') c = ' ';
  }
  std::printf("%s\n", line.substr(0, 300).c_str());
  std::fflush(stdout);
}

void fuzz_one(const std::string& path, int64_t vocab) {
  auto prog = lazykv::Program::load(path);
  if (!prog.ok()) return result(std::string("refused ") + lazykv::error_kind_name(prog.status().kind()) + ": " +
                                prog.status().message());
  int ran = 0;
  for (const std::string& name : prog.get()->method_names()) {
    auto info = prog.get()->method_info(name);
    if (!info.ok() || info.get()->inputs.empty()) continue;
    const lazykv::MethodInfo& mi = *info.get();
    auto s = prog.get()->session();
    if (!s.ok()) return result(std::string("refused-at-run ") + lazykv::error_kind_name(s.status().kind()));
    // (tokens [1, 3], position [1]) for a decoder, else zeros of each input's shape.
    std::vector<executorch::extension::TensorPtr> keep;
    std::vector<EValue> inputs;
    const bool decoder = mi.inputs.size() == 2 && mi.inputs[0].kind == lazykv::InputSpec::Kind::Tensor &&
                         mi.inputs[1].kind == lazykv::InputSpec::Kind::Tensor;
    for (size_t i = 0; i < mi.inputs.size(); ++i) {
      const lazykv::InputSpec& spec = mi.inputs[i];
      if (spec.kind != lazykv::InputSpec::Kind::Tensor) {
        inputs.emplace_back(static_cast<int64_t>(0));
        continue;
      }
      std::vector<int> sizes;
      int64_t numel = 1;
      for (int64_t d : spec.sizes) {
        const int64_t v = decoder && i == 0 && spec.sizes.size() == 2 && sizes.size() == 1 ? std::min<int64_t>(d, 3) : d;
        sizes.push_back(static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(v, 1 << 20))));
        numel *= sizes.back();
      }
      if (numel > (1 << 22)) return result("skipped: an input of " + std::to_string(numel) + " elements");
      const int st = spec.scalar_type;
      const size_t elem = st == 4 || st == 7 ? 8 : st == 3 || st == 6 ? 4 : st == 2 || st == 5 || st == 15 ? 2 : 1;
      std::vector<uint8_t> zeros(static_cast<size_t>(numel) * elem, 0);
      if (decoder && i == 0 && st == 4) {  // token ids 1, 2, 3 ... below the vocabulary
        for (int64_t k = 0; k < numel; ++k) {
          const int64_t t = (k + 1) % std::max<int64_t>(vocab, 1);
          std::memcpy(zeros.data() + 8 * k, &t, 8);
        }
      }
      keep.push_back(executorch::extension::make_tensor_ptr(sizes, std::move(zeros),
                                                            std::vector<uint8_t>{}, std::vector<int>{},
                                                            static_cast<ScalarType>(st)));
      inputs.emplace_back(*keep.back());
    }
    auto out = s.get()->run(name, inputs);
    if (!out.ok()) return result(std::string("refused-at-run ") + lazykv::error_kind_name(out.status().kind()) + ": " +
                                 out.status().message());
    ++ran;
    if (decoder && mi.uses_lazy()) {
      auto t = make_tensor_ptr({1, 1}, std::vector<int64_t>{1});
      auto p = make_tensor_ptr({1}, std::vector<int64_t>{s.get()->offset()});
      auto more = s.get()->run(name, {EValue(*t), EValue(*p)});
      if (!more.ok()) return result(std::string("refused-at-run ") + lazykv::error_kind_name(more.status().kind()));
    }
  }
  result("ok ran=" + std::to_string(ran));
}

int fuzz_worker(int64_t vocab) {
  for (int sig : {SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL}) {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_crash;
    sa.sa_flags = SA_SIGINFO;
    sigaction(sig, &sa, nullptr);
  }
  std::printf("ready\n");
  std::fflush(stdout);
  char line[4096];
  while (std::fgets(line, sizeof(line), stdin) != nullptr) {
    std::string path(line);
    while (!path.empty() && (path.back() == '\n' || path.back() == '\r')) path.pop_back();
    if (path.empty()) continue;
    fuzz_one(path, vocab);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "unit") return unit();
  const std::string ops = lazykv::host::load_custom_ops();
  if (!ops.empty()) std::fprintf(stderr, "custom ops not loaded: %s\n", ops.c_str());
  if (mode == "model" && argc == 4) return model(argv[2], argv[3]);
  if (mode == "reference" && argc == 6) return reference_run(argv[2], argv[3], std::atoi(argv[4]), argv[5]);
  if (mode == "fuzz-worker" && argc == 3) return fuzz_worker(std::atoll(argv[2]));
  if (mode == "save" && argc == 5) return save(argv[2], argv[3], std::atoi(argv[4]));
  if (mode == "restore" && argc == 5) return restore(argv[2], argv[3], std::atoll(argv[4]));
  if (mode == "policy") {
    char spec[256];
    long long needed, bound, bpp;
    while (std::scanf("%255s %lld %lld %lld", spec, &needed, &bound, &bpp) == 4) {
      auto p = lazykv::Policy::parse(spec);
      if (!p.ok()) {
        std::printf("error %s\n", lazykv::error_kind_name(p.status().kind()));
      } else {
        std::printf("%lld %s\n", (long long)p->capacity(needed, bound, bpp), p->spec().c_str());
      }
    }
    return 0;
  }
  if (mode == "bytes") {  // one size a line -> its bytes, or "error KIND"
    std::string line;
    for (int c = std::getchar(); c != EOF; c = std::getchar()) {
      if (c != '\n') {
        line += static_cast<char>(c);
        continue;
      }
      auto b = lazykv::parse_bytes(line);
      if (b.ok()) std::printf("%lld\n", (long long)b.get());
      else std::printf("error %s\n", lazykv::error_kind_name(b.status().kind()));
      line.clear();
    }
    return 0;
  }
  std::fprintf(stderr, "usage: lazykv_native_tests unit | model LAZY STATIC | save LAZY FILE N | restore LAZY FILE TOKEN"
                       " | policy < lines | bytes < lines\n");
  return 2;
}
