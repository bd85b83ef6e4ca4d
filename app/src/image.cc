// Images as the Python runtime sees them (sam3_nn.runtime.preprocess, Pillow): JPEG decoded by
// libjpeg(-turbo), PNG by libpng, EXIF orientation applied, transparency composited onto
// white; then Pillow's antialiased bilinear resize (fixed point, reproduced bit for bit)
// and the (x - 127.5) / 127.5 normalisation.
// jpeglib.h needs size_t and FILE declared first
#include <cerrno>
#include <cmath>
#include <csetjmp>
#include <cstddef>
#include <cstdio>
#include <cstring>

#include <jpeglib.h>
#include <jerror.h>
#include <png.h>
#include <sys/stat.h>

#include <fstream>
#include <sstream>

#include "internal.h"

namespace sam3 {

static std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw InputError("image " + path + ": cannot be read as an image (" + std::strerror(errno) + ")");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// ---- EXIF orientation ------------------------------------------------------------------
// The orientation tag (0x0112) of a TIFF-structured EXIF block; 1 when absent. A few lines
// of TIFF reading: Debian's libexif is not installed here and the app needs this one tag.
static int ExifOrientation(const uint8_t* p, size_t n) {
  if (n >= 6 && std::memcmp(p, "Exif\0\0", 6) == 0) {
    p += 6;
    n -= 6;
  }
  if (n < 8) return 1;
  bool le = p[0] == 'I' && p[1] == 'I';
  if (!le && !(p[0] == 'M' && p[1] == 'M')) return 1;
  auto u16 = [&](size_t o) -> uint32_t { return le ? p[o] | (p[o + 1] << 8) : (p[o] << 8) | p[o + 1]; };
  auto u32 = [&](size_t o) -> uint32_t {
    return le ? p[o] | (p[o + 1] << 8) | (p[o + 2] << 16) | (uint32_t(p[o + 3]) << 24)
              : (uint32_t(p[o]) << 24) | (p[o + 1] << 16) | (p[o + 2] << 8) | p[o + 3];
  };
  size_t ifd = u32(4);
  if (ifd + 2 > n) return 1;
  uint32_t count = u16(ifd);
  for (uint32_t i = 0; i < count; ++i) {
    size_t e = ifd + 2 + 12 * static_cast<size_t>(i);
    if (e + 12 > n) break;
    if (u16(e) != 0x0112) continue;
    uint32_t type = u16(e + 2);
    if (type == 3) return static_cast<int>(u16(e + 8));   // SHORT
    if (type == 4) return static_cast<int>(u32(e + 8));   // LONG
    if (type == 1) return p[e + 8];                         // BYTE
    return 1;
  }
  return 1;
}

// ImageOps.exif_transpose: orientations 2..8 -> flips and rotations.
static RgbImage Orient(RgbImage in, int orientation) {
  if (orientation < 2 || orientation > 8) return in;
  const int H = in.height, W = in.width;
  const bool swap = orientation >= 5;
  RgbImage out;
  out.height = swap ? W : H;
  out.width = swap ? H : W;
  out.pixels.resize(in.pixels.size());
  for (int y = 0; y < out.height; ++y)
    for (int x = 0; x < out.width; ++x) {
      int sy = y, sx = x;
      switch (orientation) {
        case 2: sx = W - 1 - x; break;                       // FLIP_LEFT_RIGHT
        case 3: sy = H - 1 - y; sx = W - 1 - x; break;       // ROTATE_180
        case 4: sy = H - 1 - y; break;                       // FLIP_TOP_BOTTOM
        case 5: sy = x; sx = y; break;                       // TRANSPOSE
        case 6: sy = H - 1 - x; sx = y; break;               // ROTATE_270
        case 7: sy = H - 1 - x; sx = W - 1 - y; break;       // TRANSVERSE
        case 8: sy = x; sx = W - 1 - y; break;               // ROTATE_90
      }
      std::memcpy(&out.pixels[(static_cast<size_t>(y) * out.width + x) * 3],
                  &in.pixels[(static_cast<size_t>(sy) * W + sx) * 3], 3);
    }
  return out;
}

// Image.alpha_composite(white, rgba).convert("RGB"): Pillow's integer arithmetic.
static void OnWhite(const uint8_t* rgba, uint8_t* rgb) {
  const uint32_t a = rgba[3];
  if (a == 0) {
    rgb[0] = rgb[1] = rgb[2] = 255;
    return;
  }
  const uint32_t blend = 255 * (255 - a);
  const uint32_t outa255 = a * 255 + blend;
  const uint32_t coef1 = a * 255 * 255 * (1 << 7) / outa255;
  const uint32_t coef2 = 255 * (1 << 7) - coef1;
  for (int c = 0; c < 3; ++c) {
    uint32_t t = rgba[c] * coef1 + 255 * coef2 + (0x80 << 7);
    rgb[c] = static_cast<uint8_t>((((t >> 8) + t) >> 8) >> 7);
  }
}

// ---- JPEG ------------------------------------------------------------------------------
namespace {
struct JpegError {
  jpeg_error_mgr mgr;
  jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
  bool truncated;
};

void JpegExit(j_common_ptr cinfo) {
  JpegError* err = reinterpret_cast<JpegError*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  longjmp(err->jump, 1);
}

void JpegMessage(j_common_ptr cinfo, int level) {
  // Pillow refuses a truncated JPEG ("image file is truncated"); other warnings it ignores
  if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) reinterpret_cast<JpegError*>(cinfo->err)->truncated = true;
}
}  // namespace

static RgbImage DecodeJpeg(const std::string& path, const std::string& bytes) {
  jpeg_decompress_struct cinfo;
  JpegError err;
  err.truncated = false;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = JpegExit;
  err.mgr.emit_message = JpegMessage;
  RgbImage img;
  int orientation = 1;
  std::vector<uint8_t> row;  // before setjmp: a longjmp must not skip a constructor
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    throw InputError("image " + path + ": cannot be read as an image (" + err.message + ")");
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, reinterpret_cast<const unsigned char*>(bytes.data()), static_cast<unsigned long>(bytes.size()));
  jpeg_save_markers(&cinfo, JPEG_APP0 + 1, 0xFFFF);
  jpeg_read_header(&cinfo, TRUE);
  for (jpeg_saved_marker_ptr m = cinfo.marker_list; m; m = m->next)
    if (m->marker == JPEG_APP0 + 1 && m->data_length >= 6 && std::memcmp(m->data, "Exif\0\0", 6) == 0) {
      orientation = ExifOrientation(m->data, m->data_length);  // the first Exif block, as Pillow
      break;
    }
  if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
    jpeg_destroy_decompress(&cinfo);
    throw InputError("image " + path + ": a CMYK JPEG, which the app does not convert (save it as RGB)");
  }
  const bool grey = cinfo.jpeg_color_space == JCS_GRAYSCALE;
  cinfo.out_color_space = grey ? JCS_GRAYSCALE : JCS_RGB;  // default DCT and upsampling, as Pillow
  jpeg_start_decompress(&cinfo);
  img.width = static_cast<int>(cinfo.output_width);
  img.height = static_cast<int>(cinfo.output_height);
  img.pixels.resize(static_cast<size_t>(img.width) * img.height * 3);
  row.resize(static_cast<size_t>(img.width) * cinfo.output_components);
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW r = row.data();
    size_t y = cinfo.output_scanline;
    jpeg_read_scanlines(&cinfo, &r, 1);
    uint8_t* out = &img.pixels[y * img.width * 3];
    if (grey) {
      for (int x = 0; x < img.width; ++x) out[3 * x] = out[3 * x + 1] = out[3 * x + 2] = row[x];
    } else {
      std::memcpy(out, row.data(), row.size());
    }
    if (err.truncated) break;
  }
  if (err.truncated) {
    jpeg_destroy_decompress(&cinfo);
    throw InputError("image " + path + ": cannot be read as an image (image file is truncated)");
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  if (err.truncated) throw InputError("image " + path + ": cannot be read as an image (image file is truncated)");
  return Orient(std::move(img), orientation);
}

// ---- PNG -------------------------------------------------------------------------------
namespace {
struct PngReader {
  const std::string* bytes;
  size_t pos;
  char message[256];
};

void PngRead(png_structp png, png_bytep out, png_size_t n) {
  PngReader* r = static_cast<PngReader*>(png_get_io_ptr(png));
  if (r->pos + n > r->bytes->size()) png_error(png, "image file is truncated");
  std::memcpy(out, r->bytes->data() + r->pos, n);
  r->pos += n;
}

void PngFail(png_structp png, png_const_charp msg) {
  PngReader* r = static_cast<PngReader*>(png_get_error_ptr(png));
  std::snprintf(r->message, sizeof(r->message), "%s", msg);
  png_longjmp(png, 1);
}

void PngWarn(png_structp, png_const_charp) {}
}  // namespace

static RgbImage DecodePng(const std::string& path, const std::string& bytes) {
  PngReader reader{&bytes, 0, {0}};
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &reader, PngFail, PngWarn);
  png_infop info = png_create_info_struct(png);
  RgbImage img;
  std::vector<uint8_t> buf;
  std::vector<png_bytep> rows;
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, nullptr);
    throw InputError("image " + path + ": cannot be read as an image (" + reader.message + ")");
  }
  png_set_read_fn(png, &reader, PngRead);
  png_read_info(png, info);
  png_uint_32 w, h;
  int depth, color, interlace;
  png_get_IHDR(png, info, &w, &h, &depth, &color, &interlace, nullptr, nullptr);
  // Pillow: 16-bit grey is mode I;16, whose conversion to RGB clips at 255; the other 16-bit
  // modes keep the high byte (png_set_strip_16)
  const bool grey16 = depth == 16 && color == PNG_COLOR_TYPE_GRAY && !png_get_valid(png, info, PNG_INFO_tRNS);
  if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if (color == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
  if (png_get_valid(png, info, PNG_INFO_tRNS)) png_set_tRNS_to_alpha(png);
  if (depth == 16 && !grey16) png_set_strip_16(png);
  if (grey16) png_set_swap(png);  // host-order 16-bit samples
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  const int channels = png_get_channels(png, info);
  const size_t rowbytes = png_get_rowbytes(png, info);
  buf.resize(rowbytes * h);
  rows.resize(h);
  for (png_uint_32 y = 0; y < h; ++y) rows[y] = buf.data() + y * rowbytes;
  png_read_image(png, rows.data());
  png_read_end(png, info);  // an eXIf chunk may follow the image data
  int orientation = 1;
  png_uint_32 exif_len = 0;
  png_bytep exif = nullptr;
  if (png_get_eXIf_1(png, info, &exif_len, &exif) && exif) orientation = ExifOrientation(exif, exif_len);
  png_destroy_read_struct(&png, &info, nullptr);

  img.width = static_cast<int>(w);
  img.height = static_cast<int>(h);
  img.pixels.resize(static_cast<size_t>(w) * h * 3);
  for (png_uint_32 y = 0; y < h; ++y) {
    const uint8_t* in = rows[y];
    uint8_t* out = &img.pixels[static_cast<size_t>(y) * w * 3];
    for (png_uint_32 x = 0; x < w; ++x, out += 3) {
      if (grey16) {
        uint16_t v;
        std::memcpy(&v, in + 2 * x, 2);
        out[0] = out[1] = out[2] = static_cast<uint8_t>(v > 255 ? 255 : v);
      } else if (channels == 1) {
        out[0] = out[1] = out[2] = in[x];
      } else if (channels == 2) {
        uint8_t rgba[4] = {in[2 * x], in[2 * x], in[2 * x], in[2 * x + 1]};
        OnWhite(rgba, out);
      } else if (channels == 3) {
        std::memcpy(out, in + 3 * x, 3);
      } else {
        OnWhite(in + 4 * x, out);
      }
    }
  }
  return Orient(std::move(img), orientation);
}

RgbImage LoadImage(const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) throw InputError("image " + path + ": no such file");
  std::string bytes = ReadFile(path);
  const auto* b = reinterpret_cast<const uint8_t*>(bytes.data());
  RgbImage img;
  if (bytes.size() >= 3 && b[0] == 0xFF && b[1] == 0xD8 && b[2] == 0xFF) {
    img = DecodeJpeg(path, bytes);
  } else if (bytes.size() >= 8 && std::memcmp(b, "\x89PNG\r\n\x1a\n", 8) == 0) {
    img = DecodePng(path, bytes);
  } else {
    throw InputError("image " + path + ": cannot be read as an image (not a JPEG or PNG file; the app reads those two)");
  }
  if (img.width < 1 || img.height < 1)
    throw InputError("image has no pixels (" + std::to_string(img.width) + "x" + std::to_string(img.height) + ")");
  return img;
}

// ---- Pillow's resize -------------------------------------------------------------------
namespace {
constexpr int kPrecision = 32 - 8 - 2;  // Pillow's PRECISION_BITS for 8-bit images

// precompute_coeffs + normalize_coeffs_8bpc of Pillow's Resample.c, BILINEAR filter
struct Coeffs {
  int ksize = 0;
  std::vector<int> bounds;  // xmin, count per output pixel
  std::vector<int32_t> k;
};

Coeffs Precompute(int in_size, int out_size) {
  const float in0 = 0.f, in1 = static_cast<float>(in_size);
  double scale = static_cast<double>(in1 - in0) / out_size;
  double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 1.0 * filterscale;
  Coeffs c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.bounds.resize(static_cast<size_t>(out_size) * 2);
  c.k.assign(static_cast<size_t>(out_size) * c.ksize, 0);
  std::vector<double> kk(c.ksize);
  const double inv = 1.0 / filterscale;
  for (int xx = 0; xx < out_size; ++xx) {
    double center = in0 + (xx + 0.5) * scale;
    double ww = 0.0;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    for (int x = 0; x < xmax; ++x) {
      double t = (x + xmin - center + 0.5) * inv;
      if (t < 0.0) t = -t;
      double w = t < 1.0 ? 1.0 - t : 0.0;
      kk[x] = w;
      ww += w;
    }
    for (int x = 0; x < xmax; ++x)
      if (ww != 0.0) kk[x] /= ww;
    for (int x = 0; x < xmax; ++x) {
      double v = kk[x] * (1 << kPrecision);
      c.k[static_cast<size_t>(xx) * c.ksize + x] = static_cast<int32_t>(v < 0 ? -0.5 + v : 0.5 + v);
    }
    c.bounds[2 * xx] = xmin;
    c.bounds[2 * xx + 1] = xmax;
  }
  return c;
}

inline uint8_t Clip8(int v) {
  int s = v >> kPrecision;
  return static_cast<uint8_t>(s < 0 ? 0 : (s > 255 ? 255 : s));
}

// one pass along x (rows stay) or along y (columns stay), 3 channels
std::vector<uint8_t> Horizontal(const std::vector<uint8_t>& in, int h, int in_w, int out_w) {
  Coeffs c = Precompute(in_w, out_w);
  std::vector<uint8_t> out(static_cast<size_t>(h) * out_w * 3);
  for (int y = 0; y < h; ++y) {
    const uint8_t* line = &in[static_cast<size_t>(y) * in_w * 3];
    for (int xx = 0; xx < out_w; ++xx) {
      const int xmin = c.bounds[2 * xx], xmax = c.bounds[2 * xx + 1];
      const int32_t* k = &c.k[static_cast<size_t>(xx) * c.ksize];
      int s0 = 1 << (kPrecision - 1), s1 = s0, s2 = s0;
      for (int x = 0; x < xmax; ++x) {
        const uint8_t* p = line + (x + xmin) * 3;
        s0 += p[0] * k[x];
        s1 += p[1] * k[x];
        s2 += p[2] * k[x];
      }
      uint8_t* o = &out[(static_cast<size_t>(y) * out_w + xx) * 3];
      o[0] = Clip8(s0);
      o[1] = Clip8(s1);
      o[2] = Clip8(s2);
    }
  }
  return out;
}

std::vector<uint8_t> Vertical(const std::vector<uint8_t>& in, int in_h, int w, int out_h) {
  Coeffs c = Precompute(in_h, out_h);
  std::vector<uint8_t> out(static_cast<size_t>(out_h) * w * 3);
  for (int yy = 0; yy < out_h; ++yy) {
    const int ymin = c.bounds[2 * yy], ymax = c.bounds[2 * yy + 1];
    const int32_t* k = &c.k[static_cast<size_t>(yy) * c.ksize];
    for (int xx = 0; xx < w; ++xx) {
      int s0 = 1 << (kPrecision - 1), s1 = s0, s2 = s0;
      for (int y = 0; y < ymax; ++y) {
        const uint8_t* p = &in[(static_cast<size_t>(y + ymin) * w + xx) * 3];
        s0 += p[0] * k[y];
        s1 += p[1] * k[y];
        s2 += p[2] * k[y];
      }
      uint8_t* o = &out[(static_cast<size_t>(yy) * w + xx) * 3];
      o[0] = Clip8(s0);
      o[1] = Clip8(s1);
      o[2] = Clip8(s2);
    }
  }
  return out;
}
}  // namespace

std::vector<uint8_t> ResizeBilinear(const RgbImage& image, int size) {
  const int in_h = image.height, in_w = image.width;
  if (in_h == size && in_w == size) return image.pixels;
  const bool need_h = size != in_w, need_v = size != in_h;
  // Pillow runs the vertical pass first when the height shrinks more than twice the width
  const bool horizontal_first = !((in_h - size) > 0 && (in_h - size) > (in_w - size) * 2);
  std::vector<uint8_t> cur = image.pixels;
  int h = in_h, w = in_w;
  if (horizontal_first) {
    if (need_h) cur = Horizontal(cur, h, w, size), w = size;
    if (need_v) cur = Vertical(cur, h, w, size), h = size;
  } else {
    if (need_v) cur = Vertical(cur, h, w, size), h = size;
    if (need_h) cur = Horizontal(cur, h, w, size), w = size;
  }
  return cur;
}

std::vector<float> NormalizePixels(const std::vector<uint8_t>& rgb, int size) {
  // (x / 255 - 0.5) / 0.5 fused as (x - 127.5) / 127.5 in float32, as sam3_nn.runtime.preprocess
  const float mean = static_cast<float>(0.5 / (1.0 / 255.0)), std = static_cast<float>(0.5 / (1.0 / 255.0));
  const size_t hw = static_cast<size_t>(size) * size;
  std::vector<float> out(3 * hw);
  for (size_t i = 0; i < hw; ++i)
    for (int c = 0; c < 3; ++c) out[c * hw + i] = (static_cast<float>(rgb[i * 3 + c]) - mean) / std;
  return out;
}

}  // namespace sam3
