#include "normalizer.hpp"

#include <algorithm>

namespace lrec {

using unicode::record;

BertNormalizer::BertNormalizer(const NormalizerOptions& opts) : opts_(opts) {
  for (char32_t c = 0; c < 128; ++c) {
    const auto& r = record(c);
    std::int32_t v = static_cast<std::int32_t>(c);
    if (opts_.clean_text && (r.flags & unicode::kControl)) v = -1;
    if (opts_.clean_text && (r.flags & unicode::kCleanWs)) v = ' ';
    if (v >= 0 && opts_.lowercase && r.lower_len == 1) v = static_cast<std::int32_t>(*unicode::pool(r.lower_off));
    ascii_out_[c] = v;
  }
}

void BertNormalizer::push_lower(char32_t cp, std::vector<char32_t>& out) const {
  const auto& r = record(cp);
  if (r.lower_len == 0) {
    out.push_back(cp);
  } else {
    const char32_t* p = unicode::pool(r.lower_off);
    out.insert(out.end(), p, p + r.lower_len);
  }
}

template <typename Unit>
void BertNormalizer::normalize(const Unit* s, std::size_t n, std::vector<char32_t>& out,
                               std::vector<char32_t>& scratch) const {
  out.clear();
  bool marks = false;  // a non-ASCII character went through NFD: reorder/filter/lowercase later
  for (std::size_t i = 0; i < n; ++i) {
    char32_t cp = static_cast<char32_t>(s[i]);
    if (cp < 128) {
      // ASCII: no decomposition, combining class 0, never a mark, never CJK.
      const std::int32_t v = ascii_out_[cp];
      if (v >= 0) out.push_back(static_cast<char32_t>(v));
      continue;
    }
    const unicode_data::Record* r = &record(cp);
    if (opts_.clean_text) {
      if (r->flags & unicode::kControl) continue;
      if (r->flags & unicode::kCleanWs) {
        out.push_back(' ');
        continue;
      }
    }
    const bool cjk = opts_.handle_chinese_chars && (r->flags & unicode::kCjk);
    if (cjk) out.push_back(' ');
    if (opts_.strip_accents) {
      marks = true;
      if (unicode::is_hangul_syllable(cp)) {
        char32_t jamo[3];
        const int k = unicode::hangul_nfd(cp, jamo);
        out.insert(out.end(), jamo, jamo + k);
      } else if (r->nfd_len) {
        const char32_t* p = unicode::pool(r->nfd_off);
        out.insert(out.end(), p, p + r->nfd_len);
      } else {
        out.push_back(cp);
      }
    } else if (opts_.lowercase) {
      push_lower(cp, out);
    } else {
      out.push_back(cp);
    }
    if (cjk) out.push_back(' ');
  }
  if (marks) finish_marks(out, scratch);
}

// Canonical ordering (stable sort of each run of non-zero combining classes), then drop
// non-spacing marks and lowercase: the rest of HF's nfd().filter(..) and lowercase().
void BertNormalizer::finish_marks(std::vector<char32_t>& buf,
                                  std::vector<char32_t>& scratch) const {
  const std::size_t n = buf.size();
  for (std::size_t i = 0; i < n;) {
    if (buf[i] < 128 || record(buf[i]).ccc == 0) {
      ++i;
      continue;
    }
    std::size_t j = i;
    while (j < n && buf[j] >= 128 && record(buf[j]).ccc != 0) ++j;
    if (j - i > 1) {
      std::stable_sort(buf.begin() + static_cast<std::ptrdiff_t>(i),
                       buf.begin() + static_cast<std::ptrdiff_t>(j),
                       [](char32_t a, char32_t b) { return record(a).ccc < record(b).ccc; });
    }
    i = j;
  }
  scratch.clear();
  for (char32_t cp : buf) {
    if (cp < 128) {
      // ASCII from a decomposition (U+212A KELVIN SIGN -> 'K') still needs lowercasing.
      const bool upper = opts_.lowercase && cp >= 'A' && cp <= 'Z';
      scratch.push_back(upper ? cp + 32 : cp);
      continue;
    }
    if (record(cp).flags & unicode::kMn) continue;
    if (opts_.lowercase) {
      push_lower(cp, scratch);
    } else {
      scratch.push_back(cp);
    }
  }
  buf.swap(scratch);
}

template void BertNormalizer::normalize<std::uint8_t>(const std::uint8_t*, std::size_t,
                                                      std::vector<char32_t>&,
                                                      std::vector<char32_t>&) const;
template void BertNormalizer::normalize<std::uint16_t>(const std::uint16_t*, std::size_t,
                                                       std::vector<char32_t>&,
                                                       std::vector<char32_t>&) const;
template void BertNormalizer::normalize<char32_t>(const char32_t*, std::size_t,
                                                  std::vector<char32_t>&,
                                                  std::vector<char32_t>&) const;

}  // namespace lrec
