#include <pushbook/booking_store.hpp>

#include <array>
#include <mutex>
#include <unordered_map>

namespace pushbook {

BookingStore::~BookingStore() = default;

namespace {
struct string_hash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
};
}  // namespace

// Sharded so that concurrent commits of different bookings rarely contend.
struct MemoryStore::impl {
  struct shard {
    mutable std::mutex mutex;
    std::unordered_map<std::string, Booking, string_hash, std::equal_to<>> bookings;
  };
  std::array<shard, 32> shards;
  shard& shard_for(std::string_view id) { return shards[string_hash{}(id) % shards.size()]; }
  const shard& shard_for(std::string_view id) const { return shards[string_hash{}(id) % shards.size()]; }
};

MemoryStore::MemoryStore() : impl_(std::make_unique<impl>()) {}
MemoryStore::~MemoryStore() = default;

result<void> MemoryStore::commit(const StateChange& change) {
  auto& s = impl_->shard_for(change.booking.id);
  std::lock_guard lock(s.mutex);
  auto it = s.bookings.find(change.booking.id);
  if (it == s.bookings.end())
    s.bookings.emplace(change.booking.id, change.booking);
  else
    it->second = change.booking;
  return {};
}

std::optional<Booking> MemoryStore::load(std::string_view booking_id) const {
  const auto& s = impl_->shard_for(booking_id);
  std::lock_guard lock(s.mutex);
  auto it = s.bookings.find(booking_id);
  if (it == s.bookings.end()) return std::nullopt;
  return it->second;
}

std::size_t MemoryStore::size() const {
  std::size_t n = 0;
  for (const auto& s : impl_->shards) {
    std::lock_guard lock(s.mutex);
    n += s.bookings.size();
  }
  return n;
}

}  // namespace pushbook
