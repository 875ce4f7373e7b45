// The BERT tokeniser pipeline of HF tokenizers, end to end: added-token split (leftmost
// longest, on the raw text) -> BertNormalizer -> BertPreTokenizer (split on whitespace,
// isolate punctuation) -> WordPiece -> truncation -> [CLS] A [SEP] (B [SEP]) -> padding.
// Batches run in three phases so the output can go straight into caller-owned arrays:
// tokenize_batch (parallel, no Python), plan (truncation, width), fill (ids, mask, type ids).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "normalizer.hpp"
#include "wordpiece.hpp"

namespace lrec {

// A text as fixed-width code units, each one code point: kind 1 (Latin-1 bytes), 2 (UCS-2)
// or 4 (UCS-4). This is how CPython stores str, so no transcoding is needed.
struct TextRef {
  const void* data = nullptr;
  std::size_t len = 0;
  int kind = 1;
};

struct AddedToken {
  std::u32string content;
  std::int32_t id;
};

enum class Truncation { kNone, kLongestFirst, kOnlyFirst, kOnlySecond };

struct EncodeOptions {
  std::size_t max_length = 512;
  Truncation truncation = Truncation::kLongestFirst;
  bool pad_to_max_length = false;  // false: pad to the longest row
  int num_threads = 0;             // 0: choose from the batch size; n: at most n
};

// Bad input (the caller turns it into ValueError, naming the text).
struct InvalidText : std::invalid_argument {
  InvalidText(std::size_t index, const std::string& what)
      : std::invalid_argument(what), index(index) {}
  std::size_t index;
};

// Token ids of a batch before specials and padding; rows point into per-thread buffers.
struct TokenizedBatch {
  std::vector<std::vector<std::int32_t>> chunks;
  std::vector<const std::int32_t*> rows;
  std::vector<std::size_t> lens;
  std::size_t bad_index = std::numeric_limits<std::size_t>::max();  // first text with a surrogate
  std::size_t size() const { return lens.size(); }
};

// Per-row lengths after truncation, and the output width.
struct Layout {
  std::vector<std::pair<std::size_t, std::size_t>> keep;  // tokens kept of (A, B)
  std::size_t width = 0;
};

class BertTokenizer {
 public:
  BertTokenizer(WordPiece model, const NormalizerOptions& norm, std::vector<AddedToken> added,
                std::int32_t cls_id, std::int32_t sep_id, std::int32_t pad_id);

  // Ids of one text, without special tokens, appended to out. Returns false (and appends
  // nothing) if the text holds a surrogate code point.
  bool tokenize(const TextRef& text, std::vector<std::int32_t>& out) const;

  TokenizedBatch tokenize_batch(const TextRef* texts, std::size_t n, int num_threads) const;

  // Throws InvalidText / std::invalid_argument where HF would refuse (or panic).
  Layout plan(const TokenizedBatch& a, const TokenizedBatch* b, const EncodeOptions& opts) const;

  // Writes rows of `layout.width` into ids / mask / type_ids (each n x width, row-major).
  template <typename T>
  void fill(const TokenizedBatch& a, const TokenizedBatch* b, const Layout& layout, T* ids,
            T* mask, T* type_ids, int num_threads) const;

  std::size_t added_specials(bool pair) const { return pair ? 3 : 2; }

  static int choose_threads(std::size_t work_units, int requested);

 private:
  struct Scratch {
    std::vector<char32_t> norm, tmp;
  };
  template <typename Unit>
  bool tokenize_units(const Unit* s, std::size_t n, std::vector<std::int32_t>& out,
                      Scratch& sc) const;
  template <typename Unit>
  void tokenize_segment(const Unit* s, std::size_t n, std::vector<std::int32_t>& out,
                        Scratch& sc) const;
  template <typename Unit>
  std::size_t match_added(const Unit* s, std::size_t n, std::size_t i, std::int32_t* id) const;
  void pre_tokenize(const std::vector<char32_t>& norm, std::vector<std::int32_t>& out) const;

  WordPiece model_;
  BertNormalizer normalizer_;
  std::vector<AddedToken> added_;
  std::vector<bool> added_first_ascii_;  // first code points of added tokens (ASCII only)
  bool added_non_ascii_first_ = false;
  std::int32_t cls_id_, sep_id_, pad_id_;
  std::uint8_t ascii_class_[128];
};

// Runs fn(begin, end) over [0, n) split into `threads` contiguous parts, weights[i] being the
// cost of item i (parts have about equal total weight); threads <= 1 runs inline.
void parallel_ranges(std::size_t n, int threads, const std::vector<std::size_t>* weights,
                     const std::function<void(std::size_t, std::size_t, std::size_t)>& fn);

}  // namespace lrec
