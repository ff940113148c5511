#include <pushbook/event_bus.hpp>

#include <boost/json/serialize.hpp>

#include <mutex>

namespace pushbook {

struct Event::cache {
  std::once_flag plain_once, snapshot_once;
  std::shared_ptr<const std::string> plain, snapshot;
};

Event::Event(std::string topic, std::uint64_t seq, std::chrono::system_clock::time_point time,
             std::shared_ptr<const boost::json::value> data)
    : topic_(std::move(topic)),
      seq_(seq),
      time_(time),
      data_(std::move(data)),
      cache_(std::make_unique<cache>()) {}

Event::~Event() = default;

std::shared_ptr<const std::string> Event::wire(bool snapshot) const {
  auto build = [&](bool snap) {
    const auto ts = std::chrono::duration_cast<std::chrono::milliseconds>(time_.time_since_epoch()).count();
    // Topics are restricted to characters that need no JSON escaping (is_valid_topic).
    std::string out;
    out.reserve(96 + topic_.size());
    out += R"({"type":"event","topic":")";
    out += topic_;
    out += R"(","seq":)";
    out += std::to_string(seq_);
    out += R"(,"ts":)";
    out += std::to_string(ts);
    if (snap) out += R"(,"snapshot":true)";
    out += R"(,"data":)";
    out += boost::json::serialize(*data_);
    out += '}';
    return std::make_shared<const std::string>(std::move(out));
  };
  if (snapshot) {
    std::call_once(cache_->snapshot_once, [&] { cache_->snapshot = build(true); });
    return cache_->snapshot;
  }
  std::call_once(cache_->plain_once, [&] { cache_->plain = build(false); });
  return cache_->plain;
}

EventBus::~EventBus() = default;
detail::SubscriptionState::~SubscriptionState() = default;

namespace {
bool topic_char(char c) noexcept {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_' ||
         c == '.' || c == ':' || c == '@' || c == '+' || c == '=' || c == '~';
}
}  // namespace

bool is_valid_topic(std::string_view topic) noexcept {
  if (topic.empty() || topic.size() > 256) return false;
  bool segment_empty = true;
  for (char c : topic) {
    if (c == '/') {
      if (segment_empty) return false;
      segment_empty = true;
    } else if (topic_char(c)) {
      segment_empty = false;
    } else {
      return false;
    }
  }
  return !segment_empty;
}

}  // namespace pushbook
