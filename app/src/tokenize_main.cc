// sam3-tokenize: the app's tokenizer on prompts read from stdin, one JSON string per line;
// prints one JSON object per line: {"input_ids": [...], "attention_mask": [...]} or
// {"error": "..."}. The tests compare it with sam3_nn.runtime.tokenizer.Sam3Tokenizer. With --clean
// it prints each prompt after the cleanup instead (a JSON string; sam3_nn.runtime.tokenizer.clean).
//
//   sam3-tokenize --tokenizer sam3_nn/runtime/data/bpe_simple_vocab_16e6.txt.gz [--context 32]
//   sam3-tokenize --clean
#include <algorithm>
#include <iostream>
#include <string>

#include "json.h"
#include "sam3/sam3.h"

int main(int argc, char** argv) {
  std::string path;
  int context = 32;
  bool clean = false;
  for (int i = 1; i < argc; ++i) {
    std::string f = argv[i];
    if (f == "--clean") {
      clean = true;
      continue;
    }
    if (i + 1 >= argc) {
      std::cerr << "error: " << f << " needs a value\n";
      return 2;
    }
    if (f == "--tokenizer") path = argv[++i];
    else if (f == "--context") context = std::stoi(argv[++i]);
    else {
      std::cerr << "error: unrecognized argument " << f << "\n";
      return 2;
    }
  }
  if (clean) {
    std::string line;
    while (std::getline(std::cin, line)) {
      if (line.empty()) continue;
      sam3::JsonWriter w(0);
      try {
        w.String(sam3::Tokenizer::Clean(sam3::ParseJson(line).s));
      } catch (const std::exception& e) {
        w = sam3::JsonWriter(0);
        w.BeginObject().Key("error").String(e.what()).EndObject();
      }
      std::cout << w.str() << "\n";
    }
    return 0;
  }
  if (path.empty()) {
    std::cerr << "usage: sam3-tokenize --tokenizer T [--context N] < prompts (one JSON string per line)\n"
                 "       sam3-tokenize --clean < prompts\n";
    return 2;
  }
  try {
    sam3::Tokenizer tok = sam3::Tokenizer::Load(path);
    std::string line;
    while (std::getline(std::cin, line)) {
      if (line.empty()) continue;
      sam3::JsonWriter w(0);
      w.BeginObject();
      try {
        sam3::JValue prompt = sam3::ParseJson(line);
        sam3::Tokenizer::Encoding e = tok.Encode(prompt.s, context);
        w.Key("input_ids").BeginArray();
        for (int32_t v : e.input_ids) w.Int(v);
        w.EndArray().Key("attention_mask").BeginArray();
        for (int32_t v : e.attention_mask) w.Int(v);
        w.EndArray();
      } catch (const std::exception& e) {
        w.Key("error").String(e.what());
      }
      w.EndObject();
      std::string out = w.str();
      out.erase(std::remove(out.begin(), out.end(), '\n'), out.end());
      std::cout << out << "\n";
    }
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
  return 0;
}
