#include "gateway/ws_frame.hpp"

#include <openssl/evp.h>
#include <openssl/sha.h>

#include <cstring>

namespace pushbook::detail::ws {

bool valid_close_code(std::uint16_t code) noexcept {
  return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1013) || (code >= 3000 && code <= 4999);
}

bool valid_utf8(std::string_view s) noexcept {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const auto* end = p + s.size();
  while (p < end) {
    // ASCII eight bytes at a time.
    if (end - p >= 8) {
      std::uint64_t w;
      std::memcpy(&w, p, 8);
      if ((w & 0x8080808080808080ull) == 0) {
        p += 8;
        continue;
      }
    }
    const unsigned c = *p;
    if (c < 0x80) {
      ++p;
      continue;
    }
    std::size_t n;
    unsigned lo = 0x80, hi = 0xbf;  // the allowed range of the second byte
    if (c >= 0xc2 && c <= 0xdf) {
      n = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
      n = 3;
      if (c == 0xe0) lo = 0xa0;  // overlong
      if (c == 0xed) hi = 0x9f;  // surrogates
    } else if (c >= 0xf0 && c <= 0xf4) {
      n = 4;
      if (c == 0xf0) lo = 0x90;  // overlong
      if (c == 0xf4) hi = 0x8f;  // past U+10FFFF
    } else {
      return false;
    }
    if (static_cast<std::size_t>(end - p) < n) return false;
    if (p[1] < lo || p[1] > hi) return false;
    for (std::size_t i = 2; i < n; ++i)
      if ((p[i] & 0xc0) != 0x80) return false;
    p += n;
  }
  return true;
}

bool valid_client_key(std::string_view key) noexcept {
  if (key.size() != 24 || key[22] != '=' || key[23] != '=') return false;
  for (std::size_t i = 0; i < 22; ++i) {
    const char c = key[i];
    const bool ok =
        (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '+' || c == '/';
    if (!ok) return false;
  }
  // 16 bytes leave the last character's four low bits unused: they must be zero.
  static constexpr std::string_view alphabet =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  return (alphabet.find(key[21]) & 0x0f) == 0;
}

std::string accept_key(std::string_view key) {
  static constexpr std::string_view guid = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
  std::string input;
  input.reserve(key.size() + guid.size());
  input.append(key).append(guid);
  unsigned char digest[SHA_DIGEST_LENGTH];
  SHA1(reinterpret_cast<const unsigned char*>(input.data()), input.size(), digest);
  unsigned char out[4 * ((SHA_DIGEST_LENGTH + 2) / 3) + 1];
  const int n = EVP_EncodeBlock(out, digest, SHA_DIGEST_LENGTH);
  return std::string(reinterpret_cast<const char*>(out), static_cast<std::size_t>(n));
}

std::size_t write_header(char* out, Opcode op, std::size_t payload_size) noexcept {
  out[0] = static_cast<char>(0x80 | static_cast<unsigned>(op));
  if (payload_size < 126) {
    out[1] = static_cast<char>(payload_size);
    return 2;
  }
  if (payload_size <= 0xffff) {
    out[1] = 126;
    out[2] = static_cast<char>(payload_size >> 8);
    out[3] = static_cast<char>(payload_size & 0xff);
    return 4;
  }
  out[1] = 127;
  const auto v = static_cast<std::uint64_t>(payload_size);
  for (int i = 0; i < 8; ++i) out[2 + i] = static_cast<char>((v >> (56 - 8 * i)) & 0xff);
  return 10;
}

std::string make_frame(Opcode op, std::string_view payload) {
  char header[10];
  const auto h = write_header(header, op, payload.size());
  std::string frame;
  frame.reserve(h + payload.size());
  frame.append(header, h).append(payload);
  return frame;
}

std::string close_payload(std::uint16_t code, std::string_view reason) {
  std::string out;
  out.push_back(static_cast<char>(code >> 8));
  out.push_back(static_cast<char>(code & 0xff));
  if (reason.size() > 123) {
    std::size_t cut = 123;
    // Back up to the start of a character (never split a UTF-8 sequence).
    while (cut > 0 && (static_cast<unsigned char>(reason[cut]) & 0xc0) == 0x80) --cut;
    reason = reason.substr(0, cut);
  }
  out.append(reason);
  return out;
}

void apply_mask(char* data, std::size_t size, const unsigned char key[4]) noexcept {
  std::size_t i = 0;
  if (size >= 16) {
    std::uint32_t k32;
    std::memcpy(&k32, key, 4);
    const std::uint64_t k64 = (std::uint64_t{k32} << 32) | k32;
    for (; i + 8 <= size; i += 8) {
      std::uint64_t w;
      std::memcpy(&w, data + i, 8);
      w ^= k64;
      std::memcpy(data + i, &w, 8);
    }
  }
  for (; i < size; ++i) data[i] = static_cast<char>(data[i] ^ key[i & 3]);
}

}  // namespace pushbook::detail::ws
