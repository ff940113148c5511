// The hash of pushbook's unordered containers keyed by strings: transparent, so that a lookup by
// std::string_view makes no std::string.
//
// Deliberately not noexcept. libstdc++ keeps each node's hash code in the node only for a hash it
// does not consider fast, and it considers fast any hash whose call is noexcept. Without the
// stored code, every step along a bucket's chain hashes that node's key again to see whether the
// chain has left the bucket, and compares keys where codes would have differed: with the bus's
// tens of thousands of booking topics that was ~5% of a pushed booking's server CPU (the hashing
// and the cache misses of reaching each key's characters). With it, a step compares two integers.
//
// The function itself: the keys are short (topics, booking ids, user names: 4 to 60 bytes) and a
// booking hashes them some 50 times (shards, maps, lanes), where libstdc++'s std::hash (murmur
// over bytes, out of line) took ~80 instructions a key, ~4,000 a booking. This one reads 8 bytes
// at a time and mixes 16 at a time with one 64x64->128-bit multiply (the construction of wyhash
// and rapidhash), inline: ~20 instructions for a booking topic. Not for keys an attacker picks to
// collide: neither is std::hash; a map's keys here are ids the engine made or names it checked.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace pushbook::detail {

namespace hash_detail {
__extension__ using u128 = unsigned __int128;  // GCC and Clang, on 64-bit targets
inline std::uint64_t mix(std::uint64_t a, std::uint64_t b) {
  const auto r = static_cast<u128>(a) * b;
  return static_cast<std::uint64_t>(r) ^ static_cast<std::uint64_t>(r >> 64);
}
inline std::uint64_t load64(const char* p) {
  std::uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
inline std::uint64_t load32(const char* p) {
  std::uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline constexpr std::uint64_t k0 = 0x2d358dccaa6c78a5, k1 = 0x8bb84b93962eacc9, k2 = 0x4b33a62ed433d4a3;
}  // namespace hash_detail

/// Every byte of `s` and its length go into the result.
inline std::uint64_t hash_bytes(std::string_view s) {
  using namespace hash_detail;
  const char* p = s.data();
  const std::size_t size = s.size();
  std::uint64_t h = k0 ^ size;
  std::uint64_t a = 0, b = 0;
  if (size <= 16) {
    if (size >= 8) {
      a = load64(p);
      b = load64(p + size - 8);  // overlaps `a` below 16 bytes
    } else if (size >= 4) {
      a = load32(p);
      b = load32(p + size - 4);
    } else if (size > 0) {
      a = (std::uint64_t{static_cast<unsigned char>(p[0])} << 16) |
          (std::uint64_t{static_cast<unsigned char>(p[size >> 1])} << 8) |
          static_cast<unsigned char>(p[size - 1]);
    }
  } else {
    std::size_t n = size;
    for (; n > 16; p += 16, n -= 16) h = mix(load64(p) ^ k1, load64(p + 8) ^ h);
    a = load64(p + n - 16);  // the last 16 bytes (overlapping the blocks above)
    b = load64(p + n - 8);
  }
  return mix(mix(a ^ k1, b ^ h) ^ k2, size ^ k1);
}

struct string_hash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const { return static_cast<std::size_t>(hash_bytes(s)); }
};

}  // namespace pushbook::detail
