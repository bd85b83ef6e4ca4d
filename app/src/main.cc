// sam3-segment: the `python -m sam3_nn segment` command line without Python.
//
//   sam3-segment --library dist/sam3-llvm.so --weights weights/sam3.safetensors \
//       --tokenizer sam3_nn/runtime/data/bpe_simple_vocab_16e6.txt.gz --image photo.jpg --text "cat" \
//       [--box x0,y0,x1,y1[:neg]]... --output out/ [--device cpu|cuda|metal]
//
// writes out/photo.json (the Python CLI's JSON: boxes, scores, COCO RLE masks) and
// out/photo.png (overlay). User errors: "error: ..." on stderr, exit status 2, no output.
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <set>

#include "internal.h"
#include "json.h"
#include "sam3/sam3.h"

using namespace sam3;
using Clock = std::chrono::steady_clock;

namespace {

const char* kUsage =
    "usage: sam3-segment --library L --weights W --image I (--text S | --box x0,y0,x1,y1[:neg] ...)\n"
    "                    --output DIR [--tokenizer T] [--device cpu|cuda|metal]\n"
    "                    [--score-threshold F] [--mask-threshold F] [--no-overlay]\n"
    "\n"
    "  --library L     compiled library (sam3-<target>.so/.dylib) with its .json manifest beside it\n"
    "  --weights W     converted .safetensors (python -m sam3_nn convert SRC L OUT)\n"
    "  --image I       an image file (JPEG, PNG) or a folder of images\n"
    "  --text S        text prompt (a noun phrase: \"cat\", \"red car\")\n"
    "  --box B         box prompt in pixels, x0,y0,x1,y1 (':neg' marks a negative box); repeatable\n"
    "  --output DIR    folder for <image>.json and <image>.png\n"
    "  --tokenizer T   CLIP's bpe_simple_vocab_16e6.txt.gz (sam3_nn/runtime/data/) or a folder with vocab.json +\n"
    "                  merges.txt (default: looked for beside the weights and the library)\n"
    "  --device D      cpu, cuda or metal (default: the library's target)\n"
    "  --score-threshold F  keep objects whose score (detection x presence) exceeds F (default 0.5)\n"
    "  --mask-threshold F   mask pixels whose probability exceeds F (default 0.5)\n"
    "  --no-overlay    write the JSON only\n";

const char* kImageExts[] = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"};

class CliError : public Error {
 public:
  using Error::Error;
};

struct Args {
  std::string library, weights, image, output, tokenizer, device;
  bool has_text = false, overlay = true;
  std::string text;
  std::vector<std::string> boxes;
  // the Python CLI's defaults: the original Sam3Processor's confidence threshold, and 0.5 on masks
  double score_threshold = 0.5, mask_threshold = 0.5;
};

void Log(const std::string& s) { std::cout << s << std::endl; }

std::string Fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.*f", digits, v);
  return buf;
}

bool IsDir(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool IsFile(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool Exists(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0;
}

std::string Lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string Basename(const std::string& p) {
  size_t s = p.find_last_of('/');
  return s == std::string::npos ? p : p.substr(s + 1);
}

std::string Dirname(const std::string& p) {
  size_t s = p.find_last_of('/');
  return s == std::string::npos ? "." : (s == 0 ? "/" : p.substr(0, s));
}

std::string Stem(const std::string& p) {
  std::string b = Basename(p);
  size_t start = b.find_first_not_of('.');
  size_t dot = b.find_last_of('.');
  return dot == std::string::npos || start == std::string::npos || dot <= start ? b : b.substr(0, dot);
}

// os.path.abspath: absolute and normalised, symbolic links kept
std::string AbsPath(const std::string& p) {
  std::string path = p;
  if (path.empty() || path[0] != '/') {
    char buf[PATH_MAX];
    if (getcwd(buf, sizeof(buf))) path = std::string(buf) + "/" + path;
  }
  std::vector<std::string> parts;
  size_t i = 0;
  while (i <= path.size()) {
    size_t j = path.find('/', i);
    if (j == std::string::npos) j = path.size();
    std::string part = path.substr(i, j - i);
    if (part == "..") {
      if (!parts.empty()) parts.pop_back();
    } else if (!part.empty() && part != ".") {
      parts.push_back(part);
    }
    i = j + 1;
  }
  std::string out;
  for (const auto& part : parts) out += "/" + part;
  return out.empty() ? "/" : out;
}

// Python's repr of a str (for messages): single quotes
std::string Repr(const std::string& s) { return "'" + s + "'"; }

bool PyStripEmpty(const std::string& s) {
  std::u32string u;
  if (!DecodeUtf8(s, &u)) return false;
  for (char32_t c : u)
    if (!(c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F) || c == 0x85 || c == 0xA0 ||
          c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
          c == 0x205F || c == 0x3000))
      return false;
  return true;
}

// Python's float(): decimal notation, inf, nan (not C's hexadecimal floats)
bool ParseFloat(const std::string& s, double* out) {
  if (s.empty() || s.find_first_of("xX") != std::string::npos) return false;
  char* end = nullptr;
  errno = 0;
  double v = std::strtod(s.c_str(), &end);
  if (end != s.c_str() + s.size()) return false;
  *out = v;
  return true;
}

std::string Strip(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\n\r\f\v"), e = s.find_last_not_of(" \t\n\r\f\v");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

// "x0,y0,x1,y1" or "x0,y0,x1,y1:neg" (":pos" too), as sam3_nn.runtime.preprocess.parse_box
Box ParseBox(const std::string& text) {
  size_t colon = text.find(':');
  std::string spec = text.substr(0, colon);
  std::string kind = colon == std::string::npos ? "" : Lower(Strip(text.substr(colon + 1)));
  if (kind.empty()) kind = "pos";
  if (kind != "pos" && kind != "neg")
    throw CliError("--box: box " + Repr(text) + ": label must be ':pos' or ':neg', got " + Repr(kind));
  std::vector<std::string> parts;
  size_t i = 0;
  while (true) {
    size_t j = spec.find(',', i);
    parts.push_back(Strip(spec.substr(i, j == std::string::npos ? std::string::npos : j - i)));
    if (j == std::string::npos) break;
    i = j + 1;
  }
  if (parts.size() != 4)
    throw CliError("--box: box " + Repr(text) + ": expected x0,y0,x1,y1 (4 numbers), got " +
                   std::to_string(parts.size()) + " values");
  double v[4];
  for (int k = 0; k < 4; ++k)
    if (!ParseFloat(parts[k], &v[k]))
      throw CliError("--box: box " + Repr(text) + ": not a number (could not convert string to float: " +
                     Repr(parts[k]) + ")");
  return Box{v[0], v[1], v[2], v[3], kind == "pos" ? 1 : 0};
}

std::vector<std::string> ListImages(const std::string& path) {
  if (IsDir(path)) {
    std::vector<std::string> files;
    if (DIR* d = opendir(path.c_str())) {
      while (dirent* e = readdir(d)) {
        std::string name = e->d_name, lower = Lower(name), full = path + "/" + name;
        for (const char* ext : kImageExts) {
          size_t n = std::strlen(ext);
          if (lower.size() >= n && lower.compare(lower.size() - n, n, ext) == 0 && IsFile(full)) {
            files.push_back(full);
            break;
          }
        }
      }
      closedir(d);
    }
    std::sort(files.begin(), files.end());
    if (files.empty()) {
      std::string exts;
      for (const char* e : kImageExts) exts += (exts.empty() ? "" : ", ") + std::string(e);
      throw CliError("--image " + path + ": folder holds no images (" + exts + ")");
    }
    return files;
  }
  if (!IsFile(path)) throw CliError("--image " + path + ": no such file or folder");
  return {path};
}

// The tokenizer given, else one beside the weights or the library (as the Python runtime
// looks for tokenizer files there): a vocab.json + merges.txt folder or CLIP's .gz.
std::string FindTokenizer(const Args& a) {
  if (!a.tokenizer.empty()) return a.tokenizer;
  for (const std::string& dir : {IsDir(a.weights) ? a.weights : Dirname(AbsPath(a.weights)), Dirname(AbsPath(a.library))}) {
    if (IsFile(dir + "/vocab.json") && IsFile(dir + "/merges.txt")) return dir;
    if (IsFile(dir + "/bpe_simple_vocab_16e6.txt.gz")) return dir + "/bpe_simple_vocab_16e6.txt.gz";
  }
  throw CliError("prompts need SAM 3's tokenizer, and none was found beside the weights or the library: pass "
                 "--tokenizer (CLIP's bpe_simple_vocab_16e6.txt.gz, shipped as sam3_nn/runtime/data/"
                 "bpe_simple_vocab_16e6.txt.gz, or an HF snapshot folder with vocab.json + merges.txt)");
}

// a temporary file in the same folder, renamed when complete: no partial output
template <typename F>
void AtomicWrite(const std::string& path, F write) {
  std::string dir = Dirname(path);
  // create the folder (and its parents) as os.makedirs
  std::string acc = dir[0] == '/' ? "" : ".";
  size_t i = 0;
  while (i <= dir.size()) {
    size_t j = dir.find('/', i);
    if (j == std::string::npos) j = dir.size();
    std::string part = dir.substr(i, j - i);
    if (!part.empty()) {
      acc += "/" + part;
      if (!IsDir(acc) && mkdir(acc.c_str(), 0777) != 0 && errno != EEXIST)
        throw Error("cannot create folder " + acc + ": " + std::strerror(errno));
    }
    i = j + 1;
  }
  std::string tmp = dir + "/.tmp-" + std::to_string(getpid()) + "-" + Basename(path);
  try {
    write(tmp);
    if (std::rename(tmp.c_str(), path.c_str()) != 0) throw Error("cannot write " + path + ": " + std::strerror(errno));
  } catch (...) {
    std::remove(tmp.c_str());
    throw;
  }
}

void WriteResultJson(const std::string& path, const std::string& image, const Detections& det, const Args& a,
                     const std::vector<Box>& boxes, const std::vector<std::pair<std::string, double>>& timings,
                     int dropped) {
  JsonWriter w(1);
  w.BeginObject();
  w.Key("image").String(AbsPath(image));
  w.Key("height").Int(det.height);
  w.Key("width").Int(det.width);
  w.Key("prompt").BeginObject();
  w.Key("text");
  if (a.has_text) w.String(a.text); else w.Null();
  w.Key("boxes");
  if (boxes.empty()) {
    w.Null();
  } else {
    w.BeginArray();
    for (const Box& b : boxes) w.BeginArray().Double(b.x0).Double(b.y0).Double(b.x1).Double(b.y1).EndArray();
    w.EndArray();
  }
  w.Key("box_labels");
  if (boxes.empty()) {
    w.Null();
  } else {
    w.BeginArray();
    for (const Box& b : boxes) w.Int(b.label);
    w.EndArray();
  }
  w.Key("text_tokens_dropped").Int(dropped);
  w.EndObject();
  w.Key("library").String(AbsPath(a.library));
  w.Key("weights").String(AbsPath(a.weights));
  w.Key("score_threshold").Double(a.score_threshold);
  w.Key("mask_threshold").Double(a.mask_threshold);
  w.Key("box_format").String("xyxy pixels");
  w.Key("mask_format").String("COCO RLE (column-major, compressed counts)");
  w.Key("objects").BeginArray();
  for (size_t k = 0; k < det.scores.size(); ++k) {
    int64_t area = 0;
    for (uint8_t v : det.masks[k]) area += v;
    w.BeginObject();
    w.Key("box").BeginArray();
    for (float v : det.boxes[k]) w.Double(RoundDecimal(v, 2));
    w.EndArray();
    w.Key("score").Double(RoundDecimal(det.scores[k], 5));
    w.Key("query").Int(det.query_index[k]);
    w.Key("area").Int(area);
    w.Key("segmentation").BeginObject();
    w.Key("size").BeginArray().Int(det.height).Int(det.width).EndArray();
    w.Key("counts").String(RleString(det.masks[k].data(), det.height, det.width));
    w.EndObject();
    w.EndObject();
  }
  w.EndArray();
  w.Key("timings_s").BeginObject();
  for (const auto& kv : timings) w.Key(kv.first).Double(RoundDecimal(kv.second, 4));
  w.EndObject();
  w.EndObject();
  AtomicWrite(path, [&](const std::string& tmp) {
    std::ofstream f(tmp, std::ios::binary);
    f << w.str();
    if (!f.flush()) throw Error("cannot write " + path);
  });
}

Args ParseArgs(int argc, char** argv) {
  Args a;
  std::set<std::string> seen;
  auto value = [&](int& i, const std::string& flag) -> std::string {
    if (i + 1 >= argc) throw CliError("argument " + flag + ": expected one argument");
    return argv[++i];
  };
  for (int i = 1; i < argc; ++i) {
    std::string f = argv[i];
    std::string inline_value;
    bool has_inline = false;
    if (f.rfind("--", 0) == 0 && f.find('=') != std::string::npos) {
      inline_value = f.substr(f.find('=') + 1);
      f = f.substr(0, f.find('='));
      has_inline = true;
    }
    auto get = [&]() { return has_inline ? inline_value : value(i, f); };
    if (f == "-h" || f == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (f == "--library") {
      a.library = get();
    } else if (f == "--weights") {
      a.weights = get();
    } else if (f == "--image") {
      a.image = get();
    } else if (f == "--output") {
      a.output = get();
    } else if (f == "--tokenizer") {
      a.tokenizer = get();
    } else if (f == "--device") {
      a.device = get();
    } else if (f == "--text") {
      a.text = get();
      a.has_text = true;
    } else if (f == "--box") {
      a.boxes.push_back(get());
    } else if (f == "--score-threshold" || f == "--mask-threshold") {
      std::string v = get();
      double d;
      if (!ParseFloat(Strip(v), &d)) throw CliError("argument " + f + ": invalid float value: " + Repr(v));
      (f == "--score-threshold" ? a.score_threshold : a.mask_threshold) = d;
    } else if (f == "--no-overlay") {
      a.overlay = false;
    } else {
      throw CliError("unrecognized arguments: " + f);
    }
    seen.insert(f);
  }
  std::vector<std::string> missing;
  for (const char* r : {"--library", "--weights", "--image", "--output"})
    if (!seen.count(r)) missing.push_back(r);
  if (!missing.empty()) {
    std::string m;
    for (const auto& s : missing) m += (m.empty() ? "" : ", ") + s;
    throw CliError("the following arguments are required: " + m);
  }
  return a;
}

int Segment(const Args& a) {
  // everything that can be checked before the (slow) load is checked first
  if (a.has_text && PyStripEmpty(a.text)) throw CliError("--text is empty");
  if (a.has_text) {
    std::u32string u;
    if (!DecodeUtf8(a.text, &u)) throw CliError("--text is not valid UTF-8");
  }
  std::vector<Box> boxes;
  for (const auto& b : a.boxes) boxes.push_back(ParseBox(b));
  if (!a.has_text && boxes.empty()) throw CliError("no prompt: give --text \"...\" and/or --box x0,y0,x1,y1[:neg]");
  std::vector<std::string> images = ListImages(a.image);
  std::vector<std::string> stems;
  std::set<std::string> dup;
  for (const auto& p : images) {
    std::string s = Stem(p);
    if (std::find(stems.begin(), stems.end(), s) != stems.end()) dup.insert(s);
    stems.push_back(s);
  }
  if (!dup.empty()) {
    std::string d;
    for (const auto& s : dup) d += (d.empty() ? "" : ", ") + s;
    throw CliError("images with the same name would overwrite each other's outputs: " + d);
  }
  for (const auto& p : images) {
    RgbImage img;
    try {
      img = LoadImage(p);
    } catch (const InputError& e) {
      throw CliError(e.what());
    }
    if (!boxes.empty()) {
      try {
        CheckBoxes(boxes, img.height, img.width);
      } catch (const InputError& e) {
        throw CliError("--box for " + p + " (" + std::to_string(img.width) + "x" + std::to_string(img.height) +
                       "): " + e.what());
      }
    }
  }
  for (const std::string& p : {a.library, a.weights})
    if (!Exists(p)) throw CliError(p + ": no such file or folder");
  Tokenizer tokenizer = Tokenizer::Load(FindTokenizer(a));

  auto t0 = Clock::now();
  Log("[load] library " + a.library + " + weights " + a.weights);
  Model model(a.library, a.weights, a.device);
  Log("[load] done in " + Fixed(std::chrono::duration<double>(Clock::now() - t0).count(), 2) + " s (target " +
      model.target() + ", " + model.dtype() + ", image size " + std::to_string(model.image_size()) + ")");
  if (!model.has("detect"))
    throw CliError("library " + a.library + " has no detect function (it has " + model.functions() +
                   "); it cannot segment: compile it with a newer sam3_nn");
  if (model.vocab_size() > 0 && tokenizer.max_id() >= model.vocab_size())
    throw LibraryError("tokenizer ids go up to " + std::to_string(tokenizer.max_id()) + ", but the model's vocabulary has " +
                       std::to_string(model.vocab_size()) + " entries: this tokenizer does not belong to this library's model");

  // a prompt longer than the text context loses its last tokens, as in the original (and the
  // Python CLI, which reports it the same way)
  int dropped = 0;
  if (a.has_text) {
    dropped = tokenizer.Encode(a.text, model.text_context()).dropped;
    if (dropped) {
      std::string shown = a.text.size() <= 60 ? a.text : a.text.substr(0, 57) + "...";
      std::cerr << "warning: text prompt '" << shown << "' is longer than the model's text context ("
                << model.text_context() << " tokens with the start and end tokens): its last " << dropped
                << " tokens are ignored, as the original SAM 3 ignores them" << std::endl;
    }
  }
  for (size_t n = 0; n < images.size(); ++n) {
    const std::string& path = images[n];
    std::string tag = "[" + std::to_string(n + 1) + "/" + std::to_string(images.size()) + "] " + Basename(path);
    auto start = Clock::now();
    RgbImage img = LoadImage(path);
    double decode_s = std::chrono::duration<double>(Clock::now() - start).count();
    ImageState state = model.SetImage(img);
    state.preprocess_s += decode_s;  // the Python runtime's preprocess opens the file too
    Log(tag + ": encode_image " + Fixed(state.encode_s, 2) + " s (preprocess " + Fixed(state.preprocess_s, 2) + " s)");
    auto t1 = Clock::now();
    Detections det = model.Predict(state, tokenizer, a.has_text ? a.text : "", boxes,
                                   static_cast<float>(a.score_threshold), static_cast<float>(a.mask_threshold));
    double detect_s = std::chrono::duration<double>(Clock::now() - t1).count();
    Log(tag + ": detect " + Fixed(detect_s, 2) + " s -> " + std::to_string(det.scores.size()) + " objects above " +
        PyFloatRepr(a.score_threshold));
    std::string out = a.output + "/" + Stem(path);
    WriteResultJson(out + ".json", path, det, a, boxes,
                    {{"preprocess", state.preprocess_s}, {"encode_image", state.encode_s},
                     {"detect_and_postprocess", detect_s}}, dropped);
    double to_json = std::chrono::duration<double>(Clock::now() - start).count();
    if (a.overlay) AtomicWrite(out + ".png", [&](const std::string& tmp) { WriteOverlayPng(tmp, img, det, boxes); });
    Log(tag + ": image to JSON " + Fixed(to_json * 1000, 1) + " ms; wrote " + (a.overlay ? out + ".png and " : "") +
        out + ".json");
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Segment(ParseArgs(argc, argv));
  } catch (const Error& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 1;
  }
}
