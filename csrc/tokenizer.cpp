#include "tokenizer.hpp"

#include <algorithm>
#include <exception>
#include <thread>

namespace lrec {

namespace {

constexpr std::size_t kMinUnitsPerThread = 8192;  // below this a thread costs more than it saves

template <typename Unit>
bool has_surrogate(const Unit* s, std::size_t n) {
  if constexpr (sizeof(Unit) == 1) {
    return false;
  } else {
    for (std::size_t i = 0; i < n; ++i) {
      if (s[i] >= 0xD800 && s[i] <= 0xDFFF) return true;
    }
    return false;
  }
}

}  // namespace

void parallel_ranges(std::size_t n, int threads, const std::vector<std::size_t>* weights,
                     const std::function<void(std::size_t, std::size_t, std::size_t)>& fn) {
  if (threads <= 1 || n <= 1) {
    fn(0, 0, n);
    return;
  }
  const auto parts = static_cast<std::size_t>(std::min<std::size_t>(threads, n));
  std::vector<std::size_t> bounds{0};
  if (weights) {
    std::size_t total = 0;
    for (std::size_t w : *weights) total += w + 1;
    std::size_t acc = 0, next = 1;
    for (std::size_t i = 0; i < n && next < parts; ++i) {
      acc += (*weights)[i] + 1;
      if (acc * parts >= total * next) {
        bounds.push_back(i + 1);
        ++next;
      }
    }
  } else {
    for (std::size_t p = 1; p < parts; ++p) bounds.push_back(n * p / parts);
  }
  bounds.push_back(n);
  // An exception in a worker (bad_alloc) must reach the caller, not std::terminate.
  std::vector<std::exception_ptr> errors(bounds.size() - 1);
  auto guarded = [&](std::size_t p) {
    try {
      fn(p, bounds[p], bounds[p + 1]);
    } catch (...) {
      errors[p] = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  for (std::size_t p = 1; p + 1 < bounds.size(); ++p) pool.emplace_back(guarded, p);
  guarded(0);  // the calling thread takes the first part
  for (auto& t : pool) t.join();
  for (const auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

int BertTokenizer::choose_threads(std::size_t work_units, int requested) {
  // hardware_concurrency() reads /sys on each call (microseconds): ask once.
  static const int hw = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  const std::size_t useful = std::max<std::size_t>(1, work_units / kMinUnitsPerThread);
  const int cap = requested > 0 ? requested : hw;
  return static_cast<int>(std::min<std::size_t>(static_cast<std::size_t>(cap), useful));
}

BertTokenizer::BertTokenizer(WordPiece model, const NormalizerOptions& norm,
                             std::vector<AddedToken> added, std::int32_t cls_id,
                             std::int32_t sep_id, std::int32_t pad_id)
    : model_(std::move(model)),
      normalizer_(norm),
      added_(std::move(added)),
      added_first_ascii_(128, false),
      cls_id_(cls_id),
      sep_id_(sep_id),
      pad_id_(pad_id) {
  for (const auto& t : added_) {
    if (t.content.empty()) throw std::invalid_argument("an added token is empty");
    if (t.content[0] < 128) {
      added_first_ascii_[t.content[0]] = true;
    } else {
      added_non_ascii_first_ = true;
    }
  }
  for (char32_t c = 0; c < 128; ++c) ascii_class_[c] = split_class(c);
}

template <typename Unit>
std::size_t BertTokenizer::match_added(const Unit* s, std::size_t n, std::size_t i,
                                       std::int32_t* id) const {
  std::size_t best = 0;
  for (const auto& t : added_) {
    const std::size_t len = t.content.size();
    if (len <= best || len > n - i) continue;
    std::size_t k = 0;
    while (k < len && static_cast<char32_t>(s[i + k]) == t.content[k]) ++k;
    if (k == len) {
      best = len;
      *id = t.id;
    }
  }
  return best;
}

template <typename Unit>
bool BertTokenizer::tokenize_units(const Unit* s, std::size_t n, std::vector<std::int32_t>& out,
                                   Scratch& sc) const {
  if (has_surrogate(s, n)) return false;
  std::size_t seg = 0;
  if (!added_.empty()) {
    for (std::size_t i = 0; i < n;) {
      const char32_t c = static_cast<char32_t>(s[i]);
      const bool candidate = c < 128 ? static_cast<bool>(added_first_ascii_[c])
                                     : added_non_ascii_first_;
      std::int32_t id = -1;
      const std::size_t len = candidate ? match_added(s, n, i, &id) : 0;
      if (len == 0) {
        ++i;
        continue;
      }
      tokenize_segment(s + seg, i - seg, out, sc);
      out.push_back(id);
      i += len;
      seg = i;
    }
  }
  tokenize_segment(s + seg, n - seg, out, sc);
  return true;
}

template <typename Unit>
void BertTokenizer::tokenize_segment(const Unit* s, std::size_t n, std::vector<std::int32_t>& out,
                                     Scratch& sc) const {
  if (n == 0) return;
  normalizer_.normalize(s, n, sc.norm, sc.tmp);
  pre_tokenize(sc.norm, out);
}

void BertTokenizer::pre_tokenize(const std::vector<char32_t>& norm,
                                 std::vector<std::int32_t>& out) const {
  const char32_t* w = norm.data();
  const std::size_t n = norm.size();
  auto cls = [this](char32_t c) { return c < 128 ? ascii_class_[c] : split_class(c); };
  std::size_t i = 0;
  while (i < n) {
    const std::uint8_t k = cls(w[i]);
    if (k & unicode::kSplitWs) {
      ++i;
    } else if (k & unicode::kPunct) {
      model_.tokenize(w + i, 1, out);
      ++i;
    } else {
      std::size_t j = i + 1;
      while (j < n && cls(w[j]) == 0) ++j;
      model_.tokenize(w + i, j - i, out);
      i = j;
    }
  }
}

bool BertTokenizer::tokenize(const TextRef& text, std::vector<std::int32_t>& out) const {
  thread_local Scratch sc;
  switch (text.kind) {
    case 1:
      return tokenize_units(static_cast<const std::uint8_t*>(text.data), text.len, out, sc);
    case 2:
      return tokenize_units(static_cast<const std::uint16_t*>(text.data), text.len, out, sc);
    case 4:
      return tokenize_units(static_cast<const char32_t*>(text.data), text.len, out, sc);
    default:
      throw std::invalid_argument("TextRef.kind must be 1, 2 or 4");
  }
}

TokenizedBatch BertTokenizer::tokenize_batch(const TextRef* texts, std::size_t n,
                                             int num_threads) const {
  TokenizedBatch batch;
  batch.lens.assign(n, 0);
  batch.rows.assign(n, nullptr);
  std::vector<std::size_t> weights(n);
  std::size_t total = 0;
  for (std::size_t i = 0; i < n; ++i) total += weights[i] = texts[i].len;
  const int threads = choose_threads(total, num_threads);
  batch.chunks.resize(static_cast<std::size_t>(threads));
  std::vector<std::size_t> starts(n, 0), part_of(n, 0);
  std::vector<std::size_t> bad(batch.chunks.size(), batch.bad_index);
  parallel_ranges(n, threads, &weights, [&](std::size_t part, std::size_t lo, std::size_t hi) {
    auto& buf = batch.chunks[part];
    buf.reserve(total / batch.chunks.size() / 3 + 16);  // about one token per 3-4 characters
    for (std::size_t i = lo; i < hi; ++i) {
      starts[i] = buf.size();
      part_of[i] = part;
      if (!tokenize(texts[i], buf) && bad[part] == batch.bad_index) bad[part] = i;
      batch.lens[i] = buf.size() - starts[i];
    }
  });
  batch.bad_index = *std::min_element(bad.begin(), bad.end());
  // Row pointers only now that the per-thread buffers have stopped growing.
  for (std::size_t i = 0; i < n; ++i) batch.rows[i] = batch.chunks[part_of[i]].data() + starts[i];
  return batch;
}

Layout BertTokenizer::plan(const TokenizedBatch& a, const TokenizedBatch* b,
                           const EncodeOptions& opts) const {
  if (b && b->size() != a.size()) {
    throw std::invalid_argument("texts and text pairs differ in length");
  }
  const bool pair = b != nullptr;
  const std::size_t added = added_specials(pair);
  if (opts.truncation != Truncation::kNone && opts.max_length < added) {
    throw std::invalid_argument("max_length must leave room for the " + std::to_string(added) +
                                " special tokens");
  }
  const std::size_t max_len = opts.max_length - (opts.truncation == Truncation::kNone ? 0 : added);
  Layout layout;
  layout.keep.resize(a.size());
  std::size_t longest = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    std::size_t n1 = a.lens[i], n2 = pair ? b->lens[i] : 0;
    const std::size_t total = n1 + n2;
    if (opts.truncation != Truncation::kNone && total > max_len) {
      const std::size_t to_remove = total - max_len;
      if (max_len == 0) {
        n1 = n2 = 0;
      } else if (opts.truncation == Truncation::kLongestFirst) {
        if (pair) {
          // HF's truncate_encodings: the shorter side keeps its length if the longer one can
          // still get as much; otherwise both get half (the longer one the odd token).
          std::size_t s1 = n1, s2 = n2;
          const bool swap = s1 > s2;
          if (swap) std::swap(s1, s2);
          s2 = s1 > max_len ? s1 : std::max(s1, max_len - s1);
          if (s1 + s2 > max_len) {
            s1 = max_len / 2;
            s2 = s1 + max_len % 2;
          }
          if (swap) std::swap(s1, s2);
          n1 = std::min(n1, s1);
          n2 = std::min(n2, s2);
        } else {
          n1 = total - to_remove;
        }
      } else {
        if (opts.truncation == Truncation::kOnlySecond && !pair) {
          throw InvalidText(i, "truncation 'only_second' needs text pairs");
        }
        std::size_t& target = opts.truncation == Truncation::kOnlyFirst ? n1 : n2;
        if (target <= to_remove) {
          throw InvalidText(i, "the sequence to truncate is too short to respect max_length");
        }
        target -= to_remove;
      }
    }
    layout.keep[i] = {n1, n2};
    longest = std::max(longest, n1 + n2 + added);
  }
  if (opts.pad_to_max_length) {
    if (longest > opts.max_length) {
      throw std::invalid_argument(
          "a text is longer than max_length and truncation is off: the rows would be ragged; "
          "use padding='longest' or truncation=True");
    }
    layout.width = opts.max_length;
  } else {
    layout.width = longest;
  }
  return layout;
}

template <typename T>
void BertTokenizer::fill(const TokenizedBatch& a, const TokenizedBatch* b, const Layout& layout,
                         T* ids, T* mask, T* type_ids, int num_threads) const {
  const std::size_t w = layout.width;
  const int threads = choose_threads(a.size() * w, num_threads);
  parallel_ranges(a.size(), threads, nullptr, [&](std::size_t, std::size_t lo, std::size_t hi) {
    for (std::size_t i = lo; i < hi; ++i) {
      T* row = ids + i * w;
      T* m = mask + i * w;
      T* tt = type_ids + i * w;
      const auto [n1, n2] = layout.keep[i];
      std::size_t k = 0;
      row[k++] = cls_id_;
      for (std::size_t j = 0; j < n1; ++j) row[k++] = a.rows[i][j];
      row[k++] = sep_id_;
      const std::size_t first = k;
      if (b) {
        for (std::size_t j = 0; j < n2; ++j) row[k++] = b->rows[i][j];
        row[k++] = sep_id_;
      }
      std::fill(row + k, row + w, static_cast<T>(pad_id_));
      std::fill(m, m + k, T{1});
      std::fill(m + k, m + w, T{0});
      std::fill(tt, tt + first, T{0});
      std::fill(tt + first, tt + k, T{1});
      std::fill(tt + k, tt + w, T{0});
    }
  });
}

template void BertTokenizer::fill<std::int64_t>(const TokenizedBatch&, const TokenizedBatch*,
                                                const Layout&, std::int64_t*, std::int64_t*,
                                                std::int64_t*, int) const;
template void BertTokenizer::fill<std::int32_t>(const TokenizedBatch&, const TokenizedBatch*,
                                                const Layout&, std::int32_t*, std::int32_t*,
                                                std::int32_t*, int) const;

}  // namespace lrec
