// A small JSON reader and writer for the two documents lazykv keeps as JSON: the
// manifest inside a `.pte` (written by Python's `json.dumps`) and a session file's
// header. Depth- and size-limited; a malformed document throws `JsonError`.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace lazykv {
namespace json {

struct JsonError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// One JSON value. Numbers keep whether they were written as integers.
struct Value {
  enum class Type { Null, Bool, Int, Double, String, Array, Object };
  Type type = Type::Null;
  bool b = false;
  int64_t i = 0;
  double d = 0;
  std::string s;
  std::vector<Value> a;
  std::map<std::string, Value> o;

  bool is_int() const { return type == Type::Int; }
  bool is_string() const { return type == Type::String; }
  bool is_array() const { return type == Type::Array; }
  bool is_object() const { return type == Type::Object; }
  /// Member `key` of an object, or nullptr.
  const Value* get(const std::string& key) const;
  /// Member `key`, which must exist and be of `want`'s type (throws JsonError naming it).
  const Value& need(const std::string& key, Type want) const;
};

/// Parse a whole document (trailing whitespace only).
Value parse(const std::string& text);
/// A JSON string literal of `s` (quotes and escapes; non-ASCII bytes pass through).
std::string quote(const std::string& s);

}  // namespace json
}  // namespace lazykv
