// WordPiece model: greedy longest-match-first over the code points of one pre-tokenised word,
// with a vocabulary trie so each piece is found in one left-to-right walk (no repeated hashing
// of shrinking substrings). No Python, torch or ICU dependency.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace lrec {

// Trie over code points. Edges live in one open-addressing hash table keyed by
// (node, code point); ASCII edges of the two roots (word start, "##" continuation) use dense
// arrays because nearly every walk starts there.
class VocabTrie {
 public:
  static constexpr std::int32_t kNone = -1;

  void insert(const std::u32string& key, std::int32_t id);
  void finish();  // builds the dense root arrays; call once after the last insert

  std::int32_t child(std::int32_t node, char32_t cp) const {
    if (cp < 128) {
      if (node == 0) return root_ascii_[cp];
      if (node == cont_root_) return cont_ascii_[cp];
    }
    return find_edge(node, cp);
  }
  std::int32_t walk(const std::u32string& key) const;  // kNone if the path is absent
  std::int32_t terminal(std::int32_t node) const { return terminal_[node]; }
  void set_cont_root(std::int32_t node) { cont_root_ = node; }

 private:
  static std::uint64_t edge_key(std::int32_t node, char32_t cp) {
    return (static_cast<std::uint64_t>(node) << 21) | cp;
  }
  std::int32_t find_edge(std::int32_t node, char32_t cp) const;
  void put_edge(std::uint64_t key, std::int32_t child);
  void grow();

  std::vector<std::int32_t> terminal_{kNone};  // node 0 is the root
  std::vector<std::uint64_t> keys_;           // kEmpty where unused
  std::vector<std::int32_t> vals_;
  std::size_t n_edges_ = 0;
  std::int32_t cont_root_ = kNone;
  std::int32_t root_ascii_[128];
  std::int32_t cont_ascii_[128];
};

class WordPiece {
 public:
  // vocab: (token, id) pairs; a later pair with the same token wins, as HF's vocab maps do.
  WordPiece(const std::vector<std::pair<std::string, std::int32_t>>& vocab,
            const std::string& unk_token, std::size_t max_input_chars_per_word,
            const std::string& continuing_prefix);

  // Appends the ids of one word. A word longer than max_input_chars_per_word code points, or
  // one the vocabulary cannot cover, becomes a single [UNK].
  void tokenize(const char32_t* word, std::size_t n, std::vector<std::int32_t>& out) const;

  std::int32_t unk_id() const { return unk_id_; }
  std::int32_t token_id(const std::string& token) const;  // -1 if absent

 private:
  VocabTrie trie_;
  std::int32_t cont_root_ = VocabTrie::kNone;
  std::int32_t unk_id_ = -1;
  std::size_t max_chars_;
};

// UTF-8 -> code points; throws std::invalid_argument on malformed input or surrogates.
std::u32string utf8_to_u32(const std::string& s);

}  // namespace lrec
