#include "io/safetensors.h"

#include <xxhash.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <memory>
#include <set>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/files.h"

namespace mpt::safetensors {
namespace {

// The dtypes mpt stores, by safetensors name.
const std::vector<std::pair<DType, const char*>>& dtype_names() {
  static const std::vector<std::pair<DType, const char*>> names = {
      {DType::f32, "F32"},  {DType::i32, "I32"},      {DType::f16, "F16"},
      {DType::bf16, "BF16"}, {DType::e4m3, "F8_E4M3"}, {DType::e5m2, "F8_E5M2"}};
  return names;
}

bool dtype_from_name(const std::string& name, DType* out) {
  for (const auto& [t, n] : dtype_names())
    if (name == n) {
      *out = t;
      return true;
    }
  return false;
}

[[noreturn]] void bad(const std::string& path, const std::string& what) {
  throw InputError(path + ": not a valid safetensors file: " + what);
}

}  // namespace

std::string format_name(DType t) {
  for (const auto& [d, n] : dtype_names())
    if (d == t) return n;
  throw RuntimeError(std::string("safetensors: no name for dtype ") + mpt::dtype_name(t));
}

Written write(const std::string& path, const std::vector<TensorRef>& tensors,
              const std::map<std::string, std::string>& metadata, const WriteHook& hook) {
  // ordered_json keeps the header in the order the tensors are laid out, which reads better.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::set<std::string> seen;
  uint64_t offset = 0;
  std::vector<ByteSpan> chunks;
  chunks.reserve(tensors.size() + 2);
  chunks.push_back({nullptr, 0});  // the length, filled in below
  chunks.push_back({nullptr, 0});  // the header
  for (const TensorRef& t : tensors) {
    MPT_CHECK(t.name != "__metadata__" && seen.insert(t.name).second,
              "safetensors: duplicate or reserved tensor name '" + t.name + "'");
    const uint64_t bytes = static_cast<uint64_t>(t.shape.numel()) * dtype_size(t.dtype);
    std::vector<int64_t> shape(t.shape.dims.begin(), t.shape.dims.begin() + t.shape.ndim);
    header[t.name] = {{"dtype", format_name(t.dtype)},
                      {"shape", shape},
                      {"data_offsets", {offset, offset + bytes}}};
    MPT_CHECK(t.data != nullptr || t.fill != nullptr || bytes == 0,
              "safetensors: tensor '" + t.name + "' has neither data nor a fill");
    chunks.push_back({t.data, static_cast<size_t>(bytes), t.fill});
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // data starts 8-byte aligned
  unsigned char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(uint64_t(text.size()) >> (8 * i));
  chunks[0] = {len, sizeof len};
  chunks[1] = {text.data(), text.size()};
  // Hashed as written: a tensor that fills itself is in memory only while it is written.
  std::unique_ptr<XXH3_state_t, XXH_errorcode (*)(XXH3_state_t*)> st(XXH3_createState(),
                                                                    XXH3_freeState);
  MPT_CHECK(st != nullptr, "XXH3_createState");
  XXH3_64bits_reset(st.get());
  uint64_t total = 0;
  write_file_atomic(path, chunks, hook, [&](const void* data, size_t size) {
    XXH3_64bits_update(st.get(), data, size);
    total += size;
  });
  return {total, XXH3_64bits_digest(st.get())};
}

File File::open(const std::string& path) { return parse(path, MappedFile::map(path)); }

File File::parse(const std::string& path, std::vector<char> bytes) {
  auto v = std::make_shared<std::vector<char>>(std::move(bytes));
  return parse_bytes(path, v, v->data(), v->size());
}

File File::parse(const std::string& path, MappedFile bytes) {
  auto m = std::make_shared<MappedFile>(std::move(bytes));
  return parse_bytes(path, m, m->data(), m->size());
}

File File::parse_bytes(const std::string& path, std::shared_ptr<const void> owner,
                       const char* base, size_t size) {
  File f;
  f.path_ = path;
  f.owner_ = std::move(owner);
  f.base_ = base;
  f.size_ = size;
  if (size < 8) bad(path, "only " + std::to_string(size) + " bytes, shorter than the 8-byte length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(base[i]);
  if (n > size - 8)
    bad(path, "header length " + std::to_string(n) + " exceeds the file's " +
                  std::to_string(size - 8) + " remaining bytes (truncated?)");
  f.data_start_ = 8 + static_cast<size_t>(n);
  const size_t data_size = size - f.data_start_;

  nlohmann::json header;
  try {
    header = nlohmann::json::parse(base + 8, base + f.data_start_);
  } catch (const nlohmann::json::exception& e) {
    bad(path, std::string("header is not JSON (") + e.what() + ")");
  }
  if (!header.is_object()) bad(path, "header is not a JSON object");

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) bad(path, "__metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) bad(path, "__metadata__." + m.key() + " is not a string");
        f.metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = "tensor '" + name + "'";
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") ||
        !v.contains("data_offsets"))
      bad(path, where + " lacks dtype, shape or data_offsets");
    Entry e;
    e.name = name;
    if (!v["dtype"].is_string() || !dtype_from_name(v["dtype"].get<std::string>(), &e.dtype))
      bad(path, where + " has dtype " + v["dtype"].dump() + ", which mpt does not read");
    const nlohmann::json& shape = v["shape"];
    if (!shape.is_array() || shape.size() > static_cast<size_t>(kMaxDims))
      bad(path, where + " has a shape that is not a list of at most 4 dimensions");
    for (const auto& d : shape) {
      if (!d.is_number_unsigned()) bad(path, where + " has a negative or non-integer dimension");
      e.shape.dims[e.shape.ndim++] = d.get<int64_t>();
    }
    const nlohmann::json& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
        !off[1].is_number_unsigned() || off[0].get<uint64_t>() > off[1].get<uint64_t>())
      bad(path, where + " has data_offsets that are not [begin, end] with begin <= end");
    e.offset = off[0].get<uint64_t>();
    e.bytes = off[1].get<uint64_t>() - e.offset;
    const uint64_t want = static_cast<uint64_t>(e.shape.numel()) * dtype_size(e.dtype);
    if (e.bytes != want)
      bad(path, where + " spans " + std::to_string(e.bytes) + " bytes but its shape " +
                    e.shape.str() + " needs " + std::to_string(want));
    f.entries_.push_back(std::move(e));
  }
  std::sort(f.entries_.begin(), f.entries_.end(),
            [](const Entry& a, const Entry& b) { return a.offset < b.offset; });
  size_t expect = 0;
  for (const Entry& e : f.entries_) {
    if (e.offset != expect)
      bad(path, "tensor '" + e.name + "' starts at byte " + std::to_string(e.offset) +
                    " of the data, expected " + std::to_string(expect) + " (overlap or gap)");
    expect += e.bytes;
  }
  if (expect != data_size)
    bad(path, "the tensors cover " + std::to_string(expect) + " bytes but the data section has " +
                  std::to_string(data_size) + " (truncated or trailing bytes)");
  return f;
}

bool File::contains(const std::string& name) const {
  return std::any_of(entries_.begin(), entries_.end(),
                     [&](const Entry& e) { return e.name == name; });
}

const File::Entry& File::entry(const std::string& name) const {
  for (const Entry& e : entries_)
    if (e.name == name) return e;
  throw InputError(path_ + ": no tensor named '" + name + "'");
}

}  // namespace mpt::safetensors
