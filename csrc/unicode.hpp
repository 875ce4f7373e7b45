// Per-code-point data of the BERT text pipeline, looked up in O(1) from generated tables.
// The tables (unicode_tables.inc) are measured from HF tokenizers by gen_unicode_tables.py,
// because the reference mixes Unicode versions; see that script for the reasons.
#pragma once

#include <cstdint>

namespace lrec::unicode_data {

// One distinct combination of properties; most code points share record 0 (no property).
struct Record {
  std::uint8_t flags;      // bit set of the constants below
  std::uint8_t ccc;        // canonical combining class as the reference's NFD sees it
  std::uint8_t nfd_len;    // 0: no canonical decomposition (Hangul is decomposed by rule)
  std::uint8_t lower_len;  // 0: lowercase is the character itself
  std::uint32_t nfd_off;   // offsets into kPool
  std::uint32_t lower_off;
};

}  // namespace lrec::unicode_data

#include "unicode_tables.inc"

namespace lrec::unicode {

// Keep in sync with gen_unicode_tables.py.
enum Flag : std::uint8_t {
  kControl = 1,   // removed by clean_text
  kCleanWs = 2,   // mapped to ' ' by clean_text
  kSplitWs = 4,   // the pre-tokeniser splits on it and drops it
  kPunct = 8,     // the pre-tokeniser isolates it as its own word
  kCjk = 16,      // handle_chinese_chars puts spaces around it
  kMn = 32,       // deleted by strip_accents (after NFD)
};

constexpr char32_t kMaxCodePoint = 0x10FFFF;

inline const unicode_data::Record& record(char32_t cp) {
  using namespace unicode_data;
  const std::uint32_t block = kStage1[cp >> kBlockShift];
  return kRecords[kStage2[(block << kBlockShift) | (cp & ((1u << kBlockShift) - 1))]];
}

inline const char32_t* pool(std::uint32_t off) { return unicode_data::kPool + off; }

inline bool is_surrogate(char32_t cp) { return cp >= 0xD800 && cp <= 0xDFFF; }

// Hangul syllables (U+AC00..U+D7A3) decompose by the Unicode rule into 2 or 3 jamo.
constexpr char32_t kHangulBase = 0xAC00;
constexpr char32_t kHangulCount = 11172;

inline int hangul_nfd(char32_t cp, char32_t out[3]) {
  const char32_t s = cp - kHangulBase;
  out[0] = 0x1100 + s / 588;
  out[1] = 0x1161 + (s % 588) / 28;
  if (s % 28 == 0) return 2;
  out[2] = 0x11A7 + s % 28;
  return 3;
}

inline bool is_hangul_syllable(char32_t cp) {
  return cp >= kHangulBase && cp < kHangulBase + kHangulCount;
}

}  // namespace lrec::unicode
