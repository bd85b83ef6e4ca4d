#include "json.h"

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/string.h>

#include <charconv>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace sam3 {

namespace ffi = tvm::ffi;

const JValue* JValue::get(const std::string& key) const {
  if (kind != kObject) return nullptr;
  auto it = object.find(key);
  return it == object.end() ? nullptr : &it->second;
}

static JValue Convert(const ffi::Any& v) {
  JValue out;
  switch (v.type_index()) {
    case ffi::TypeIndex::kTVMFFINone:
      return out;
    case ffi::TypeIndex::kTVMFFIBool:
      out.kind = JValue::kBool;
      out.b = v.cast<bool>();
      return out;
    case ffi::TypeIndex::kTVMFFIInt:
      out.kind = JValue::kInt;
      out.i = v.cast<int64_t>();
      return out;
    case ffi::TypeIndex::kTVMFFIFloat:
      out.kind = JValue::kDouble;
      out.d = v.cast<double>();
      return out;
    default:
      break;
  }
  if (auto s = v.try_cast<ffi::String>()) {
    out.kind = JValue::kString;
    out.s = std::string(*s);
  } else if (auto a = v.try_cast<ffi::Array<ffi::Any>>()) {
    out.kind = JValue::kArray;
    for (const ffi::Any& e : *a) out.array.push_back(Convert(e));
  } else if (auto m = v.try_cast<ffi::Map<ffi::Any, ffi::Any>>()) {
    out.kind = JValue::kObject;
    for (const auto& kv : *m) out.object[std::string(kv.first.cast<ffi::String>())] = Convert(kv.second);
  } else {
    throw std::runtime_error("unexpected JSON value of type " + v.GetTypeKey());
  }
  return out;
}

JValue ParseJson(const std::string& text) {
  ffi::String error;
  ffi::Any v = ffi::json::Parse(ffi::String(text), &error);
  if (!error.empty()) throw std::runtime_error(std::string(error));
  return Convert(v);
}

JValue ReadJsonFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ParseJson(ss.str());
}

bool JsonEqual(const JValue& a, const JValue& b) {
  if (a.is_number() && b.is_number()) return a.number() == b.number();
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case JValue::kNull:
      return true;
    case JValue::kBool:
      return a.b == b.b;
    case JValue::kString:
      return a.s == b.s;
    case JValue::kArray:
      if (a.array.size() != b.array.size()) return false;
      for (size_t i = 0; i < a.array.size(); ++i)
        if (!JsonEqual(a.array[i], b.array[i])) return false;
      return true;
    case JValue::kObject:
      if (a.object.size() != b.object.size()) return false;
      for (const auto& kv : a.object) {
        const JValue* o = b.get(kv.first);
        if (!o || !JsonEqual(kv.second, *o)) return false;
      }
      return true;
    default:
      return false;
  }
}

void FlattenJson(const JValue& v, const std::string& prefix, std::map<std::string, const JValue*>* out) {
  if (v.kind == JValue::kObject) {
    for (const auto& kv : v.object) FlattenJson(kv.second, prefix + kv.first + ".", out);
  } else {
    (*out)[prefix.empty() ? prefix : prefix.substr(0, prefix.size() - 1)] = &v;
  }
}

static std::string FormatDouble(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), v);
  std::string s(buf, res.ptr);
  if (s.find_first_of(".eE") == std::string::npos) s += ".0";
  return s;
}

std::string PyFloatRepr(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  return FormatDouble(v);
}

std::string JsonRepr(const JValue& v) {
  switch (v.kind) {
    case JValue::kNull:
      return "None";
    case JValue::kBool:
      return v.b ? "True" : "False";
    case JValue::kInt:
      return std::to_string(v.i);
    case JValue::kDouble:
      return FormatDouble(v.d);
    case JValue::kString:
      return "'" + v.s + "'";
    case JValue::kArray: {
      std::string s = "[";
      for (size_t i = 0; i < v.array.size(); ++i) s += (i ? ", " : "") + JsonRepr(v.array[i]);
      return s + "]";
    }
    case JValue::kObject: {
      std::string s = "{";
      bool first = true;
      for (const auto& kv : v.object) {
        s += (first ? "'" : ", '") + kv.first + "': " + JsonRepr(kv.second);
        first = false;
      }
      return s + "}";
    }
  }
  return "?";
}

double RoundDecimal(double x, int digits) {
  if (!std::isfinite(x)) return x;
  char buf[512];
  std::snprintf(buf, sizeof(buf), "%.*f", digits, x);  // glibc/libc: exact, ties to even
  return std::strtod(buf, nullptr);
}

// ---- writer ----------------------------------------------------------------------------
void JsonWriter::Newline() {
  out_ += '\n';
  out_.append(stack_.size() * indent_, ' ');
}

void JsonWriter::BeforeValue() {
  if (after_key_) {
    after_key_ = false;
    return;
  }
  if (stack_.empty()) return;
  if (stack_.back().count++) out_ += ',';
  Newline();
}

JsonWriter& JsonWriter::BeginObject() {
  BeforeValue();
  out_ += '{';
  stack_.push_back({false, 0});
  return *this;
}

JsonWriter& JsonWriter::EndObject() {
  bool any = stack_.back().count > 0;
  stack_.pop_back();
  if (any) Newline();
  out_ += '}';
  return *this;
}

JsonWriter& JsonWriter::EndArray() {
  bool any = stack_.back().count > 0;
  stack_.pop_back();
  if (any) Newline();
  out_ += ']';
  return *this;
}

JsonWriter& JsonWriter::BeginArray() {
  BeforeValue();
  out_ += '[';
  stack_.push_back({true, 0});
  return *this;
}

static void AppendEscaped(std::string* out, const std::string& s) {
  // ensure_ascii: non-ASCII as \uXXXX (UTF-16 surrogate pairs above the BMP), as Python writes
  *out += '"';
  size_t i = 0;
  while (i < s.size()) {
    unsigned char c = s[i];
    uint32_t cp = c;
    int n = 1;
    if (c >= 0xF0 && i + 3 < s.size()) {
      cp = ((c & 0x07) << 18) | ((s[i + 1] & 0x3F) << 12) | ((s[i + 2] & 0x3F) << 6) | (s[i + 3] & 0x3F);
      n = 4;
    } else if (c >= 0xE0 && i + 2 < s.size()) {
      cp = ((c & 0x0F) << 12) | ((s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F);
      n = 3;
    } else if (c >= 0xC0 && i + 1 < s.size()) {
      cp = ((c & 0x1F) << 6) | (s[i + 1] & 0x3F);
      n = 2;
    }
    i += n;
    char buf[16];
    switch (cp) {
      case '"': *out += "\\\""; continue;
      case '\\': *out += "\\\\"; continue;
      case '\n': *out += "\\n"; continue;
      case '\r': *out += "\\r"; continue;
      case '\t': *out += "\\t"; continue;
      case '\b': *out += "\\b"; continue;
      case '\f': *out += "\\f"; continue;
      default: break;
    }
    if (cp >= 0x20 && cp < 0x7F) {
      *out += static_cast<char>(cp);
    } else if (cp >= 0x10000) {
      uint32_t v = cp - 0x10000;
      std::snprintf(buf, sizeof(buf), "\\u%04x\\u%04x", 0xD800 + (v >> 10), 0xDC00 + (v & 0x3FF));
      *out += buf;
    } else {
      std::snprintf(buf, sizeof(buf), "\\u%04x", cp);
      *out += buf;
    }
  }
  *out += '"';
}

JsonWriter& JsonWriter::Key(const std::string& key) {
  BeforeValue();
  AppendEscaped(&out_, key);
  out_ += ": ";
  after_key_ = true;
  return *this;
}

JsonWriter& JsonWriter::String(const std::string& utf8) {
  BeforeValue();
  AppendEscaped(&out_, utf8);
  return *this;
}

JsonWriter& JsonWriter::Int(int64_t v) {
  BeforeValue();
  out_ += std::to_string(v);
  return *this;
}

JsonWriter& JsonWriter::Double(double v) {
  BeforeValue();
  out_ += FormatDouble(v);
  return *this;
}

JsonWriter& JsonWriter::Null() {
  BeforeValue();
  out_ += "null";
  return *this;
}

JsonWriter& JsonWriter::Bool(bool v) {
  BeforeValue();
  out_ += v ? "true" : "false";
  return *this;
}

}  // namespace sam3
