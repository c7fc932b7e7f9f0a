// The byte-level tokenizer: each byte of UTF-8 (or any) text is one token, vocabulary 256.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace mpt::data {

constexpr int kByteVocab = 256;

inline std::vector<uint16_t> encode(std::string_view text) {
  std::vector<uint16_t> out(text.size());
  for (size_t i = 0; i < text.size(); ++i) out[i] = static_cast<unsigned char>(text[i]);
  return out;
}

// Tokens outside the byte range (a model with vocab_size > 256) have no byte to stand for; each
// becomes U+FFFD (the UTF-8 replacement character) so the output stays printable.
inline std::string decode(const uint16_t* tokens, size_t n) {
  std::string out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    if (tokens[i] < kByteVocab) {
      out.push_back(static_cast<char>(static_cast<unsigned char>(tokens[i])));
    } else {
      out += "\xEF\xBF\xBD";
    }
  }
  return out;
}

inline std::string decode(const std::vector<uint16_t>& tokens) {
  return decode(tokens.data(), tokens.size());
}

}  // namespace mpt::data
