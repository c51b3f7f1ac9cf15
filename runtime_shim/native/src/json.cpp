#include "json.h"

#include <cerrno>
#include <cstdlib>
#include <cstdio>
#include <cstring>

namespace lazykv {
namespace json {

namespace {

constexpr int kMaxDepth = 64;

const char* type_name(Value::Type t) {
  switch (t) {
    case Value::Type::Null: return "null";
    case Value::Type::Bool: return "a bool";
    case Value::Type::Int: return "an integer";
    case Value::Type::Double: return "a number";
    case Value::Type::String: return "a string";
    case Value::Type::Array: return "an array";
    case Value::Type::Object: return "an object";
  }
  return "?";
}

class Parser {
 public:
  explicit Parser(const std::string& text) : p_(text.data()), end_(text.data() + text.size()) {}

  Value document() {
    Value v = value(0);
    ws();
    if (p_ != end_) {
      fail("trailing characters");
    }
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& what) {
    throw JsonError("invalid JSON: " + what);
  }
  void ws() {
    while (p_ != end_ && (*p_ == ' ' || *p_ == '\n' || *p_ == '\r' || *p_ == '\t')) {
      ++p_;
    }
  }
  bool literal(const char* word) {
    const size_t n = std::strlen(word);
    if (static_cast<size_t>(end_ - p_) >= n && std::memcmp(p_, word, n) == 0) {
      p_ += n;
      return true;
    }
    return false;
  }

  Value value(int depth) {
    if (depth > kMaxDepth) {
      fail("nested too deeply");
    }
    ws();
    if (p_ == end_) {
      fail("unexpected end");
    }
    Value v;
    const char c = *p_;
    if (c == '{') {
      ++p_;
      v.type = Value::Type::Object;
      ws();
      if (p_ != end_ && *p_ == '}') {
        ++p_;
        return v;
      }
      while (true) {
        ws();
        if (p_ == end_ || *p_ != '"') {
          fail("expected a key");
        }
        std::string key = string();
        ws();
        if (p_ == end_ || *p_ != ':') {
          fail("expected ':'");
        }
        ++p_;
        v.o[key] = value(depth + 1);
        ws();
        if (p_ != end_ && *p_ == ',') {
          ++p_;
          continue;
        }
        if (p_ != end_ && *p_ == '}') {
          ++p_;
          return v;
        }
        fail("expected ',' or '}'");
      }
    }
    if (c == '[') {
      ++p_;
      v.type = Value::Type::Array;
      ws();
      if (p_ != end_ && *p_ == ']') {
        ++p_;
        return v;
      }
      while (true) {
        v.a.push_back(value(depth + 1));
        ws();
        if (p_ != end_ && *p_ == ',') {
          ++p_;
          continue;
        }
        if (p_ != end_ && *p_ == ']') {
          ++p_;
          return v;
        }
        fail("expected ',' or ']'");
      }
    }
    if (c == '"') {
      v.type = Value::Type::String;
      v.s = string();
      return v;
    }
    if (literal("true")) {
      v.type = Value::Type::Bool;
      v.b = true;
      return v;
    }
    if (literal("false")) {
      v.type = Value::Type::Bool;
      return v;
    }
    if (literal("null")) {
      return v;
    }
    return number();
  }

  Value number() {
    const char* start = p_;
    bool is_int = true;
    if (p_ != end_ && *p_ == '-') {
      ++p_;
    }
    if (p_ == end_ || !(*p_ >= '0' && *p_ <= '9')) {
      fail("unexpected character");
    }
    while (p_ != end_ && ((*p_ >= '0' && *p_ <= '9') || *p_ == '.' || *p_ == 'e' || *p_ == 'E' ||
                          *p_ == '+' || *p_ == '-')) {
      if (*p_ == '.' || *p_ == 'e' || *p_ == 'E') {
        is_int = false;
      }
      ++p_;
    }
    const std::string text(start, p_);
    Value v;
    errno = 0;
    char* stop = nullptr;
    if (is_int) {
      v.type = Value::Type::Int;
      v.i = std::strtoll(text.c_str(), &stop, 10);
    } else {
      v.type = Value::Type::Double;
      v.d = std::strtod(text.c_str(), &stop);
    }
    if (errno != 0 || stop != text.c_str() + text.size()) {
      fail("bad number '" + text + "'");
    }
    return v;
  }

  unsigned hex4() {
    if (end_ - p_ < 4) {
      fail("short \\u escape");
    }
    unsigned u = 0;
    for (int k = 0; k < 4; ++k) {
      const char h = *p_++;
      u <<= 4;
      if (h >= '0' && h <= '9') u |= static_cast<unsigned>(h - '0');
      else if (h >= 'a' && h <= 'f') u |= static_cast<unsigned>(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F') u |= static_cast<unsigned>(h - 'A' + 10);
      else fail("bad \\u escape");
    }
    return u;
  }

  static void utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  std::string string() {
    ++p_;  // opening quote
    std::string out;
    while (true) {
      if (p_ == end_) {
        fail("unterminated string");
      }
      const char c = *p_++;
      if (c == '"') {
        return out;
      }
      if (static_cast<unsigned char>(c) < 0x20) {
        fail("control character in a string");
      }
      if (c != '\\') {
        out += c;
        continue;
      }
      if (p_ == end_) {
        fail("unterminated escape");
      }
      const char e = *p_++;
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && end_ - p_ >= 6 && p_[0] == '\\' && p_[1] == 'u') {
            p_ += 2;
            const unsigned lo = hex4();
            if (lo >= 0xDC00 && lo < 0xE000) {
              cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else {
              fail("bad surrogate pair");
            }
          }
          utf8(out, cp);
          break;
        }
        default:
          fail("bad escape");
      }
    }
  }

  const char* p_;
  const char* end_;
};

}  // namespace

const Value* Value::get(const std::string& key) const {
  if (type != Type::Object) {
    return nullptr;
  }
  auto it = o.find(key);
  return it == o.end() ? nullptr : &it->second;
}

const Value& Value::need(const std::string& key, Type want) const {
  const Value* v = get(key);
  if (v == nullptr) {
    throw JsonError("missing key '" + key + "'");
  }
  if (v->type != want) {
    throw JsonError("'" + key + "' is " + type_name(v->type) + ", expected " + type_name(want));
  }
  return *v;
}

Value parse(const std::string& text) {
  return Parser(text).document();
}

std::string quote(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", static_cast<unsigned>(static_cast<unsigned char>(c)));
          out += buf;
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

}  // namespace json
}  // namespace lazykv
