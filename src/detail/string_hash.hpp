// The hash of pushbook's unordered containers keyed by strings: transparent, so that a lookup by
// std::string_view makes no std::string.
//
// Deliberately not noexcept. libstdc++ keeps each node's hash code in the node only for a hash it
// does not consider fast, and it considers fast any hash whose call is noexcept. Without the
// stored code, every step along a bucket's chain hashes that node's key again to see whether the
// chain has left the bucket, and compares keys where codes would have differed: with the bus's
// tens of thousands of booking topics that was ~5% of a pushed booking's server CPU (the hashing
// and the cache misses of reaching each key's characters). With it, a step compares two integers.
#pragma once

#include <cstddef>
#include <functional>
#include <string_view>

namespace pushbook::detail {

struct string_hash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

}  // namespace pushbook::detail
