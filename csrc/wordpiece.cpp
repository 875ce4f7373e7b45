#include "wordpiece.hpp"

#include <algorithm>
#include <stdexcept>

namespace lrec {

namespace {

constexpr std::uint64_t kEmpty = ~std::uint64_t{0};

inline std::size_t slot_of(std::uint64_t key, std::size_t mask) {
  return static_cast<std::size_t>((key * 0x9E3779B97F4A7C15ull) >> 32) & mask;
}

}  // namespace

std::u32string utf8_to_u32(const std::string& s) {
  std::u32string out;
  out.reserve(s.size());
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned char c = p[i];
    std::size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    if (len == 0 || i + len > n) throw std::invalid_argument("malformed UTF-8");
    char32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
    for (std::size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) throw std::invalid_argument("malformed UTF-8");
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    static const char32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
      throw std::invalid_argument("malformed UTF-8 (overlong, surrogate or out of range)");
    }
    out.push_back(cp);
    i += len;
  }
  return out;
}

void VocabTrie::grow() {
  std::vector<std::uint64_t> old_keys = std::move(keys_);
  std::vector<std::int32_t> old_vals = std::move(vals_);
  const std::size_t cap = std::max<std::size_t>(1024, old_keys.size() * 2);
  keys_.assign(cap, kEmpty);
  vals_.assign(cap, kNone);
  for (std::size_t i = 0; i < old_keys.size(); ++i) {
    if (old_keys[i] != kEmpty) put_edge(old_keys[i], old_vals[i]);
  }
}

void VocabTrie::put_edge(std::uint64_t key, std::int32_t child) {
  const std::size_t mask = keys_.size() - 1;
  std::size_t s = slot_of(key, mask);
  while (keys_[s] != kEmpty) s = (s + 1) & mask;
  keys_[s] = key;
  vals_[s] = child;
}

std::int32_t VocabTrie::find_edge(std::int32_t node, char32_t cp) const {
  if (keys_.empty() || node < 0) return kNone;
  const std::uint64_t key = edge_key(node, cp);
  const std::size_t mask = keys_.size() - 1;
  for (std::size_t s = slot_of(key, mask);; s = (s + 1) & mask) {
    if (keys_[s] == key) return vals_[s];
    if (keys_[s] == kEmpty) return kNone;
  }
}

void VocabTrie::insert(const std::u32string& key, std::int32_t id) {
  std::int32_t node = 0;
  for (char32_t cp : key) {
    std::int32_t next = find_edge(node, cp);
    if (next == kNone) {
      if ((n_edges_ + 1) * 2 > keys_.size()) grow();  // load factor <= 1/2
      next = static_cast<std::int32_t>(terminal_.size());
      terminal_.push_back(kNone);
      put_edge(edge_key(node, cp), next);
      ++n_edges_;
    }
    node = next;
  }
  terminal_[node] = id;
}

void VocabTrie::finish() {
  for (char32_t c = 0; c < 128; ++c) {
    root_ascii_[c] = find_edge(0, c);
    cont_ascii_[c] = cont_root_ == kNone ? kNone : find_edge(cont_root_, c);
  }
}

std::int32_t VocabTrie::walk(const std::u32string& key) const {
  std::int32_t node = 0;
  for (char32_t cp : key) {
    node = find_edge(node, cp);
    if (node == kNone) return kNone;
  }
  return node;
}

WordPiece::WordPiece(const std::vector<std::pair<std::string, std::int32_t>>& vocab,
                     const std::string& unk_token, std::size_t max_input_chars_per_word,
                     const std::string& continuing_prefix)
    : max_chars_(max_input_chars_per_word) {
  for (const auto& [token, id] : vocab) {
    if (id < 0) throw std::invalid_argument("negative token id");
    trie_.insert(utf8_to_u32(token), id);  // re-inserting a token overwrites its id
  }
  const std::u32string prefix = utf8_to_u32(continuing_prefix);
  cont_root_ = prefix.empty() ? 0 : trie_.walk(prefix);
  trie_.set_cont_root(cont_root_);
  trie_.finish();
  unk_id_ = token_id(unk_token);
  if (unk_id_ < 0) throw std::invalid_argument("the unk token is not in the vocabulary");
}

std::int32_t WordPiece::token_id(const std::string& token) const {
  const std::u32string key = utf8_to_u32(token);
  if (key.empty()) return -1;
  const std::int32_t node = trie_.walk(key);
  return node == VocabTrie::kNone ? -1 : trie_.terminal(node);
}

void WordPiece::tokenize(const char32_t* word, std::size_t n, std::vector<std::int32_t>& out) const {
  if (n == 0) return;
  if (n > max_chars_) {
    out.push_back(unk_id_);
    return;
  }
  const std::size_t mark = out.size();
  std::size_t start = 0;
  while (start < n) {
    // Walk as far as the trie allows; the last terminal seen is the longest vocabulary piece.
    std::int32_t node = start == 0 ? 0 : cont_root_;
    std::size_t best_end = 0;
    std::int32_t best_id = -1;
    for (std::size_t p = start; p < n && node != VocabTrie::kNone; ++p) {
      node = trie_.child(node, word[p]);
      if (node != VocabTrie::kNone && trie_.terminal(node) >= 0) {
        best_end = p + 1;
        best_id = trie_.terminal(node);
      }
    }
    if (best_id < 0) {
      out.resize(mark);
      out.push_back(unk_id_);
      return;
    }
    out.push_back(best_id);
    start = best_end;
  }
}

}  // namespace lrec
