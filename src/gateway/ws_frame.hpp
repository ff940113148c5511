// The server side of RFC 6455 without sockets: the upgrade's checks and accept key, frames read
// from a client (masked, possibly fragmented, control frames between fragments) and frame headers
// written to it. The gateway's own WebSocket session (raw_websocket_session) carries these out over
// a plain TCP socket; tests/ws_frame_test.cpp and fuzz/fuzz_ws_frames.cpp drive them directly.
// No allocation while a connection is idle: a reader holds bytes only while a frame or a fragmented
// message is incomplete.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

namespace pushbook::detail::ws {

enum class Opcode : std::uint8_t { continuation = 0, text = 1, binary = 2, close = 8, ping = 9, pong = 10 };

/// Close codes this side sends (RFC 6455 section 7.4.1).
inline constexpr std::uint16_t close_normal = 1000;
inline constexpr std::uint16_t close_going_away = 1001;
inline constexpr std::uint16_t close_protocol_error = 1002;
inline constexpr std::uint16_t close_bad_payload = 1007;  // text that is not UTF-8
inline constexpr std::uint16_t close_too_big = 1009;

/// Whether `code` may be sent in a close frame (1000-1003, 1007-1013, 3000-4999).
bool valid_close_code(std::uint16_t code) noexcept;

/// Whether `s` is well-formed UTF-8 (no overlong forms, no surrogates, nothing past U+10FFFF).
bool valid_utf8(std::string_view s) noexcept;

/// Whether `key` is a Sec-WebSocket-Key: base64 of 16 bytes (24 characters ending in "==").
bool valid_client_key(std::string_view key) noexcept;

/// Sec-WebSocket-Accept for a client's key: base64(SHA-1(key + the RFC's GUID)).
std::string accept_key(std::string_view key);

/// The header of an unmasked server frame with FIN set, written to `out` (at least 10 bytes);
/// returns its length (2, 4 or 10).
std::size_t write_header(char* out, Opcode op, std::size_t payload_size) noexcept;

/// A whole unmasked server frame: header and payload (control frames: payload at most 125 bytes).
std::string make_frame(Opcode op, std::string_view payload);

/// A close frame's payload: the code (big-endian), then the reason cut to fit 123 bytes (at a
/// character boundary).
std::string close_payload(std::uint16_t code, std::string_view reason);

/// Parses the frames a client sends, in whatever pieces they arrive. Each call of feed() hands
/// every complete message and control frame to the handler, in order; bytes of an incomplete frame
/// (and a fragmented message's payload so far) are kept for the next call and released once used.
class FrameReader {
 public:
  explicit FrameReader(std::size_t max_message) : max_message_(max_message) {}

  /// What a protocol violation closes the connection with.
  struct Failure {
    std::uint16_t code = 0;  // 0: none
    const char* reason = "";
  };

  /// Handler: bool on_message(bool text, std::string_view payload) (a whole message, unmasked;
  /// text is valid UTF-8), bool on_ping(std::string_view), bool on_pong(std::string_view),
  /// bool on_close(std::uint16_t code or 0 when the frame has none, std::string_view reason);
  /// each returns false to stop reading (the rest of `data` is then ignored). `data` is unmasked
  /// in place. Returns the failure that ends the connection, if any (no call happens after it).
  template <class Handler>
  Failure feed(char* data, std::size_t size, Handler& handler);

  /// Bytes held for an incomplete frame or message (0 when idle).
  std::size_t buffered() const noexcept { return held_ ? held_->pending.size() + held_->message.size() : 0; }

 private:
  enum class Step { frame, incomplete, stop, failed };
  template <class Handler>
  Step one(char* p, std::size_t size, std::size_t& used, Handler& handler);
  Step fail(std::uint16_t code, const char* reason) {
    failure_ = {code, reason};
    return Step::failed;
  }
  // Made only while a frame or a fragmented message is incomplete, so an idle reader is a few
  // words.
  struct Held {
    std::string pending;  // an incomplete frame's bytes
    std::string message;  // a fragmented message's payload so far
  };
  Held& held() {
    if (!held_) held_ = std::make_unique<Held>();
    return *held_;
  }

  std::size_t max_message_;
  std::unique_ptr<Held> held_;
  bool in_message_ = false;
  bool message_text_ = false;
  Failure failure_;
};

/// Unmasks (or masks) a payload of `size` bytes in place with `key`.
void apply_mask(char* data, std::size_t size, const unsigned char key[4]) noexcept;

// --- FrameReader, inline for the handler's sake ----------------------------------------------

template <class Handler>
FrameReader::Failure FrameReader::feed(char* data, std::size_t size, Handler& handler) {
  failure_ = {};
  char* p = data;
  std::size_t n = size;
  const bool from_pending = held_ && !held_->pending.empty();
  if (from_pending) {
    held_->pending.append(data, size);
    p = held_->pending.data();
    n = held_->pending.size();
  }
  std::size_t at = 0;
  for (;;) {
    std::size_t used = 0;
    const Step s = one(p + at, n - at, used, handler);
    if (s == Step::frame) {
      at += used;
      continue;
    }
    if (s == Step::failed || s == Step::stop) {
      held_.reset();
      in_message_ = false;
      return failure_;
    }
    break;  // incomplete
  }
  if (from_pending)
    held_->pending.erase(0, at);
  else if (at < n)
    held().pending.assign(p + at, n - at);
  if (held_ && held_->pending.empty() && held_->message.empty()) held_.reset();
  return failure_;
}

template <class Handler>
FrameReader::Step FrameReader::one(char* p, std::size_t size, std::size_t& used, Handler& handler) {
  if (size < 2) return Step::incomplete;
  const auto b0 = static_cast<unsigned char>(p[0]);
  const auto b1 = static_cast<unsigned char>(p[1]);
  const bool fin = (b0 & 0x80) != 0;
  const unsigned op = b0 & 0x0f;
  if ((b0 & 0x70) != 0) return fail(close_protocol_error, "reserved bits set");
  if ((b1 & 0x80) == 0) return fail(close_protocol_error, "client frame not masked");
  std::uint64_t len = b1 & 0x7f;
  std::size_t header = 2;
  if (len == 126) {
    if (size < 4) return Step::incomplete;
    len = (std::uint64_t{static_cast<unsigned char>(p[2])} << 8) | static_cast<unsigned char>(p[3]);
    if (len < 126) return fail(close_protocol_error, "payload length not minimally encoded");
    header = 4;
  } else if (len == 127) {
    if (size < 10) return Step::incomplete;
    len = 0;
    for (int i = 2; i < 10; ++i) len = (len << 8) | static_cast<unsigned char>(p[i]);
    if (len >> 63) return fail(close_protocol_error, "payload length too large");
    if (len < 65536) return fail(close_protocol_error, "payload length not minimally encoded");
    header = 10;
  }
  const bool control = (op & 0x8) != 0;
  if (control) {
    if (op != 8 && op != 9 && op != 10) return fail(close_protocol_error, "unknown opcode");
    if (!fin) return fail(close_protocol_error, "fragmented control frame");
    if (len > 125) return fail(close_protocol_error, "control frame too big");
  } else {
    if (op > 2) return fail(close_protocol_error, "unknown opcode");
    if (op == 0 && !in_message_) return fail(close_protocol_error, "continuation without a message");
    if (op != 0 && in_message_) return fail(close_protocol_error, "new message inside a fragmented one");
    const std::uint64_t so_far = op == 0 && held_ ? held_->message.size() : 0;
    if (len > max_message_ || so_far + len > max_message_) return fail(close_too_big, "message too big");
  }
  const std::size_t need = header + 4 + static_cast<std::size_t>(len);
  if (size < need) return Step::incomplete;
  unsigned char key[4];
  for (int i = 0; i < 4; ++i) key[i] = static_cast<unsigned char>(p[header + i]);
  char* payload = p + header + 4;
  apply_mask(payload, static_cast<std::size_t>(len), key);
  used = need;
  const std::string_view body(payload, static_cast<std::size_t>(len));

  if (control) {
    if (op == 9) return handler.on_ping(body) ? Step::frame : Step::stop;
    if (op == 10) return handler.on_pong(body) ? Step::frame : Step::stop;
    if (body.size() == 1) return fail(close_protocol_error, "close frame with a 1-byte payload");
    std::uint16_t code = 0;
    std::string_view reason;
    if (body.size() >= 2) {
      code = static_cast<std::uint16_t>((static_cast<unsigned char>(body[0]) << 8) |
                                        static_cast<unsigned char>(body[1]));
      if (!valid_close_code(code)) return fail(close_protocol_error, "invalid close code");
      reason = body.substr(2);
      if (!valid_utf8(reason)) return fail(close_bad_payload, "close reason is not UTF-8");
    }
    handler.on_close(code, reason);
    return Step::stop;  // nothing is read after a close frame
  }

  if (op != 0 && fin) {  // a whole message in one frame: no copy
    if (op == 1 && !valid_utf8(body)) return fail(close_bad_payload, "text message is not UTF-8");
    return handler.on_message(op == 1, body) ? Step::frame : Step::stop;
  }
  if (op != 0) {
    in_message_ = true;
    message_text_ = op == 1;
  }
  auto& message = held().message;
  message.append(body);
  if (!fin) return Step::frame;
  in_message_ = false;
  if (message_text_ && !valid_utf8(message)) return fail(close_bad_payload, "text message is not UTF-8");
  // The handler may feed nothing back into this reader: it sees the message, then it is released.
  const bool go_on = handler.on_message(message_text_, message);
  std::string().swap(message);
  return go_on ? Step::frame : Step::stop;
}

}  // namespace pushbook::detail::ws
