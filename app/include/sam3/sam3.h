// sam3: segment images with a compiled SAM 3 library (sam3_nn) from C++, no Python.
//
//   sam3::Model model("dist/sam3-llvm.so", "weights/sam3.safetensors");   // + manifest beside it
//   sam3::Tokenizer tok = sam3::Tokenizer::Load("sam3_nn/runtime/data/bpe_simple_vocab_16e6.txt.gz");
//   sam3::ImageState state = model.SetImage(sam3::LoadImage("photo.jpg"));
//   sam3::Detections cats = model.Predict(state, tok, "cat", {});
//   sam3::InteractiveResult one = model.PredictPoints(state, {{410, 220, 1}, {380, 300, 0}});  // clicks
//
// Each step does what the Python runtime (sam3_nn.runtime.Sam3) does, with the same
// arithmetic, so that both give the same JSON for the same inputs. TVM stays behind this
// header (no TVM include needed by users of the library).
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace sam3 {

// Errors a user can fix (the CLI prints "error: <message>" and exits with status 2).
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
// A library, its manifest and the weights or tokenizer given to it do not fit together.
class LibraryError : public Error {
 public:
  using Error::Error;
};
// An image, prompt or box the model cannot take.
class InputError : public Error {
 public:
  using Error::Error;
};

// ---- images ----------------------------------------------------------------------------
struct RgbImage {
  int height = 0, width = 0;
  std::vector<uint8_t> pixels;  // height x width x 3, row-major
};

// Decodes a JPEG (libjpeg) or PNG (libpng) file as the Python runtime's Pillow path does:
// EXIF orientation applied, transparency composited onto white, grey replicated to RGB.
RgbImage LoadImage(const std::string& path);

// Pillow's Image.resize(BILINEAR) (antialiased, fixed point) to size x size, reproduced
// bit for bit; then (x - 127.5) / 127.5 in float32, channels first: [3, size, size].
std::vector<uint8_t> ResizeBilinear(const RgbImage& image, int size);
std::vector<float> NormalizePixels(const std::vector<uint8_t>& rgb, int size);

// ---- tokenizer -------------------------------------------------------------------------
// SAM 3's CLIP byte-level BPE tokenizer, giving the ids of sam3_nn.runtime.tokenizer.Sam3Tokenizer.
class Tokenizer {
 public:
  // `path`: CLIP's bpe_simple_vocab_16e6.txt.gz (what sam3_nn ships in sam3_nn/runtime/data/), or
  // a folder with vocab.json + merges.txt (an HF SAM 3 snapshot).
  static Tokenizer Load(const std::string& path);
  Tokenizer();
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // A prompt after the cleanup (ftfy.fix_text, HTML unescaping, strip), as UTF-8.
  static std::string Clean(const std::string& utf8);
  // BPE ids of one prompt, no start/end token, no truncation.
  std::vector<int32_t> Tokenize(const std::string& utf8) const;
  struct Encoding {
    std::vector<int32_t> input_ids, attention_mask;  // `context` each
    int dropped = 0;                                  // tokens cut from the end
  };
  // start + tokens (at most context - 2) + end, padded; throws InputError if no tokens.
  Encoding Encode(const std::string& utf8, int context) const;
  int max_id() const;  // largest id the vocabulary holds

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// ---- model -----------------------------------------------------------------------------
struct Box {
  double x0, y0, x1, y1;
  int label = 1;  // 1 positive, 0 negative
};

// A click in pixels of the original image.
struct Point {
  double x, y;
  int label = 1;  // 1 positive (the object), 0 negative (background)
};

struct Detections {
  int height = 0, width = 0;                 // the original image
  std::vector<std::array<float, 4>> boxes;   // xyxy pixels
  std::vector<float> scores;                 // detection x presence
  std::vector<int64_t> query_index;          // the model query each object came from
  std::vector<std::vector<uint8_t>> masks;   // height x width, 0/1, row-major
};

// One object selected by clicks / a box / a mask (interactive segmentation): K candidate
// masks (3 with multimask, else 1) in the model's order.
struct InteractiveResult {
  int height = 0, width = 0;                    // the original image
  std::vector<std::vector<uint8_t>> masks;      // K x (height x width), 0/1, row-major
  std::vector<float> scores;                    // predicted IoU of each mask
  int low_res_size = 0;                         // g: the low-resolution logits are g x g
  std::vector<std::vector<float>> low_res_logits;  // K x (g x g), clamped to +-32: a later mask_input
  float object_score = 0;                       // object score logit (> 0: an object is present)
  int best() const;                             // the first candidate with the highest score
};

// An encoded image: its feature maps stay on the device, reusable for many prompts.
struct ImageState {
  int height = 0, width = 0;
  std::shared_ptr<void> features;  // encode_image's maps, detector's and tracker's (opaque)
  double preprocess_s = 0, encode_s = 0;
};

class Model {
 public:
  // `library`: sam3-<target>.so/.dylib with its manifest sam3-<target>.json beside it;
  // `weights`: .safetensors written by `python -m sam3_nn convert`; `device`: cpu, cuda or
  // metal ("" = the library's target). Throws LibraryError when they do not fit together.
  Model(const std::string& library, const std::string& weights, const std::string& device = "");
  ~Model();

  const std::string& target() const;
  const std::string& dtype() const;
  int image_size() const;
  int text_context() const;   // encode_text's input length
  int max_boxes() const;      // detect's box slots
  int max_points() const;     // predict_masks' point slots (a box takes two); 0 without it
  int64_t vocab_size() const; // the text encoder's vocabulary
  bool has(const std::string& function) const;
  std::string functions() const;  // comma-separated, for messages

  ImageState SetImage(const RgbImage& image);
  // Raw outputs -> objects above `score_threshold`, as sam3_nn.runtime.postprocess (defaults as
  // Sam3.predict's). `text` empty:
  // a box-only prompt ("visual", as Sam3Processor does). Text features are cached per prompt.
  Detections Predict(const ImageState& state, const Tokenizer& tokenizer, const std::string& text,
                     const std::vector<Box>& boxes, float score_threshold = 0.5f,
                     float mask_threshold = 0.5f);
  // Interactive segmentation (a library with the interactive part: predict_masks), as
  // sam3_nn's Sam3.predict_points: clicks and/or one box (pixels of the original image)
  // and/or a previous result's low_res_logits[k] as `mask_input` (empty: none). Masks are the
  // logits after hole filling (background components of at most `max_hole_area` low-res
  // pixels) resized to the image and `> mask_threshold_logit` (0: probability 0.5).
  bool has_interactive() const;
  InteractiveResult PredictPoints(const ImageState& state, const std::vector<Point>& points,
                                  const Box* box = nullptr, bool multimask = true,
                                  double mask_threshold_logit = 0.0, double max_hole_area = 256.0,
                                  const std::vector<float>& mask_input = {});

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// ---- outputs ---------------------------------------------------------------------------
// COCO compressed RLE counts (pycocotools' string form) of a row-major height x width mask.
std::string RleString(const uint8_t* mask, int height, int width);

// Overlay PNG: masks tinted, boxes outlined (no text tags: no font library is used).
// Clicks are drawn as discs, green (positive) or red (negative), outlined in white.
void WriteOverlayPng(const std::string& path, const RgbImage& image, const Detections& det,
                     const std::vector<Box>& prompt_boxes, const std::vector<Point>& prompt_points = {});

// Checks boxes as sam3_nn.runtime.preprocess.check_boxes does; throws InputError.
void CheckBoxes(const std::vector<Box>& boxes, int height, int width);
// Checks clicks and an interactive box as sam3_nn.runtime.interactive.check_points /
// check_box do; throws InputError.
void CheckPoints(const std::vector<Point>& points, int height, int width);
void CheckBox(const Box& box, int height, int width);

}  // namespace sam3
