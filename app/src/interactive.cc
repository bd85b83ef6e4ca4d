// Interactive segmentation on the host, as sam3_nn.runtime.interactive (the original SAM 3's
// SAM3InteractiveImagePredictor and SAM2Transforms): prompt checks, clicks and a box into
// predict_masks' point slots, and its outputs back to masks at the image's size (hole
// filling, bilinear resize, threshold). Float32 in the numpy code's order.
#include <algorithm>
#include <cmath>
#include <string>

#include "internal.h"
#include "json.h"

namespace sam3 {

static constexpr float kLowResClamp = 32.0f;  // _predict: torch.clamp(low_res_masks, -32, 32)
static constexpr double kHoleFill = 10.0;     // holes become threshold + 10

int InteractiveResult::best() const {
  return scores.empty() ? 0 : static_cast<int>(std::max_element(scores.begin(), scores.end()) - scores.begin());
}

static std::string List(std::initializer_list<double> v) {
  std::string s = "[";
  for (double x : v) s += (s.size() > 1 ? ", " : "") + PyFloatRepr(x);
  return s + "]";
}

void CheckPoints(const std::vector<Point>& points, int height, int width) {
  for (size_t i = 0; i < points.size(); ++i) {
    const Point& p = points[i];
    if (p.label != 0 && p.label != 1)
      throw InputError("point labels must be 1 (positive) or 0 (negative), got [" + std::to_string(p.label) + "]");
    std::string tag = "point " + std::to_string(i) + ": ";
    if (!std::isfinite(p.x) || !std::isfinite(p.y))
      throw InputError(tag + "coordinates must be finite, got " + List({p.x, p.y}));
    if (!(0 <= p.x && p.x <= width && 0 <= p.y && p.y <= height))
      throw InputError(tag + List({p.x, p.y}) + " lies outside the " + std::to_string(width) + "x" +
                       std::to_string(height) + " image");
  }
}

void CheckBox(const Box& b, int height, int width) {
  std::string coords = List({b.x0, b.y0, b.x1, b.y1});
  if (!std::isfinite(b.x0) || !std::isfinite(b.y0) || !std::isfinite(b.x1) || !std::isfinite(b.y1))
    throw InputError("box coordinates must be finite, got " + coords);
  if (!(b.x1 > b.x0 && b.y1 > b.y0)) throw InputError("box: expected x0 < x1 and y0 < y1 (xyxy pixels), got " + coords);
  if (b.x1 <= 0 || b.y1 <= 0 || b.x0 >= width || b.y0 >= height)
    throw InputError("box " + coords + " lies outside the " + std::to_string(width) + "x" + std::to_string(height) +
                     " image");
}

PointSlots MakePointSlots(const std::vector<Point>& points, const Box* box, int height, int width, int image_size,
                          int slots) {
  CheckPoints(points, height, width);
  // the box's corners first (labels 2, 3), then the clicks, as make_prompt
  std::vector<float> xy;
  std::vector<int64_t> labels;
  if (box) {
    CheckBox(*box, height, width);
    xy = {static_cast<float>(box->x0), static_cast<float>(box->y0), static_cast<float>(box->x1),
          static_cast<float>(box->y1)};
    labels = {2, 3};
  }
  for (const Point& p : points) {
    xy.push_back(static_cast<float>(p.x));
    xy.push_back(static_cast<float>(p.y));
    labels.push_back(p.label);
  }
  const int n = static_cast<int>(labels.size());
  if (n > slots)
    throw InputError(std::to_string(points.size()) + " points" + (box ? " and a box (2 points)" : "") +
                     " given; this library takes at most " + std::to_string(slots) +
                     " points (compile with --max-points)");
  PointSlots s;
  s.points.assign(static_cast<size_t>(slots) * 2, 0.f);
  s.labels.assign(slots, 0);
  s.mask.assign(slots, 0);
  // transform_coords(normalize=True): x / w * S, y / h * S in float32
  const float w = static_cast<float>(width), h = static_cast<float>(height), size = static_cast<float>(image_size);
  for (int i = 0; i < n; ++i) {
    float x = xy[2 * i] / w, y = xy[2 * i + 1] / h;
    s.points[2 * i] = x * size;
    s.points[2 * i + 1] = y * size;
    s.labels[i] = labels[i];
    s.mask[i] = 1;
  }
  s.count = n;
  return s;
}

// Background components (8-connected pixels with logit <= threshold) of at most `max_area`
// pixels set to threshold + 10, as interactive.fill_holes (skimage.measure.label's full
// connectivity in the original).
static void FillHoles(std::vector<float>* logits, int h, int w, double max_area, double threshold) {
  if (max_area <= 0) return;
  const float t = static_cast<float>(threshold);  // numpy compares float32 with the threshold in float32
  const float fill = static_cast<float>(threshold + kHoleFill);
  std::vector<int> comp(logits->size(), -1);
  std::vector<size_t> stack, members;
  for (size_t start = 0; start < logits->size(); ++start) {
    if (comp[start] >= 0 || !((*logits)[start] <= t)) continue;
    members.clear();
    stack.assign(1, start);
    comp[start] = 1;
    while (!stack.empty()) {
      size_t p = stack.back();
      stack.pop_back();
      members.push_back(p);
      const int y = static_cast<int>(p / w), x = static_cast<int>(p % w);
      for (int dy = -1; dy <= 1; ++dy)
        for (int dx = -1; dx <= 1; ++dx) {
          const int yy = y + dy, xx = x + dx;
          if (yy < 0 || yy >= h || xx < 0 || xx >= w) continue;
          const size_t q = static_cast<size_t>(yy) * w + xx;
          if (comp[q] < 0 && (*logits)[q] <= t) {
            comp[q] = 1;
            stack.push_back(q);
          }
        }
    }
    if (static_cast<double>(members.size()) <= max_area)
      for (size_t p : members) (*logits)[p] = fill;
  }
}

InteractiveResult PostProcessInteractive(const std::vector<float>& pred_masks, int g, const std::vector<float>& iou,
                                         float object_score, bool multimask, int height, int width,
                                         double threshold, double max_hole_area) {
  InteractiveResult r;
  r.height = height;
  r.width = width;
  r.low_res_size = g;
  r.object_score = object_score;
  const size_t plane = static_cast<size_t>(g) * g;
  const int first = multimask ? 1 : 0, count = multimask ? 3 : 1;  // slot 0: the single-mask output
  for (int k = first; k < first + count; ++k) {
    std::vector<float> low(pred_masks.begin() + k * plane, pred_masks.begin() + (k + 1) * plane);
    std::vector<float> clamped(low);
    for (float& v : clamped) v = std::min(kLowResClamp, std::max(-kLowResClamp, v));
    FillHoles(&low, g, g, max_hole_area, threshold);
    std::vector<float> up = ResizeMaps(low, 1, g, g, height, width);
    const float t = static_cast<float>(threshold);
    std::vector<uint8_t> mask(up.size());
    for (size_t j = 0; j < up.size(); ++j) mask[j] = up[j] > t;
    r.masks.push_back(std::move(mask));
    r.scores.push_back(iou.at(k));
    r.low_res_logits.push_back(std::move(clamped));
  }
  return r;
}

}  // namespace sam3
