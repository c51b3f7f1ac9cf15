// lazykv_bench: the C++ measurements of `python -m benchmarks native`, each printed as
// one JSON object on stdout.
//
//   lazykv_bench load PTE stock|lazykv     load + load_method("forward") in this process:
//                                           seconds, RSS growth, peak RSS growth (VmHWM)
//   lazykv_bench decode STATIC LAZY CONTEXTS BLOCKS STEPS MAX_CONTEXT
//       ExecuTorch's own Module on the static program against lazykv on the lazy one, in
//       one process: alternating blocks of greedy generation (benchmarks/worker.py:
//       decode, the same protocol), tokens and logits compared on every call.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor_ptr_maker.h>

#include <lazykv/lazykv.h>

#include "host.h"

namespace {

using lazykv::host::argmax;
using lazykv::host::last_logits;
using executorch::extension::make_tensor_ptr;
using executorch::runtime::EValue;
using Clock = std::chrono::steady_clock;

int64_t status_kib(const char* key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  const size_t n = std::strlen(key);
  while (std::getline(f, line)) {
    if (line.compare(0, n, key) == 0) return std::atoll(line.c_str() + n + 1);
  }
  return -1;
}

void reset_peak() {
  std::ofstream("/proc/self/clear_refs") << "5";  // VmHWM := VmRSS
}

int fail(const std::string& m) {
  std::fprintf(stderr, "lazykv_bench: %s\n", m.c_str());
  return 1;
}

int load(const std::string& pte, const std::string& how) {
  const int64_t before = status_kib("VmRSS:");
  reset_peak();
  const auto t0 = Clock::now();
  std::unique_ptr<executorch::extension::Module> module;
  std::shared_ptr<lazykv::Program> program;
  std::unique_ptr<lazykv::Session> session;
  if (how == "stock") {
    module.reset(new executorch::extension::Module(pte, executorch::extension::Module::LoadMode::Mmap));
    if (module->load_method("forward") != executorch::runtime::Error::Ok) return fail("Module refused " + pte);
  } else {
    auto p = lazykv::Program::load(pte);
    if (!p.ok()) return fail(p.status().to_string());
    program = p.get();
    const lazykv::Status s = program->load_method("forward");
    if (!s.ok()) return fail(s.to_string());
    auto sess = program->session();
    if (!sess.ok()) return fail(sess.status().to_string());
    session = std::move(sess.get());
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  const int64_t after = status_kib("VmRSS:");
  const int64_t peak = status_kib("VmHWM:");
  std::printf("{\"load_seconds\": %.6f, \"rss_growth_bytes\": %lld, \"peak_growth_bytes\": %lld, "
              "\"kv_bytes\": %lld, \"region_bytes\": %lld}\n",
              seconds, (long long)((after - before) * 1024), (long long)((peak - before) * 1024),
              (long long)(session ? session->kv_bytes() : 0),
              (long long)(program ? program->patched_region_bytes() : 0));
  return 0;
}

int decode(const std::string& static_pte, const std::string& lazy_pte, const std::string& contexts_csv, int blocks,
           int steps, int64_t max_context) {
  executorch::extension::Module module(static_pte, executorch::extension::Module::LoadMode::Mmap);
  if (module.load_method("forward") != executorch::runtime::Error::Ok) return fail("Module refused " + static_pte);
  auto loaded = lazykv::Program::load(lazy_pte);
  if (!loaded.ok()) return fail(loaded.status().to_string());
  std::shared_ptr<lazykv::Program> program = loaded.get();
  auto info = program->method_info("forward");
  if (!info.ok()) return fail(info.status().to_string());
  const lazykv::InputSpec& tok_spec = info.get()->inputs[0];
  const int64_t chunk = tok_spec.dynamic ? tok_spec.sizes[1] : 1;
  std::mt19937_64 rng(0);
  std::printf("{");
  std::stringstream cs(contexts_csv);
  std::string item;
  bool first_ctx = true;
  while (std::getline(cs, item, ',')) {
    const int64_t ctx = std::atoll(item.c_str());
    const int64_t start = std::min<int64_t>(ctx + 1, max_context - steps - 2);
    auto made = program->session();
    if (!made.ok()) return fail(made.status().to_string());
    lazykv::Session& sess = *made.get();
    std::vector<int64_t> prompt;
    for (int64_t i = 0; i < start; ++i) prompt.push_back(static_cast<int64_t>(rng() % 1000));
    float diff = 0;
    int64_t tok = 0;
    for (int64_t pos = 0; pos < start;) {
      const int64_t n = std::min(chunk, start - pos);
      std::vector<int64_t> piece(prompt.begin() + pos, prompt.begin() + pos + n);
      auto t = make_tensor_ptr({1, static_cast<int>(n)}, std::vector<int64_t>(piece));
      auto p = make_tensor_ptr({1}, std::vector<int64_t>{pos});
      auto ls = module.execute("forward", {EValue(*t), EValue(*p)});
      if (!ls.ok()) return fail("static prefill failed");
      const std::vector<float> s_logits = last_logits(ls.get()[0]);
      auto ll = sess.run("forward", {EValue(*t), EValue(*p)});
      if (!ll.ok()) return fail(ll.status().to_string());
      const std::vector<float> l_logits = last_logits(ll.get()[0]);
      for (size_t i = 0; i < s_logits.size(); ++i) diff = std::max(diff, std::fabs(s_logits[i] - l_logits[i]));
      tok = argmax(s_logits);
      pos += n;
    }
    // One greedy loop: execute, argmax, next inputs, as a generation loop does.
    auto loop = [&](bool lazy, std::vector<int64_t>* toks, std::vector<std::vector<float>>* kept) -> double {
      int64_t t = tok;
      const auto t0 = Clock::now();
      for (int i = 0; i < steps; ++i) {
        auto tt = make_tensor_ptr({1, 1}, std::vector<int64_t>{t});
        auto pp = make_tensor_ptr({1}, std::vector<int64_t>{start + i});
        std::vector<float> logits;
        if (lazy) {
          auto o = sess.run("forward", {EValue(*tt), EValue(*pp)});
          if (!o.ok()) return -1;
          logits = last_logits(o.get()[0]);
        } else {
          auto o = module.execute("forward", {EValue(*tt), EValue(*pp)});
          if (!o.ok()) return -1;
          logits = last_logits(o.get()[0]);
        }
        t = argmax(logits);
        toks->push_back(t);
        kept->push_back(std::move(logits));
      }
      return std::chrono::duration<double>(Clock::now() - t0).count();
    };
    std::string blocks_json;
    int64_t held = -1;
    for (int b = 0; b <= blocks; ++b) {  // block 0 warms both sides up, untimed
      double ts = 0, tl = 0;
      std::vector<int64_t> tok_s, tok_l;
      std::vector<std::vector<float>> ks, kl;
      for (int side = 0; side < 2; ++side) {
        const bool lazy = (side == 1) != (b % 2 == 1);
        if (lazy) {
          tl = loop(true, &tok_l, &kl);
          auto trimmed = sess.trim(steps);
          if (!trimmed.ok()) return fail(trimmed.status().to_string());
        } else {
          ts = loop(false, &tok_s, &ks);
        }
      }
      if (ts < 0 || tl < 0) return fail("a decode step failed");
      if (tok_s != tok_l) return fail("context " + std::to_string(ctx) + ": tokens differ in block " + std::to_string(b));
      for (size_t i = 0; i < ks.size(); ++i) {
        for (size_t j = 0; j < ks[i].size(); ++j) diff = std::max(diff, std::fabs(ks[i][j] - kl[i][j]));
      }
      if (held < 0) held = sess.kv_bytes();
      else if (sess.kv_bytes() != held) return fail("trimming back changed the KV storage");
      if (b) {
        char buf[160];
        std::snprintf(buf, sizeof(buf), "%s{\"static_tps\": %.6f, \"lazy_tps\": %.6f, \"ratio\": %.6f}",
                      blocks_json.empty() ? "" : ", ", steps / ts, steps / tl, ts / tl);
        blocks_json += buf;
      }
    }
    std::printf("%s\"%lld\": {\"start\": %lld, \"end\": %lld, \"blocks\": [%s], \"max_abs_diff\": %.9g, "
                "\"kv_bytes\": %lld, \"steps\": %d}",
                first_ctx ? "" : ", ", (long long)ctx, (long long)start, (long long)(start + steps),
                blocks_json.c_str(), diff, (long long)sess.kv_bytes(), steps);
    first_ctx = false;
  }
  std::printf("}\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  const std::string ops = lazykv::host::load_custom_ops();
  if (!ops.empty()) return fail("custom ops: " + ops);
  if (mode == "load" && argc == 4) return load(argv[2], argv[3]);
  if (mode == "decode" && argc == 8) {
    return decode(argv[2], argv[3], argv[4], std::atoi(argv[5]), std::atoi(argv[6]), std::atoll(argv[7]));
  }
  std::fprintf(stderr, "usage: lazykv_bench load PTE stock|lazykv | decode STATIC LAZY CONTEXTS BLOCKS STEPS MAX_CONTEXT\n");
  return 2;
}
