#include "wordpiece.hpp"

#include <stdexcept>

namespace lrec {

namespace {

// Length in bytes of the UTF-8 sequence that starts with byte c (1 for invalid lead bytes, so a
// malformed string still advances and ends in [UNK] rather than looping).
inline std::size_t utf8_len(unsigned char c) {
  if (c < 0x80) return 1;
  if ((c >> 5) == 0x6) return 2;
  if ((c >> 4) == 0xE) return 3;
  if ((c >> 3) == 0x1E) return 4;
  return 1;
}

}  // namespace

WordPiece::WordPiece(const std::vector<std::string>& vocab, const std::string& unk_token,
                     std::size_t max_input_chars_per_word, const std::string& continuing_prefix)
    : max_chars_(max_input_chars_per_word), prefix_(continuing_prefix) {
  vocab_.reserve(vocab.size() * 2);
  for (std::size_t i = 0; i < vocab.size(); ++i) {
    // The first occurrence wins, as in HF's vocab loading order.
    vocab_.emplace(vocab[i], static_cast<std::int32_t>(i));
  }
  auto it = vocab_.find(unk_token);
  if (it == vocab_.end()) throw std::invalid_argument("unk token is not in the vocabulary");
  unk_id_ = it->second;
}

std::int32_t WordPiece::lookup(std::string_view piece, bool continuing) const {
  std::string key;
  key.reserve(piece.size() + (continuing ? prefix_.size() : 0));
  if (continuing) key += prefix_;
  key.append(piece.data(), piece.size());
  auto it = vocab_.find(key);
  return it == vocab_.end() ? -1 : it->second;
}

void WordPiece::tokenize_word(std::string_view word, std::vector<std::int32_t>& out) const {
  // Code point boundaries, so candidate pieces never split a character.
  std::vector<std::size_t> bounds;
  bounds.reserve(word.size() + 1);
  for (std::size_t i = 0; i < word.size(); i += utf8_len(static_cast<unsigned char>(word[i]))) {
    bounds.push_back(i);
  }
  bounds.push_back(word.size());
  const std::size_t n_chars = bounds.size() - 1;
  if (n_chars == 0) return;
  if (n_chars > max_chars_) {
    out.push_back(unk_id_);
    return;
  }
  const std::size_t mark = out.size();
  std::size_t start = 0;
  while (start < n_chars) {
    std::size_t end = n_chars;
    std::int32_t found = -1;
    while (end > start) {
      found = lookup(word.substr(bounds[start], bounds[end] - bounds[start]), start > 0);
      if (found >= 0) break;
      --end;
    }
    if (found < 0) {
      out.resize(mark);
      out.push_back(unk_id_);
      return;
    }
    out.push_back(found);
    start = end;
  }
}

void WordPiece::tokenize_words(const std::vector<std::string>& words,
                               std::vector<std::int32_t>& ids,
                               std::vector<std::int64_t>& offsets) const {
  offsets.clear();
  offsets.reserve(words.size() + 1);
  offsets.push_back(0);
  for (const auto& w : words) {
    tokenize_word(w, ids);
    offsets.push_back(static_cast<std::int64_t>(ids.size()));
  }
}

}  // namespace lrec
