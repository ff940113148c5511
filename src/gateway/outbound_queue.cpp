#include "gateway/outbound_queue.hpp"

#include <fmt/format.h>
#include <boost/json/array.hpp>
#include <boost/json/object.hpp>
#include <boost/json/serialize.hpp>

namespace pushbook::detail {

OutboundQueue::~OutboundQueue() { count_queued(-static_cast<std::int64_t>(bytes_)); }

void OutboundQueue::count_queued(std::int64_t delta) {
  if (metrics_) metrics_->queued_bytes.fetch_add(delta, std::memory_order_relaxed);
}

void OutboundQueue::count_drop(const EventPtr& event) {
  if (!dropped_topics_) dropped_topics_ = std::make_unique<std::set<std::string>>();
  dropped_topics_->insert(event->topic());
  ++dropped_;
  if (metrics_) metrics_->dropped_messages.fetch_add(1, std::memory_order_relaxed);
}

OutboundQueue::Pushed OutboundQueue::push(std::shared_ptr<const std::string> bytes, const EventPtr& event) {
  std::lock_guard lock(mutex_);
  if (closed_) return {};
  const std::size_t size = bytes->size() + 1;  // and its newline
  if (bytes_ + size > max_bytes_) {
    if (policy_ == SlowConsumerPolicy::drop_with_gap) {
      // Drop the oldest events (never replies) until this one fits.
      for (auto it = items_.begin() + static_cast<std::ptrdiff_t>(head_);
           it != items_.end() && bytes_ + size > max_bytes_;) {
        if (!it->event) {
          ++it;
          continue;
        }
        const auto freed = it->bytes->size() + 1;
        bytes_ -= freed;
        count_queued(-static_cast<std::int64_t>(freed));
        count_drop(it->event);
        it = items_.erase(it);
      }
      if (bytes_ + size > max_bytes_ && event) {
        count_drop(event);
        return {};
      }
    }
    if (bytes_ + size > max_bytes_) {
      closed_ = true;
      if (metrics_) metrics_->slow_consumer_disconnects.fetch_add(1, std::memory_order_relaxed);
      return {false, fmt::format("too slow: {} bytes waiting", bytes_)};
    }
  }
  bytes_ += size;
  count_queued(static_cast<std::int64_t>(size));
  items_.push_back({std::move(bytes), event});
  Pushed out;
  if (!writer_busy_) out.wake = writer_busy_ = true;
  return out;
}

std::size_t OutboundQueue::take(std::string& frame, std::size_t max_frame) {
  frame.clear();
  std::size_t messages = 0;
  std::lock_guard lock(mutex_);
  if (dropped_ > 0) {
    boost::json::array topics;
    for (const auto& t : *dropped_topics_) topics.emplace_back(t);
    frame = boost::json::serialize(
        boost::json::object{{"type", "gap"}, {"dropped", dropped_}, {"topics", std::move(topics)}});
    ++messages;
    dropped_ = 0;
    dropped_topics_.reset();
  }
  std::size_t taken = 0;  // queued bytes taken
  while (head_ < items_.size() &&
         (messages == 0 || frame.size() + 1 + items_[head_].bytes->size() <= max_frame)) {
    auto& item = items_[head_++];
    if (messages > 0) frame += '\n';
    frame += *item.bytes;
    taken += item.bytes->size() + 1;
    ++messages;
    item.bytes.reset();
    item.event.reset();
  }
  if (head_ == items_.size()) {
    head_ = 0;
    if (items_.capacity() > 4)
      std::vector<Item>().swap(items_);  // a burst's queue is not kept by an idle connection
    else
      items_.clear();
  } else if (head_ >= 1024 && head_ * 2 >= items_.size()) {
    items_.erase(items_.begin(), items_.begin() + static_cast<std::ptrdiff_t>(head_));
    head_ = 0;
  }
  bytes_ -= taken;
  count_queued(-static_cast<std::int64_t>(taken));
  if (messages == 0) writer_busy_ = false;
  return messages;
}

bool OutboundQueue::empty() const {
  std::lock_guard lock(mutex_);
  return head_ == items_.size() && dropped_ == 0;
}

void OutboundQueue::close(bool discard) {
  std::lock_guard lock(mutex_);
  closed_ = true;
  if (!discard) return;
  items_.clear();
  head_ = 0;
  count_queued(-static_cast<std::int64_t>(bytes_));
  bytes_ = 0;
  dropped_ = 0;
  dropped_topics_.reset();
}

bool OutboundQueue::closed() const {
  std::lock_guard lock(mutex_);
  return closed_;
}

}  // namespace pushbook::detail
