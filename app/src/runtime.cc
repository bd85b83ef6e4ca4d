// The compiled library at run time: manifest, converted weights, TVM's Relax VM, and the
// calls encode_image / encode_text / detect / predict_masks, as sam3_nn.runtime.engine and sam3_nn.runtime.api do.
#include <dlfcn.h>
#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#ifdef __APPLE__
#include <mach-o/dyld.h>
#else
#include <link.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/optional.h>
#include <tvm/ffi/string.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <regex>
#include <set>
#include <sstream>

#include "internal.h"
#include "json.h"
#include "sam3/sam3.h"

namespace sam3 {

namespace ffi = tvm::ffi;
using Clock = std::chrono::steady_clock;

static double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// ---- small helpers ---------------------------------------------------------------------
static bool IsFile(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

static bool Exists(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0;
}

static bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// os.path.splitext(path)[0]
static std::string StripExtension(const std::string& path) {
  size_t slash = path.find_last_of('/');
  size_t dot = path.find_last_of('.');
  size_t base = slash == std::string::npos ? 0 : slash + 1;
  while (base < path.size() && path[base] == '.') ++base;  // leading dots are no extension
  if (dot == std::string::npos || dot < base) return path;
  return path.substr(0, dot);
}

static std::string Join(const std::vector<std::string>& v, const std::string& sep, size_t limit = SIZE_MAX) {
  std::string s;
  for (size_t i = 0; i < v.size() && i < limit; ++i) s += (i ? sep : "") + v[i];
  return s;
}

static std::string ShapeStr(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// ---- manifest ----------------------------------------------------------------------------
JValue ReadManifest(const std::string& library) {
  std::string path = StripExtension(library) + ".json";
  if (!IsFile(path))
    throw LibraryError(library + ": manifest " + path + " not found (written by compile.py beside the library)");
  JValue m;
  try {
    m = ReadJsonFile(path);
  } catch (const std::exception& e) {
    throw LibraryError(path + ": not a valid manifest: " + e.what());
  }
  const JValue* format = m.get("format");
  if (!format || format->kind != JValue::kString || format->s != "sam3_nn-library")
    throw LibraryError(path + ": not a sam3_nn library manifest");
  for (const char* key : {"target", "dtype", "config", "functions", "params"})
    if (!m.get(key)) throw LibraryError(path + ": manifest lacks '" + std::string(key) + "'");
  return m;
}

// The part of a library's config the weights depend on (sam3_nn.runtime.api.weights_config):
// the image size changes no weight.
static JValue WeightsConfig(JValue config) {
  auto v = config.object.find("vision");
  if (v != config.object.end()) {
    auto b = v->second.object.find("backbone");
    if (b != v->second.object.end()) b->second.object.erase("image_size");
  }
  return config;
}

// "key: theirs (weights) vs ours (library); ..." as sam3_nn.runtime.api.config_diff
static std::string ConfigDiff(const JValue& ours, const JValue& theirs, size_t limit = 6) {
  std::map<std::string, const JValue*> a, b;
  JValue wa = WeightsConfig(ours), wb = WeightsConfig(theirs);
  FlattenJson(wa, "", &a);
  FlattenJson(wb, "", &b);
  std::set<std::string> keys;
  for (auto& kv : a) keys.insert(kv.first);
  for (auto& kv : b) keys.insert(kv.first);
  std::vector<std::string> diff;
  for (const auto& k : keys) {
    auto ia = a.find(k), ib = b.find(k);
    bool same = ia != a.end() && ib != b.end() && JsonEqual(*ia->second, *ib->second);
    if (!same)
      diff.push_back(k + ": " + (ib != b.end() ? JsonRepr(*ib->second) : "None") + " (weights) vs " +
                     (ia != a.end() ? JsonRepr(*ia->second) : "None") + " (library)");
  }
  std::string s = Join(diff, "; ", limit);
  if (diff.size() > limit) s += "; ... (" + std::to_string(diff.size()) + " keys differ)";
  return s;
}

// ---- safetensors -------------------------------------------------------------------------
// The format is an 8-byte header length, a JSON header and the raw data: read with the
// JSON parser above and mmap, no library needed.
struct SafeTensors {
  struct Entry {
    std::string dtype;  // manifest spelling: float32, float16, ...
    std::vector<int64_t> shape;
    size_t begin = 0, end = 0;
  };
  std::map<std::string, Entry> tensors;
  std::map<std::string, std::string> metadata;
  const uint8_t* data = nullptr;  // start of the data section
  void* map = nullptr;
  size_t map_size = 0;

  ~SafeTensors() {
    if (map) munmap(map, map_size);
  }
};

static std::string SafeTensorsDtype(const std::string& st) {
  static const std::map<std::string, std::string> names = {
      {"F64", "float64"}, {"F32", "float32"}, {"F16", "float16"}, {"BF16", "bfloat16"},
      {"I64", "int64"},   {"I32", "int32"},   {"I16", "int16"},   {"I8", "int8"},
      {"U64", "uint64"},  {"U32", "uint32"},  {"U16", "uint16"},  {"U8", "uint8"},
      {"BOOL", "bool"}};
  auto it = names.find(st);
  return it == names.end() ? st : it->second;
}

static std::unique_ptr<SafeTensors> OpenSafeTensors(const std::string& path) {
  auto bad = [&](const std::string& why) {
    return LibraryError("weights " + path + ": not a readable safetensors file (" + why + ")");
  };
  int fd = open(path.c_str(), O_RDONLY);
  if (fd < 0) throw bad(std::strerror(errno));
  struct stat st;
  fstat(fd, &st);
  auto out = std::make_unique<SafeTensors>();
  out->map_size = static_cast<size_t>(st.st_size);
  if (out->map_size < 8) {
    close(fd);
    throw bad("file too short");
  }
  void* m = mmap(nullptr, out->map_size, PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (m == MAP_FAILED) throw bad(std::strerror(errno));
  out->map = m;
  const uint8_t* bytes = static_cast<const uint8_t*>(m);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];
  if (n > out->map_size - 8) throw bad("header length past the end of the file");
  JValue header;
  try {
    header = ParseJson(std::string(reinterpret_cast<const char*>(bytes + 8), n));
  } catch (const std::exception& e) {
    throw bad(std::string("header: ") + e.what());
  }
  if (header.kind != JValue::kObject) throw bad("header is not a JSON object");
  out->data = bytes + 8 + n;
  size_t data_size = out->map_size - 8 - n;
  for (const auto& kv : header.object) {
    if (kv.first == "__metadata__") {
      for (const auto& m2 : kv.second.object)
        if (m2.second.kind == JValue::kString) out->metadata[m2.first] = m2.second.s;
      continue;
    }
    const JValue* dtype = kv.second.get("dtype");
    const JValue* shape = kv.second.get("shape");
    const JValue* offsets = kv.second.get("data_offsets");
    if (!dtype || !shape || !offsets || offsets->array.size() != 2)
      throw bad("tensor " + kv.first + " lacks dtype, shape or data_offsets");
    SafeTensors::Entry e;
    e.dtype = SafeTensorsDtype(dtype->s);
    for (const JValue& d : shape->array) e.shape.push_back(d.i);
    e.begin = static_cast<size_t>(offsets->array[0].i);
    e.end = static_cast<size_t>(offsets->array[1].i);
    if (e.end < e.begin || e.end > data_size) throw bad("tensor " + kv.first + " lies past the end of the file");
    out->tensors[kv.first] = e;
  }
  return out;
}

// ---- dtypes ------------------------------------------------------------------------------
static uint16_t FloatToHalf(float f) {
  // round to nearest even, as numpy's astype(float16)
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000;
  uint32_t mag = x & 0x7FFFFFFF;
  if (mag >= 0x7F800000) return sign | (mag > 0x7F800000 ? 0x7E00 : 0x7C00);  // NaN / inf
  if (mag >= 0x477FF000) return sign | 0x7C00;                                 // overflow
  if (mag < 0x38800000) {  // a half subnormal: round(f / 2^-24)
    if (mag < 0x33000000) return sign;
    uint32_t e = mag >> 23, m = (mag & 0x7FFFFF) | 0x800000;
    uint32_t shift = 126 - e;  // 14..24
    uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) ++r;
    return sign | r;
  }
  uint32_t h = ((mag - 0x38000000) >> 13);
  uint32_t rem = mag & 0x1FFF;
  if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) ++h;
  return sign | h;
}

static float HalfToFloat(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF, x;
  if (e == 0) {
    if (m == 0) {
      x = sign;
    } else {  // subnormal: normalise
      e = 127 - 15 + 1;
      while (!(m & 0x400)) {
        m <<= 1;
        --e;
      }
      x = sign | (e << 23) | ((m & 0x3FF) << 13);
    }
  } else if (e == 31) {
    x = sign | 0x7F800000 | (m << 13);
  } else {
    x = sign | ((e + 127 - 15) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

// F16C converts 8 values per instruction with the same rounding (nearest even) as the scalar
// code; a 1008 px image is 3M pixels and a mask output 16M logits, too many to do one by one.
#if defined(__x86_64__) || defined(__i386__)
static bool HasF16C() {
  static const bool has = __builtin_cpu_supports("f16c");
  return has;
}
__attribute__((target("f16c"))) static void FloatsToHalfF16C(const float* in, uint16_t* out, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) out[i] = FloatToHalf(in[i]);
}
__attribute__((target("f16c"))) static void HalfsToFloatF16C(const uint16_t* in, float* out, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
  for (; i < n; ++i) out[i] = HalfToFloat(in[i]);
}
#endif

static void FloatsToHalf(const float* in, uint16_t* out, size_t n) {
#if defined(__x86_64__) || defined(__i386__)
  if (HasF16C()) return FloatsToHalfF16C(in, out, n);
#endif
  for (size_t i = 0; i < n; ++i) out[i] = FloatToHalf(in[i]);
}

static void HalfsToFloat(const uint16_t* in, float* out, size_t n) {
#if defined(__x86_64__) || defined(__i386__)
  if (HasF16C()) return HalfsToFloatF16C(in, out, n);
#endif
  for (size_t i = 0; i < n; ++i) out[i] = HalfToFloat(in[i]);
}

static uint16_t FloatToBfloat16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7FFFFFFF) > 0x7F800000) return static_cast<uint16_t>((x >> 16) | 0x40);
  x += 0x7FFF + ((x >> 16) & 1);
  return static_cast<uint16_t>(x >> 16);
}

static float Bfloat16ToFloat(uint16_t b) {
  uint32_t x = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

// ---- the TVM side ----------------------------------------------------------------------
// Where libtvm_runtime was loaded from (its device runtimes lie beside it).
static std::string TvmRuntimeDir() {
  std::string found;
#ifdef __APPLE__
  for (uint32_t i = 0; i < _dyld_image_count(); ++i) {
    std::string name = _dyld_get_image_name(i);
    if (name.find("libtvm_runtime.") != std::string::npos) found = name;
  }
#else
  dl_iterate_phdr(
      [](struct dl_phdr_info* info, size_t, void* data) {
        std::string name = info->dlpi_name ? info->dlpi_name : "";
        if (name.find("libtvm_runtime.") != std::string::npos) *static_cast<std::string*>(data) = name;
        return 0;
      },
      &found);
#endif
  size_t slash = found.find_last_of('/');
  return slash == std::string::npos ? "." : found.substr(0, slash);
}

// The wheels keep a GPU's module loader in a library of its own (Linux:
// libtvm_runtime_cuda.so; the macOS wheel: libtvm_runtime_metal.dylib), which nothing loads
// by itself; a library for that GPU fails to load without it.
static void LoadDeviceRuntime(const std::string& kind) {
#ifdef __APPLE__
  const std::string ext = ".dylib";
#else
  const std::string ext = ".so";
#endif
  if (kind != "cuda" && kind != "metal" && kind != "rocm" && kind != "vulkan" && kind != "opencl") return;
  std::string path = TvmRuntimeDir() + "/libtvm_runtime_" + kind + ext;
  if (!Exists(path)) return;  // built into libtvm_runtime itself, or absent: TVM says which
  if (!dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL))
    throw LibraryError("cannot load TVM's " + kind + " runtime " + path + ": " + dlerror());
}

static DLDevice DeviceFor(const std::string& name) {
  std::string kind = name.substr(0, name.find('-'));
  static const std::map<std::string, std::pair<std::string, int>> kinds = {
      {"llvm", {"cpu", kDLCPU}},    {"cpu", {"cpu", kDLCPU}},          {"cuda", {"cuda", kDLCUDA}},
      {"metal", {"metal", kDLMetal}}, {"rocm", {"rocm", kDLROCM}},     {"opencl", {"opencl", kDLOpenCL}},
      {"vulkan", {"vulkan", kDLVulkan}}, {"webgpu", {"webgpu", kDLWebGPU}}};
  auto it = kinds.find(kind);
  if (it == kinds.end()) throw LibraryError("unknown device " + name + " (expected cpu, cuda or metal)");
#ifndef __APPLE__
  if (it->second.first == "metal") throw LibraryError("device metal: Metal runs on Apple machines only");
#endif
  LoadDeviceRuntime(it->second.first);
  return DLDevice{static_cast<DLDeviceType>(it->second.second), 0};
}

// Tensors through the runtime's registered functions (the wheel's C++ headers for
// tvm::runtime::Tensor include headers the wheel does not ship).
static ffi::Tensor Empty(const std::vector<int64_t>& shape, DLDataType dtype, DLDevice dev) {
  static ffi::Function alloc = ffi::Function::GetGlobalRequired("runtime.TVMTensorAllocWithScope");
  return alloc(ffi::Shape(shape.begin(), shape.end()), dtype, dev, ffi::Optional<ffi::String>())
      .cast<ffi::Tensor>();
}

static void CopyIn(const ffi::Tensor& t, const void* data, size_t nbytes) {
  static ffi::Function copy = ffi::Function::GetGlobalRequired("runtime.TVMTensorCopyFromBytes");
  copy(t, const_cast<void*>(data), static_cast<int64_t>(nbytes));
}

static void CopyOut(const ffi::Tensor& t, void* data, size_t nbytes) {
  static ffi::Function copy = ffi::Function::GetGlobalRequired("runtime.TVMTensorCopyToBytes");
  copy(t, data, static_cast<int64_t>(nbytes));
}

static size_t NumBytes(const ffi::Tensor& t) {
  return static_cast<size_t>(t.numel()) * ((t.dtype().bits * t.dtype().lanes + 7) / 8);
}

// A host array in `dtype` from float32 / int64 values, as numpy's astype.
static std::vector<uint8_t> ConvertFloats(const std::vector<float>& v, const std::string& dtype) {
  std::vector<uint8_t> out;
  if (dtype == "float32") {
    out.resize(v.size() * 4);
    std::memcpy(out.data(), v.data(), out.size());
  } else if (dtype == "float16") {
    std::vector<uint16_t> h(v.size());
    FloatsToHalf(v.data(), h.data(), v.size());
    out.resize(v.size() * 2);
    std::memcpy(out.data(), h.data(), out.size());
  } else if (dtype == "bfloat16") {
    out.resize(v.size() * 2);
    for (size_t i = 0; i < v.size(); ++i) {
      uint16_t h = FloatToBfloat16(v[i]);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  } else {
    throw LibraryError("the library takes " + dtype + " where this app feeds floating-point values");
  }
  return out;
}

static std::vector<uint8_t> ConvertInts(const std::vector<int64_t>& v, const std::string& dtype) {
  std::vector<uint8_t> out;
  if (dtype == "int64") {
    out.resize(v.size() * 8);
    std::memcpy(out.data(), v.data(), out.size());
  } else if (dtype == "int32") {
    out.resize(v.size() * 4);
    for (size_t i = 0; i < v.size(); ++i) {
      int32_t x = static_cast<int32_t>(v[i]);
      std::memcpy(out.data() + 4 * i, &x, 4);
    }
  } else {
    throw LibraryError("the library takes " + dtype + " where this app feeds integer values");
  }
  return out;
}

static std::vector<float> ToFloats(const ffi::Tensor& t) {
  size_t n = static_cast<size_t>(t.numel());
  std::vector<float> out(n);
  DLDataType dt = t.dtype();
  if (dt.code == kDLFloat && dt.bits == 32) {
    CopyOut(t, out.data(), n * 4);
  } else if ((dt.code == kDLFloat || dt.code == kDLBfloat) && dt.bits == 16) {
    std::vector<uint16_t> h(n);
    CopyOut(t, h.data(), n * 2);
    if (dt.code == kDLFloat) {
      HalfsToFloat(h.data(), out.data(), n);
    } else {
      for (size_t i = 0; i < n; ++i) out[i] = Bfloat16ToFloat(h[i]);
    }
  } else {
    throw LibraryError("unexpected output dtype " + std::string(ffi::DLDataTypeToString(dt)));
  }
  return out;
}

// The tensor's bytes on the host, converted to float32 a range at a time.
static std::function<std::vector<float>(size_t, size_t)> FloatRange(const ffi::Tensor& t) {
  DLDataType dt = t.dtype();
  const bool f32 = dt.code == kDLFloat && dt.bits == 32;
  if (!f32 && !((dt.code == kDLFloat || dt.code == kDLBfloat) && dt.bits == 16))
    throw LibraryError("unexpected output dtype " + std::string(ffi::DLDataTypeToString(dt)));
  auto bytes = std::make_shared<std::vector<uint8_t>>(NumBytes(t));
  CopyOut(t, bytes->data(), bytes->size());
  const bool half = dt.code == kDLFloat;
  return [bytes, f32, half](size_t begin, size_t count) {
    std::vector<float> out(count);
    if (f32) {
      std::memcpy(out.data(), bytes->data() + begin * 4, count * 4);
      return out;
    }
    std::vector<uint16_t> h(count);
    std::memcpy(h.data(), bytes->data() + begin * 2, count * 2);
    if (half) {
      HalfsToFloat(h.data(), out.data(), count);
    } else {
      for (size_t i = 0; i < count; ++i) out[i] = Bfloat16ToFloat(h[i]);
    }
    return out;
  };
}

void ConfigureCpuThreads() {
  if (getenv("TVM_NUM_THREADS") || getenv("OMP_NUM_THREADS")) return;
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return;
  std::set<std::string> cores;  // CPUs sharing a core list the same thread siblings
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (!CPU_ISSET(cpu, &set)) continue;
    std::ifstream f("/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/thread_siblings_list");
    std::string line;
    if (!f || !std::getline(f, line)) return;  // unknown: TVM's default stays
    cores.insert(line);
  }
  if (!cores.empty()) setenv("TVM_NUM_THREADS", std::to_string(cores.size()).c_str(), 0);
#endif
}

// ---- the model -------------------------------------------------------------------------
struct InputSpec {
  std::string name, dtype;
  std::vector<JValue> shape;
};

struct Model::Impl {
  JValue manifest;
  std::string library, target, dtype;
  int image_size = 0;
  DLDevice device{kDLCPU, 0};
  std::optional<ffi::Module> module, vm;  // set in the constructor
  ffi::Array<ffi::Any> params;                 // bound weights (empty once transformed)
  std::map<std::string, ffi::Any> fn_params;   // per function: its transformed weights
  std::map<std::string, ffi::Function> funcs;
  ffi::Optional<ffi::Tensor> token;            // release_outputs' argument
  std::map<std::string, std::vector<ffi::Tensor>> text_cache;
  std::vector<ffi::Tensor> positions;

  const JValue& functions() const { return *manifest.get("functions"); }
  bool has(const std::string& fn) const { return functions().get(fn) != nullptr; }

  std::vector<InputSpec> inputs(const std::string& fn) const {
    std::vector<InputSpec> out;
    for (const JValue& i : functions().get(fn)->get("inputs")->array)
      out.push_back({i.get("name")->s, i.get("dtype")->s, i.get("shape")->array});
    return out;
  }

  std::vector<std::string> outputs(const std::string& fn) const {
    std::vector<std::string> out;
    for (const JValue& o : functions().get(fn)->get("outputs")->array) out.push_back(o.get("name")->s);
    return out;
  }

  std::string function_list() const {
    std::vector<std::string> names;
    for (const auto& kv : functions().object) names.push_back(kv.first);
    return Join(names, ", ");
  }

  ffi::Function& function(const std::string& name) {
    auto it = funcs.find(name);
    if (it != funcs.end()) return it->second;
    ffi::Optional<ffi::Function> f = (*vm)->GetFunction(name);
    if (!f.has_value()) throw LibraryError("library " + library + " has no function '" + name + "'");
    return funcs.emplace(name, *f).first->second;
  }

  // A library compiled for one batch size takes exactly that many (sam3_nn.engine).
  void check_batch(const std::string& fn) const {
    const JValue* batch = manifest.get("batch");
    if (!batch || batch->kind != JValue::kInt || batch->i == 1) return;
    throw LibraryError(fn + ": this app runs one image at a time, but this library was compiled for batch " +
                       std::to_string(batch->i) + " only (compile.py --batch 1, or --batch any for every size)");
  }

  // Calls `fn` with its packed weights; returns its outputs (device tensors).
  std::vector<ffi::Tensor> call(const std::string& fn, const std::vector<ffi::Any>& args) {
    if (!has(fn))
      throw LibraryError("library has no function '" + fn + "'; it has " + function_list());
    check_batch(fn);
    std::vector<ffi::AnyView> views(args.begin(), args.end());
    auto fp = fn_params.find(fn);
    ffi::Any packed = fp != fn_params.end() ? fp->second : ffi::Any(params);
    views.push_back(packed);
    ffi::Any result;
    function(fn).CallPacked(views.data(), static_cast<int32_t>(views.size()), &result);
    std::vector<ffi::Tensor> out;
    if (auto t = result.try_cast<ffi::Tensor>()) {
      out.push_back(*t);
    } else {
      for (const ffi::Any& o : result.cast<ffi::Array<ffi::Any>>()) out.push_back(o.cast<ffi::Tensor>());
    }
    release();
    return out;
  }

  // TVM's VM holds the value its last call returned until the next call; the library's
  // release_outputs (which returns its argument) makes it let go, as sam3_nn.engine does.
  void release() {
    if (!has("release_outputs")) return;
    if (!token.has_value()) {
      token = Empty({1}, DLDataType{kDLInt, 32, 1}, device);
      int32_t zero = 0;
      CopyIn(*token, &zero, 4);
    }
    function("release_outputs")(*token);
  }

  ffi::Tensor host_to_device(const std::vector<uint8_t>& bytes, const std::vector<int64_t>& shape,
                             const std::string& dtype) {
    ffi::Tensor t = Empty(shape, ffi::StringToDLDataType(ffi::String(dtype)), device);
    CopyIn(t, bytes.data(), bytes.size());
    return t;
  }
};

static std::string InputDtype(const std::vector<InputSpec>& specs, const std::string& name, const std::string& fn) {
  for (const auto& s : specs)
    if (s.name == name) return s.dtype;
  throw LibraryError("library function '" + fn + "' has no input '" + name + "'");
}

static void CheckConverted(const std::string& path, const SafeTensors& st, const JValue& manifest) {
  auto meta = [&](const char* k) {
    auto it = st.metadata.find(k);
    return it == st.metadata.end() ? std::string() : it->second;
  };
  const std::string dtype = manifest.get("dtype")->s;
  if (meta("dtype") != dtype)
    throw LibraryError("weights " + path + " are " + (meta("dtype").empty() ? "None" : meta("dtype")) +
                       " but the library is compiled for " + dtype +
                       "; convert again for this library (python -m sam3_nn convert SRC <library>.json OUT)");
  // The Python runtime compares sha256 fingerprints of the canonical config JSON; the
  // converter stores that config beside the fingerprint, so the app compares the configs
  // themselves (the same test, without re-creating Python's JSON spelling of numbers).
  if (meta("config").empty())
    throw LibraryError("weights " + path + " lack the model configuration in their metadata; convert them "
                       "again with a current sam3_nn (python -m sam3_nn convert SRC <library>.json OUT)");
  JValue theirs;
  try {
    theirs = ParseJson(meta("config"));
  } catch (const std::exception& e) {
    throw LibraryError("weights " + path + ": unreadable configuration in the metadata (" + e.what() + ")");
  }
  const JValue& ours = *manifest.get("config");
  if (!JsonEqual(WeightsConfig(ours), WeightsConfig(theirs)))
    throw LibraryError("weights " + path + " were converted for a different model configuration than the library's: " +
                       ConfigDiff(ours, theirs));
  std::vector<std::string> parts, lib_parts;
  std::stringstream ss(meta("parts"));
  for (std::string p; std::getline(ss, p, ',');)
    if (!p.empty()) parts.push_back(p);
  if (const JValue* lp = manifest.get("parts"))
    for (const JValue& p : lp->array) lib_parts.push_back(p.s);
  auto list = [](const std::vector<std::string>& v) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); ++i) s += (i ? ", '" : "'") + v[i] + "'";
    return s + "]";
  };
  if (!parts.empty() && parts != lib_parts)
    throw LibraryError("weights " + path + " hold parts " + list(parts) + " but the library has " + list(lib_parts));
}

Model::Model(const std::string& library, const std::string& weights, const std::string& device)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.library = library;
  ConfigureCpuThreads();  // before TVM's thread pool starts
  if (!IsFile(library)) throw LibraryError("library " + library + " does not exist");
  m.manifest = ReadManifest(library);
  m.target = m.manifest.get("target")->s;
  m.dtype = m.manifest.get("dtype")->s;
  const JValue* size = m.manifest.get("config")->get("vision");
  size = size ? size->get("backbone") : nullptr;
  size = size ? size->get("image_size") : nullptr;
  if (!size || size->kind != JValue::kInt) throw LibraryError(library + ": manifest config lacks vision.backbone.image_size");
  m.image_size = static_cast<int>(size->i);

  // weights first (as the Python runtime): cheap checks before the library loads
  if (!Exists(weights)) throw LibraryError("weights " + weights + " do not exist");
  if (EndsWith(weights, ".pt") || EndsWith(weights, ".pth"))
    throw LibraryError("weights " + weights + ": a PyTorch checkpoint cannot be read without torch; convert it once with "
                       "`python -m sam3_nn convert " + weights + " <library>.json <out>.safetensors`");
  if (!IsFile(weights))
    throw LibraryError("weights " + weights + ": the app reads converted weights only (one .safetensors file); "
                       "convert the snapshot once with `python -m sam3_nn convert " + weights +
                       " <library>.json <out>.safetensors`");
  std::unique_ptr<SafeTensors> st = OpenSafeTensors(weights);
  auto fmt = st->metadata.find("format");
  if (fmt == st->metadata.end() || fmt->second != "sam3_nn")
    throw LibraryError("weights " + weights + ": not converted sam3_nn weights (metadata format=" +
                       (fmt == st->metadata.end() ? "None" : "'" + fmt->second + "'") +
                       "); convert a checkpoint with `python -m sam3_nn convert " + weights +
                       " <library>.json <out>.safetensors`");
  CheckConverted(weights, *st, m.manifest);

  // names, shapes and dtypes against the manifest (sam3_nn.engine.CompiledModel.bind)
  const JValue& want = *m.manifest.get("params");
  std::vector<std::string> missing, extra, bad;
  std::set<std::string> names;
  for (const JValue& p : want.array) {
    const std::string& name = p.get("name")->s;
    names.insert(name);
    auto it = st->tensors.find(name);
    if (it == st->tensors.end()) {
      missing.push_back(name);
      continue;
    }
    std::vector<int64_t> shape;
    for (const JValue& d : p.get("shape")->array) shape.push_back(d.i);
    if (shape != it->second.shape || p.get("dtype")->s != it->second.dtype)
      bad.push_back(name + ": expected " + ShapeStr(shape) + " " + p.get("dtype")->s + ", got " +
                    ShapeStr(it->second.shape) + " " + it->second.dtype);
  }
  for (const auto& kv : st->tensors)
    if (!names.count(kv.first)) extra.push_back(kv.first);
  if (!missing.empty() || !extra.empty() || !bad.empty()) {
    std::string msg = "weights do not fit this library:";
    if (!missing.empty()) msg += "\n  missing " + std::to_string(missing.size()) + ": " + Join(missing, ", ", 8);
    if (!extra.empty()) msg += "\n  extra " + std::to_string(extra.size()) + ": " + Join(extra, ", ", 8);
    if (!bad.empty()) msg += "\n  wrong shape/dtype: " + Join(bad, "; ", 8);
    throw LibraryError(msg);
  }

  try {
    m.device = DeviceFor(device.empty() ? m.target : device);
    m.module = ffi::Module::LoadFromFile(ffi::String(library));
    ffi::Optional<ffi::Function> load = (*m.module)->GetFunction("vm_load_executable");
    if (!load.has_value()) throw LibraryError("library " + library + " holds no Relax VM executable");
    m.vm = (*load)().cast<ffi::Module>();
    // the device, then the CPU (shape functions run there), each with the pooled allocator
    std::vector<ffi::Any> init = {static_cast<int64_t>(m.device.device_type), static_cast<int64_t>(m.device.device_id),
                                  int64_t{2}};
    if (m.device.device_type != kDLCPU) init.insert(init.end(), {int64_t{kDLCPU}, int64_t{0}, int64_t{2}});
    std::vector<ffi::AnyView> views(init.begin(), init.end());
    ffi::Any ignored;
    (*(*m.vm)->GetFunction("vm_initialization")).CallPacked(views.data(), static_cast<int32_t>(views.size()), &ignored);

    // bind: one device tensor per parameter, in the manifest's order
    std::vector<ffi::Any> raw;
    raw.reserve(want.array.size());
    for (const JValue& p : want.array) {
      const SafeTensors::Entry& e = st->tensors.at(p.get("name")->s);
      ffi::Tensor t = Empty(e.shape, ffi::StringToDLDataType(ffi::String(e.dtype)), m.device);
      if (NumBytes(t) != e.end - e.begin)
        throw LibraryError("weights " + weights + ": tensor " + p.get("name")->s + " holds " +
                           std::to_string(e.end - e.begin) + " bytes, expected " + std::to_string(NumBytes(t)));
      CopyIn(t, st->data + e.begin, e.end - e.begin);
      raw.push_back(t);
    }
    ffi::Array<ffi::Any> bound(raw.begin(), raw.end());
    raw.clear();
    // the library's weight transforms run once here (sam3_nn.param_transform); a transform
    // takes a tuple holding the weight tuple
    if (const JValue* tf = m.manifest.get("param_transforms")) {
      ffi::Array<ffi::Any> held{ffi::Any(bound)};
      for (const auto& kv : tf->object) m.fn_params[kv.first] = m.function(kv.second.s)(held);
    }
    m.params = m.fn_params.empty() ? bound : ffi::Array<ffi::Any>();
  } catch (const ffi::Error& e) {
    throw LibraryError("library " + library + " cannot run on this machine: " + e.message());
  }
}

Model::~Model() = default;

const std::string& Model::target() const { return impl_->target; }
const std::string& Model::dtype() const { return impl_->dtype; }
int Model::image_size() const { return impl_->image_size; }
bool Model::has(const std::string& fn) const { return impl_->has(fn); }
std::string Model::functions() const { return impl_->function_list(); }

int Model::text_context() const {
  for (const auto& s : impl_->inputs("encode_text"))
    if (s.name == "input_ids") return static_cast<int>(s.shape.back().i);
  throw LibraryError("library function 'encode_text' has no input 'input_ids'");
}

int Model::max_boxes() const {
  for (const auto& s : impl_->inputs("detect"))
    if (s.name == "boxes") return static_cast<int>(s.shape[1].i);
  return 0;
}

int Model::max_points() const {
  if (!impl_->has("predict_masks")) return 0;
  for (const auto& s : impl_->inputs("predict_masks"))
    if (s.name == "points") return static_cast<int>(s.shape[1].i);
  return 0;
}

int64_t Model::vocab_size() const {
  const JValue* t = impl_->manifest.get("config")->get("text");
  const JValue* v = t ? t->get("vocab_size") : nullptr;
  return v ? v->i : 0;
}

ImageState Model::SetImage(const RgbImage& image) {
  auto t0 = Clock::now();
  Impl& m = *impl_;
  if (!m.has("encode_image"))
    throw LibraryError("an image needs the library function 'encode_image', which this library lacks (it has " +
                       m.function_list() + ")");
  std::vector<uint8_t> resized = ResizeBilinear(image, m.image_size);
  std::vector<float> pixels = NormalizePixels(resized, m.image_size);
  std::string dtype = InputDtype(m.inputs("encode_image"), "pixel_values", "encode_image");
  ffi::Tensor x = m.host_to_device(ConvertFloats(pixels, dtype), {1, 3, m.image_size, m.image_size}, dtype);
  auto t1 = Clock::now();
  auto features = std::make_shared<std::vector<ffi::Tensor>>(m.call("encode_image", {x}));
  ImageState s;
  s.height = image.height;
  s.width = image.width;
  s.features = features;
  s.preprocess_s = std::chrono::duration<double>(t1 - t0).count();
  s.encode_s = Since(t1);
  return s;
}

// A detect input name -> (role, level), as sam3_nn.runtime.api._input_role.
static std::pair<std::string, int> InputRole(std::string name) {
  for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  static const std::regex feature(R"((?:fpn_)?(?:hidden_states|features|vision_features|fpn)[._]?(\d+))");
  static const std::regex position(R"((?:fpn_)?(?:position_encoding|pos_encoding|pos_embeds?|pos)[._]?(\d+))");
  std::smatch mt;
  if (std::regex_match(name, mt, feature)) return {"feature", std::stoi(mt[1])};
  if (std::regex_match(name, mt, position)) return {"position", std::stoi(mt[1])};
  static const std::map<std::string, std::string> roles = {
      {"text_features", "text"},        {"text_embeds", "text"},         {"prompt_features", "text"},
      {"text_mask", "text_mask"},       {"attention_mask", "text_mask"}, {"prompt_mask", "text_mask"},
      {"input_boxes", "boxes"},         {"boxes", "boxes"},              {"box_embeddings", "boxes"},
      {"input_boxes_labels", "box_labels"}, {"box_labels", "box_labels"}, {"labels", "box_labels"},
      {"box_mask", "box_mask"}};
  auto it = roles.find(name);
  if (it != roles.end()) return {it->second, -1};
  throw LibraryError("the library's detect function takes an input '" + name + "' this runtime does not know");
}

Detections Model::Predict(const ImageState& state, const Tokenizer& tokenizer, const std::string& text_in,
                          const std::vector<Box>& boxes, float score_threshold, float mask_threshold) {
  Impl& m = *impl_;
  for (const char* fn : {"encode_text", "detect"})
    if (!m.has(fn))
      throw LibraryError(std::string("prediction needs the library function '") + fn +
                         "', which this library lacks (it has " + m.function_list() +
                         "); compile it with a newer sam3_nn");
  const std::string text = text_in.empty() ? "visual" : text_in;  // Sam3Processor's box-only text
  auto cached = m.text_cache.find(text);
  if (cached == m.text_cache.end()) {
    Tokenizer::Encoding enc = tokenizer.Encode(text, text_context());
    auto specs = m.inputs("encode_text");
    int ctx = static_cast<int>(enc.input_ids.size());
    std::vector<int64_t> ids(enc.input_ids.begin(), enc.input_ids.end());
    std::vector<int64_t> mask(enc.attention_mask.begin(), enc.attention_mask.end());
    std::string id_t = InputDtype(specs, "input_ids", "encode_text");
    std::string mask_t = InputDtype(specs, "attention_mask", "encode_text");
    std::vector<ffi::Any> args = {m.host_to_device(ConvertInts(ids, id_t), {1, ctx}, id_t),
                                  m.host_to_device(ConvertInts(mask, mask_t), {1, ctx}, mask_t)};
    cached = m.text_cache.emplace(text, m.call("encode_text", args)).first;
  }
  const std::vector<ffi::Tensor>& text_out = cached->second;

  auto specs = m.inputs("detect");
  int slots = max_boxes();
  std::vector<float> model_boxes(static_cast<size_t>(slots) * 4, 0.f);
  std::vector<int64_t> labels(slots, 0), box_mask(slots, 0);
  if (!boxes.empty()) {
    CheckBoxes(boxes, state.height, state.width);
    if (static_cast<int>(boxes.size()) > slots)
      throw InputError(std::to_string(boxes.size()) + " boxes given; this library takes at most " +
                       std::to_string(slots) + " (compile with more box slots)");
    // pixel xyxy -> normalised cxcywh in float32 (sam3_nn.runtime.preprocess.boxes_to_model)
    const float w = static_cast<float>(state.width), h = static_cast<float>(state.height);
    for (size_t i = 0; i < boxes.size(); ++i) {
      float x0 = static_cast<float>(boxes[i].x0) / w, y0 = static_cast<float>(boxes[i].y0) / h;
      float x1 = static_cast<float>(boxes[i].x1) / w, y1 = static_cast<float>(boxes[i].y1) / h;
      float* b = &model_boxes[i * 4];
      b[0] = (x0 + x1) / 2;
      b[1] = (y0 + y1) / 2;
      b[2] = x1 - x0;
      b[3] = y1 - y0;
      labels[i] = boxes[i].label;
      box_mask[i] = 1;
    }
  }
  const auto& features = *static_cast<std::vector<ffi::Tensor>*>(state.features.get());
  std::vector<ffi::Any> args;
  for (const auto& in : specs) {
    auto role = InputRole(in.name);
    if (role.first == "feature") {
      args.push_back(features.at(role.second));
    } else if (role.first == "position") {
      if (m.positions.empty()) m.positions = m.call("image_position_encoding", {ffi::Shape({1})});
      args.push_back(m.positions.at(role.second));
    } else if (role.first == "text") {
      args.push_back(text_out.at(0));
    } else if (role.first == "text_mask") {
      args.push_back(text_out.at(1));
    } else if (role.first == "boxes") {
      args.push_back(m.host_to_device(ConvertFloats(model_boxes, in.dtype), {1, slots, 4}, in.dtype));
    } else if (role.first == "box_mask") {
      args.push_back(m.host_to_device(ConvertInts(box_mask, in.dtype), {1, slots}, in.dtype));
    } else {
      args.push_back(m.host_to_device(ConvertInts(labels, in.dtype), {1, slots}, in.dtype));
    }
  }
  std::vector<ffi::Tensor> out = m.call("detect", args);
  std::vector<std::string> names = m.outputs("detect");
  if (names.size() != out.size())
    throw LibraryError("detect returned " + std::to_string(out.size()) + " outputs, manifest names " +
                       std::to_string(names.size()));
  RawOutputs raw;
  for (size_t i = 0; i < names.size(); ++i) {
    const std::string& n = names[i];
    if (n != "pred_logits" && n != "pred_boxes" && n != "pred_masks" && n != "presence_logits") continue;
    RawOutputs::Array& a = raw.arrays[n];
    if (n == "pred_masks")
      a.range = FloatRange(out[i]);
    else
      a.values = ToFloats(out[i]);
    a.shape.assign(out[i].shape().begin(), out[i].shape().end());
  }
  return PostProcess(raw, state.height, state.width, score_threshold, mask_threshold);
}

bool Model::has_interactive() const { return impl_->has("predict_masks"); }

InteractiveResult Model::PredictPoints(const ImageState& state, const std::vector<Point>& points, const Box* box,
                                       bool multimask, double mask_threshold_logit, double max_hole_area,
                                       const std::vector<float>& mask_input) {
  Impl& m = *impl_;
  if (!m.has("predict_masks"))
    throw LibraryError("interactive segmentation (points, a box or a mask) needs the library function "
                       "'predict_masks', which this library lacks (it has " + m.function_list() +
                       "); compile it with the interactive part (--parts vision,text,detector,interactive)");
  const auto specs = m.inputs("predict_masks");
  int slots = 0, g = 0;
  for (const auto& in : specs) {
    if (in.name == "points") slots = static_cast<int>(in.shape.at(1).i);
    if (in.name == "mask_input") g = static_cast<int>(in.shape.back().i);
  }
  PointSlots prompt = MakePointSlots(points, box, state.height, state.width, m.image_size, slots);
  const size_t plane = static_cast<size_t>(g) * g;
  if (!mask_input.empty()) {
    if (mask_input.size() != plane)
      throw InputError("mask_input must be " + std::to_string(g) + "x" + std::to_string(g) +
                       " low-resolution logits (one of a previous call's low_res_logits), got " +
                       std::to_string(mask_input.size()) + " values");
    for (float v : mask_input)
      if (!std::isfinite(v)) throw InputError("mask_input must hold finite floating-point logits");
  }
  if (prompt.count == 0 && mask_input.empty()) throw InputError("give a prompt: points, a box or a mask_input");
  // encode_image's maps by name: the tracker neck's are predict_masks' inputs
  const auto& features = *static_cast<std::vector<ffi::Tensor>*>(state.features.get());
  const std::vector<std::string> names = m.outputs("encode_image");
  std::map<std::string, ffi::Tensor> tracker;
  for (size_t i = 0; i < names.size() && i < features.size(); ++i)
    if (names[i].rfind("tracker_embeddings.", 0) == 0)
      tracker.emplace("tracker_embeddings_" + names[i].substr(std::strlen("tracker_embeddings.")), features[i]);
  if (tracker.empty())
    throw LibraryError("this image state holds no tracker features (it was encoded by a library without the "
                       "interactive part)");
  std::vector<float> mask = mask_input.empty() ? std::vector<float>(plane, 0.f) : mask_input;
  std::vector<ffi::Any> args;
  for (const auto& in : specs) {
    if (tracker.count(in.name)) {
      args.push_back(tracker.at(in.name));
    } else if (in.name == "points") {
      args.push_back(m.host_to_device(ConvertFloats(prompt.points, in.dtype), {1, slots, 2}, in.dtype));
    } else if (in.name == "point_labels") {
      args.push_back(m.host_to_device(ConvertInts(prompt.labels, in.dtype), {1, slots}, in.dtype));
    } else if (in.name == "point_mask") {
      args.push_back(m.host_to_device(ConvertInts(prompt.mask, in.dtype), {1, slots}, in.dtype));
    } else if (in.name == "mask_input") {
      args.push_back(m.host_to_device(ConvertFloats(mask, in.dtype), {1, 1, g, g}, in.dtype));
    } else if (in.name == "mask_valid") {
      args.push_back(m.host_to_device(ConvertInts({mask_input.empty() ? 0 : 1}, in.dtype), {1}, in.dtype));
    } else {
      throw LibraryError("the library's predict_masks function takes an input '" + in.name +
                         "' this runtime does not know");
    }
  }
  std::vector<ffi::Tensor> out = m.call("predict_masks", args);
  std::vector<std::string> out_names = m.outputs("predict_masks");
  std::map<std::string, std::vector<float>> raw;
  for (size_t i = 0; i < out_names.size() && i < out.size(); ++i) raw[out_names[i]] = ToFloats(out[i]);
  for (const char* n : {"pred_masks", "iou_scores", "object_score_logits"})
    if (!raw.count(n)) throw LibraryError(std::string("predict_masks' outputs lack '") + n + "'");
  if (raw["pred_masks"].size() < 4 * plane || raw["iou_scores"].size() < 4)
    throw LibraryError("predict_masks returned fewer than 4 masks of " + std::to_string(g) + "x" + std::to_string(g));
  return PostProcessInteractive(raw["pred_masks"], g, raw["iou_scores"], raw["object_score_logits"].at(0), multimask,
                                state.height, state.width, mask_threshold_logit, max_hole_area);
}

}  // namespace sam3
