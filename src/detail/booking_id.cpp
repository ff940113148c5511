#include "detail/booking_id.hpp"

#include <random>

namespace pushbook::detail {
namespace {
constexpr char alphabet[] = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";  // Crockford base32

int decode(char c) {
  for (int i = 0; i < 32; ++i)
    if (alphabet[i] == c) return i;
  return -1;
}
}  // namespace

std::string BookingIdGenerator::next(std::chrono::system_clock::time_point now) {
  const auto ms = static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count());
  const auto count = counter_.fetch_add(1, std::memory_order_relaxed);
  const std::uint64_t hi = ((ms & 0xFFFF'FFFF'FFFFull) << 16) | (node_id_ >> 16);
  const std::uint64_t lo = (std::uint64_t{node_id_ & 0xFFFF} << 48) | (count & 0xFFFF'FFFF'FFFFull);
  // 128 bits as 26 base32 digits, most significant first (the first digit carries 3 bits).
  std::string out(26, '0');
  for (int i = 0; i < 26; ++i) {
    const int off = 5 * (25 - i);  // bit offset of this digit from the least significant bit
    std::uint64_t digit;
    if (off >= 64)
      digit = hi >> (off - 64);
    else if (off + 5 <= 64)
      digit = lo >> off;
    else
      digit = (lo >> off) | (hi << (64 - off));
    out[static_cast<std::size_t>(i)] = alphabet[digit & 31];
  }
  return out;
}

std::uint32_t BookingIdGenerator::random_node_id() {
  std::random_device rd;
  return rd();
}

std::uint64_t BookingIdGenerator::random_counter_start() {
  std::random_device rd;
  // Start low in the 48-bit space so the counter does not wrap in practice.
  return (std::uint64_t{rd()} << 8) ^ rd();
}

std::int64_t BookingIdGenerator::timestamp_ms(const std::string& id) {
  if (id.size() != 26) return -1;
  std::uint64_t hi = 0, lo = 0;
  for (char c : id) {
    const int d = decode(c);
    if (d < 0) return -1;
    hi = (hi << 5) | (lo >> 59);
    lo = (lo << 5) | static_cast<std::uint64_t>(d);
  }
  return static_cast<std::int64_t>(hi >> 16);  // the top 48 of 128 bits
}

}  // namespace pushbook::detail
