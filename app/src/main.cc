// sam3-segment: the `python -m sam3_nn segment` command line without Python.
//
//   sam3-segment --library dist/sam3-llvm.so --weights weights/sam3.safetensors \
//       --tokenizer sam3_nn/runtime/data/bpe_simple_vocab_16e6.txt.gz --image photo.jpg --text "cat" \
//       [--box x0,y0,x1,y1[:neg]]... --output out/ [--device cpu|cuda|metal]
//   sam3-segment ... --image photo.jpg --point 410,220 --point 380,300:neg [--box x0,y0,x1,y1]
//
// writes out/photo.json (the Python CLI's JSON: boxes, scores, COCO RLE masks) and
// out/photo.png (overlay). The first form is the concept task (every object matching the
// text / exemplar boxes); the second the interactive one (clicks and/or one box select one
// object: a library with the interactive part), with the Python CLI's flags and rules.
// User errors: "error: ..." on stderr, exit status 2, no output.
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
#include <optional>
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
    "       sam3-segment --library L --weights W --image I (--point x,y[:neg] ... | --task interactive)\n"
    "                    [--box x0,y0,x1,y1] [--multimask | --no-multimask] --output DIR ...\n"
    "\n"
    "  --library L     compiled library (sam3-<target>.so/.dylib) with its .json manifest beside it\n"
    "  --weights W     converted .safetensors (python -m sam3_nn convert SRC L OUT)\n"
    "  --image I       an image file (JPEG, PNG) or a folder of images\n"
    "  --text S        text prompt (a noun phrase: \"cat\", \"red car\")\n"
    "  --box B         box prompt in pixels, x0,y0,x1,y1: concept exemplars (repeatable; ':neg' marks a\n"
    "                  negative box), or with --point / --task interactive the object's box (one)\n"
    "  --point P       a click in pixels, x,y (':neg' marks a background click; repeatable): interactive\n"
    "                  segmentation of one object (a library with the interactive part)\n"
    "  --task T        concept: every object matching --text / exemplar --box; interactive: the one object\n"
    "                  --point and/or one --box select (default: interactive with --point, else concept)\n"
    "  --multimask, --no-multimask  interactive: three candidate masks (the best drawn, all in the JSON)\n"
    "                  or one (default: three for a single click alone, one otherwise)\n"
    "  --output DIR    folder for <image>.json and <image>.png\n"
    "  --tokenizer T   CLIP's bpe_simple_vocab_16e6.txt.gz (sam3_nn/runtime/data/) or a folder with vocab.json +\n"
    "                  merges.txt (default: looked for beside the weights and the library)\n"
    "  --device D      cpu, cuda or metal (default: the library's target)\n"
    "  --score-threshold F  keep objects whose score (detection x presence) exceeds F (default 0.5)\n"
    "  --mask-threshold F   mask pixels whose probability exceeds F (default 0.5; interactive: on the\n"
    "                  logits' sigmoid)\n"
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
  std::vector<std::string> boxes, points;
  std::string task;   // "" (from the prompts), concept or interactive
  int multimask = -1;  // -1 unset, 0 --no-multimask, 1 --multimask
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

// "x,y" or "x,y:neg" (":pos" too), as sam3_nn.runtime.interactive.parse_point
Point ParsePoint(const std::string& text) {
  size_t colon = text.find(':');
  std::string spec = text.substr(0, colon);
  std::string kind = colon == std::string::npos ? "" : Lower(Strip(text.substr(colon + 1)));
  if (kind.empty()) kind = "pos";
  if (kind != "pos" && kind != "neg")
    throw CliError("--point: point " + Repr(text) + ": label must be ':pos' or ':neg', got " + Repr(kind));
  std::vector<std::string> parts;
  for (size_t i = 0;;) {
    size_t j = spec.find(',', i);
    parts.push_back(Strip(spec.substr(i, j == std::string::npos ? std::string::npos : j - i)));
    if (j == std::string::npos) break;
    i = j + 1;
  }
  if (parts.size() != 2)
    throw CliError("--point: point " + Repr(text) + ": expected x,y (2 numbers), got " + std::to_string(parts.size()) +
                   " values");
  double v[2];
  for (int k = 0; k < 2; ++k)
    if (!ParseFloat(parts[k], &v[k]))
      throw CliError("--point: point " + Repr(text) + ": not a number (could not convert string to float: " +
                     Repr(parts[k]) + ")");
  return Point{v[0], v[1], kind == "pos" ? 1 : 0};
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

// An object's mask as COCO RLE, the "segmentation" key of both commands' JSON.
static void WriteSegmentation(JsonWriter& w, const std::vector<uint8_t>& mask, int height, int width) {
  w.Key("segmentation").BeginObject();
  w.Key("size").BeginArray().Int(height).Int(width).EndArray();
  w.Key("counts").String(RleString(mask.data(), height, width));
  w.EndObject();
}

// The timings, the closing brace, and the file written atomically (nothing half-written).
static void FinishJson(JsonWriter& w, const std::vector<std::pair<std::string, double>>& timings,
                       const std::string& path) {
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
    WriteSegmentation(w, det.masks[k], det.height, det.width);
    w.EndObject();
  }
  w.EndArray();
  FinishJson(w, timings, path);
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
    } else if (f == "--point") {
      a.points.push_back(get());
    } else if (f == "--task") {
      a.task = get();
      if (a.task != "concept" && a.task != "interactive")
        throw CliError("argument --task: invalid choice: " + Repr(a.task) + " (choose from 'concept', 'interactive')");
    } else if (f == "--multimask" || f == "--no-multimask") {
      a.multimask = f == "--multimask";
    } else if (f == "--score-threshold" || f == "--mask-threshold") {
      std::string v = get();
      double d;
      if (!ParseFloat(Strip(v), &d) || !std::isfinite(d) || d < 0.0 || d > 1.0)
        throw CliError("argument " + f + ": expected a number in [0, 1], got " + Repr(v));
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

// The image files (a folder's, sorted), refused when two would write the same outputs.
std::vector<std::string> ImagesOf(const Args& a) {
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
  return images;
}

// concept (text and/or exemplar boxes: every matching object) or interactive (clicks and/or
// one box: one object), with the Python CLI's rules (sam3_nn.cli.segment_task).
bool IsInteractive(const Args& a) {
  const std::string task = !a.task.empty() ? a.task : (a.points.empty() ? "concept" : "interactive");
  if (task == "concept") {
    if (!a.points.empty())
      throw CliError("--point is an interactive prompt, but --task concept was given: drop "
                     "--task (--point implies --task interactive) or the points");
    if (a.multimask >= 0)
      throw CliError("--multimask / --no-multimask apply to interactive segmentation "
                     "(--point, --task interactive) only");
    return false;
  }
  if (a.has_text)
    throw CliError("--text is a concept prompt (every object matching it); interactive "
                   "segmentation (--point / --task interactive) takes clicks and at most one "
                   "--box: give one task's prompts");
  if (a.boxes.size() > 1)
    throw CliError("interactive segmentation takes one --box (the object's), got " + std::to_string(a.boxes.size()) +
                   "; several boxes are concept exemplars (drop --point and --task interactive)");
  for (const auto& b : a.boxes) {
    size_t colon = b.find(':');
    if (colon != std::string::npos && Lower(Strip(b.substr(colon + 1))) == "neg")
      throw CliError("a negative --box (:neg) is a concept exemplar; interactive segmentation "
                     "takes negative clicks (--point x,y:neg) instead");
  }
  if (a.points.empty() && a.boxes.empty())
    throw CliError("interactive segmentation needs --point x,y[:neg] (repeatable) and/or one "
                   "--box x0,y0,x1,y1");
  return true;
}

// The pixel box around a mask's pixels (xyxy, end exclusive), as interactive.mask_box; false if empty.
bool MaskBox(const std::vector<uint8_t>& m, int h, int w, std::array<float, 4>* box) {
  int x0 = w, y0 = h, x1 = -1, y1 = -1;
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      if (m[static_cast<size_t>(y) * w + x]) {
        x0 = std::min(x0, x), x1 = std::max(x1, x), y0 = std::min(y0, y), y1 = std::max(y1, y);
      }
  if (x1 < 0) return false;
  *box = {static_cast<float>(x0), static_cast<float>(y0), static_cast<float>(x1 + 1), static_cast<float>(y1 + 1)};
  return true;
}

// The Python CLI's interactive JSON (sam3_nn.cli._interactive_json).
void WriteInteractiveJson(const std::string& path, const std::string& image, const InteractiveResult& res,
                          const Args& a, const std::vector<Point>& points, const Box* box, bool multimask,
                          const std::vector<std::pair<std::string, double>>& timings) {
  JsonWriter w(1);
  w.BeginObject();
  w.Key("image").String(AbsPath(image));
  w.Key("height").Int(res.height);
  w.Key("width").Int(res.width);
  w.Key("task").String("interactive");
  w.Key("prompt").BeginObject();
  w.Key("points");
  if (points.empty()) {
    w.Null();
  } else {
    w.BeginArray();
    for (const Point& p : points) w.BeginArray().Double(p.x).Double(p.y).EndArray();
    w.EndArray();
  }
  w.Key("point_labels");
  if (points.empty()) {
    w.Null();
  } else {
    w.BeginArray();
    for (const Point& p : points) w.Int(p.label);
    w.EndArray();
  }
  w.Key("box");
  if (box) w.BeginArray().Double(box->x0).Double(box->y0).Double(box->x1).Double(box->y1).EndArray(); else w.Null();
  w.Key("multimask").Bool(multimask);
  w.EndObject();
  w.Key("library").String(AbsPath(a.library));
  w.Key("weights").String(AbsPath(a.weights));
  w.Key("mask_threshold").Double(a.mask_threshold);
  w.Key("box_format").String("xyxy pixels");
  w.Key("mask_format").String("COCO RLE (column-major, compressed counts)");
  w.Key("score").String("predicted IoU of each candidate mask");
  w.Key("object_score_logit").Double(RoundDecimal(res.object_score, 5));
  w.Key("best").Int(res.best());
  w.Key("objects").BeginArray();
  for (size_t k = 0; k < res.scores.size(); ++k) {
    const std::vector<uint8_t>& m = res.masks[k];
    int64_t area = 0;
    for (uint8_t v : m) area += v;
    std::array<float, 4> bb;
    w.BeginObject();
    w.Key("box");
    if (MaskBox(m, res.height, res.width, &bb)) {
      w.BeginArray();
      for (float v : bb) w.Double(RoundDecimal(v, 2));
      w.EndArray();
    } else {
      w.Null();
    }
    w.Key("score").Double(RoundDecimal(res.scores[k], 5));
    w.Key("mask_index").Int(static_cast<int64_t>(k));
    w.Key("area").Int(area);
    WriteSegmentation(w, m, res.height, res.width);
    w.EndObject();
  }
  w.EndArray();
  FinishJson(w, timings, path);
}

// segment with clicks and/or one box (sam3_nn.cli.segment_interactive): the prompt and every
// image are checked before the model loads.
int SegmentInteractive(const Args& a) {
  std::vector<Point> points;
  for (const auto& p : a.points) points.push_back(ParsePoint(p));
  std::optional<Box> box;
  if (!a.boxes.empty()) box = ParseBox(a.boxes[0]);
  if (!(0.0 < a.mask_threshold && a.mask_threshold < 1.0))
    throw CliError("--mask-threshold must be a probability strictly between 0 and 1 for interactive segmentation, "
                   "got " + PyFloatRepr(a.mask_threshold));
  // one click alone is ambiguous (part or whole): three candidates; more prompts pin one
  const bool multimask = a.multimask >= 0 ? a.multimask == 1 : (points.size() == 1 && !box);
  const Box* box_ptr = box ? &*box : nullptr;
  std::vector<std::string> images = ImagesOf(a);
  for (const auto& p : images) {
    RgbImage img;
    try {
      img = LoadImage(p);
    } catch (const InputError& e) {
      throw CliError(e.what());
    }
    try {
      CheckPoints(points, img.height, img.width);
      if (box) CheckBox(*box, img.height, img.width);
    } catch (const InputError& e) {
      throw CliError("prompt for " + p + " (" + std::to_string(img.width) + "x" + std::to_string(img.height) +
                     "): " + e.what());
    }
  }
  for (const std::string& p : {a.library, a.weights})
    if (!Exists(p)) throw CliError(p + ": no such file or folder");

  auto t0 = Clock::now();
  Log("[load] library " + a.library + " + weights " + a.weights);
  Model model(a.library, a.weights, a.device);
  Log("[load] done in " + Fixed(std::chrono::duration<double>(Clock::now() - t0).count(), 2) + " s (target " +
      model.target() + ", " + model.dtype() + ", image size " + std::to_string(model.image_size()) + ")");
  if (!model.has_interactive())
    throw CliError("library " + a.library + " has no predict_masks function (it has " + model.functions() +
                   "): interactive segmentation needs a library compiled with the interactive part (--parts "
                   "vision,interactive or vision,text,detector,interactive)");
  if (static_cast<int>(points.size()) + (box ? 2 : 0) > model.max_points())
    throw CliError(std::to_string(points.size()) + " points" + (box ? " and a box (2 points)" : "") +
                   " given; this library takes at most " + std::to_string(model.max_points()) +
                   " points (compile with --max-points)");
  // the probability threshold as a logit threshold (0.5 -> 0, the original's)
  const double logit = std::log(a.mask_threshold / (1.0 - a.mask_threshold));
  for (size_t n = 0; n < images.size(); ++n) {
    const std::string& path = images[n];
    std::string tag = "[" + std::to_string(n + 1) + "/" + std::to_string(images.size()) + "] " + Basename(path);
    auto start = Clock::now();
    RgbImage img = LoadImage(path);
    double decode_s = std::chrono::duration<double>(Clock::now() - start).count();
    ImageState state = model.SetImage(img);
    state.preprocess_s += decode_s;
    Log(tag + ": encode_image " + Fixed(state.encode_s, 2) + " s (preprocess " + Fixed(state.preprocess_s, 2) + " s)");
    auto t1 = Clock::now();
    InteractiveResult res = model.PredictPoints(state, points, box_ptr, multimask, logit);
    double predict_s = std::chrono::duration<double>(Clock::now() - t1).count();
    const int best = res.best();
    char obj[32];
    std::snprintf(obj, sizeof(obj), "%+.2f", res.object_score);
    Log(tag + ": predict_masks " + Fixed(predict_s, 2) + " s -> " + std::to_string(res.scores.size()) +
        " candidate mask(s), best IoU " + Fixed(res.scores[best], 3) + ", object score " + obj);
    std::string out = a.output + "/" + Stem(path);
    WriteInteractiveJson(out + ".json", path, res, a, points, box_ptr, multimask,
                         {{"preprocess", state.preprocess_s}, {"encode_image", state.encode_s},
                          {"predict_and_postprocess", predict_s}});
    double to_json = std::chrono::duration<double>(Clock::now() - start).count();
    if (a.overlay) {
      // the best candidate, boxed; an empty mask: nothing but the prompts
      Detections shown;
      shown.height = res.height;
      shown.width = res.width;
      std::array<float, 4> bb;
      if (MaskBox(res.masks[best], res.height, res.width, &bb)) {
        shown.boxes.push_back(bb);
        shown.scores.push_back(res.scores[best]);
        shown.query_index.push_back(best);
        shown.masks.push_back(res.masks[best]);
      }
      std::vector<Box> prompt_boxes;
      if (box) prompt_boxes.push_back(Box{box->x0, box->y0, box->x1, box->y1, 1});
      AtomicWrite(out + ".png", [&](const std::string& tmp) { WriteOverlayPng(tmp, img, shown, prompt_boxes, points); });
    }
    Log(tag + ": image to JSON " + Fixed(to_json * 1000, 1) + " ms; wrote " + (a.overlay ? out + ".png and " : "") +
        out + ".json");
  }
  return 0;
}

int Segment(const Args& a) {
  if (IsInteractive(a)) return SegmentInteractive(a);
  // everything that can be checked before the (slow) load is checked first
  if (a.has_text && PyStripEmpty(a.text)) throw CliError("--text is empty");
  if (a.has_text) {
    std::u32string u;
    if (!DecodeUtf8(a.text, &u)) throw CliError("--text is not valid UTF-8");
  }
  std::vector<Box> boxes;
  for (const auto& b : a.boxes) boxes.push_back(ParseBox(b));
  if (!a.has_text && boxes.empty()) throw CliError("no prompt: give --text \"...\" and/or --box x0,y0,x1,y1[:neg]");
  std::vector<std::string> images = ImagesOf(a);
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
