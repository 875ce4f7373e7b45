// pybind11 layer: converts at the boundary only. Texts are read in place from CPython's str
// storage (1, 2 or 4 bytes per code point: no UTF-8 transcoding), the GIL is released while
// tokenising and filling, and the output is three numpy arrays written directly.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "tokenizer.hpp"

namespace py = pybind11;

namespace {

// Borrowed views of the strs of a sequence, kept alive by `owners` while the GIL is released.
std::vector<lrec::TextRef> text_refs(const py::sequence& seq, const char* what,
                                     std::vector<py::object>& owners) {
  const auto n = static_cast<std::size_t>(py::len(seq));
  std::vector<lrec::TextRef> refs(n);
  owners.reserve(owners.size() + n);
  for (std::size_t i = 0; i < n; ++i) {
    py::object item = seq[i];
    PyObject* o = item.ptr();
    if (!PyUnicode_Check(o)) {
      throw py::type_error(std::string(what) + "[" + std::to_string(i) + "] is " +
                           Py_TYPE(o)->tp_name + ", expected str");
    }
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(o) != 0) throw py::error_already_set();  // legacy (non-compact) str
#endif
    refs[i] = {PyUnicode_DATA(o), static_cast<std::size_t>(PyUnicode_GET_LENGTH(o)),
               static_cast<int>(PyUnicode_KIND(o))};
    owners.push_back(std::move(item));
  }
  return refs;
}

lrec::Truncation parse_truncation(const py::object& t) {
  if (py::isinstance<py::bool_>(t)) {
    return t.cast<bool>() ? lrec::Truncation::kLongestFirst : lrec::Truncation::kNone;
  }
  const auto s = t.cast<std::string>();
  if (s == "longest_first") return lrec::Truncation::kLongestFirst;
  if (s == "only_first") return lrec::Truncation::kOnlyFirst;
  if (s == "only_second") return lrec::Truncation::kOnlySecond;
  if (s == "do_not_truncate") return lrec::Truncation::kNone;
  throw py::value_error("unknown truncation strategy '" + s + "'");
}

template <typename T>
py::dict encode_into(const lrec::BertTokenizer& tok, const lrec::TokenizedBatch& a,
                     const lrec::TokenizedBatch* b, const lrec::Layout& layout, int threads) {
  const auto rows = static_cast<py::ssize_t>(a.size());
  const auto width = static_cast<py::ssize_t>(layout.width);
  py::array_t<T> ids({rows, width}), mask({rows, width}), types({rows, width});
  T* pi = ids.mutable_data();
  T* pm = mask.mutable_data();
  T* pt = types.mutable_data();
  {
    py::gil_scoped_release release;
    tok.fill(a, b, layout, pi, pm, pt, threads);
  }
  py::dict out;
  out["input_ids"] = ids;
  out["attention_mask"] = mask;
  out["token_type_ids"] = types;
  return out;
}

void raise_bad_text(std::size_t index, const char* what) {
  throw py::value_error(std::string(what) + "[" + std::to_string(index) +
                        "] is not valid Unicode: it holds a lone surrogate code point");
}

py::dict encode_batch(const lrec::BertTokenizer& tok, const py::sequence& texts,
                      const py::object& pairs, std::size_t max_length,
                      const py::object& truncation, bool pad_to_max_length, int num_threads,
                      bool int32) {
  if (py::isinstance<py::str>(texts)) throw py::type_error("texts must be a sequence of str, not one str");
  lrec::EncodeOptions opts;
  opts.max_length = max_length;
  opts.truncation = parse_truncation(truncation);
  opts.pad_to_max_length = pad_to_max_length;
  opts.num_threads = num_threads;
  std::vector<py::object> owners;
  const auto refs_a = text_refs(texts, "texts", owners);
  std::vector<lrec::TextRef> refs_b;
  const bool pair = !pairs.is_none();
  if (pair) {
    if (py::isinstance<py::str>(pairs)) throw py::type_error("text_pairs must be a sequence of str");
    refs_b = text_refs(pairs.cast<py::sequence>(), "text_pairs", owners);
    if (refs_b.size() != refs_a.size()) {
      throw py::value_error("texts and text_pairs differ in length");
    }
  }
  lrec::TokenizedBatch a, b;
  lrec::Layout layout;
  {
    py::gil_scoped_release release;
    a = tok.tokenize_batch(refs_a.data(), refs_a.size(), num_threads);
    if (pair) b = tok.tokenize_batch(refs_b.data(), refs_b.size(), num_threads);
  }
  if (a.bad_index < a.size()) raise_bad_text(a.bad_index, "texts");
  if (pair && b.bad_index < b.size()) raise_bad_text(b.bad_index, "text_pairs");
  try {
    layout = tok.plan(a, pair ? &b : nullptr, opts);
  } catch (const lrec::InvalidText& e) {
    throw py::value_error("text " + std::to_string(e.index) + ": " + e.what());
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
  return int32 ? encode_into<std::int32_t>(tok, a, pair ? &b : nullptr, layout, num_threads)
               : encode_into<std::int64_t>(tok, a, pair ? &b : nullptr, layout, num_threads);
}

std::unique_ptr<lrec::BertTokenizer> make_tokenizer(
    const std::vector<std::pair<std::string, std::int32_t>>& vocab, const std::string& unk_token,
    std::size_t max_input_chars_per_word, const std::string& continuing_prefix, bool clean_text,
    bool handle_chinese_chars, bool strip_accents, bool lowercase,
    const std::vector<std::pair<std::string, std::int32_t>>& added_tokens, std::int32_t cls_id,
    std::int32_t sep_id, std::int32_t pad_id) {
  try {
    lrec::WordPiece model(vocab, unk_token, max_input_chars_per_word, continuing_prefix);
    std::vector<lrec::AddedToken> added;
    for (const auto& [content, id] : added_tokens) {
      added.push_back({lrec::utf8_to_u32(content), id});
    }
    lrec::NormalizerOptions norm{clean_text, handle_chinese_chars, strip_accents, lowercase};
    return std::make_unique<lrec::BertTokenizer>(std::move(model), norm, std::move(added), cls_id,
                                                 sep_id, pad_id);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
}

}  // namespace

PYBIND11_MODULE(_wordpiece, m) {
  m.doc() = "lrec_fast private extension: the BERT WordPiece tokeniser of HF tokenizers in C++.";
  m.attr("UNICODE_REFERENCE") = lrec::unicode_data::kReferenceVersion;
  py::class_<lrec::BertTokenizer>(m, "BertTokenizer")
      .def(py::init(&make_tokenizer), py::arg("vocab"), py::arg("unk_token"),
           py::arg("max_input_chars_per_word"), py::arg("continuing_prefix"),
           py::arg("clean_text"), py::arg("handle_chinese_chars"), py::arg("strip_accents"),
           py::arg("lowercase"), py::arg("added_tokens"), py::arg("cls_id"), py::arg("sep_id"),
           py::arg("pad_id"),
           "vocab and added_tokens: lists of (token, id); the normaliser flags as in HF's "
           "BertNormalizer (strip_accents already resolved).")
      .def("encode_batch", &encode_batch, py::arg("texts"), py::arg("text_pairs"),
           py::arg("max_length"), py::arg("truncation"), py::arg("pad_to_max_length"),
           py::arg("num_threads"), py::arg("int32"),
           "Encode a batch: dict of int64 (or int32) arrays [batch, width] input_ids, "
           "attention_mask, token_type_ids. Releases the GIL while it works.")
      .def(
          "tokenize",
          [](const lrec::BertTokenizer& tok, const std::string& text) {
            std::vector<std::int32_t> ids;
            const std::u32string u = lrec::utf8_to_u32(text);
            tok.tokenize({u.data(), u.size(), 4}, ids);
            return ids;
          },
          py::arg("text"), "Ids of one text without special tokens (a debugging aid).");
}
