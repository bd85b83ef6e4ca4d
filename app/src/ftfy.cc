// ftfy.fix_text (ftfy 6.3.1, its default TextFixerConfig), which the original SAM 3's
// tokenizer runs first on every prompt (basic_clean) and sam3_nn.runtime.tokenizer.clean
// runs too. No C or C++ port of ftfy exists (Debian packages only the Python one), so this
// is a port of its code path, step by step, with its data generated from the installed
// ftfy by tools/gen_ftfy_tables.py (ftfy_tables.inc): character sets computed by Python's
// `re` on every code point, BADNESS_RE / ALTERED_UTF8_RE / LOSSY_UTF8_RE / UTF8_DETECTOR_RE
// read from their parsed patterns, the single-byte codecs' tables, the entity, width,
// ligature and control-character tables.
//
// fix_text: the text in segments (each line with its '\n', at most 1,000,000 code points);
// HTML unescaping is switched off from the first segment holding '<' on. Each segment, until
// a round changes nothing:
//   unescape_html -> fix_encoding -> fix_c1_controls -> fix_latin_ligatures ->
//   fix_character_width -> uncurl_quotes -> fix_line_breaks -> fix_surrogates ->
//   remove_terminal_escapes -> remove_control_chars -> NFC.
// fix_encoding repeats _fix_encoding_one_step_and_explain until nothing changes: ASCII or
// text that is not is_bad stays; else each of CHARMAP_ENCODINGS that can encode the text
// (in order): encode, restore_byte_a0 (not for macroman), replace_lossy_sequences (sloppy
// codecs), decode as UTF-8 (utf-8-variants when byte ED or C0 occurs) -- the first that
// decodes wins; else decode_inconsistent_utf8; else latin-1 -> windows-1252; else C1
// controls as windows-1252.
//
// What is not the same: Unicode data. The character sets come from the generating Python's
// unicodedata (Unicode 14.0 for Python 3.11), NFC from ICU (Unicode 15.0 for ICU 72), as the
// rest of the tokenizer; characters whose properties changed between those versions may be
// handled differently. Python strings can hold lone surrogates, UTF-8 input cannot: the
// surrogate fix only sees what the steps themselves produce.
#include <unicode/normalizer2.h>
#include <unicode/unistr.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "internal.h"

namespace sam3 {

namespace {
struct FtfyRange {
  uint32_t lo, hi;
};
struct FtfySet {
  uint32_t first, count;
};
struct FtfyElem {
  uint16_t set;
  uint8_t optional;  // `?`: greedy, zero or one
};
struct FtfyAlt {
  uint32_t first, count;
  uint8_t at_begin;  // `^` (no MULTILINE): only at the start of the text
};
struct FtfyEncodeEntry {
  uint32_t cp;
  uint8_t byte;
};
struct FtfyEncoding {
  const char* name;
  const FtfyEncodeEntry* table;  // sorted by cp; the characters chardata.possible_encoding accepts
  size_t size;
};
struct HtmlEntity {
  const char* name;
  const char* value;
};
struct FtfyCharMap {
  uint32_t cp;
  const char* value;  // UTF-8; "" for a removed character
};
#include "ftfy_tables.inc"

template <class T, size_t N>
constexpr size_t Len(const T (&)[N]) {
  return N;
}

bool InSet(int set, uint32_t c) {
  const FtfyRange* b = kSetRanges + kSets[set].first;
  const FtfyRange* e = b + kSets[set].count;
  const FtfyRange* it = std::upper_bound(b, e, c, [](uint32_t v, const FtfyRange& r) { return v < r.lo; });
  return it != b && c <= (it - 1)->hi;
}

// ---- fixed-width alternations (Python's re semantics: at one position the alternatives
// are tried in order, an optional element is taken when it can be) -----------------------
template <class S>
bool MatchElems(const FtfyElem* e, size_t n, const S& s, size_t i, size_t* end) {
  if (n == 0) {
    *end = i;
    return true;
  }
  bool here = i < s.size() && InSet(e->set, static_cast<uint32_t>(static_cast<std::make_unsigned_t<typename S::value_type>>(s[i])));
  if (here && MatchElems(e + 1, n - 1, s, i + 1, end)) return true;
  return e->optional && MatchElems(e + 1, n - 1, s, i, end);
}

// the end of the first alternative that matches at i, or npos
template <class S, size_t N>
size_t MatchAt(const FtfyAlt (&alts)[N], const FtfyElem* elems, const S& s, size_t i) {
  for (const FtfyAlt& a : alts) {
    if (a.at_begin && i != 0) continue;
    size_t end;
    if (MatchElems(elems + a.first, a.count, s, i, &end)) return end;
  }
  return S::npos;
}

template <class S, size_t N>
bool Search(const FtfyAlt (&alts)[N], const FtfyElem* elems, const S& s) {
  for (size_t i = 0; i < s.size(); ++i)
    if (MatchAt(alts, elems, s, i) != S::npos) return true;
  return false;
}

// badness.is_bad
bool IsBad(const std::u32string& s) { return Search(kBadness, kBadnessElems, s); }

std::u32string Utf8To32(const char* utf8) {
  std::u32string out;
  DecodeUtf8(utf8, &out);
  return out;
}

// str.translate with one of the generated maps
std::u32string Translate(const std::u32string& s, const FtfyCharMap* map, size_t n) {
  std::u32string out;
  for (char32_t c : s) {
    const FtfyCharMap* it = std::lower_bound(map, map + n, c, [](const FtfyCharMap& m, char32_t v) { return m.cp < v; });
    if (it != map + n && it->cp == c) {
      out += Utf8To32(it->value);
    } else {
      out += c;
    }
  }
  return out;
}

// ---- byte-level steps of fix_encoding -------------------------------------------------
// chardata.possible_encoding + str.encode
bool Encode(const FtfyEncoding& enc, const std::u32string& s, std::string* out) {
  out->clear();
  for (char32_t c : s) {
    const FtfyEncodeEntry* e = enc.table + enc.size;
    const FtfyEncodeEntry* it =
        std::lower_bound(enc.table, e, c, [](const FtfyEncodeEntry& x, char32_t v) { return x.cp < v; });
    if (it == e || it->cp != c) return false;
    *out += static_cast<char>(it->byte);
  }
  return true;
}

// fixes.restore_byte_a0: A_GRAVE_WORD_RE (b"\xc3 (?! |quele|quela|quilo|s )" -> b"\xc3\xa0 "),
// then each ALTERED_UTF8_RE match with its spaces made A0
std::string RestoreByteA0(const std::string& b) {
  std::string s;
  for (size_t i = 0; i < b.size(); ++i) {
    s += b[i];
    if (static_cast<unsigned char>(b[i]) == 0xC3 && i + 1 < b.size() && b[i + 1] == ' ') {
      bool exception = false;
      for (const char* w : {" ", "quele", "quela", "quilo", "s "})
        exception = exception || b.compare(i + 2, std::strlen(w), w) == 0;
      if (!exception) {
        s += "\xa0 ";
        ++i;
      }
    }
  }
  std::string out;
  for (size_t i = 0; i < s.size();) {
    size_t end = MatchAt(kAlteredUtf8, kAlteredUtf8Elems, s, i);
    if (end == std::string::npos) {
      out += s[i++];
      continue;
    }
    for (; i < end; ++i) out += s[i] == ' ' ? '\xa0' : s[i];
  }
  return out;
}

// fixes.replace_lossy_sequences: each LOSSY_UTF8_RE match -> U+FFFD's UTF-8
std::string ReplaceLossySequences(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size();) {
    size_t end = MatchAt(kLossyUtf8, kLossyUtf8Elems, s, i);
    if (end == std::string::npos) {
      out += s[i++];
    } else {
      out += "\xef\xbf\xbd";
      i = end;
    }
  }
  return out;
}

// Python's strict UTF-8 decoder on b[from, to)
bool DecodeStrict(const std::string& b, size_t from, size_t to, std::u32string* out) {
  std::u32string part;
  if (!DecodeUtf8(b.substr(from, to - from), &part)) return false;
  *out += part;
  return true;
}

// ftfy.bad_codecs.utf8_variants (decode, final): UTF-8 plus CESU-8 surrogate pairs and Java's
// C0 80 for U+0000. SPECIAL_BYTES_RE = (\xc0(\x80|$)) | (\xed([\xa0-\xaf]|$)([\x80-\xbf]|$)
// (\xed|$)([\xb0-\xbf]|$)([\x80-\xbf]|$)) | (\xed([\xa0-\xbf]|$)([\x80-\xbf]|$)); `$` also
// matches before a final '\n'.
bool DecodeUtf8Variants(const std::string& b, std::u32string* out) {
  const size_t n = b.size();
  auto byte = [&](size_t i) { return static_cast<unsigned char>(b[i]); };
  auto dollar = [&](size_t p) { return p == n || (p + 1 == n && b[p] == '\n'); };
  // a sequence of ([lo-hi]|$) groups from p; after a `$` only `$` can follow
  auto groups = [&](size_t p, std::initializer_list<std::pair<int, int>> gs) {
    for (const auto& [lo, hi] : gs) {
      if (p < n && byte(p) >= lo && byte(p) <= hi) {
        ++p;
      } else if (!dollar(p)) {
        return false;
      }
    }
    return true;
  };
  auto cesu = [&](size_t p) {
    return byte(p) == 0xED && groups(p + 1, {{0xA0, 0xAF}, {0x80, 0xBF}, {0xED, 0xED}, {0xB0, 0xBF}, {0x80, 0xBF}});
  };
  auto special = [&](size_t p) {
    if (byte(p) == 0xC0) return groups(p + 1, {{0x80, 0x80}});
    return byte(p) == 0xED && (cesu(p) || groups(p + 1, {{0xA0, 0xBF}, {0x80, 0xBF}}));
  };
  out->clear();
  size_t pos = 0;
  while (pos < n) {
    size_t s = pos;
    while (s < n && !special(s)) ++s;
    if (s > pos && !DecodeStrict(b, pos, s, out)) return false;
    if (s == n) break;
    if (byte(s) == 0xC0) {
      if (n - s < 2) return false;  // a lone C0 at the end: invalid UTF-8
      *out += U'\0';
      pos = s + 2;
    } else if (n - s < 6) {
      return DecodeStrict(b, s, n, out);
    } else if (cesu(s)) {
      *out += static_cast<char32_t>(((byte(s + 1) & 0x0F) << 16) + ((byte(s + 2) & 0x3F) << 10) +
                                    ((byte(s + 4) & 0x0F) << 6) + (byte(s + 5) & 0x3F) + 0x10000);
      pos = s + 6;
    } else {
      if (!DecodeStrict(b, s, s + 3, out)) return false;
      pos = s + 3;
    }
  }
  return true;
}

// ---- str-level steps -------------------------------------------------------------------
// fixes.fix_c1_controls: U+0080..U+009F as sloppy-windows-1252 bytes
std::u32string FixC1Controls(const std::u32string& s) {
  std::u32string out = s;
  for (char32_t& c : out)
    if (c >= 0x80 && c <= 0x9F && kWindows1252[c] != 0xFFFFFFFF) c = kWindows1252[c];
  return out;
}

std::u32string FixEncoding(const std::u32string& text);

// fixes.decode_inconsistent_utf8: UTF8_DETECTOR_RE = (?<![strict]) (alt1|alt2|alt3)+, each
// match that is shorter than the text and is_bad -> fix_encoding
std::u32string DecodeInconsistentUtf8(const std::u32string& s) {
  std::u32string out;
  for (size_t i = 0; i < s.size();) {
    size_t end = i;
    if (i == 0 || !InSet(kSetUtf8ContinuationStrict, s[i - 1])) {
      for (size_t e; (e = MatchAt(kUtf8Detector, kUtf8DetectorElems, s, end)) != std::u32string::npos;) end = e;
    }
    if (end == i) {
      out += s[i++];
      continue;
    }
    std::u32string sub = s.substr(i, end - i);
    out += sub.size() < s.size() && IsBad(sub) ? FixEncoding(sub) : sub;
    i = end;
  }
  return out;
}

bool Utf8DetectorSearch(const std::u32string& s) {
  for (size_t i = 0; i < s.size(); ++i)
    if ((i == 0 || !InSet(kSetUtf8ContinuationStrict, s[i - 1])) &&
        MatchAt(kUtf8Detector, kUtf8DetectorElems, s, i) != std::u32string::npos)
      return true;
  return false;
}

// ftfy._fix_encoding_one_step_and_explain
std::u32string FixEncodingOneStep(const std::u32string& text) {
  if (text.empty()) return text;
  if (std::all_of(text.begin(), text.end(), [](char32_t c) { return c < 0x80; }) || !IsBad(text)) return text;
  bool latin1 = false;
  std::string bytes;
  for (const FtfyEncoding& enc : kCharmapEncodings) {
    if (!Encode(enc, text, &bytes)) continue;
    if (std::strcmp(enc.name, "latin-1") == 0) latin1 = true;
    if (std::strcmp(enc.name, "macroman") != 0 && Search(kAlteredUtf8, kAlteredUtf8Elems, bytes))
      bytes = RestoreByteA0(bytes);
    if (std::strncmp(enc.name, "sloppy", 6) == 0) bytes = ReplaceLossySequences(bytes);
    std::u32string fixed;
    bool variants = bytes.find('\xed') != std::string::npos || bytes.find('\xc0') != std::string::npos;
    if (variants ? DecodeUtf8Variants(bytes, &fixed) : DecodeUtf8(bytes, &fixed)) return fixed;
  }
  if (Utf8DetectorSearch(text)) {
    std::u32string fixed = DecodeInconsistentUtf8(text);
    if (fixed != text) return fixed;
  }
  // ftfy checks "windows-1252" in the list of possible encodings, which holds only
  // "sloppy-windows-1252": so latin-1 text is always tried as strict windows-1252 here
  if (latin1) {
    std::u32string fixed;
    bool ok = true;
    for (char32_t c : text) {
      uint32_t v = c < 256 ? kWindows1252[c] : 0xFFFFFFFF;
      if (v == 0xFFFFFFFF) {
        ok = false;
        break;
      }
      fixed += static_cast<char32_t>(v);
    }
    if (ok && fixed != text) return fixed;
  }
  if (std::any_of(text.begin(), text.end(), [](char32_t c) { return c >= 0x80 && c <= 0x9F; }))
    return FixC1Controls(text);
  return text;
}

// ftfy.fix_encoding
std::u32string FixEncoding(const std::u32string& text) {
  std::u32string cur = text;
  for (;;) {
    std::u32string next = FixEncodingOneStep(cur);
    if (next == cur) return cur;
    cur = std::move(next);
  }
}

bool IsAsciiAlnum(char32_t c) { return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z'); }
bool IsAsciiLetter(char32_t c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z'); }

// fixes.unescape_html: HTML_ENTITY_RE = &#?[0-9A-Za-z]{1,24}; -> ftfy's entity table, or
// html.unescape for a numeric reference unless it leaves a ';'
std::u32string UnescapeHtml(const std::u32string& s) {
  std::u32string out;
  for (size_t i = 0; i < s.size();) {
    size_t j = i + 1, k;
    if (s[i] == '&') {
      if (j < s.size() && s[j] == '#') ++j;
      for (k = j; k < s.size() && k - j < 24 && IsAsciiAlnum(s[k]);) ++k;
      if (k > j && k < s.size() && s[k] == ';') {
        std::u32string match = s.substr(i, k + 1 - i);
        std::string key = EncodeUtf8(match);
        const HtmlEntity* end = kFtfyEntities + Len(kFtfyEntities);
        const HtmlEntity* it = std::lower_bound(kFtfyEntities, end, key.c_str(), [](const HtmlEntity& e, const char* n) {
          return std::strcmp(e.name, n) < 0;
        });
        if (it != end && key == it->name) {
          out += Utf8To32(it->value);
        } else if (match[1] == '#') {
          std::u32string u = HtmlUnescape(match);
          out += u.find(U';') != std::u32string::npos ? match : u;
        } else {
          out += match;
        }
        i = k + 1;
        continue;
      }
    }
    out += s[i++];
  }
  return out;
}

// fixes.uncurl_quotes
std::u32string UncurlQuotes(const std::u32string& s) {
  std::u32string out = s;
  for (char32_t& c : out) {
    if (InSet(kSetDoubleQuote, c)) c = '"';
    else if (InSet(kSetSingleQuote, c)) c = '\'';
  }
  return out;
}

// fixes.fix_line_breaks: \r\n, \r, U+2028, U+2029, U+0085 -> \n
std::u32string FixLineBreaks(const std::u32string& s) {
  std::u32string out;
  for (size_t i = 0; i < s.size(); ++i) {
    char32_t c = s[i];
    if (c == '\r' && i + 1 < s.size() && s[i + 1] == '\n') continue;  // the \n follows
    out += c == '\r' || c == 0x2028 || c == 0x2029 || c == 0x85 ? U'\n' : c;
  }
  return out;
}

// fixes.fix_surrogates: pairs -> their character, lone ones -> U+FFFD
std::u32string FixSurrogates(const std::u32string& s) {
  std::u32string out;
  for (size_t i = 0; i < s.size(); ++i) {
    char32_t c = s[i];
    if (c >= 0xD800 && c <= 0xDBFF && i + 1 < s.size() && s[i + 1] >= 0xDC00 && s[i + 1] <= 0xDFFF) {
      out += 0x10000 + (c - 0xD800) * 0x400 + (s[++i] - 0xDC00);
    } else {
      out += c >= 0xD800 && c <= 0xDFFF ? U'\uFFFD' : c;
    }
  }
  return out;
}

// fixes.remove_terminal_escapes: ANSI_RE = \033\[((?:\d|;)*)([a-zA-Z]) removed
std::u32string RemoveTerminalEscapes(const std::u32string& s) {
  std::u32string out;
  for (size_t i = 0; i < s.size();) {
    if (s[i] == 0x1B && i + 1 < s.size() && s[i + 1] == '[') {
      size_t k = i + 2;
      while (k < s.size() && (s[k] == ';' || InSet(kSetDigit, s[k]))) ++k;
      if (k < s.size() && IsAsciiLetter(s[k])) {
        i = k + 1;
        continue;
      }
    }
    out += s[i++];
  }
  return out;
}

std::u32string Nfc(const std::u32string& s) {
  UErrorCode err = U_ZERO_ERROR;
  const icu::Normalizer2* nfc = icu::Normalizer2::getNFCInstance(err);
  std::string utf8;
  icu::UnicodeString u = nfc->normalize(icu::UnicodeString::fromUTF8(EncodeUtf8(s)), err);
  if (U_FAILURE(err)) throw std::runtime_error(std::string("ICU NFC failed: ") + u_errorName(err));
  u.toUTF8String(utf8);
  std::u32string out;
  DecodeUtf8(utf8, &out);
  return out;
}

// ftfy.fix_and_explain on one segment (explain=False)
std::u32string FixSegment(std::u32string text, bool unescape_html) {
  for (;;) {
    std::u32string orig = text;
    if (unescape_html) text = UnescapeHtml(text);
    text = FixEncoding(text);
    text = FixC1Controls(text);
    text = Translate(text, kLigatures, Len(kLigatures));
    text = Translate(text, kWidthMap, Len(kWidthMap));
    text = UncurlQuotes(text);
    text = FixLineBreaks(text);
    text = FixSurrogates(text);
    text = RemoveTerminalEscapes(text);
    text = Translate(text, kControlChars, Len(kControlChars));
    text = Nfc(text);
    if (text == orig) return text;
  }
}
}  // namespace

std::u32string FixText(const std::u32string& text) {
  constexpr size_t kMaxDecodeLength = 1000000;
  bool unescape_html = true;  // "auto": off from the first segment that holds '<'
  std::u32string out;
  for (size_t pos = 0; pos < text.size();) {
    size_t brk = text.find(U'\n', pos);
    brk = brk == std::u32string::npos ? text.size() : brk + 1;
    brk = std::min(brk, pos + kMaxDecodeLength);
    std::u32string segment = text.substr(pos, brk - pos);
    if (segment.find(U'<') != std::u32string::npos) unescape_html = false;
    out += FixSegment(segment, unescape_html);
    pos = brk;
  }
  return out;
}

}  // namespace sam3
