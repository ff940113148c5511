// The gateway's RFC 6455 layer without sockets (src/gateway/ws_frame.hpp) and the per-io_context
// deadline heap its sessions use (src/gateway/deadlines.hpp). The same layer over real sockets is
// tested in push_gateway_test ("RFC 6455 ..." cases), by the Python websockets suite, Node's and
// Chromium's clients, and fuzzed by fuzz/fuzz_ws_frames.cpp.
#include <doctest/doctest.h>

#include "gateway/deadlines.hpp"
#include "gateway/ws_frame.hpp"
#include "raw_socket.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include <atomic>
#include <cstdio>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

using namespace pushbook::detail;
using namespace std::chrono_literals;
using pushbook::test::ws_frame;

namespace {

struct Seen {
  std::vector<std::string> messages;  // "T:payload" or "B:payload"
  std::vector<std::string> pings, pongs;
  std::optional<std::pair<std::uint16_t, std::string>> close;
  bool stop_after_message = false;

  bool on_message(bool text, std::string_view payload) {
    messages.push_back(std::string(text ? "T:" : "B:") + std::string(payload));
    return !stop_after_message;
  }
  bool on_ping(std::string_view p) {
    pings.emplace_back(p);
    return true;
  }
  bool on_pong(std::string_view p) {
    pongs.emplace_back(p);
    return true;
  }
  bool on_close(std::uint16_t code, std::string_view reason) {
    close.emplace(code, std::string(reason));
    return false;
  }
};

ws::FrameReader::Failure feed(ws::FrameReader& r, std::string bytes, Seen& seen) {
  return r.feed(bytes.data(), bytes.size(), seen);
}

std::uint16_t failure_of(std::string bytes, std::size_t max = 1024) {
  ws::FrameReader r(max);
  Seen seen;
  return feed(r, std::move(bytes), seen).code;
}

}  // namespace

TEST_CASE("accept key, client key and close codes as RFC 6455 gives them") {
  // The example of RFC 6455 section 1.3.
  CHECK(ws::accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
  CHECK(ws::valid_client_key("dGhlIHNhbXBsZSBub25jZQ=="));
  CHECK_FALSE(ws::valid_client_key(""));
  CHECK_FALSE(ws::valid_client_key("dGhlIHNhbXBsZSBub25jZQ="));   // 23 characters
  CHECK_FALSE(ws::valid_client_key("dGhlIHNhbXBsZSBub25jZQ=x"));  // no padding
  CHECK_FALSE(ws::valid_client_key("dGhlIHNhbXBsZSBub25j*Q=="));  // not base64
  CHECK_FALSE(ws::valid_client_key("dGhlIHNhbXBsZSBub25jZR=="));  // unused bits set: not 16 bytes
  for (std::uint16_t c : {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 3000, 4001, 4999})
    CHECK(ws::valid_close_code(c));
  for (std::uint16_t c : {0, 999, 1004, 1005, 1006, 1014, 1015, 1016, 2999, 5000})
    CHECK_FALSE(ws::valid_close_code(c));
}

TEST_CASE(
    "UTF-8 validation refuses overlong forms, surrogates, code points past U+10FFFF and cut sequences") {
  CHECK(ws::valid_utf8(""));
  CHECK(ws::valid_utf8("plain ascii that is longer than eight bytes"));
  CHECK(ws::valid_utf8("h\xc3\xa9llo \xe2\x82\xac \xf0\x9f\x98\x80 \xf4\x8f\xbf\xbf"));  // é € 😀 U+10FFFF
  CHECK_FALSE(ws::valid_utf8("\xc0\xaf"));                                               // overlong '/'
  CHECK_FALSE(ws::valid_utf8("\xe0\x80\xaf"));                                           // overlong
  CHECK_FALSE(ws::valid_utf8("\xf0\x80\x80\xaf"));                                       // overlong
  CHECK_FALSE(ws::valid_utf8("\xed\xa0\x80"));      // U+D800, a surrogate
  CHECK_FALSE(ws::valid_utf8("\xf4\x90\x80\x80"));  // U+110000
  CHECK_FALSE(ws::valid_utf8("\xf5\x80\x80\x80"));
  CHECK_FALSE(ws::valid_utf8("ab\xe2\x82"));  // cut at the end
  CHECK_FALSE(ws::valid_utf8("ab\xe2\x28\xa1 and more text"));
  CHECK_FALSE(ws::valid_utf8("\x80"));
  CHECK_FALSE(ws::valid_utf8("\xff"));
}

TEST_CASE("server frame headers use the shortest length encoding") {
  char h[10];
  CHECK(ws::write_header(h, ws::Opcode::text, 0) == 2);
  CHECK(static_cast<unsigned char>(h[0]) == 0x81);
  CHECK(ws::write_header(h, ws::Opcode::text, 125) == 2);
  CHECK(static_cast<unsigned char>(h[1]) == 125);
  CHECK(ws::write_header(h, ws::Opcode::text, 126) == 4);
  CHECK(static_cast<unsigned char>(h[1]) == 126);
  CHECK(ws::write_header(h, ws::Opcode::binary, 65535) == 4);
  CHECK(ws::write_header(h, ws::Opcode::text, 65536) == 10);
  CHECK(static_cast<unsigned char>(h[1]) == 127);
  CHECK(static_cast<unsigned char>(h[7]) == 1);  // 0x0000000000010000
  CHECK(ws::make_frame(ws::Opcode::pong, "hi") == std::string("\x8a\x02hi", 4));
  // A close reason is cut to fit a control frame, never inside a character.
  std::string long_reason;
  for (int i = 0; i < 50; ++i) long_reason += "\xe2\x82\xac";  // 150 bytes
  const auto p = ws::close_payload(1013, long_reason);
  CHECK(p.size() <= 125);
  CHECK(ws::valid_utf8(std::string_view(p).substr(2)));
  CHECK(ws::close_payload(4001, "token expired") == std::string("\x0f\xa1token expired"));
}

TEST_CASE("a FrameReader gives whole messages however the bytes are cut, and holds nothing when idle") {
  const std::string stream = ws_frame(R"({"op":"ping","id":1})") + ws_frame("", 0x9) +
                             ws_frame("frag-", 0x1, false) + ws_frame("pong-me", 0xA) +
                             ws_frame("ment", 0x0, true) + ws_frame(std::string(300, 'y')) +
                             ws_frame(std::string(70000, 'z'), 0x2) +
                             ws_frame(
                                 "\x03\xe8"
                                 "bye",
                                 0x8);
  // Every cut in two, then random cuts into many pieces.
  auto run = [&](const std::vector<std::size_t>& cuts) {
    ws::FrameReader r(100 * 1024);
    Seen seen;
    std::size_t at = 0;
    for (std::size_t i = 0; i <= cuts.size(); ++i) {
      const std::size_t end = i < cuts.size() ? cuts[i] : stream.size();
      auto f = feed(r, stream.substr(at, end - at), seen);
      REQUIRE(f.code == 0);
      at = end;
      if (seen.close) break;
    }
    REQUIRE(seen.messages.size() == 4);
    CHECK(seen.messages[0] == R"(T:{"op":"ping","id":1})");
    CHECK(seen.messages[1] == "T:frag-ment");
    CHECK(seen.messages[2] == "T:" + std::string(300, 'y'));
    CHECK(seen.messages[3] == "B:" + std::string(70000, 'z'));
    CHECK(seen.pings == std::vector<std::string>{""});
    CHECK(seen.pongs == std::vector<std::string>{"pong-me"});
    REQUIRE(seen.close);
    CHECK(seen.close->first == 1000);
    CHECK(seen.close->second == "bye");
    CHECK(r.buffered() == 0);
  };
  for (std::size_t cut = 0; cut <= 400 && cut <= stream.size(); ++cut) run({cut});
  const auto seed = std::random_device{}();
  MESSAGE("ws_frame_test random cuts: seed " << seed);
  std::mt19937 rng(seed);
  for (int round = 0; round < 200; ++round) {
    std::vector<std::size_t> cuts;
    std::size_t at = 0;
    while (true) {
      at += 1 + rng() % 900;
      if (at >= stream.size()) break;
      cuts.push_back(at);
    }
    run(cuts);
  }
  // Between messages nothing is kept.
  ws::FrameReader r(1024);
  Seen seen;
  auto half = ws_frame("hello");
  REQUIRE(feed(r, half.substr(0, 4), seen).code == 0);
  CHECK(r.buffered() == 4);
  REQUIRE(feed(r, half.substr(4), seen).code == 0);
  CHECK(r.buffered() == 0);
  CHECK(seen.messages == std::vector<std::string>{"T:hello"});
}

TEST_CASE("a FrameReader refuses what RFC 6455 forbids with the close code it names") {
  CHECK(failure_of(ws_frame("ok")) == 0);
  std::string unmasked = "\x81\x02hi";
  CHECK(failure_of(unmasked) == 1002);
  auto rsv = ws_frame("x");
  rsv[0] = static_cast<char>(rsv[0] | 0x40);
  CHECK(failure_of(rsv) == 1002);                                   // reserved bit, no extension
  CHECK(failure_of(ws_frame("x", 0x3)) == 1002);                    // reserved data opcode
  CHECK(failure_of(ws_frame("x", 0xB)) == 1002);                    // reserved control opcode
  CHECK(failure_of(ws_frame("x", 0x9, false)) == 1002);             // fragmented ping
  CHECK(failure_of(ws_frame(std::string(126, 'p'), 0x9)) == 1002);  // control frame > 125 bytes
  CHECK(failure_of(ws_frame("x", 0x0)) == 1002);                    // continuation with nothing to continue
  CHECK(failure_of(ws_frame("a", 0x1, false) + ws_frame("b", 0x1)) == 1002);  // a new message inside one
  CHECK(failure_of(ws_frame(std::string(1025, 'x'))) == 1009);                // bigger than the limit
  CHECK(failure_of(ws_frame(std::string(600, 'x'), 0x1, false) + ws_frame(std::string(600, 'x'), 0x0)) ==
        1009);                                                                       // the fragments together
  CHECK(failure_of(ws_frame("\xc3\x28")) == 1007);                                   // text that is not UTF-8
  CHECK(failure_of(ws_frame("\xe2\x82", 0x1, false) + ws_frame("\xac", 0x0)) == 0);  // split € is fine
  CHECK(failure_of(ws_frame("\xe2\x82", 0x1, false) + ws_frame("(", 0x0)) == 1007);
  CHECK(failure_of(ws_frame("\xff", 0x2)) == 0);                 // binary is not UTF-8 checked
  CHECK(failure_of(ws_frame("\x03", 0x8)) == 1002);              // close with a 1-byte payload
  CHECK(failure_of(ws_frame("\x03\xed", 0x8)) == 1002);          // close code 1005 may not be sent
  CHECK(failure_of(ws_frame("\x03\xe8\xc3\x28", 0x8)) == 1007);  // close reason not UTF-8
  // A 16-bit length below 126, a 64-bit one below 65536 or with the top bit: not minimal, refused.
  std::string f16 = "\x81\xfe";
  f16 += std::string("\x00\x05", 2) + std::string("\0\0\0\0", 4) + "hello";
  CHECK(failure_of(f16) == 1002);
  std::string f64 = "\x81\xff";
  f64 += std::string("\x00\x00\x00\x00\x00\x00\x00\x05", 8) + std::string("\0\0\0\0", 4) + "hello";
  CHECK(failure_of(f64) == 1002);
  std::string huge = "\x81\xff";
  huge += std::string("\x80\x00\x00\x00\x00\x00\x00\x00", 8) + std::string("\0\0\0\0", 4);
  CHECK(failure_of(huge) == 1002);
  // A frame announcing more than the limit fails at its header, before its payload is held.
  std::string big_header = ws_frame(std::string(70000, 'x')).substr(0, 14);
  ws::FrameReader r(64 * 1024);
  Seen seen;
  CHECK(feed(r, big_header, seen).code == 1009);
  CHECK(r.buffered() == 0);
  // Nothing is handed on after a close frame or after a handler says stop.
  ws::FrameReader r2(1024);
  Seen s2;
  CHECK(feed(r2, ws_frame("\x03\xe8", 0x8) + ws_frame("after"), s2).code == 0);
  CHECK(s2.messages.empty());
  ws::FrameReader r3(1024);
  Seen s3;
  s3.stop_after_message = true;
  CHECK(feed(r3, ws_frame("one") + ws_frame("two"), s3).code == 0);
  CHECK(s3.messages == std::vector<std::string>{"T:one"});
}

namespace {
struct CountingTarget : DeadlineTarget, std::enable_shared_from_this<CountingTarget> {
  Deadlines& deadlines;
  Deadlines::Slot slot;
  std::atomic<int> fired{0};
  explicit CountingTarget(Deadlines& d) : deadlines(d), slot(d.add(this)) {}
  ~CountingTarget() override { deadlines.remove(slot); }
  std::shared_ptr<DeadlineTarget> lock_target() override {
    auto self = weak_from_this().lock();
    return self ? std::static_pointer_cast<DeadlineTarget>(self) : nullptr;
  }
  void deadline_passed() override { fired.fetch_add(1); }
};
}  // namespace

TEST_CASE("Deadlines: one heap per io_context calls each target at its time, never one that is gone") {
  boost::asio::io_context ioc;
  auto& d = Deadlines::of(ioc);
  CHECK(&Deadlines::of(ioc) == &d);
  auto a = std::make_shared<CountingTarget>(d);
  auto b = std::make_shared<CountingTarget>(d);
  auto c = std::make_shared<CountingTarget>(d);
  const auto t0 = std::chrono::steady_clock::now();
  d.at(a->slot, t0 + 60ms);
  d.at(b->slot, t0 + 20ms);
  d.at(c->slot, t0 + 40ms);
  d.at(a->slot, t0 + 10ms);  // earlier again: the earlier entry fires too (the target checks the time)
  c.reset();                 // gone before its time: never called
  std::optional<std::chrono::steady_clock::duration> b_at;
  // Run until every live target fired; the io_context has no other work, so run_for bounds it.
  const auto deadline = t0 + 5s;
  while ((a->fired < 2 || b->fired < 1) && std::chrono::steady_clock::now() < deadline) {
    ioc.run_for(10ms);
    if (b->fired == 1 && !b_at) b_at = std::chrono::steady_clock::now() - t0;
  }
  CHECK(a->fired == 2);
  CHECK(b->fired == 1);
  REQUIRE(b_at);
  CHECK(*b_at >= 20ms);
  CHECK(d.waiting() == 0);
  // A slot freed and taken again: the old slot's entries do not reach the new target.
  auto old_slot = b->slot;
  d.at(old_slot, std::chrono::steady_clock::now() + 10ms);
  b.reset();
  auto e = std::make_shared<CountingTarget>(d);  // reuses b's slot with a new generation
  ioc.restart();
  CHECK(e->slot.index == old_slot.index);
  CHECK(e->slot.generation != old_slot.generation);
  ioc.run_for(60ms);
  CHECK(e->fired == 0);
}
