// JSON written as text without making a boost::json::value first: the payloads of the engine's
// events (kept by the bus as text, about a third of the memory of the parsed value, and sent as
// they are), strings inside the gateway's replies, and the checks made on text a host publishes.
#pragma once

#include <pushbook/booking.hpp>
#include <pushbook/event_bus.hpp>

#include <boost/json/value.hpp>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

namespace pushbook::detail {

/// Appends `s` as a JSON string (quoted and escaped as boost::json::serialize does).
void append_json_string(std::string& out, std::string_view s);
/// Appends n in decimal (as a JSON number).
void append_int(std::string& out, std::int64_t n);
void append_int(std::string& out, std::uint64_t n);

/// boost::json::serialize(to_json(b)), written directly: the same text byte for byte.
void append_json(std::string& out, const Booking& b);
void append_json(std::string& out, const ResourceState& r);

/// The JSON text of a booking's or a resource's events (append_json), in a string of its size.
std::shared_ptr<const std::string> json_text(const Booking& b);
std::shared_ptr<const std::string> json_text(const ResourceState& r);

/// Publishes text this library wrote (json_text()) without checking it again
/// (EventBus::publish_trusted_json_async).
struct TrustedJson {
  static void publish_async(EventBus& bus, std::string_view topic,
                            std::shared_ptr<const std::string> json_text, const PublishOptions& options,
                            EventBus::PublishCallback done) {
    bus.publish_trusted_json_async(topic, std::move(json_text), options, std::move(done));
  }
};

/// Why `text` is not exactly one JSON value (RFC 8259, nothing but whitespace around it), or
/// nullopt when it is. Allocates nothing for valid text.
std::optional<std::string> json_text_error(std::string_view text);

/// The value of member `key` of the event's payload when the payload is an object and the member
/// is a string, a number, true, false or null; a null value otherwise (no such member, an object
/// or array there, not an object). For a payload kept as text the text is scanned (the event's
/// data() is not made); strings longer than boost::json's inline ones are allocated.
boost::json::value payload_member(const Event& e, std::string_view key);

}  // namespace pushbook::detail
