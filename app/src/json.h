// A JSON value tree read through TVM FFI's parser (tvm/ffi/extra/json.h), and a writer
// whose output reads like Python's json.dumps(indent=1).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace sam3 {

struct JValue {
  enum Kind { kNull, kBool, kInt, kDouble, kString, kArray, kObject };
  Kind kind = kNull;
  bool b = false;
  int64_t i = 0;
  double d = 0;
  std::string s;
  std::vector<JValue> array;
  std::map<std::string, JValue> object;  // sorted keys (the parser's map keeps no order)

  bool is_number() const { return kind == kInt || kind == kDouble; }
  double number() const { return kind == kInt ? static_cast<double>(i) : d; }
  // object member or nullptr
  const JValue* get(const std::string& key) const;
};

// Parses `text`; throws std::runtime_error with the parser's message.
JValue ParseJson(const std::string& text);
// Reads and parses a file; `what` names it in errors (throws std::runtime_error).
JValue ReadJsonFile(const std::string& path);

// Structural equality (numbers compared by value, so 1 == 1.0).
bool JsonEqual(const JValue& a, const JValue& b);
// Leaves as dotted keys ("vision.backbone.image_size" -> value), as the Python runtime's
// config diff lists them.
void FlattenJson(const JValue& v, const std::string& prefix, std::map<std::string, const JValue*>* out);
// Compact rendering of a value for messages (Python repr-like enough: strings quoted).
std::string JsonRepr(const JValue& v);

// Output: a tiny streaming writer with Python json.dumps(indent=1, ensure_ascii=True) layout.
class JsonWriter {
 public:
  explicit JsonWriter(int indent = 1) : indent_(indent) {}
  JsonWriter& BeginObject();
  JsonWriter& EndObject();
  JsonWriter& BeginArray();
  JsonWriter& EndArray();
  JsonWriter& Key(const std::string& key);
  JsonWriter& String(const std::string& utf8);
  JsonWriter& Int(int64_t v);
  JsonWriter& Double(double v);  // shortest round-trip digits, "20.0" for integral values
  JsonWriter& Null();
  JsonWriter& Bool(bool v);
  const std::string& str() const { return out_; }

 private:
  void BeforeValue();
  void Newline();
  struct Level {
    bool array;
    int count;
  };
  std::vector<Level> stack_;
  std::string out_;
  int indent_;
  bool after_key_ = false;
};

// Python's repr of a float: shortest round-trip digits, "20.0", "inf", "nan".
std::string PyFloatRepr(double v);

// Python's round(x, digits): the decimal nearest to x's exact binary value (ties to even),
// read back as the nearest double.
double RoundDecimal(double x, int digits);

}  // namespace sam3
