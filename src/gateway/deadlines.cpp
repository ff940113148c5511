#include "gateway/deadlines.hpp"

#include <algorithm>
#include <functional>

namespace pushbook::detail {

Deadlines::Deadlines(boost::asio::io_context& ioc)
    : boost::asio::execution_context::service(ioc), timer_(ioc) {}

Deadlines::Slot Deadlines::add(DeadlineTarget* target) {
  std::lock_guard lock(mutex_);
  std::uint32_t index;
  if (!free_.empty()) {
    index = free_.back();
    free_.pop_back();
  } else {
    index = static_cast<std::uint32_t>(slots_.size());
    slots_.emplace_back();
  }
  slots_[index].target = target;
  return {index, slots_[index].generation};
}

void Deadlines::remove(Slot slot) {
  std::lock_guard lock(mutex_);
  auto& s = slots_[slot.index];
  if (s.generation != slot.generation) return;
  s.target = nullptr;
  ++s.generation;  // its heap entries no longer match
  free_.push_back(slot.index);
}

void Deadlines::at(Slot slot, clock::time_point when) {
  std::lock_guard lock(mutex_);
  if (shut_down_) return;
  heap_.push_back({when, slot});
  std::push_heap(heap_.begin(), heap_.end(), std::greater<>{});
  if (when < armed_) arm(when);
}

std::size_t Deadlines::waiting() {
  std::lock_guard lock(mutex_);
  return heap_.size();
}

void Deadlines::arm(clock::time_point when) {
  armed_ = when;
  timer_.expires_at(when);  // cancels the wait in flight, if any: its handler sees operation_aborted
  timer_.async_wait([this](boost::system::error_code ec) {
    if (!ec) on_timer();
  });
}

void Deadlines::on_timer() {
  std::vector<std::shared_ptr<DeadlineTarget>> due;
  {
    std::lock_guard lock(mutex_);
    if (shut_down_) return;
    armed_ = clock::time_point::max();
    const auto now = clock::now();
    while (!heap_.empty() && heap_.front().when <= now) {
      const Slot slot = heap_.front().slot;
      std::pop_heap(heap_.begin(), heap_.end(), std::greater<>{});
      heap_.pop_back();
      const auto& s = slots_[slot.index];
      if (s.generation != slot.generation || s.target == nullptr) continue;  // gone since
      if (auto target = s.target->lock_target()) due.push_back(std::move(target));
    }
    if (!heap_.empty()) arm(heap_.front().when);
    // A long idle stretch after a busy one: give the heap's memory back.
    if (heap_.empty() && heap_.capacity() > 1024) std::vector<Entry>().swap(heap_);
  }
  for (auto& target : due) target->deadline_passed();
}

void Deadlines::shutdown() {
  std::lock_guard lock(mutex_);
  shut_down_ = true;
  heap_.clear();
  timer_.cancel();
}

}  // namespace pushbook::detail
