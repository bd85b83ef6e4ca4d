// Declarations shared by the app's sources (not part of the public API).
#pragma once

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "sam3/sam3.h"

namespace sam3 {

// The detect outputs post-processing reads, on the host in float32.
struct RawOutputs {
  struct Array {
    std::vector<float> values;  // empty for an array read through `range`
    std::vector<int64_t> shape;
    // values [begin, begin + count) as float32, converted when asked for: detect's mask logits
    // (200 x 288 x 288) are read for the kept queries only
    std::function<std::vector<float>(size_t begin, size_t count)> range;
  };
  std::map<std::string, Array> arrays;
};

// sam3_nn.runtime.postprocess.post_process_instances for image 0 of the batch.
Detections PostProcess(const RawOutputs& raw, int height, int width, float score_threshold,
                       float mask_threshold);

// predict_masks' point slots for one image (sam3_nn.runtime.interactive.make_prompt): the
// box's corners (labels 2, 3) then the clicks, in pixels of the S x S model input; empty
// slots zero with mask 0. Checks the prompt (InputError).
struct PointSlots {
  std::vector<float> points;             // slots x 2
  std::vector<int64_t> labels, mask;     // slots
  int count = 0;                         // valid slots
};
PointSlots MakePointSlots(const std::vector<Point>& points, const Box* box, int height, int width, int image_size,
                          int slots);

// sam3_nn.runtime.interactive.post_process for image 0: `pred_masks` [4, g, g] (slot 0 single,
// 1..3 multimask), `iou` [4]; `threshold` on the logits.
InteractiveResult PostProcessInteractive(const std::vector<float>& pred_masks, int g, const std::vector<float>& iou,
                                         float object_score, bool multimask, int height, int width,
                                         double threshold, double max_hole_area);

// PyTorch's F.interpolate(bilinear, align_corners=False) of `maps` ([n, in_h, in_w]) to
// [n, out_h, out_w], in float32 with sam3_nn.runtime.postprocess.resize_bilinear's arithmetic.
std::vector<float> ResizeMaps(const std::vector<float>& maps, int n, int in_h, int in_w, int out_h, int out_w);

// UTF-8 <-> code points (the tokenizer works on code points, as Python's str does).
bool DecodeUtf8(const std::string& s, std::u32string* out);
std::string EncodeUtf8(const std::u32string& s);

// Python's html.unescape (tokenizer.cc).
std::u32string HtmlUnescape(const std::u32string& s);

// ftfy.fix_text with its default configuration (ftfy.cc).
std::u32string FixText(const std::u32string& text);

// Set TVM_NUM_THREADS to the physical cores this process may run on unless TVM_NUM_THREADS
// or OMP_NUM_THREADS is set (sam3_nn.cpu_threads: TVM's pool otherwise takes half the
// hardware threads on x86, one thread on a 2-vCPU VM without SMT).
void ConfigureCpuThreads();

}  // namespace sam3
