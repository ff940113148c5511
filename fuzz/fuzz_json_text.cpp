// The checks made on JSON text without parsing it into a value (src/detail/json_text.hpp), on any
// bytes: json_text_error accepts exactly what boost::json::parse accepts (the text a host gives
// EventBus::publish_json, kept and pushed to clients as it is), and payload_member reads from the
// text what a lookup in the parsed value finds (the gateway reads "status" and "version" of the
// events it sends that way).
#include "fuzz_check.hpp"

#include "detail/json_text.hpp"

#include <pushbook/event_bus.hpp>

#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>

#include <memory>

using namespace pushbook;

namespace {
// Equal as JSON text: a number such as 0e900 parses to NaN, which equals nothing.
bool same(const boost::json::value& a, const boost::json::value& b) {
  return boost::json::serialize(a) == boost::json::serialize(b);
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto text = pushbook::fuzz::as_text(data, size);
  boost::system::error_code ec;
  auto v = boost::json::parse(text, ec);
  const auto why = detail::json_text_error(text);
  FUZZ_CHECK(why.has_value() == static_cast<bool>(ec));
  const auto t0 = std::chrono::system_clock::time_point{};
  if (why) {
    FUZZ_CHECK(!why->empty());
    // No bus keeps such a text, but a host may make an Event of it: read safely, whatever it says.
    const Event invalid("t", 1, t0, std::make_shared<const std::string>(text));
    for (const char* key : {"status", "version", "a"}) (void)detail::payload_member(invalid, key);
    return 0;
  }
  const Event as_text("t", 1, t0, std::make_shared<const std::string>(text));
  const Event as_value("t", 1, t0, std::make_shared<const boost::json::value>(v));
  std::vector<std::string> keys{"status", "version", "", "a"};
  if (const auto* o = v.if_object())
    for (const auto& kv : *o) keys.emplace_back(kv.key());
  for (const auto& key : keys) {
    // A key given twice: both keep the last one.
    FUZZ_CHECK(same(detail::payload_member(as_text, key), detail::payload_member(as_value, key)));
  }
  FUZZ_CHECK(same(as_text.data(), v));
  return 0;
}
