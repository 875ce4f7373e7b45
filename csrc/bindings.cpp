// pybind11 layer for the WordPiece core: converts at the boundary, releases the GIL for batch
// work and returns numpy arrays rather than lists of lists.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "wordpiece.hpp"

namespace py = pybind11;

namespace {

py::tuple tokenize_words(const lrec::WordPiece& wp, const std::vector<std::string>& words) {
  std::vector<std::int32_t> ids;
  std::vector<std::int64_t> offsets;
  {
    py::gil_scoped_release release;
    wp.tokenize_words(words, ids, offsets);
  }
  py::array_t<std::int32_t> ids_arr(static_cast<py::ssize_t>(ids.size()));
  std::copy(ids.begin(), ids.end(), ids_arr.mutable_data());
  py::array_t<std::int64_t> off_arr(static_cast<py::ssize_t>(offsets.size()));
  std::copy(offsets.begin(), offsets.end(), off_arr.mutable_data());
  return py::make_tuple(ids_arr, off_arr);
}

}  // namespace

PYBIND11_MODULE(_wordpiece, m) {
  m.doc() = "lrec_fast private extension: WordPiece core (greedy longest-match-first).";
  py::class_<lrec::WordPiece>(m, "WordPiece")
      .def(py::init<const std::vector<std::string>&, const std::string&, std::size_t,
                    const std::string&>(),
           py::arg("vocab"), py::arg("unk_token") = "[UNK]",
           py::arg("max_input_chars_per_word") = 100, py::arg("continuing_prefix") = "##")
      .def("tokenize_words", &tokenize_words, py::arg("words"),
           "Tokenise pre-split words; returns (ids int32 [T], offsets int64 [W+1]).")
      .def_property_readonly("unk_id", &lrec::WordPiece::unk_id)
      .def_property_readonly("vocab_size", &lrec::WordPiece::vocab_size);
}
