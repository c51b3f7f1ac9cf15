// Growth policies: the arithmetic of runtime_shim/policy.py, line for line.
#include <lazykv/policy.h>

#include <cctype>
#include <climits>
#include <vector>

namespace lazykv {

namespace {

std::string lower(std::string s) {
  for (char& c : s) {
    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  return s;
}

std::string strip(const std::string& s) {
  size_t a = 0, b = s.size();
  while (a < b && std::isspace(static_cast<unsigned char>(s[a]))) ++a;
  while (b > a && std::isspace(static_cast<unsigned char>(s[b - 1]))) --b;
  return s.substr(a, b - a);
}

Status policy_error(const std::string& message) {
  return Status(ErrorKind::PolicyError, message);
}

bool parse_int(const std::string& text, int64_t* out) {
  const std::string t = strip(text);
  if (t.empty()) return false;
  size_t i = 0;
  bool neg = false;
  if (t[0] == '+' || t[0] == '-') {
    neg = t[0] == '-';
    i = 1;
  }
  if (i == t.size()) return false;
  int64_t v = 0;
  for (; i < t.size(); ++i) {
    if (!std::isdigit(static_cast<unsigned char>(t[i]))) return false;
    if (v > (INT64_MAX - 9) / 10) return false;
    v = v * 10 + (t[i] - '0');
  }
  *out = neg ? -v : v;
  return true;
}

std::vector<std::string> fields_of(Policy::Kind k) {
  switch (k) {
    case Policy::Kind::Doubling: return {"initial_positions"};
    case Policy::Kind::Step: return {"step"};
    case Policy::Kind::Hybrid: return {"start", "linear_after", "increment"};
    case Policy::Kind::Preallocate: return {};
  }
  return {};
}

std::string list(const std::vector<std::string>& names) {
  std::string out = "[";
  for (size_t i = 0; i < names.size(); ++i) {
    out += (i ? ", '" : "'") + names[i] + "'";
  }
  return out + "]";
}

}  // namespace

const char* Policy::name() const {
  switch (kind) {
    case Kind::Doubling: return "doubling";
    case Kind::Step: return "step";
    case Kind::Hybrid: return "hybrid";
    case Kind::Preallocate: return "preallocate";
  }
  return "?";
}

int64_t Policy::capacity(int64_t needed, int64_t bound, int64_t bytes_per_position) const {
  switch (kind) {
    case Kind::Doubling: {
      if (needed <= 0) return 0;
      int64_t cap = initial_positions;
      while (cap < needed) cap *= 2;
      return cap < bound ? cap : bound;
    }
    case Kind::Step: {
      if (needed <= 0) return 0;
      const int64_t cap = ((needed + step - 1) / step) * step;
      return cap < bound ? cap : bound;
    }
    case Kind::Hybrid: {
      if (needed <= 0) return 0;
      const int64_t bpp = bytes_per_position > 1 ? bytes_per_position : 1;
      int64_t inc = (increment + bpp - 1) / bpp;
      if (inc < 1) inc = 1;
      int64_t cap = start;
      while (cap < needed) {
        if (cap * bpp < linear_after) {
          cap *= 2;
        } else {
          cap += inc;
        }
      }
      return cap < bound ? cap : bound;
    }
    case Kind::Preallocate:
      return bound;
  }
  return bound;
}

int64_t Policy::initial(int64_t bound, int64_t) const {
  return kind == Kind::Preallocate ? bound : 0;
}

std::string Policy::spec() const {
  switch (kind) {
    case Kind::Doubling:
      return "doubling:" + std::to_string(initial_positions);
    case Kind::Step:
      return "step:" + std::to_string(step);
    case Kind::Hybrid: {
      const Policy d;
      std::string out;
      auto add = [&out](const char* k, int64_t v) {
        out += (out.empty() ? "" : ",") + std::string(k) + "=" + std::to_string(v);
      };
      if (start != d.start) add("start", start);
      if (linear_after != d.linear_after) add("linear_after", linear_after);
      if (increment != d.increment) add("increment", increment);
      return out.empty() ? "hybrid" : "hybrid:" + out;
    }
    case Kind::Preallocate:
      return "preallocate";
  }
  return "?";
}

Result<int64_t> parse_bytes(const std::string& text) {
  // lazykv/units.py: parse_size. ^\s*([0-9][0-9_,]*(\.[0-9]+)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$,
  // SI units powers of 1000, IEC units powers of 1024, B or nothing bytes.
  const std::string forms =
      "use bytes (123), KiB/MiB/GiB (powers of 1024, e.g. 64MiB) or KB/MB/GB (powers of 1000, e.g. 1.5GB)";
  const std::string t = strip(text);
  const auto bad = [&](const std::string& hint) {
    return policy_error("cannot read '" + text + "' as a size" + hint + "; " + forms);
  };
  size_t i = 0;
  std::string whole, frac;
  if (i < t.size() && std::isdigit(static_cast<unsigned char>(t[i]))) {
    while (i < t.size() && (std::isdigit(static_cast<unsigned char>(t[i])) || t[i] == '_' || t[i] == ',')) {
      if (t[i] != '_' && t[i] != ',') whole += t[i];
      ++i;
    }
  }
  if (i + 1 < t.size() && t[i] == '.' && std::isdigit(static_cast<unsigned char>(t[i + 1]))) {
    for (++i; i < t.size() && std::isdigit(static_cast<unsigned char>(t[i])); ++i) frac += t[i];
  }
  if (whole.empty() && frac.empty()) return bad(t.empty() || t[0] != '-' ? "" : " (a size cannot be negative)");
  const std::string unit = lower(strip(t.substr(i)));
  for (char c : unit) {
    if (!std::isalpha(static_cast<unsigned char>(c))) return bad("");
  }
  static const std::vector<std::pair<std::string, int64_t>> units = {
      {"", 1}, {"b", 1}, {"kb", 1000}, {"mb", 1000000}, {"gb", 1000000000}, {"tb", 1000000000000},
      {"kib", int64_t(1) << 10}, {"mib", int64_t(1) << 20}, {"gib", int64_t(1) << 30}, {"tib", int64_t(1) << 40}};
  int64_t scale = 0;
  for (const auto& u : units) {
    if (u.first == unit) scale = u.second;
  }
  if (scale == 0) {
    if (unit.size() == 1 && std::string("kmgt").find(unit) != std::string::npos) {
      std::string u = t.substr(i);
      u = strip(u);
      std::string upper = u;
      for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
      return bad(" (" + u + " is ambiguous: write " + upper + "iB for powers of 1024 or " + upper +
                 "B for powers of 1000)");
    }
    return bad("");
  }
  // (whole.frac) x scale, exactly: digits x scale / 10^len(frac), which must divide.
  while (!frac.empty() && frac.back() == '0') frac.pop_back();
  const auto not_whole = [&]() { return policy_error("'" + text + "' is not a whole number of bytes; " + forms); };
  if (frac.size() > 30) return not_whole();
  using u128 = unsigned __int128;
  const u128 limit = ~u128(0) / 16;
  u128 n = 0;
  for (char c : whole + frac) {
    if (n > limit / 10) return bad(" (too large)");
    n = n * 10 + static_cast<unsigned>(c - '0');
  }
  if (n > limit / static_cast<u128>(scale)) return bad(" (too large)");
  n *= static_cast<u128>(scale);
  u128 div = 1;
  for (size_t k = 0; k < frac.size(); ++k) div *= 10;
  if (n % div != 0) return not_whole();
  n /= div;
  if (n > static_cast<u128>(INT64_MAX)) return bad(" (too large)");
  return static_cast<int64_t>(n);
}

Result<Policy> Policy::parse(const std::string& text) {
  const std::string stripped = strip(text);
  const size_t colon = stripped.find(':');
  const std::string head = lower(colon == std::string::npos ? stripped : stripped.substr(0, colon));
  const std::string rest = colon == std::string::npos ? "" : stripped.substr(colon + 1);
  Policy p;
  if (head == "doubling") p.kind = Kind::Doubling;
  else if (head == "step") p.kind = Kind::Step;
  else if (head == "hybrid") p.kind = Kind::Hybrid;
  else if (head == "preallocate") p.kind = Kind::Preallocate;
  else {
    return policy_error("unknown growth policy '" + head +
                        "'; choose one of ['doubling', 'hybrid', 'preallocate', 'step'] (e.g. 'step:256')");
  }
  const std::vector<std::string> fields = fields_of(p.kind);
  size_t index = 0;
  size_t pos = 0;
  while (!rest.empty() && pos <= rest.size()) {
    size_t comma = rest.find(',', pos);
    if (comma == std::string::npos) comma = rest.size();
    const std::string part = rest.substr(pos, comma - pos);
    pos = comma + 1;
    if (strip(part).empty()) continue;
    std::string key, val;
    const size_t eq = part.find('=');
    if (eq == std::string::npos) {
      if (index >= fields.size()) {
        return policy_error(head + ": too many values in '" + text + "'; it takes " + list(fields));
      }
      key = fields[index];
      val = part;
    } else {
      key = strip(part.substr(0, eq));
      val = part.substr(eq + 1);
    }
    ++index;
    int64_t v = 0;
    if (key == "linear_after" || key == "increment") {
      auto b = parse_bytes(val);
      if (!b.ok()) return b.status();
      v = b.get();
    } else if (!parse_int(val, &v)) {
      return policy_error(head + ": " + key + " must be an integer, got '" + val + "'");
    }
    if (key == "initial_positions" && p.kind == Kind::Doubling) p.initial_positions = v;
    else if (key == "step" && p.kind == Kind::Step) p.step = v;
    else if (key == "start" && p.kind == Kind::Hybrid) p.start = v;
    else if (key == "linear_after" && p.kind == Kind::Hybrid) p.linear_after = v;
    else if (key == "increment" && p.kind == Kind::Hybrid) p.increment = v;
    else return policy_error(head + ": unknown parameter '" + key + "'; it takes " + list(fields));
  }
  if (p.kind == Kind::Doubling && p.initial_positions < 1) {
    return policy_error("doubling: initial_positions must be >= 1, got " + std::to_string(p.initial_positions));
  }
  if (p.kind == Kind::Step && p.step < 1) {
    return policy_error("step: the step must be >= 1 position, got " + std::to_string(p.step) + " (e.g. step:256)");
  }
  if (p.kind == Kind::Hybrid && (p.start < 1 || p.linear_after < 0 || p.increment < 1)) {
    return policy_error("hybrid: need start >= 1, linear_after >= 0, increment >= 1 byte; got start=" +
                        std::to_string(p.start) + ", linear_after=" + std::to_string(p.linear_after) +
                        ", increment=" + std::to_string(p.increment));
  }
  return p;
}

const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::Ok: return "Ok";
    case ErrorKind::InvalidProgram: return "InvalidProgram";
    case ErrorKind::ManifestError: return "ManifestError";
    case ErrorKind::ProgramRejected: return "ProgramRejected";
    case ErrorKind::InvalidInput: return "InvalidInput";
    case ErrorKind::UnknownMethod: return "UnknownMethod";
    case ErrorKind::ContextOverflow: return "ContextOverflow";
    case ErrorKind::MemoryBudgetExceeded: return "MemoryBudgetExceeded";
    case ErrorKind::AllocationFailed: return "AllocationFailed";
    case ErrorKind::ExecutionFailed: return "ExecutionFailed";
    case ErrorKind::SessionClosed: return "SessionClosed";
    case ErrorKind::SessionFileError: return "SessionFileError";
    case ErrorKind::PolicyError: return "PolicyError";
    case ErrorKind::IoError: return "IoError";
  }
  return "Unknown";
}

std::string Status::to_string() const {
  return ok() ? std::string("Ok") : std::string(error_kind_name(kind_)) + ": " + message_;
}

}  // namespace lazykv
