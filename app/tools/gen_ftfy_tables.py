#!/usr/bin/env python3
"""Write app/src/ftfy_tables.inc: the data of ftfy.fix_text (default configuration), read
from the installed ftfy, so that the app's tokenizer (src/ftfy.cc) cleans prompts exactly
as sam3_nn.runtime.tokenizer.clean does. Run with the Python the project uses:

    python app/tools/gen_ftfy_tables.py > app/src/ftfy_tables.inc

What it writes:
- character sets as code point ranges, each computed by running Python's own `re` on every
  code point (so \\s, \\w, \\d, negated classes and ranges mean what they mean to ftfy);
- ftfy's regular expressions that are alternations of fixed-width sequences (BADNESS_RE,
  ALTERED_UTF8_RE, LOSSY_UTF8_RE, the branches of UTF8_DETECTOR_RE) as lists of
  alternatives, each a list of (set, optional) elements, read from the parsed patterns;
- the single-byte codecs ftfy tries (chardata.CHARMAP_ENCODINGS, its "sloppy" ones
  included) as code point -> byte tables, and windows-1252's decoding table;
- ftfy's HTML entity table, width map, ligatures and removed control characters.

The regular expressions whose structure src/ftfy.cc writes out by hand (ANSI_RE,
HTML_ENTITY_RE, A_GRAVE_WORD_RE, UTF8_DETECTOR_RE's look-behind and repetition, the
utf-8-variants codec's) and the fixing order are checked against the installed ftfy here,
so that another ftfy version stops this script instead of silently diverging.
"""
import codecs
import html
import inspect
import re
import re._parser as sre_parse
import sys
from re._constants import ANY, AT, AT_BEGINNING, BRANCH, IN, LITERAL, MAX_REPEAT, SUBPATTERN, ASSERT_NOT

import ftfy
import ftfy.bad_codecs.utf8_variants as utf8_variants
from ftfy import badness, chardata, fixes

FTFY_VERSION = "6.3.1"
ALL_CHARS = "".join(map(chr, range(0x110000)))
ALL_BYTES = bytes(range(256))


def c_string(s: str) -> str:
    # octal escapes: at most three digits, so a following character never joins them
    return '"' + "".join(chr(b) if 32 <= b < 127 and chr(b) not in '"\\?' else f"\\{b:03o}"
                         for b in s.encode("utf-8", "surrogatepass")) + '"'


class Sets:
    """Distinct character sets, each a list of inclusive code point ranges."""

    def __init__(self):
        self.index = {}
        self.ranges = []

    def add(self, members) -> int:
        key = tuple(sorted(members))
        if key not in self.index:
            rs = []
            for c in key:
                if rs and rs[-1][1] + 1 == c:
                    rs[-1][1] = c
                else:
                    rs.append([c, c])
            self.index[key] = len(self.ranges)
            self.ranges.append(rs)
        return self.index[key]


def item_pattern(op, arg, is_bytes: bool) -> str:
    """A one-character regular expression equal to one parsed element."""
    esc = (lambda c: f"\\x{c:02x}") if is_bytes else (lambda c: f"\\U{c:08x}")
    if op is LITERAL:
        return esc(arg)
    if op is ANY:
        return "."
    assert op is IN, (op, arg)
    body = ""
    for iop, iarg in arg:
        name = str(iop)
        if name == "NEGATE":
            body = "^" + body
        elif name == "LITERAL":
            body += esc(iarg)
        elif name == "RANGE":
            body += esc(iarg[0]) + "-" + esc(iarg[1])
        elif name == "CATEGORY":
            body += {"CATEGORY_SPACE": r"\s", "CATEGORY_WORD": r"\w", "CATEGORY_DIGIT": r"\d"}[str(iarg)]
        else:
            raise AssertionError(f"unexpected class item {iop} {iarg}")
    return "[" + body + "]"


def members(pattern: str, is_bytes: bool, flags: int = 0):
    if is_bytes:
        return {m[0] for m in re.findall(pattern.encode("latin-1"), ALL_BYTES, flags)}
    return {ord(c) for c in re.findall(pattern, ALL_CHARS, flags)}


def element_set(sets: Sets, op, arg, is_bytes: bool, flags: int) -> int:
    return sets.add(members(item_pattern(op, arg, is_bytes), is_bytes, flags))


def alternatives(sets: Sets, branches, is_bytes: bool, flags: int):
    """[(at_begin, [(set, optional), ...]), ...] for a branch of fixed-width sequences."""
    out = []
    for seq in branches:
        at_begin, elems = False, []
        for op, arg in seq:
            if op is AT:
                assert arg is AT_BEGINNING and not elems, (op, arg)
                at_begin = True
            elif op is MAX_REPEAT:
                lo, hi, sub = arg
                assert len(sub) == 1 and (lo, hi) in ((0, 1), (hi, hi)), arg
                s = element_set(sets, *sub[0], is_bytes, flags)
                if (lo, hi) == (0, 1):
                    elems.append((s, 1))
                else:
                    elems += [(s, 0)] * hi
            else:
                elems.append((element_set(sets, op, arg, is_bytes, flags), 0))
        out.append((at_begin, elems))
    return out


def top_branches(regex):
    tree = sre_parse.parse(regex.pattern, regex.flags)
    assert len(tree.data) == 1 and tree.data[0][0] is BRANCH, regex.pattern
    return [list(b.data) for b in tree.data[0][1][1]]


def write_alts(out, name: str, alts, doc: str) -> None:
    out.write(f"// {doc}\n")
    out.write(f"static const FtfyElem {name}Elems[] = {{\n")
    first = []
    n = 0
    for at_begin, elems in alts:
        first.append(n)
        out.write("    " + " ".join(f"{{{s}, {o}}}," for s, o in elems) + "\n")
        n += len(elems)
    out.write("};\n")
    out.write(f"static const FtfyAlt {name}[] = {{\n")
    for (at_begin, elems), f in zip(alts, first):
        out.write(f"    {{{f}, {len(elems)}, {int(at_begin)}}},\n")
    out.write("};\n")


def check_structure() -> None:
    """The parts src/ftfy.cc writes by hand are what the installed ftfy has."""
    assert ftfy.__version__ == FTFY_VERSION, f"ftfy {ftfy.__version__}: src/ftfy.cc follows {FTFY_VERSION}"
    assert fixes.ANSI_RE.pattern == "\033\\[((?:\\d|;)*)([a-zA-Z])", fixes.ANSI_RE.pattern
    assert chardata.HTML_ENTITY_RE.pattern == r"&#?[0-9A-Za-z]{1,24};", chardata.HTML_ENTITY_RE.pattern
    assert fixes.A_GRAVE_WORD_RE.pattern == b"\xc3 (?! |quele|quela|quilo|s )", fixes.A_GRAVE_WORD_RE.pattern
    assert chardata.C1_CONTROL_RE.pattern == r"[\x80-\x9f]"
    assert utf8_variants.SPECIAL_BYTES_RE.pattern == (
        b"(\xc0(\x80|$))|(\xed([\xa0-\xaf]|$)([\x80-\xbf]|$)(\xed|$)([\xb0-\xbf]|$)([\x80-\xbf]|$))"
        b"|(\xed([\xa0-\xbf]|$)([\x80-\xbf]|$))"), utf8_variants.SPECIAL_BYTES_RE.pattern
    defaults = ftfy.TextFixerConfig()
    assert defaults == ftfy.TextFixerConfig(
        unescape_html="auto", remove_terminal_escapes=True, fix_encoding=True, restore_byte_a0=True,
        replace_lossy_sequences=True, decode_inconsistent_utf8=True, fix_c1_controls=True,
        fix_latin_ligatures=True, fix_character_width=True, uncurl_quotes=True, fix_line_breaks=True,
        fix_surrogates=True, remove_control_chars=True, normalization="NFC", max_decode_length=1000000,
        explain=True), defaults
    src = inspect.getsource(ftfy.fix_and_explain)
    order = ['"fix_c1_controls"', '"fix_latin_ligatures"', '"fix_character_width"', '"uncurl_quotes"',
             '"fix_line_breaks"', '"fix_surrogates"', '"remove_terminal_escapes"', '"remove_control_chars"']
    pos = [src.index(s) for s in order]
    assert pos == sorted(pos), "fix_and_explain's order of fixers changed"
    assert chardata.CHARMAP_ENCODINGS == [
        "latin-1", "sloppy-windows-1252", "sloppy-windows-1251", "sloppy-windows-1250", "sloppy-windows-1253",
        "sloppy-windows-1254", "sloppy-windows-1257", "iso-8859-2", "macroman", "cp437"], chardata.CHARMAP_ENCODINGS


def main() -> None:
    check_structure()
    out = sys.stdout
    sets = Sets()
    text = []

    # BADNESS_RE: one alternation; ^ only at the start of the alternative
    bad = alternatives(sets, top_branches(badness.BADNESS_RE), False, badness.BADNESS_RE.flags)
    altered = alternatives(sets, top_branches(chardata.ALTERED_UTF8_RE), True, 0)
    lossy = alternatives(sets, top_branches(chardata.LOSSY_UTF8_RE), True, 0)

    # UTF8_DETECTOR_RE: (?<![strict]) ( alt | alt | alt )+
    tree = sre_parse.parse(chardata.UTF8_DETECTOR_RE.pattern, chardata.UTF8_DETECTOR_RE.flags).data
    assert [op for op, _ in tree] == [ASSERT_NOT, MAX_REPEAT], tree
    direction, behind = tree[0][1]
    assert direction == -1 and len(behind.data) == 1
    strict = element_set(sets, *behind.data[0], False, 0)
    lo, hi, body = tree[1][1]
    assert lo == 1 and hi == sre_parse.MAXREPEAT and len(body) == 1 and body[0][0] is SUBPATTERN
    inner = body[0][1][3].data
    assert len(inner) == 1 and inner[0][0] is BRANCH
    detector = alternatives(sets, [list(b.data) for b in inner[0][1][1]], False, 0)

    single_quote = sets.add(members(chardata.SINGLE_QUOTE_RE.pattern, False))
    double_quote = sets.add(members(chardata.DOUBLE_QUOTE_RE.pattern, False))
    digit = sets.add(members(r"\d", False))  # ANSI_RE's \d

    out.write(f"// Generated by app/tools/gen_ftfy_tables.py from ftfy {ftfy.__version__} on Python "
              f"{sys.version.split()[0]} (Unicode {__import__('unicodedata').unidata_version}); do not edit.\n")
    out.write("// kSetRanges[kSets[i].first .. + kSets[i].count]: set i's inclusive code point (or byte) ranges.\n")
    out.write("static const FtfyRange kSetRanges[] = {\n")
    starts = []
    n = 0
    for rs in sets.ranges:
        starts.append(n)
        line = " ".join(f"{{0x{a:x}, 0x{b:x}}}," for a, b in rs)
        out.write(f"    {line}\n")
        n += len(rs)
    out.write("};\n")
    out.write("static const FtfySet kSets[] = {\n")
    for s, rs in zip(starts, sets.ranges):
        out.write(f"    {{{s}, {len(rs)}}},\n")
    out.write("};\n")
    write_alts(out, "kBadness", bad, "badness.BADNESS_RE (is_bad: any alternative matching anywhere)")
    write_alts(out, "kAlteredUtf8", altered, "chardata.ALTERED_UTF8_RE (bytes)")
    write_alts(out, "kLossyUtf8", lossy, "chardata.LOSSY_UTF8_RE (bytes)")
    write_alts(out, "kUtf8Detector", detector, "the branches of chardata.UTF8_DETECTOR_RE's repeated group")
    out.write("// UTF8_DETECTOR_RE's look-behind set; uncurl_quotes' sets; ANSI_RE's \\d\n")
    out.write(f"constexpr int kSetUtf8ContinuationStrict = {strict};\n")
    out.write(f"constexpr int kSetSingleQuote = {single_quote};\n")
    out.write(f"constexpr int kSetDoubleQuote = {double_quote};\n")
    out.write(f"constexpr int kSetDigit = {digit};\n")

    # the single-byte codecs: which characters each can encode (ENCODING_REGEXES) and to what
    out.write("// chardata.CHARMAP_ENCODINGS in order: each one's encodable characters -> byte, sorted\n")
    names = []
    for enc in chardata.CHARMAP_ENCODINGS:
        regex = chardata.ENCODING_REGEXES[enc]
        inner_class = regex.pattern[1:-1]  # ^[...]*$ -> [...]*
        assert regex.pattern.startswith("^[") and regex.pattern.endswith("]*$")
        chars = members(inner_class[:-1], False)
        table = []
        for c in sorted(chars):
            b = chr(c).encode(enc)
            assert len(b) == 1, (enc, c, b)
            table.append((c, b[0]))
        ident = "kEnc_" + re.sub(r"\W", "_", enc)
        names.append((enc, ident))
        out.write(f"static const FtfyEncodeEntry {ident}[] = {{\n")
        for i in range(0, len(table), 8):
            out.write("    " + " ".join(f"{{0x{c:x}, 0x{b:02x}}}," for c, b in table[i:i + 8]) + "\n")
        out.write("};\n")
    out.write("static const FtfyEncoding kCharmapEncodings[] = {\n")
    for enc, ident in names:
        out.write(f"    {{{c_string(enc)}, {ident}, sizeof({ident}) / sizeof({ident}[0])}},\n")
    out.write("};\n")
    out.write("// windows-1252 (strict, Python's codec): byte -> code point, 0xFFFFFFFF where undefined\n")
    out.write("static const uint32_t kWindows1252[256] = {\n")
    cps = []
    for b in range(256):
        try:
            cps.append(ord(bytes([b]).decode("windows-1252")))
        except UnicodeDecodeError:
            cps.append(0xFFFFFFFF)
    for i in range(0, 256, 8):
        out.write("    " + " ".join(f"0x{c:x}," for c in cps[i:i + 8]) + "\n")
    out.write("};\n")
    # fix_c1_controls: U+0080..U+009F -> latin-1 byte -> sloppy-windows-1252
    for c in range(0x80, 0xA0):
        want = bytes([c]).decode("sloppy-windows-1252")
        got = chr(cps[c]) if cps[c] != 0xFFFFFFFF else chr(c)
        assert want == got, (c, want, got)

    out.write("// chardata.HTML_ENTITIES: '&name;' -> UTF-8, sorted by name\n")
    out.write("static const HtmlEntity kFtfyEntities[] = {\n")
    for name in sorted(chardata.HTML_ENTITIES):
        out.write(f"    {{{c_string(name)}, {c_string(chardata.HTML_ENTITIES[name])}}},\n")
    out.write("};\n")

    def write_map(ident, mapping, doc):
        out.write(f"// {doc}\n")
        out.write(f"static const FtfyCharMap {ident}[] = {{\n")
        for c in sorted(mapping):
            v = mapping[c]
            out.write(f"    {{0x{c:x}, {c_string(v if v is not None else '')}}},\n")
        out.write("};\n")

    write_map("kWidthMap", chardata.WIDTH_MAP, "chardata.WIDTH_MAP (fix_character_width)")
    write_map("kLigatures", chardata.LIGATURES, "chardata.LIGATURES (fix_latin_ligatures)")
    write_map("kControlChars", chardata.CONTROL_CHARS, "chardata.CONTROL_CHARS (remove_control_chars: removed)")


if __name__ == "__main__":
    main()
