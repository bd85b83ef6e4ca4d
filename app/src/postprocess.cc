// Post-processing as sam3_nn.runtime.postprocess, which follows the original SAM 3's
// Sam3Processor: scores = sigmoid(pred_logits) * sigmoid(presence_logits) kept above the score
// threshold, boxes scaled to pixels, mask logits resized bilinearly to the image, then sigmoid,
// then the mask threshold. Also the COCO RLE of sam3_nn.runtime.rle and the box checks of
// sam3_nn.runtime.preprocess. Float32 arithmetic in the same order as the numpy code (the build
// turns off FMA contraction for that reason).
#include <cmath>
#include <string>

#include "internal.h"
#include "json.h"

namespace sam3 {

static float Sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

namespace {
// PyTorch's source indices and weights for align_corners=False (postprocess._linear_indices)
struct Linear {
  std::vector<int> i0, i1;
  std::vector<float> l0, l1;
};

Linear LinearIndices(int in_size, int out_size) {
  Linear L;
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  for (int k = 0; k < out_size; ++k) {
    float dst = static_cast<float>(k) + 0.5f;
    // scale * (dst + 0.5) - 0.5 rounded once, as PyTorch's kernel (fused multiply-add)
    float src = static_cast<float>(static_cast<double>(scale) * static_cast<double>(dst) - 0.5);
    if (src < 0.f) src = 0.f;
    int i0 = static_cast<int>(src);
    float lam1 = src - static_cast<float>(i0);
    lam1 = lam1 < 0.f ? 0.f : (lam1 > 1.f ? 1.f : lam1);
    L.i0.push_back(i0);
    L.i1.push_back(i0 < in_size - 1 ? i0 + 1 : i0);
    L.l1.push_back(lam1);
    L.l0.push_back(1.0f - lam1);
  }
  return L;
}
}  // namespace

std::vector<float> ResizeMaps(const std::vector<float>& maps, int n, int in_h, int in_w, int out_h, int out_w) {
  Linear H = LinearIndices(in_h, out_h), W = LinearIndices(in_w, out_w);
  std::vector<float> out(static_cast<size_t>(n) * out_h * out_w);
  std::vector<float> rows(static_cast<size_t>(in_h) * out_w);  // each input row resized along x
  for (int k = 0; k < n; ++k) {
    const float* in = maps.data() + static_cast<size_t>(k) * in_h * in_w;
    for (int r = 0; r < in_h; ++r) {
      const float* a = in + static_cast<size_t>(r) * in_w;
      float* row = rows.data() + static_cast<size_t>(r) * out_w;
      for (int x = 0; x < out_w; ++x) {
        float p = W.l0[x] * a[W.i0[x]];
        float q = W.l1[x] * a[W.i1[x]];
        row[x] = p + q;
      }
    }
    float* o = out.data() + static_cast<size_t>(k) * out_h * out_w;
    for (int y = 0; y < out_h; ++y) {
      const float* top = rows.data() + static_cast<size_t>(H.i0[y]) * out_w;
      const float* bot = rows.data() + static_cast<size_t>(H.i1[y]) * out_w;
      for (int x = 0; x < out_w; ++x) {
        float p = H.l0[y] * top[x];
        float q = H.l1[y] * bot[x];
        o[static_cast<size_t>(y) * out_w + x] = p + q;
      }
    }
  }
  return out;
}

Detections PostProcess(const RawOutputs& raw, int height, int width, float score_threshold, float mask_threshold) {
  for (const char* name : {"pred_logits", "pred_boxes", "pred_masks"})
    if (!raw.arrays.count(name)) throw LibraryError(std::string("detect's outputs lack '") + name + "'");
  const auto& logits = raw.arrays.at("pred_logits");
  const auto& pboxes = raw.arrays.at("pred_boxes");
  const auto& pmasks = raw.arrays.at("pred_masks");
  const int q = static_cast<int>(logits.shape.at(1));
  const int mh = static_cast<int>(pmasks.shape.at(2)), mw = static_cast<int>(pmasks.shape.at(3));
  auto presence = raw.arrays.find("presence_logits");
  const bool has_presence = presence != raw.arrays.end();
  const float p = has_presence ? Sigmoid(presence->second.values.at(0)) : 1.0f;

  Detections det;
  det.height = height;
  det.width = width;
  const float scale[4] = {static_cast<float>(width), static_cast<float>(height), static_cast<float>(width),
                          static_cast<float>(height)};
  for (int i = 0; i < q; ++i) {
    float s = Sigmoid(logits.values[i]);
    if (has_presence) s = s * p;
    if (!(s > score_threshold)) continue;
    det.scores.push_back(s);
    det.query_index.push_back(i);
    std::array<float, 4> b;
    for (int c = 0; c < 4; ++c) b[c] = pboxes.values[static_cast<size_t>(i) * 4 + c] * scale[c];
    det.boxes.push_back(b);
    // one mask at a time: a full-size image with 200 objects would take a GB in float32
    const size_t plane = static_cast<size_t>(mh) * mw;
    std::vector<float> mask_logits =
        pmasks.values.empty() ? pmasks.range(static_cast<size_t>(i) * plane, plane)
                              : std::vector<float>(pmasks.values.begin() + i * plane, pmasks.values.begin() + (i + 1) * plane);
    // the logits are resized, then passed through the sigmoid, as the original (transformers
    // resizes the probabilities, which moves mask edges)
    std::vector<float> up = ResizeMaps(mask_logits, 1, mh, mw, height, width);
    std::vector<uint8_t> mask(up.size());
    for (size_t j = 0; j < up.size(); ++j) mask[j] = Sigmoid(up[j]) > mask_threshold;
    det.masks.push_back(std::move(mask));
  }
  return det;
}

std::string RleString(const uint8_t* mask, int height, int width) {
  // uncompressed counts, column by column (Fortran order), starting with a run of 0s
  std::vector<int64_t> counts;
  uint8_t cur = 0;
  int64_t run = 0;
  for (int x = 0; x < width; ++x)
    for (int y = 0; y < height; ++y) {
      uint8_t v = mask[static_cast<size_t>(y) * width + x] ? 1 : 0;
      if (v != cur) {
        counts.push_back(run);
        run = 0;
        cur = v;
      }
      ++run;
    }
  if (static_cast<int64_t>(height) * width > 0) counts.push_back(run);
  // pycocotools' string form: differences to the count two back, 5 bits per character
  std::string out;
  for (size_t i = 0; i < counts.size(); ++i) {
    int64_t x = counts[i] - (i > 2 ? counts[i - 2] : 0);
    bool more = true;
    while (more) {
      int64_t c = x & 0x1F;
      x >>= 5;  // arithmetic: negative differences stay negative
      more = (c & 0x10) ? x != -1 : x != 0;
      if (more) c |= 0x20;
      out += static_cast<char>(c + 48);
    }
  }
  return out;
}

void CheckBoxes(const std::vector<Box>& boxes, int height, int width) {
  for (size_t i = 0; i < boxes.size(); ++i) {
    const Box& b = boxes[i];
    std::string coords = "[" + PyFloatRepr(b.x0) + ", " + PyFloatRepr(b.y0) + ", " + PyFloatRepr(b.x1) + ", " +
                         PyFloatRepr(b.y1) + "]";
    std::string tag = "box " + std::to_string(i) + ": ";
    if (!std::isfinite(b.x0) || !std::isfinite(b.y0) || !std::isfinite(b.x1) || !std::isfinite(b.y1))
      throw InputError(tag + "coordinates must be finite, got " + coords);
    if (!(b.x1 > b.x0 && b.y1 > b.y0))
      throw InputError(tag + "expected x0 < x1 and y0 < y1 (xyxy pixels), got " + coords);
    if (b.x1 <= 0 || b.y1 <= 0 || b.x0 >= width || b.y0 >= height)
      throw InputError(tag + coords + " lies outside the " + std::to_string(width) + "x" + std::to_string(height) +
                       " image");
  }
}

}  // namespace sam3
