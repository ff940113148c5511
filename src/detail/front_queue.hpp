// front_queue: a FIFO without std::deque's fixed cost.
#pragma once

#include <cstddef>
#include <utility>
#include <vector>

namespace pushbook::detail {

// A FIFO in a vector whose front moves: LocalBus's topic histories (oldest first) and
// subscription queues, the engine's publish lanes. Empty, it holds no memory (std::deque
// allocates ~600 bytes even then, and a subscription or a lane is made per booking). Most hold a
// handful of items; a busy topic at its limit drops one event per publish, which costs nothing
// here until half of the vector is dropped, then one move of what is left.
template <typename T>
class front_queue {
 public:
  std::size_t size() const noexcept { return items_.size() - start_; }
  bool empty() const noexcept { return size() == 0; }
  T& front() noexcept { return items_[start_]; }
  const T& front() const noexcept { return items_[start_]; }
  T& back() noexcept { return items_.back(); }
  const T& operator[](std::size_t i) const noexcept { return items_[start_ + i]; }
  auto begin() noexcept { return items_.begin() + static_cast<std::ptrdiff_t>(start_); }
  auto end() noexcept { return items_.end(); }
  auto begin() const noexcept { return items_.begin() + static_cast<std::ptrdiff_t>(start_); }
  auto end() const noexcept { return items_.end(); }
  void push_back(T item) {
    // Room for two at first (a booking/<id> topic gets its two events in one block), then the
    // vector's doubling.
    if (items_.capacity() == 0) items_.reserve(2);
    items_.push_back(std::move(item));
  }
  void pop_front() { drop_front(1); }
  // Drops the `n` oldest (n <= size()).
  void drop_front(std::size_t n) {
    for (std::size_t i = start_; i < start_ + n; ++i) items_[i] = T{};  // released now
    start_ += n;
    if (start_ == items_.size()) {
      clear();
    } else if (start_ >= 32 && start_ * 2 >= items_.size()) {
      items_.erase(items_.begin(), items_.begin() + static_cast<std::ptrdiff_t>(start_));
      start_ = 0;
    }
  }
  void clear() noexcept {
    if (items_.capacity() > 64)
      std::vector<T>().swap(items_);  // a burst's room is not kept for good
    else
      items_.clear();
    start_ = 0;
  }

 private:
  std::vector<T> items_;
  std::size_t start_ = 0;  // items_[0, start_) are dropped (empty)
};

}  // namespace pushbook::detail
