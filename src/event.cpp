#include <pushbook/event_bus.hpp>

#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>

#include <array>
#include <charconv>
#include <cstdint>
#include <mutex>

namespace pushbook {

namespace {
// An epoch's 8 lower-case hex digits (format_epoch), written into `out`.
void write_epoch(std::uint32_t epoch, char* out) {
  static constexpr char digits[] = "0123456789abcdef";
  for (int i = 7; i >= 0; --i, epoch >>= 4) out[i] = digits[epoch & 0xF];
}
}  // namespace

Event::Event(std::string topic, std::uint64_t seq, std::chrono::system_clock::time_point time,
             std::shared_ptr<const boost::json::value> data, std::uint32_t epoch)
    : Event(std::make_shared<const std::string>(std::move(topic)), seq, time, std::move(data), epoch) {}

Event::Event(std::string topic, std::uint64_t seq, std::chrono::system_clock::time_point time,
             std::shared_ptr<const std::string> json_text, std::uint32_t epoch)
    : Event(std::make_shared<const std::string>(std::move(topic)), seq, time, std::move(json_text), epoch) {}

struct Event::Extras {
  // The payload as a value: given (publish) or parsed from text_ on first use (parsed guards that).
  std::shared_ptr<const boost::json::value> data;
  std::once_flag parsed;
  // The wire forms once built. A form is written once, by the thread that moved its state from 0
  // (none) to 1 (being built), and read once the state is 2 (built).
  std::shared_ptr<const std::string> plain, snapshot;
  std::atomic<std::uint8_t> plain_state{0}, snapshot_state{0};
};

Event::Event(std::shared_ptr<const std::string> topic, std::uint64_t seq,
             std::chrono::system_clock::time_point time, std::shared_ptr<const boost::json::value> data,
             std::uint32_t epoch)
    : topic_(std::move(topic)), seq_(seq), time_(time), epoch_(epoch) {
  auto extras = std::make_unique<Extras>();
  extras->data = std::move(data);
  extras_.store(extras.release(), std::memory_order_relaxed);
}

Event::Event(std::shared_ptr<const std::string> topic, std::uint64_t seq,
             std::chrono::system_clock::time_point time, std::shared_ptr<const std::string> json_text,
             std::uint32_t epoch)
    : topic_(std::move(topic)), seq_(seq), time_(time), text_(std::move(json_text)), epoch_(epoch) {}

static_assert(sizeof(void*) != 8 || sizeof(Event) == 64, "Event's members are laid out without padding");

Event::~Event() { delete extras_.load(std::memory_order_acquire); }

Event::Extras& Event::extras() const {
  Extras* current = extras_.load(std::memory_order_acquire);
  if (current) return *current;
  auto fresh = std::make_unique<Extras>();
  if (extras_.compare_exchange_strong(current, fresh.get(), std::memory_order_acq_rel,
                                      std::memory_order_acquire))
    return *fresh.release();
  return *current;  // another thread's, made meanwhile
}

const std::shared_ptr<const boost::json::value>& Event::shared_data() const {
  auto& x = extras();
  if (text_)
    std::call_once(x.parsed,
                   [&] { x.data = std::make_shared<const boost::json::value>(boost::json::parse(*text_)); });
  return x.data;
}

std::shared_ptr<const std::string> Event::build_wire(bool snapshot) const {
  const auto ts = std::chrono::duration_cast<std::chrono::milliseconds>(time_.time_since_epoch()).count();
  // Topics are restricted to characters that need no JSON escaping (is_valid_topic).
  // Written out (no format string to interpret: this runs for every event sent).
  std::string serialized;
  if (!text_) serialized = boost::json::serialize(*extras().data);
  const std::string_view body = text_ ? std::string_view(*text_) : std::string_view(serialized);
  char numbers[64];
  auto* p = std::to_chars(numbers, numbers + 24, seq_).ptr;
  const std::size_t seq_len = static_cast<std::size_t>(p - numbers);
  auto* q = std::to_chars(p, p + 24, ts).ptr;
  const std::string_view seq_text(numbers, seq_len), ts_text(p, static_cast<std::size_t>(q - p));
  char epoch_text[8];
  write_epoch(epoch_, epoch_text);
  static constexpr std::string_view a = R"({"type":"event","topic":")", b = R"(","seq":)",
                                    c = R"(,"epoch":")", d = R"(","ts":)", snap = R"(,"snapshot":true)",
                                    e = R"(,"data":)";
  // Sized exactly: the form may be kept as long as the event is in history.
  std::string out;
  out.reserve(a.size() + topic_->size() + b.size() + seq_text.size() + c.size() + 8 + d.size() +
              ts_text.size() + (snapshot ? snap.size() : 0) + e.size() + body.size() + 1);
  out += a;
  out += *topic_;  // topics need no JSON escaping (is_valid_topic)
  out += b;
  out += seq_text;
  out += c;
  out.append(epoch_text, 8);
  out += d;
  out += ts_text;
  if (snapshot) out += snap;
  out += e;
  out += body;
  out += '}';
  return std::make_shared<const std::string>(std::move(out));
}

namespace {
// The states of an event's wire form (Extras::plain_state, snapshot_state).
constexpr std::uint8_t form_none = 0, form_building = 1, form_built = 2;
}  // namespace

std::shared_ptr<const std::string> Event::wire(bool snapshot) const {
  auto& x = extras();
  auto& form = snapshot ? x.snapshot : x.plain;
  auto& state = snapshot ? x.snapshot_state : x.plain_state;
  // The common case, every delivery after the first: two loads, as cheap as plain reads.
  if (state.load(std::memory_order_acquire) == form_built) return form;
  std::uint8_t expected = form_none;
  if (!state.compare_exchange_strong(expected, form_building, std::memory_order_acquire,
                                     std::memory_order_acquire))
    // Built meanwhile: shared. Being built by another thread: an equal copy, not kept (no waiting).
    return expected == form_built ? form : build_wire(snapshot);
  try {
    form = build_wire(snapshot);
  } catch (...) {
    state.store(form_none, std::memory_order_release);  // out of memory: the next caller tries again
    throw;
  }
  state.store(form_built, std::memory_order_release);
  return form;
}

std::shared_ptr<const std::string> Event::wire_once(bool snapshot) const {
  // No Extras made for this: an event sent once keeps nothing of it.
  if (const Extras* x = extras_.load(std::memory_order_acquire)) {
    const auto& form = snapshot ? x->snapshot : x->plain;
    const auto& state = snapshot ? x->snapshot_state : x->plain_state;
    if (state.load(std::memory_order_acquire) == form_built) return form;
  }
  return build_wire(snapshot);
}

std::string format_epoch(std::uint32_t epoch) {
  std::string out(8, '0');
  write_epoch(epoch, out.data());
  return out;
}

std::optional<std::uint32_t> parse_epoch(std::string_view text) noexcept {
  if (text.empty() || text.size() > 8) return std::nullopt;
  std::uint32_t v = 0;
  for (char c : text) {
    std::uint32_t d;
    if (c >= '0' && c <= '9')
      d = static_cast<std::uint32_t>(c - '0');
    else if (c >= 'a' && c <= 'f')
      d = static_cast<std::uint32_t>(c - 'a' + 10);
    else if (c >= 'A' && c <= 'F')
      d = static_cast<std::uint32_t>(c - 'A' + 10);
    else
      return std::nullopt;
    v = (v << 4) | d;
  }
  return v;
}

EventBus::~EventBus() = default;

bool EventBus::available() const noexcept { return true; }

std::optional<std::vector<EventPtr>> EventBus::history_if_local(std::string_view, std::uint64_t) const {
  return std::nullopt;
}

void EventBus::publish_async(std::string_view topic, std::shared_ptr<const boost::json::value> data,
                             const PublishOptions& options, PublishCallback done) {
  auto r = publish(topic, std::move(data), options);
  if (done) done(std::move(r));
}
namespace {
Error not_json(const std::optional<std::string>& why) {
  return Error(errc::bad_request, "publish_json needs one JSON value: " + why.value_or("no text"));
}
}  // namespace

result<EventPtr> EventBus::publish_json(std::string_view topic, std::shared_ptr<const std::string> json_text,
                                        const PublishOptions& options) {
  if (!json_text) return not_json(std::nullopt);
  boost::system::error_code ec;
  auto v = boost::json::parse(*json_text, ec);
  if (ec) return not_json(ec.message());
  return publish(topic, std::make_shared<const boost::json::value>(std::move(v)), options);
}

void EventBus::publish_json_async(std::string_view topic, std::shared_ptr<const std::string> json_text,
                                  const PublishOptions& options, PublishCallback done) {
  boost::system::error_code ec;
  boost::json::value v;
  if (json_text) v = boost::json::parse(*json_text, ec);
  if (!json_text || ec) {
    if (done) done(not_json(json_text ? std::optional<std::string>(ec.message()) : std::nullopt));
    return;
  }
  publish_async(topic, std::make_shared<const boost::json::value>(std::move(v)), options, std::move(done));
}

void EventBus::publish_trusted_json_async(std::string_view topic,
                                          std::shared_ptr<const std::string> json_text,
                                          const PublishOptions& options, PublishCallback done) {
  publish_json_async(topic, std::move(json_text), options, std::move(done));
}

void EventBus::subscribe_async(std::string_view pattern, DeliveryCallback callback, SubscribeOptions options,
                               SubscribeCallback done) {
  auto r = subscribe(pattern, std::move(callback), std::move(options));
  if (done) done(std::move(r));
}

detail::SubscriptionState::~SubscriptionState() = default;

namespace {
// What each byte may be in a topic: 1 a segment's character, 2 the separator, 0 neither. One load
// per byte (this runs for every publish).
constexpr std::array<std::uint8_t, 256> topic_bytes = [] {
  std::array<std::uint8_t, 256> t{};
  for (int c = 'a'; c <= 'z'; ++c) t[static_cast<std::size_t>(c)] = 1;
  for (int c = 'A'; c <= 'Z'; ++c) t[static_cast<std::size_t>(c)] = 1;
  for (int c = '0'; c <= '9'; ++c) t[static_cast<std::size_t>(c)] = 1;
  for (unsigned char c : std::string_view("-_.:@+=~")) t[c] = 1;
  t['/'] = 2;
  return t;
}();
}  // namespace

bool is_valid_topic(std::string_view topic) noexcept {
  // Segments of the characters above, joined by single slashes: none empty.
  if (topic.empty() || topic.size() > 256 || topic.front() == '/' || topic.back() == '/') return false;
  std::uint8_t previous = 0;
  for (const char c : topic) {
    const std::uint8_t kind = topic_bytes[static_cast<unsigned char>(c)];
    if (kind == 0 || (kind & previous & 2) != 0) return false;  // not allowed, or "//"
    previous = kind;
  }
  return true;
}

}  // namespace pushbook
