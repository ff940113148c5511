#include <pushbook/booking_store.hpp>

#include "detail/recovery.hpp"
#include "detail/string_hash.hpp"

#include <algorithm>
#include <array>
#include <chrono>
#include <deque>
#include <limits>
#include <map>
#include <mutex>

#include <boost/unordered/unordered_flat_map.hpp>

namespace pushbook {

BookingStore::~BookingStore() = default;

void BookingStore::commit_async(const StateChange& change, CommitCallback done) { done(commit(change)); }

void BookingStore::published(std::string_view, std::uint64_t) {}
void BookingStore::on_takeover(std::function<void(Booking, Takeover)>) {}
bool BookingStore::on_resource_counts(std::function<void(std::vector<ResourceState>)>) { return false; }
bool BookingStore::available() const noexcept { return true; }
result<std::optional<StoredKey>> BookingStore::find_key(std::string_view, std::string_view) const {
  return std::optional<StoredKey>{};
}

namespace {
using detail::string_hash;
}  // namespace

// Sharded so that concurrent commits of different bookings rarely contend.
struct MemoryStore::impl {
  struct stored {
    Booking booking;
    std::uint64_t order = 0;  // when it was first stored: recovery re-queues in this order
    std::string fingerprint;
  };
  struct shard {
    mutable std::mutex mutex;
    // Keyed by a view of the stored booking's own id (one copy of the id per booking, not two),
    // open addressing (a lookup reads one group of slots, not a chain of scattered nodes).
    boost::unordered_flat_map<std::string_view, std::unique_ptr<stored>, string_hash, std::equal_to<>>
        bookings;
  };
  explicit impl(MemoryStoreOptions o) : options(o) {
    // At most a century: beyond, steady_clock arithmetic could overflow.
    options.finished_retention =
        std::min<std::chrono::milliseconds>(options.finished_retention, std::chrono::hours(24 * 365 * 100));
    options.finished_retention = std::max(options.finished_retention, std::chrono::milliseconds::zero());
  }
  MemoryStoreOptions options;
  std::array<shard, 32> shards;
  // Finished bookings, oldest first, with when they finished: forgotten from the front.
  std::mutex finished_mutex;
  std::deque<std::pair<std::chrono::steady_clock::time_point, std::string>> finished;
  // When the oldest finished booking is due to be forgotten (steady_clock ticks): commits of live
  // bookings take finished_mutex only from then on.
  std::atomic<std::int64_t> next_due{std::numeric_limits<std::int64_t>::max()};
  std::atomic<std::uint64_t> next_order{1};
  mutable std::mutex resources_mutex;
  std::map<std::string, std::uint32_t, std::less<>> resources;

  shard& shard_for(std::string_view id) { return shards[string_hash{}(id) % shards.size()]; }
  const shard& shard_for(std::string_view id) const { return shards[string_hash{}(id) % shards.size()]; }
};

MemoryStore::MemoryStore(MemoryStoreOptions options) : impl_(std::make_unique<impl>(options)) {}
MemoryStore::~MemoryStore() = default;

result<void> MemoryStore::commit(const StateChange& change) {
  {
    auto& s = impl_->shard_for(change.booking.id);
    std::lock_guard lock(s.mutex);
    auto it = s.bookings.find(change.booking.id);
    if (it == s.bookings.end()) {
      auto st = std::make_unique<impl::stored>(
          impl::stored{change.booking, impl_->next_order.fetch_add(1), std::string(change.fingerprint)});
      const std::string_view key = st->booking.id;
      s.bookings.emplace(key, std::move(st));
    } else {
      // The key views booking.id, so the stored id string stays (the new version's id is the same
      // id). The copy first: if it throws, the stored booking is as it was; the moves cannot throw.
      auto& booking = it->second->booking;
      Booking updated = change.booking;
      updated.id = std::move(booking.id);
      booking = std::move(updated);
    }
  }
  // Retention: the finished booking joins the back of the line; what is past its time, or
  // beyond the count, leaves from the front. A finished booking never changes again, so what is
  // forgotten is never a booking the engine still works on.
  const auto now = std::chrono::steady_clock::now();
  const bool final = is_final(change.booking.status);
  if (!final && now.time_since_epoch().count() < impl_->next_due.load(std::memory_order_relaxed)) return {};
  std::lock_guard lock(impl_->finished_mutex);
  auto& finished = impl_->finished;
  if (final) finished.emplace_back(now, change.booking.id);
  const auto retention = impl_->options.finished_retention;
  // At most 64 forgotten for their age per commit (the caller may be an I/O thread, and after a
  // quiet hour thousands may be due): next_due brings the next commit back for the rest.
  std::size_t aged = 0;
  while (!finished.empty() && (finished.size() > impl_->options.max_finished ||
                               (aged++ < 64 && now - finished.front().first >= retention))) {
    const auto& id = finished.front().second;
    auto& s = impl_->shard_for(id);
    {
      std::lock_guard shard_lock(s.mutex);
      s.bookings.erase(id);
    }
    finished.pop_front();
  }
  impl_->next_due.store(finished.empty() ? std::numeric_limits<std::int64_t>::max()
                                         : (finished.front().first + retention).time_since_epoch().count(),
                        std::memory_order_relaxed);
  return {};
}

result<std::optional<Booking>> MemoryStore::load(std::string_view booking_id) const {
  const auto& s = impl_->shard_for(booking_id);
  std::lock_guard lock(s.mutex);
  auto it = s.bookings.find(booking_id);
  if (it == s.bookings.end()) return std::optional<Booking>{};
  return std::optional<Booking>{it->second->booking};
}

result<void> MemoryStore::put_resource(std::string_view resource_id, std::uint32_t capacity) {
  std::lock_guard lock(impl_->resources_mutex);
  impl_->resources.insert_or_assign(std::string(resource_id), capacity);
  return {};
}

result<RecoveredState> MemoryStore::recover(wall_clock::time_point keys_since) {
  detail::RecoveryBuilder builder;
  {
    std::lock_guard lock(impl_->resources_mutex);
    for (const auto& [id, capacity] : impl_->resources) builder.resource(id, capacity);
  }
  std::vector<std::pair<std::uint64_t, Booking>> processing;
  for (const auto& s : impl_->shards) {
    std::lock_guard lock(s.mutex);
    for (const auto& [id, st] : s.bookings) {
      const auto& b = st->booking;
      builder.booking_lines(b.status, b.lines);
      if (b.status == BookingStatus::processing) processing.emplace_back(st->order, b);
      if (b.status == BookingStatus::held) builder.state.held.push_back(b);
      if (!b.idempotency_key.empty() && b.created_at >= keys_since)
        builder.state.keys.push_back({b.user, b.idempotency_key, st->fingerprint, b.id, b.created_at});
    }
  }
  std::sort(processing.begin(), processing.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  for (auto& [order, b] : processing) builder.state.processing.push_back(std::move(b));
  return builder.finish();
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
