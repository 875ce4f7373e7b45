// BERT normaliser and pre-tokeniser classes, reproducing HF tokenizers' BertNormalizer:
// clean_text (drop controls, map whitespace to ' '), handle_chinese_chars (space CJK
// ideographs), strip_accents (NFD, then drop non-spacing marks), lowercase (per character,
// may expand). The order is HF's; only canonical reordering of marks looks across characters.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "unicode.hpp"

namespace lrec {

struct NormalizerOptions {
  bool clean_text = true;
  bool handle_chinese_chars = true;
  bool strip_accents = true;  // HF's strip_accents=None means "same as lowercase"
  bool lowercase = true;
};

class BertNormalizer {
 public:
  explicit BertNormalizer(const NormalizerOptions& opts);

  // Normalises code points s[0..n) (each unit one code point, no surrogates) into out
  // (cleared first). scratch is reused between calls to avoid allocation.
  template <typename Unit>
  void normalize(const Unit* s, std::size_t n, std::vector<char32_t>& out,
                 std::vector<char32_t>& scratch) const;

  const NormalizerOptions& options() const { return opts_; }

 private:
  void finish_marks(std::vector<char32_t>& buf, std::vector<char32_t>& scratch) const;
  void push_lower(char32_t cp, std::vector<char32_t>& out) const;

  NormalizerOptions opts_;
  // ASCII fast path: the normalised character, or -1 where clean_text drops it.
  std::int32_t ascii_out_[128];
};

// Pre-tokeniser class of a normalised character: unicode::kSplitWs, unicode::kPunct or 0.
inline std::uint8_t split_class(char32_t cp) {
  return unicode::record(cp).flags & (unicode::kSplitWs | unicode::kPunct);
}

}  // namespace lrec
