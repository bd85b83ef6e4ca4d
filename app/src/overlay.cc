// The overlay PNG (libpng): masks tinted and boxes outlined as sam3_nn.runtime.overlay draws them;
// the "label score" tags are left out, since drawing text would need a font library. Clicks
// are discs of the same size and colours as there, rasterised here (Pillow's ellipse edge
// pixels are not reproduced).
#include <png.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <numeric>

#include "internal.h"

namespace sam3 {

static const uint8_t kPalette[20][3] = {
    {230, 25, 75},   {60, 180, 75},   {0, 130, 200},   {245, 130, 48},  {145, 30, 180},
    {70, 240, 240},  {240, 50, 230},  {210, 245, 60},  {250, 190, 212}, {0, 128, 128},
    {220, 190, 255}, {170, 110, 40},  {255, 250, 200}, {128, 0, 0},     {170, 255, 195},
    {128, 128, 0},   {255, 215, 180}, {0, 0, 128},     {255, 225, 25},  {128, 128, 128}};

// Pillow's ImageDraw.rectangle outline of `width` pixels (inside the box), clipped
static void Rectangle(std::vector<uint8_t>* img, int h, int w, double fx0, double fy0, double fx1, double fy1,
                      const uint8_t* color, int width) {
  int x0 = static_cast<int>(fx0), y0 = static_cast<int>(fy0), x1 = static_cast<int>(fx1), y1 = static_cast<int>(fy1);
  if (x1 < x0) std::swap(x0, x1);
  if (y1 < y0) std::swap(y0, y1);
  auto put = [&](int x, int y) {
    if (x >= 0 && x < w && y >= 0 && y < h) std::memcpy(&(*img)[(static_cast<size_t>(y) * w + x) * 3], color, 3);
  };
  for (int i = 0; i < width; ++i) {
    for (int x = x0; x <= x1; ++x) put(x, y0 + i), put(x, y1 - i);
    for (int y = y0 + width; y <= y1 - width + 1; ++y) put(x1 - i, y), put(x0 + i, y);
  }
}

// A disc filling the pixel box [x0, x1] x [y0, y1] (inclusive, truncated as Pillow's
// coordinates), its outer ring of `ring` pixels in `outline`
static void Disc(std::vector<uint8_t>* img, int h, int w, double fx0, double fy0, double fx1, double fy1,
                 const uint8_t* fill, const uint8_t* outline, int ring) {
  const int x0 = static_cast<int>(fx0), y0 = static_cast<int>(fy0), x1 = static_cast<int>(fx1), y1 = static_cast<int>(fy1);
  const double cx = (x0 + x1) / 2.0, cy = (y0 + y1) / 2.0, r = (x1 - x0 + 1) / 2.0, inner = r - ring;
  for (int y = std::max(0, y0); y <= std::min(h - 1, y1); ++y)
    for (int x = std::max(0, x0); x <= std::min(w - 1, x1); ++x) {
      const double d = std::hypot(x - cx, y - cy);
      if (d > r) continue;
      std::memcpy(&(*img)[(static_cast<size_t>(y) * w + x) * 3], d > inner ? outline : fill, 3);
    }
}

void WriteOverlayPng(const std::string& path, const RgbImage& image, const Detections& det,
                     const std::vector<Box>& prompt_boxes, const std::vector<Point>& prompt_points) {
  const int h = image.height, w = image.width;
  const size_t n = det.scores.size();
  std::vector<float> out(image.pixels.begin(), image.pixels.end());
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return det.scores[a] > det.scores[b]; });
  const float keep = static_cast<float>(1 - 0.45), alpha = 0.45f;  // the best drawn last, on top
  for (auto it = order.rbegin(); it != order.rend(); ++it) {
    const uint8_t* c = kPalette[*it % 20];
    const std::vector<uint8_t>& m = det.masks[*it];
    for (size_t p = 0; p < m.size(); ++p)
      if (m[p])
        for (int k = 0; k < 3; ++k) out[p * 3 + k] = keep * out[p * 3 + k] + alpha * static_cast<float>(c[k]);
  }
  std::vector<uint8_t> img(out.size());
  for (size_t i = 0; i < out.size(); ++i) img[i] = static_cast<uint8_t>(std::min(255.f, std::max(0.f, std::nearbyint(out[i]))));
  const int width = std::max(2, static_cast<int>(std::nearbyint(std::min(h, w) / 300.0)));
  for (auto it = order.rbegin(); it != order.rend(); ++it) {
    const auto& b = det.boxes[*it];
    Rectangle(&img, h, w, b[0], b[1], b[2], b[3], kPalette[*it % 20], width);
  }
  static const uint8_t kWhite[3] = {255, 255, 255}, kBlack[3] = {0, 0, 0};
  for (const Box& b : prompt_boxes) Rectangle(&img, h, w, b.x0, b.y0, b.x1, b.y1, b.label ? kWhite : kBlack, std::max(1, width / 2));
  // clicks: green (positive) or red (negative), outlined in white
  static const uint8_t kPositive[3] = {0, 200, 0}, kNegative[3] = {230, 0, 0};
  const int radius = std::max(3, static_cast<int>(std::nearbyint(std::min(h, w) / 120.0)));
  for (const Point& p : prompt_points)
    Disc(&img, h, w, p.x - radius, p.y - radius, p.x + radius, p.y + radius, p.label ? kPositive : kNegative, kWhite,
         std::max(1, radius / 3));

  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) throw Error("cannot write " + path + ": " + std::strerror(errno));
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png_create_info_struct(png);
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    std::fclose(f);
    throw Error("cannot write " + path + " (libpng error)");
  }
  png_init_io(png, f);
  png_set_IHDR(png, info, w, h, 8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT,
               PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  for (int y = 0; y < h; ++y) png_write_row(png, &img[static_cast<size_t>(y) * w * 3]);
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  if (std::fclose(f) != 0) throw Error("cannot write " + path + ": " + std::strerror(errno));
}

}  // namespace sam3
