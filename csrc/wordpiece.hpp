// WordPiece core: greedy longest-match-first over UTF-8 words, no Python or torch dependency.
// This first version takes words that are already normalised and pre-split (the BERT
// normaliser and pre-tokeniser stay in HF tokenizers until the full C++ pipeline lands).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace lrec {

class WordPiece {
 public:
  WordPiece(const std::vector<std::string>& vocab, const std::string& unk_token,
            std::size_t max_input_chars_per_word, const std::string& continuing_prefix);

  // Appends the ids of one word to `out`. A word with more than max_input_chars_per_word
  // code points, or one that cannot be covered by vocabulary pieces, becomes one [UNK].
  void tokenize_word(std::string_view word, std::vector<std::int32_t>& out) const;

  // Tokenises many words; offsets has words.size() + 1 entries (CSR layout into ids).
  void tokenize_words(const std::vector<std::string>& words, std::vector<std::int32_t>& ids,
                      std::vector<std::int64_t>& offsets) const;

  std::int32_t unk_id() const { return unk_id_; }
  std::size_t vocab_size() const { return vocab_.size(); }

 private:
  std::int32_t lookup(std::string_view piece, bool continuing) const;

  std::unordered_map<std::string, std::int32_t> vocab_;
  std::int32_t unk_id_;
  std::size_t max_chars_;
  std::string prefix_;
};

}  // namespace lrec
