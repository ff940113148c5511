// A BookingStore for engine tests: a MemoryStore underneath, commits that fail on demand at any
// commit point, and (optionally) completions on a writer thread of its own, as a durable store
// has them. Records which version of each booking is stored, so a subscriber can check that
// nothing is published before it is stored.
#pragma once

#include <pushbook/booking_store.hpp>

#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <thread>

namespace pushbook::test {

class TestStore final : public BookingStore {
 public:
  /// With `async`, commit_async() completes on the store's own thread, in commit order.
  explicit TestStore(bool async = false) : async_(async) {
    if (async_) writer_ = std::thread([this] { run(); });
  }
  ~TestStore() override {
    if (!async_) return;
    {
      std::lock_guard lock(queue_mutex_);
      stop_ = true;
    }
    queue_cv_.notify_all();
    writer_.join();
  }

  /// Commits of bookings for which `pred` holds fail with store_failed ("disk full").
  void fail_when(std::function<bool(const Booking&)> pred) {
    std::lock_guard lock(mutex_);
    fail_when_ = std::move(pred);
  }
  void heal() { fail_when(nullptr); }
  std::atomic<bool> fail_resources{false};
  std::atomic<bool> fail_reads{false};

  std::uint64_t stored_version(const std::string& id) {
    std::lock_guard lock(mutex_);
    auto it = versions_.find(id);
    return it == versions_.end() ? 0 : it->second;
  }
  std::uint64_t failed_commits() {
    std::lock_guard lock(mutex_);
    return failed_;
  }
  MemoryStore& inner() { return inner_; }

  result<void> commit(const StateChange& change) override {
    std::lock_guard lock(mutex_);
    if (fail_when_ && fail_when_(change.booking)) {
      ++failed_;
      return Error(errc::store_failed, "disk full");
    }
    versions_[change.booking.id] = change.booking.version;
    return inner_.commit(change);
  }

  void commit_async(const StateChange& change, CommitCallback done) override {
    if (!async_) return done(commit(change));
    // Decided at commit time, completed later on the writer thread (as a group commit does).
    auto r = commit(change);
    {
      std::lock_guard lock(queue_mutex_);
      queue_.emplace_back(std::move(done), std::move(r));
    }
    queue_cv_.notify_one();
  }

  result<std::optional<Booking>> load(std::string_view id) const override {
    if (fail_reads.load()) return Error(errc::store_failed, "I/O error");
    return inner_.load(id);
  }
  result<void> put_resource(std::string_view id, std::uint32_t capacity) override {
    if (fail_resources.load()) return Error(errc::store_failed, "disk full");
    return inner_.put_resource(id, capacity);
  }
  result<RecoveredState> recover(wall_clock::time_point keys_since) override {
    if (fail_reads.load()) return Error(errc::store_failed, "I/O error");
    return inner_.recover(keys_since);
  }

 private:
  void run() {
    std::unique_lock lock(queue_mutex_);
    for (;;) {
      queue_cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;
      auto [done, r] = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      done(std::move(r));
      lock.lock();
    }
  }

  MemoryStore inner_;
  std::mutex mutex_;
  std::function<bool(const Booking&)> fail_when_;
  std::map<std::string, std::uint64_t> versions_;
  std::uint64_t failed_ = 0;

  bool async_;
  std::mutex queue_mutex_;
  std::condition_variable queue_cv_;
  std::deque<std::pair<CommitCallback, result<void>>> queue_;
  bool stop_ = false;
  std::thread writer_;
};

}  // namespace pushbook::test
