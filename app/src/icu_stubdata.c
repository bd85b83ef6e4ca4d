/* An empty ICU common-data package (the layout of ICU's own stubdata library), linked in
 * place of libicudata when ICU is linked statically: the tokenizer uses only what libicuuc
 * compiles in (NFC, character properties, case mapping), so the 30 MB of locale data would
 * be dead weight. tests/test_app.py checks the tokenizer built this way against Python's. */
#include <unicode/udata.h>
#include <unicode/utypes.h>

typedef struct {
  uint16_t header_size;
  uint8_t magic1, magic2;
  UDataInfo info;
  char padding[8];
  uint32_t count, reserved;
  struct {
    uint32_t name_offset, data_offset;
  } toc[1];
} Sam3IcuStubData;

U_EXPORT const Sam3IcuStubData U_ICUDATA_ENTRY_POINT = {
    32, 0xda, 0x27,
    {sizeof(UDataInfo), 0, U_IS_BIG_ENDIAN, U_CHARSET_FAMILY, sizeof(UChar), 0,
     {0x43, 0x6d, 0x6e, 0x44}, /* "CmnD" */ {1, 0, 0, 0}, {0, 0, 0, 0}},
    {0, 0, 0, 0, 0, 0, 0, 0},
    0, 0,
    {{0, 0}}};
