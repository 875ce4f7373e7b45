// Stand-alone driver of the tokeniser core for sanitizer builds (tests/test_sanitizers.py):
//   fuzz_main VOCAB_TXT TEXTS_BIN OUT_TXT
// VOCAB_TXT: one token per line, id = line number, BERT uncased configuration.
// TEXTS_BIN: records of (uint32 little-endian byte length, UTF-8 bytes).
// OUT_TXT:   per text, its ids without special tokens on one line ("!" for invalid UTF-8).
// It also runs every text through the threaded batch path (UCS-4, UCS-2 where the text fits,
// Latin-1 where it fits) with truncation and both paddings, and checks the rows agree.
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>

#include "tokenizer.hpp"

namespace {

int fail(const std::string& msg) {
  std::cerr << "fuzz_main: " << msg << "\n";
  return 2;
}

template <typename Unit>
std::vector<Unit> narrow(const std::u32string& s, bool* ok) {
  std::vector<Unit> out;
  *ok = true;
  for (char32_t c : s) {
    if (c > static_cast<char32_t>(static_cast<Unit>(~Unit{0}))) *ok = false;
    out.push_back(static_cast<Unit>(c));
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) return fail("usage: fuzz_main VOCAB_TXT TEXTS_BIN OUT_TXT");
  std::ifstream vf(argv[1]);
  std::vector<std::pair<std::string, std::int32_t>> vocab;
  for (std::string line; std::getline(vf, line);) {
    vocab.emplace_back(line, static_cast<std::int32_t>(vocab.size()));
  }
  std::vector<lrec::AddedToken> added;
  std::int32_t ids[5];
  const char* specials[5] = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"};
  lrec::WordPiece model(vocab, "[UNK]", 100, "##");
  for (int k = 0; k < 5; ++k) {
    ids[k] = model.token_id(specials[k]);
    if (ids[k] < 0) return fail(std::string("vocab lacks ") + specials[k]);
    added.push_back({lrec::utf8_to_u32(specials[k]), ids[k]});
  }
  lrec::BertTokenizer tok(std::move(model), lrec::NormalizerOptions{}, added, ids[2], ids[3],
                          ids[0]);

  std::ifstream tf(argv[2], std::ios::binary);
  std::vector<std::u32string> texts;
  std::vector<bool> valid;
  for (std::uint32_t len; tf.read(reinterpret_cast<char*>(&len), 4);) {
    std::string bytes(len, '\0');
    if (!tf.read(bytes.data(), len)) return fail("truncated texts file");
    try {
      texts.push_back(lrec::utf8_to_u32(bytes));
      valid.push_back(true);
    } catch (const std::invalid_argument&) {
      texts.emplace_back();
      valid.push_back(false);
    }
  }

  std::ofstream out(argv[3]);
  std::vector<std::vector<std::int32_t>> single(texts.size());
  for (std::size_t i = 0; i < texts.size(); ++i) {
    if (!valid[i]) {
      out << "!\n";
      continue;
    }
    tok.tokenize({texts[i].data(), texts[i].size(), 4}, single[i]);
    for (std::size_t j = 0; j < single[i].size(); ++j) out << (j ? " " : "") << single[i][j];
    out << "\n";
  }

  // The batch path over the same texts, in every storage kind the text fits, on 2 threads.
  std::vector<std::vector<std::uint8_t>> latin1(texts.size());
  std::vector<std::vector<std::uint16_t>> ucs2(texts.size());
  std::vector<lrec::TextRef> refs;
  for (std::size_t i = 0; i < texts.size(); ++i) {
    bool fits1 = false, fits2 = false;
    latin1[i] = narrow<std::uint8_t>(texts[i], &fits1);
    ucs2[i] = narrow<std::uint16_t>(texts[i], &fits2);
    if (fits1) {
      refs.push_back({latin1[i].data(), latin1[i].size(), 1});
    } else if (fits2) {
      refs.push_back({ucs2[i].data(), ucs2[i].size(), 2});
    } else {
      refs.push_back({texts[i].data(), texts[i].size(), 4});
    }
  }
  const lrec::TokenizedBatch a = tok.tokenize_batch(refs.data(), refs.size(), 2);
  for (std::size_t i = 0; i < texts.size(); ++i) {
    if (!valid[i]) continue;
    const std::vector<std::int32_t> row(a.rows[i], a.rows[i] + a.lens[i]);
    if (row != single[i]) return fail("batch row " + std::to_string(i) + " differs");
  }
  for (const auto trunc : {lrec::Truncation::kLongestFirst, lrec::Truncation::kOnlyFirst}) {
    lrec::EncodeOptions opts;
    opts.max_length = 24;
    opts.truncation = trunc;
    opts.pad_to_max_length = trunc == lrec::Truncation::kOnlyFirst;
    lrec::Layout layout;
    try {
      layout = tok.plan(a, &a, opts);
    } catch (const lrec::InvalidText&) {
      continue;  // only_first cannot shorten a short first text: a clean refusal
    }
    const std::size_t cells = a.size() * layout.width;
    std::vector<std::int64_t> o_ids(cells), o_mask(cells), o_types(cells);
    tok.fill(a, &a, layout, o_ids.data(), o_mask.data(), o_types.data(), 2);
  }
  std::cerr << "fuzz_main: " << texts.size() << " texts ok\n";
  return 0;
}
