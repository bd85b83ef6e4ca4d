// SAM 3's text tokenizer: CLIP's byte-level BPE, giving the ids of sam3_nn.runtime.tokenizer
// (HF tokenizers' BPE with transformers' CLIPTokenizer pipeline).
//
// A small hand-written BPE: no maintained C++ BPE library is packaged by Debian (HF's
// tokenizers is Rust, sentencepiece has no byte-level CLIP BPE). Unicode comes from ICU
// (NFC, character categories, white space, lower case); the HTML entity table is Python's,
// generated into html_entities.inc (tools/gen_html_entities.py).
//
// A prompt goes through, as in Python:
//  1. cleanup: ftfy.fix_text (ftfy.cc), HTML entities unescaped twice (Python's
//     html.unescape), then Python's strip();
//  2. the special tokens (<|startoftext|>, <|endoftext|>) matched literally; every other
//     stretch: NFC, each run of White_Space -> one space, lower case per character;
//  3. CLIP's split: contractions ('s 't 're 've 'm 'll 'd), letter runs, single digits,
//     runs of other non-space characters; white space dropped; then GPT-2's split of each
//     piece (HF's ByteLevel pre-tokenizer);
//  4. each piece's UTF-8 bytes as byte-level symbols, the last carrying </w>; BPE merges by
//     rank (lowest first, leftmost among equals); ids from the vocabulary.
#include <unicode/normalizer2.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>
#include <zlib.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <fstream>
#include <sstream>
#include <sys/stat.h>
#include <unordered_map>

#include "internal.h"
#include "json.h"

namespace sam3 {

namespace {
struct HtmlEntity {
  const char* name;
  const char* value;
};
struct InvalidCharref {
  uint32_t num;
  const char* value;
};
#include "html_entities.inc"

constexpr int kClipMerges = 49152 - 256 - 2;  // CLIP reads merges[1:49152-256-2+1]
const char* kBos = "<|startoftext|>";
const char* kEos = "<|endoftext|>";

bool IsDir(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool IsFile(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string ReadText(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw LibraryError("cannot read tokenizer file " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string ReadGzip(const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");
  if (!f) throw LibraryError("cannot read tokenizer file " + path);
  std::string out;
  char buf[1 << 16];
  int n;
  while ((n = gzread(f, buf, sizeof(buf))) > 0) out.append(buf, n);
  int err = 0;
  const char* msg = gzerror(f, &err);
  std::string why = err != Z_OK && err != Z_STREAM_END ? msg : "";
  gzclose(f);
  if (n < 0 || !why.empty()) throw LibraryError("tokenizer file " + path + ": not a readable .gz file (" + why + ")");
  return out;
}

std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> lines;
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    std::string line = text.substr(start, end - start);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    lines.push_back(line);
    start = end + 1;
  }
  return lines;
}

// GPT-2 / CLIP bytes_to_unicode: printable bytes stand for themselves, the others for
// 256 + n, in the order CLIP lists them (the first 256 vocabulary entries)
std::vector<std::pair<int, char32_t>> ByteSymbols() {
  std::vector<std::pair<int, char32_t>> out;
  std::vector<bool> seen(256, false);
  for (int b = '!'; b <= '~'; ++b) out.push_back({b, static_cast<char32_t>(b)}), seen[b] = true;
  for (int b = 0xA1; b <= 0xAC; ++b) out.push_back({b, static_cast<char32_t>(b)}), seen[b] = true;
  for (int b = 0xAE; b <= 0xFF; ++b) out.push_back({b, static_cast<char32_t>(b)}), seen[b] = true;
  int n = 0;
  for (int b = 0; b < 256; ++b)
    if (!seen[b]) out.push_back({b, static_cast<char32_t>(256 + n++)});
  return out;
}

// Python's str.isspace(): White_Space plus the ASCII separators U+001C..U+001F
bool PyIsSpace(char32_t c) { return u_isUWhiteSpace(c) || (c >= 0x1C && c <= 0x1F); }

bool IsLetter(char32_t c) { return (U_GET_GC_MASK(c) & U_GC_L_MASK) != 0; }
bool IsNumber(char32_t c) { return (U_GET_GC_MASK(c) & U_GC_N_MASK) != 0; }

// ---- html.unescape -------------------------------------------------------------------
const char* Html5(const std::string& name) {
  const HtmlEntity* end = kHtml5 + sizeof(kHtml5) / sizeof(kHtml5[0]);
  const HtmlEntity* it = std::lower_bound(kHtml5, end, name.c_str(),
                                          [](const HtmlEntity& e, const char* n) { return std::strcmp(e.name, n) < 0; });
  return it != end && name == it->name ? it->value : nullptr;
}

void AppendUtf8(std::u32string* out, const char* utf8) {
  std::u32string cps;
  DecodeUtf8(utf8, &cps);
  *out += cps;
}

bool IsDigit(char32_t c) { return c >= '0' && c <= '9'; }
bool IsHex(char32_t c) { return IsDigit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); }

}  // namespace

// Python's html.unescape: re.sub of
// &(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?) with html._replace_charref
std::u32string HtmlUnescape(const std::u32string& s) {
  std::u32string out;
  size_t i = 0;
  while (i < s.size()) {
    if (s[i] != '&') {
      out += s[i++];
      continue;
    }
    size_t j = i + 1;
    if (j < s.size() && s[j] == '#') {
      bool hex = j + 1 < s.size() && (s[j + 1] == 'x' || s[j + 1] == 'X');
      size_t k = j + (hex ? 2 : 1), d = k;
      while (d < s.size() && (hex ? IsHex(s[d]) : IsDigit(s[d]))) ++d;
      if (d == k) {  // no digits: no match at this '&'
        out += s[i++];
        continue;
      }
      uint64_t num = 0;
      for (size_t t = k; t < d; ++t) {
        uint32_t v = IsDigit(s[t]) ? s[t] - '0' : (s[t] | 0x20) - 'a' + 10;
        num = std::min<uint64_t>(num * (hex ? 16 : 10) + v, 0x110000);  // past the range is all one
      }
      if (d < s.size() && s[d] == ';') ++d;
      i = d;
      const InvalidCharref* r = nullptr;
      for (const auto& e : kInvalidCharrefs)
        if (e.num == num) r = &e;
      if (r) {
        AppendUtf8(&out, r->value);
      } else if ((num >= 0xD800 && num <= 0xDFFF) || num > 0x10FFFF) {
        out += U'\uFFFD';
      } else if (std::find(std::begin(kInvalidCodepoints), std::end(kInvalidCodepoints), num) ==
                 std::end(kInvalidCodepoints)) {
        out += static_cast<char32_t>(num);
      }
      continue;
    }
    size_t k = j;
    auto excluded = [](char32_t c) {
      return c == '\t' || c == '\n' || c == '\f' || c == ' ' || c == '<' || c == '&' || c == '#' || c == ';';
    };
    while (k < s.size() && k - j < 32 && !excluded(s[k])) ++k;
    if (k == j) {
      out += s[i++];
      continue;
    }
    if (k < s.size() && s[k] == ';') ++k;
    std::u32string name = s.substr(j, k - j);
    i = k;
    std::string ascii = EncodeUtf8(name);
    if (const char* v = Html5(ascii)) {
      AppendUtf8(&out, v);
      continue;
    }
    bool done = false;
    for (size_t x = name.size() - 1; x > 1; --x) {  // the longest known prefix
      if (const char* v = Html5(EncodeUtf8(name.substr(0, x)))) {
        AppendUtf8(&out, v);
        out += name.substr(x);
        done = true;
        break;
      }
    }
    if (!done) out += U'&' + name;
  }
  return out;
}

// ---- UTF-8 -----------------------------------------------------------------------------
bool DecodeUtf8(const std::string& s, std::u32string* out) {
  out->clear();
  size_t i = 0;
  while (i < s.size()) {
    unsigned char c = s[i];
    int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (!n || i + n > s.size()) return false;
    char32_t cp = n == 1 ? c : n == 2 ? (c & 0x1F) : n == 3 ? (c & 0x0F) : (c & 0x07);
    for (int k = 1; k < n; ++k) {
      unsigned char d = s[i + k];
      if ((d & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3F);
    }
    static const char32_t min_for[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min_for[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    out->push_back(cp);
    i += n;
  }
  return true;
}

std::string EncodeUtf8(const std::u32string& s) {
  std::string out;
  for (char32_t c : s) {
    if (c < 0x80) {
      out += static_cast<char>(c);
    } else if (c < 0x800) {
      out += static_cast<char>(0xC0 | (c >> 6));
      out += static_cast<char>(0x80 | (c & 0x3F));
    } else if (c < 0x10000) {
      out += static_cast<char>(0xE0 | (c >> 12));
      out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (c & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (c >> 18));
      out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (c & 0x3F));
    }
  }
  return out;
}

// ---- the tokenizer ---------------------------------------------------------------------
struct Tokenizer::Impl {
  std::unordered_map<std::string, int32_t> vocab;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (a, b) -> (rank, merged id)
  std::string byte_symbol[256];                                       // UTF-8 of each byte's symbol
  int32_t bos = -1, eos = -1, pad = -1, unk = -1;
  std::vector<std::string> specials;  // matched literally in the text
  int32_t max_id = -1;

  static uint64_t Key(int32_t a, int32_t b) { return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b); }

  int32_t id(const std::string& token) const {
    auto it = vocab.find(token);
    return it == vocab.end() ? unk : it->second;
  }

  void add_merges(const std::vector<std::pair<std::string, std::string>>& pairs, const std::string& source) {
    int32_t rank = 0;
    for (const auto& p : pairs) {
      auto a = vocab.find(p.first), b = vocab.find(p.second), ab = vocab.find(p.first + p.second);
      if (a == vocab.end() || b == vocab.end() || ab == vocab.end())
        throw LibraryError("tokenizer " + source + ": merge '" + p.first + " " + p.second +
                           "' names a token the vocabulary lacks");
      merges.emplace(Key(a->second, b->second), std::make_pair(rank++, ab->second));
    }
  }

  void finish(const std::string& source, const std::string& bos_t, const std::string& eos_t, const std::string& pad_t) {
    for (const auto& [role, tok, dst] : {std::tuple<const char*, std::string, int32_t*>{"start", bos_t, &bos},
                                         {"end", eos_t, &eos},
                                         {"padding", pad_t, &pad}}) {
      auto it = vocab.find(tok);
      if (it == vocab.end()) throw LibraryError("tokenizer " + source + ": the vocabulary has no " + role + " token '" + tok + "'");
      *dst = it->second;
    }
    unk = eos;  // sam3_nn.runtime.tokenizer: unk_token=eos
    specials = {bos_t, eos_t, pad_t};
    std::sort(specials.begin(), specials.end());
    specials.erase(std::unique(specials.begin(), specials.end()), specials.end());
    for (const auto& kv : vocab) max_id = std::max(max_id, kv.second);
    for (const auto& [b, cp] : ByteSymbols()) byte_symbol[b] = EncodeUtf8(std::u32string(1, cp));
  }

  // BPE of one pre-tokenized piece (its UTF-8 bytes)
  void bpe(const std::string& piece, std::vector<int32_t>* out) const {
    std::vector<int32_t> sym;
    for (size_t i = 0; i < piece.size(); ++i) {
      std::string s = byte_symbol[static_cast<unsigned char>(piece[i])];
      if (i + 1 == piece.size()) s += "</w>";
      sym.push_back(id(s));
    }
    while (sym.size() > 1) {
      int32_t best = INT32_MAX, merged = -1;
      size_t at = 0;
      for (size_t i = 0; i + 1 < sym.size(); ++i) {
        auto it = merges.find(Key(sym[i], sym[i + 1]));
        if (it != merges.end() && it->second.first < best) best = it->second.first, merged = it->second.second, at = i;
      }
      if (merged < 0) break;
      sym[at] = merged;
      sym.erase(sym.begin() + at + 1);
    }
    out->insert(out->end(), sym.begin(), sym.end());
  }

  // step 2 and 3 on one stretch between special tokens
  void encode_stretch(const std::u32string& text, std::vector<int32_t>* out) const {
    if (text.empty()) return;
    UErrorCode err = U_ZERO_ERROR;
    const icu::Normalizer2* nfc = icu::Normalizer2::getNFCInstance(err);
    std::string utf8 = EncodeUtf8(text), nfc_utf8;
    icu::UnicodeString u = nfc->normalize(icu::UnicodeString::fromUTF8(utf8), err);
    if (U_FAILURE(err)) throw std::runtime_error(std::string("ICU NFC failed: ") + u_errorName(err));
    u.toUTF8String(nfc_utf8);
    std::u32string s, norm;
    DecodeUtf8(nfc_utf8, &s);
    for (size_t i = 0; i < s.size();) {
      if (u_isUWhiteSpace(s[i])) {
        while (i < s.size() && u_isUWhiteSpace(s[i])) ++i;
        norm += U' ';
      } else {
        char32_t c = s[i++];
        if (c == 0x130) {
          norm += U"i\u0307";  // the one character whose full lower case is two (Rust's to_lowercase)
        } else {
          norm += static_cast<char32_t>(u_tolower(c));
        }
      }
    }
    static const char32_t* kContractions[] = {U"'s", U"'t", U"'re", U"'ve", U"'m", U"'ll", U"'d"};
    size_t i = 0;
    while (i < norm.size()) {
      size_t len = 0;
      for (const char32_t* c : {U"<|startoftext|>", U"<|endoftext|>"}) {
        std::u32string lit(c);
        if (!len && norm.compare(i, lit.size(), lit) == 0) len = lit.size();
      }
      for (const char32_t* c : kContractions) {
        std::u32string lit(c);
        if (!len && norm.compare(i, lit.size(), lit) == 0) len = lit.size();
      }
      if (!len) {
        char32_t c = norm[i];
        if (IsLetter(c)) {
          while (i + len < norm.size() && IsLetter(norm[i + len])) ++len;
        } else if (IsNumber(c)) {
          len = 1;
        } else if (!u_isUWhiteSpace(c)) {
          while (i + len < norm.size() && !u_isUWhiteSpace(norm[i + len]) && !IsLetter(norm[i + len]) &&
                 !IsNumber(norm[i + len]))
            ++len;
        } else {
          ++i;  // white space: dropped
          continue;
        }
      }
      byte_level_split(norm.substr(i, len), out);
      i += len;
    }
  }

  // HF's ByteLevel pre-tokenizer splits each piece again with GPT-2's pattern ('s|'t|'re|
  // 've|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+): a no-op on CLIP's pieces except
  // the literal <|startoftext|> / <|endoftext|> ones, which become "<|", the word, "|>"
  void byte_level_split(const std::u32string& piece, std::vector<int32_t>* out) const {
    static const char32_t* kContractions[] = {U"'s", U"'t", U"'re", U"'ve", U"'m", U"'ll", U"'d"};
    size_t i = 0;
    while (i < piece.size()) {
      size_t len = 0;
      for (const char32_t* c : kContractions) {
        std::u32string lit(c);
        if (!len && piece.compare(i, lit.size(), lit) == 0) len = lit.size();
      }
      if (!len) {
        auto same = [&](char32_t c) {
          char32_t first = piece[i];
          if (IsLetter(first)) return IsLetter(c);
          if (IsNumber(first)) return IsNumber(c);
          return !IsLetter(c) && !IsNumber(c) && !u_isUWhiteSpace(c);
        };
        while (i + len < piece.size() && same(piece[i + len])) ++len;
        if (!len) len = 1;  // white space cannot occur here (CLIP's split drops it)
      }
      bpe(EncodeUtf8(piece.substr(i, len)), out);
      i += len;
    }
  }
};

Tokenizer::Tokenizer() : impl_(std::make_unique<Impl>()) {}
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

Tokenizer Tokenizer::Load(const std::string& path) {
  Tokenizer t;
  Impl& m = *t.impl_;
  std::vector<std::pair<std::string, std::string>> pairs;
  auto split = [&](const std::string& line, const std::string& source) {
    size_t sp = line.find(' ');
    if (sp == std::string::npos || sp == 0 || sp + 1 >= line.size() || line.find(' ', sp + 1) != std::string::npos)
      throw LibraryError("tokenizer " + source + ": merge line '" + line + "' is not two tokens");
    pairs.push_back({line.substr(0, sp), line.substr(sp + 1)});
  };
  std::string bos = kBos, eos = kEos, pad = kEos;
  if (IsFile(path) && path.size() > 3 && path.compare(path.size() - 3, 3, ".gz") == 0) {
    // CLIP's bpe_simple_vocab_16e6.txt.gz: a header line, then merges; the vocabulary is the
    // 256 byte symbols, the same with </w>, each merge's result, then the two special tokens
    std::vector<std::string> lines = Lines(ReadGzip(path));
    for (size_t i = 1; i < lines.size() && static_cast<int>(pairs.size()) < kClipMerges; ++i) {
      if (lines[i].empty() && i + 1 == lines.size()) break;  // the final newline
      split(lines[i], path);
    }
    std::vector<std::string> tokens;
    for (const auto& [b, cp] : ByteSymbols()) tokens.push_back(EncodeUtf8(std::u32string(1, cp)));
    for (size_t i = 0, n = tokens.size(); i < n; ++i) tokens.push_back(tokens[i] + "</w>");
    for (const auto& p : pairs) tokens.push_back(p.first + p.second);
    tokens.push_back(kBos);
    tokens.push_back(kEos);
    for (size_t i = 0; i < tokens.size(); ++i) m.vocab.emplace(tokens[i], static_cast<int32_t>(i));
  } else if (IsDir(path)) {
    std::string vocab = path + "/vocab.json", merges = path + "/merges.txt";
    if (!IsFile(vocab) || !IsFile(merges))
      throw LibraryError("tokenizer " + path + ": no vocab.json + merges.txt in this folder; expected CLIP's "
                         "bpe_simple_vocab_16e6.txt.gz (sam3_nn/runtime/data/) or an HF SAM 3 snapshot folder");
    JValue v;
    try {
      v = ParseJson(ReadText(vocab));
    } catch (const std::exception& e) {
      throw LibraryError("tokenizer " + vocab + ": not a readable vocab.json (" + e.what() + ")");
    }
    for (const auto& kv : v.object) m.vocab.emplace(kv.first, static_cast<int32_t>(kv.second.i));
    for (const std::string& line : Lines(ReadText(merges))) {
      if (line.empty() || line.rfind("#version", 0) == 0) continue;
      split(line, merges);
    }
    // the special tokens an HF snapshot names (sam3_nn.runtime.tokenizer.from_pretrained)
    for (const char* file : {"special_tokens_map.json", "tokenizer_config.json"}) {
      std::string f = path + "/" + file;
      if (!IsFile(f)) continue;
      JValue cfg;
      try {
        cfg = ParseJson(ReadText(f));
      } catch (const std::exception& e) {
        throw LibraryError("cannot read " + f + ": " + e.what());
      }
      for (auto& [key, dst] : {std::pair<const char*, std::string*>{"bos_token", &bos}, {"eos_token", &eos},
                               {"pad_token", &pad}}) {
        const JValue* x = cfg.get(key);
        if (x && x->kind == JValue::kObject) x = x->get("content");
        if (x && x->kind == JValue::kString) *dst = x->s;
      }
    }
  } else {
    throw LibraryError("tokenizer " + path + ": " +
                       (IsFile(path) || IsDir(path) ? "expected CLIP's bpe_simple_vocab_16e6.txt.gz or a folder with "
                                                      "vocab.json + merges.txt"
                                                    : "no such file or folder"));
  }
  m.add_merges(pairs, path);
  m.finish(path, bos, eos, pad);
  return t;
}

int Tokenizer::max_id() const { return impl_->max_id; }

namespace {
// step 1: sam3_nn.runtime.tokenizer.clean
std::u32string Clean(const std::string& utf8) {
  std::u32string text;
  if (!DecodeUtf8(utf8, &text)) throw InputError("text prompt is not valid UTF-8");
  text = HtmlUnescape(HtmlUnescape(FixText(text)));
  size_t b = 0, e = text.size();
  while (b < e && PyIsSpace(text[b])) ++b;
  while (e > b && PyIsSpace(text[e - 1])) --e;
  return text.substr(b, e - b);
}
}  // namespace

std::string Tokenizer::Clean(const std::string& utf8) { return EncodeUtf8(sam3::Clean(utf8)); }

std::vector<int32_t> Tokenizer::Tokenize(const std::string& utf8) const {
  std::u32string text = sam3::Clean(utf8);
  // special tokens first, on the raw text (HF tokenizers' added vocabulary: leftmost, longest)
  std::vector<int32_t> ids;
  std::vector<std::u32string> specials;
  for (const auto& s : impl_->specials) {
    std::u32string u;
    DecodeUtf8(s, &u);
    specials.push_back(u);
  }
  size_t start = 0, i = 0;
  while (i < text.size()) {
    size_t best = 0;
    int32_t id = -1;
    for (size_t k = 0; k < specials.size(); ++k)
      if (specials[k].size() > best && text.compare(i, specials[k].size(), specials[k]) == 0) {
        best = specials[k].size();
        id = impl_->vocab.at(impl_->specials[k]);
      }
    if (!best) {
      ++i;
      continue;
    }
    impl_->encode_stretch(text.substr(start, i - start), &ids);
    ids.push_back(id);
    i += best;
    start = i;
  }
  impl_->encode_stretch(text.substr(start), &ids);
  return ids;
}

Tokenizer::Encoding Tokenizer::Encode(const std::string& utf8, int context) const {
  std::vector<int32_t> body = Tokenize(utf8);
  if (body.empty()) throw InputError("text prompt '" + utf8 + "' is empty after cleanup: nothing to look for");
  if (context < 3) throw LibraryError("text context " + std::to_string(context) + " is too short");
  Encoding enc;
  enc.input_ids.assign(context, impl_->pad);
  enc.attention_mask.assign(context, 0);
  size_t keep = std::min(body.size(), static_cast<size_t>(context - 2));
  enc.dropped = static_cast<int>(body.size() - keep);
  enc.input_ids[0] = impl_->bos;
  std::copy(body.begin(), body.begin() + keep, enc.input_ids.begin() + 1);
  enc.input_ids[keep + 1] = impl_->eos;
  std::fill(enc.attention_mask.begin(), enc.attention_mask.begin() + keep + 2, 1);
  return enc;
}

}  // namespace sam3
