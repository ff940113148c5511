#include "detail/json_text.hpp"

#include <pushbook/event_bus.hpp>

#include <boost/json/basic_parser_impl.hpp>
#include <boost/json/serializer.hpp>

#include <charconv>
#include <cstdint>

namespace pushbook::detail {

void append_json_string(std::string& out, std::string_view s) {
  static constexpr char hex[] = "0123456789abcdef";
  out += '"';
  // Runs of characters that need no escaping go in whole (ids, names: usually the whole string).
  std::size_t run = 0;
  for (std::size_t i = 0; i < s.size(); ++i) {
    const auto u = static_cast<unsigned char>(s[i]);
    if (u >= 0x20 && u != '"' && u != '\\') continue;
    out.append(s.data() + run, i - run);
    run = i + 1;
    switch (s[i]) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        out += "\\u00";
        out += hex[u >> 4];
        out += hex[u & 0xF];
    }
  }
  out.append(s.data() + run, s.size() - run);
  out += '"';
}

void append_int(std::string& out, std::int64_t n) {
  char buf[24];
  out.append(buf, std::to_chars(buf, buf + sizeof buf, n).ptr);
}

void append_int(std::string& out, std::uint64_t n) {
  char buf[24];
  out.append(buf, std::to_chars(buf, buf + sizeof buf, n).ptr);
}

namespace {

// ,"key": (or "key": first), written as one literal: every key here is a literal of this file
// and needs no escaping.
template <std::size_t N>
void append_key(std::string& out, const char (&key)[N], bool first = false) {
  char lit[N + 3];
  lit[0] = ',';
  lit[1] = '"';
  for (std::size_t i = 0; i + 1 < N; ++i) lit[i + 2] = key[i];
  lit[N + 1] = '"';
  lit[N + 2] = ':';
  out.append(first ? lit + 1 : lit, first ? N + 2 : N + 3);
}

std::int64_t unix_ms(std::chrono::system_clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count();
}

}  // namespace

void append_json(std::string& out, const Booking& b) {
  // The members of to_json(b) in its order (booking_test compares the two for many bookings).
  out += '{';
  append_key(out, "booking_id", true), append_json_string(out, b.id);
  append_key(out, "status"), append_json_string(out, to_string(b.status));
  if (b.reason != RejectReason::none) append_key(out, "reason"), append_json_string(out, to_string(b.reason));
  if (!b.reason_message.empty()) append_key(out, "reason_message"), append_json_string(out, b.reason_message);
  append_key(out, "user"), append_json_string(out, b.user);
  append_key(out, "lines");
  out += '[';
  for (std::size_t i = 0; i < b.lines.size(); ++i) {
    out += i ? ",{" : "{";
    append_key(out, "resource", true);
    append_json_string(out, b.lines[i].resource);
    append_key(out, "quantity"), append_int(out, std::int64_t{b.lines[i].quantity});
    out += '}';
  }
  out += ']';
  if (!b.metadata.empty()) {
    append_key(out, "metadata");
    boost::json::serializer sr;
    sr.reset(&b.metadata);
    char buf[512];
    while (!sr.done()) {
      const auto part = sr.read(buf);
      out.append(part.data(), part.size());
    }
  }
  if (b.hold_for) append_key(out, "hold_ms"), append_int(out, static_cast<std::int64_t>(b.hold_for->count()));
  append_key(out, "version"), append_int(out, static_cast<std::int64_t>(b.version));
  append_key(out, "created_at"), append_int(out, unix_ms(b.created_at));
  append_key(out, "updated_at"), append_int(out, unix_ms(b.updated_at));
  if (b.expires_at) append_key(out, "expires_at"), append_int(out, unix_ms(*b.expires_at));
  out += '}';
}

void append_json(std::string& out, const ResourceState& r) {
  out += '{';
  append_key(out, "resource", true), append_json_string(out, r.id);
  append_key(out, "capacity"), append_int(out, std::int64_t{r.capacity});
  append_key(out, "available"), append_int(out, std::int64_t{r.available()});
  append_key(out, "reserved"), append_int(out, std::int64_t{r.reserved});
  append_key(out, "confirmed"), append_int(out, std::int64_t{r.confirmed});
  out += '}';
}

namespace {
template <class T>
std::shared_ptr<const std::string> text_of(const T& t) {
  // Written in the thread's buffer, then copied into a string of exactly its size: the bus keeps
  // it for as long as it keeps the events.
  thread_local std::string buffer;
  buffer.clear();
  buffer.reserve(512);
  append_json(buffer, t);
  return std::make_shared<const std::string>(buffer);
}
}  // namespace

std::shared_ptr<const std::string> json_text(const Booking& b) { return text_of(b); }
std::shared_ptr<const std::string> json_text(const ResourceState& r) { return text_of(r); }

namespace {

using boost::json::string_view;
using boost::system::error_code;

// A basic_parser handler that builds nothing: the parser checks the grammar on its own.
struct null_handler {
  static constexpr std::size_t max_object_size = std::size_t(-1);
  static constexpr std::size_t max_array_size = std::size_t(-1);
  static constexpr std::size_t max_key_size = std::size_t(-1);
  static constexpr std::size_t max_string_size = std::size_t(-1);
  bool on_document_begin(error_code&) { return true; }
  bool on_document_end(error_code&) { return true; }
  bool on_array_begin(error_code&) { return true; }
  bool on_array_end(std::size_t, error_code&) { return true; }
  bool on_object_begin(error_code&) { return true; }
  bool on_object_end(std::size_t, error_code&) { return true; }
  bool on_string_part(string_view, std::size_t, error_code&) { return true; }
  bool on_string(string_view, std::size_t, error_code&) { return true; }
  bool on_key_part(string_view, std::size_t, error_code&) { return true; }
  bool on_key(string_view, std::size_t, error_code&) { return true; }
  bool on_number_part(string_view, error_code&) { return true; }
  bool on_int64(std::int64_t, string_view, error_code&) { return true; }
  bool on_uint64(std::uint64_t, string_view, error_code&) { return true; }
  bool on_double(double, string_view, error_code&) { return true; }
  bool on_bool(bool, error_code&) { return true; }
  bool on_null(error_code&) { return true; }
  bool on_comment_part(string_view, error_code&) { return true; }
  bool on_comment(string_view, error_code&) { return true; }
};

// Finds one member of the top-level object: `found` is its value when it is a scalar.
struct member_handler : null_handler {
  std::string_view wanted;
  int depth = 0;
  std::string key, string;
  bool at_wanted = false;  // the value being read is the wanted member's
  boost::json::value found;

  bool on_array_begin(error_code&) {
    not_scalar();
    ++depth;
    return true;
  }
  bool on_array_end(std::size_t, error_code&) {
    --depth;
    return true;
  }
  bool on_object_begin(error_code&) {
    not_scalar();
    ++depth;
    return true;
  }
  // An object or array as the wanted member's value: null (a later one of the same key wins).
  void not_scalar() {
    if (depth == 1 && at_wanted) found = nullptr;
    at_wanted = false;
  }
  bool on_object_end(std::size_t, error_code&) {
    --depth;
    return true;
  }
  bool on_key_part(string_view s, std::size_t, error_code&) {
    if (depth == 1) key.append(s.data(), s.size());
    return true;
  }
  bool on_key(string_view s, std::size_t, error_code&) {
    if (depth != 1) return true;
    key.append(s.data(), s.size());
    at_wanted = key == wanted;
    key.clear();
    return true;
  }
  // A scalar at depth 1 is a member's value: the wanted one's is kept (the last, for a key given
  // twice, as boost::json::parse keeps it).
  template <class T>
  void scalar(T&& v) {
    if (depth == 1 && at_wanted) found = std::forward<T>(v), at_wanted = false;
  }
  bool on_string_part(string_view s, std::size_t, error_code&) {
    if (depth == 1 && at_wanted) string.append(s.data(), s.size());
    return true;
  }
  bool on_string(string_view s, std::size_t, error_code&) {
    if (depth == 1 && at_wanted) {
      string.append(s.data(), s.size());
      scalar(boost::json::string_view(string));
      string.clear();
    }
    return true;
  }
  bool on_int64(std::int64_t i, string_view, error_code&) {
    scalar(i);
    return true;
  }
  bool on_uint64(std::uint64_t u, string_view, error_code&) {
    scalar(u);
    return true;
  }
  bool on_double(double d, string_view, error_code&) {
    scalar(d);
    return true;
  }
  bool on_bool(bool b, error_code&) {
    scalar(b);
    return true;
  }
  bool on_null(error_code&) {
    scalar(nullptr);
    return true;
  }
};

// Runs the parser over the whole of `text`: its error, or extra_data when anything but
// whitespace follows the value.
template <class Handler>
error_code parse_all(boost::json::basic_parser<Handler>& p, std::string_view text) {
  error_code ec;
  const auto n = p.write_some(false, text.data(), text.size(), ec);
  if (!ec && n != text.size()) ec = boost::json::error::extra_data;
  return ec;
}

}  // namespace

std::optional<std::string> json_text_error(std::string_view text) {
  boost::json::basic_parser<null_handler> p{boost::json::parse_options{}};
  const auto ec = parse_all(p, text);
  if (!ec) return std::nullopt;
  return ec.message();
}

boost::json::value payload_member(const Event& e, std::string_view key) {
  if (const auto& text = e.data_text()) {
    boost::json::basic_parser<member_handler> p{boost::json::parse_options{}};
    p.handler().wanted = key;
    if (parse_all(p, *text)) return nullptr;
    return std::move(p.handler().found);
  }
  const auto* o = e.data().if_object();
  const auto* v = o ? o->if_contains(key) : nullptr;
  if (!v || v->is_object() || v->is_array()) return nullptr;
  return *v;
}

}  // namespace pushbook::detail
