// The gateway's RFC 6455 frame reader (src/gateway/ws_frame.hpp) fed any bytes a client can send
// after the upgrade. The input's first byte chooses where the rest is cut in two (the reader must
// not depend on how the bytes arrive). Invariants: the same input gives the same messages, control
// frames and failure whole or cut; a text message is valid UTF-8 and no message is over the limit;
// a failure carries one of the codes the RFC names for it (1002, 1007, 1009) and nothing is handed on
// after it or after a close frame; the reader holds no more than one frame's worth of bytes, and
// nothing once the input ends on a frame boundary.
#include "fuzz_check.hpp"

#include "gateway/ws_frame.hpp"

#include <string>
#include <vector>

using namespace pushbook::detail;

namespace {

constexpr std::size_t max_message = 4096;

struct Record {
  std::vector<std::string> events;
  bool closed = false;

  bool on_message(bool text, std::string_view payload) {
    FUZZ_CHECK(!closed);
    FUZZ_CHECK(payload.size() <= max_message);
    if (text) FUZZ_CHECK(ws::valid_utf8(payload));
    events.push_back((text ? "T" : "B") + std::string(payload));
    return true;
  }
  bool on_ping(std::string_view p) {
    FUZZ_CHECK(p.size() <= 125);
    events.push_back("i" + std::string(p));
    return true;
  }
  bool on_pong(std::string_view p) {
    FUZZ_CHECK(p.size() <= 125);
    events.push_back("o" + std::string(p));
    return true;
  }
  bool on_close(std::uint16_t code, std::string_view reason) {
    FUZZ_CHECK(code == 0 || ws::valid_close_code(code));
    FUZZ_CHECK(ws::valid_utf8(reason));
    events.push_back("c" + std::to_string(code) + std::string(reason));
    closed = true;
    return false;
  }
};

struct Outcome {
  std::vector<std::string> events;
  std::uint16_t failure = 0;
};

Outcome run(std::string_view input, std::size_t cut) {
  ws::FrameReader reader(max_message);
  Record record;
  Outcome out;
  std::string first(input.substr(0, cut)), second(input.substr(cut));
  for (auto* part : {&first, &second}) {
    if (record.closed || out.failure != 0) break;
    const auto f = reader.feed(part->data(), part->size(), record);
    if (f.code != 0) {
      FUZZ_CHECK(f.code == ws::close_protocol_error || f.code == ws::close_bad_payload ||
                 f.code == ws::close_too_big);
      out.failure = f.code;
    }
    // An incomplete frame: at most its header, mask and payload (the payload within the limit).
    FUZZ_CHECK(reader.buffered() <= 14 + max_message + max_message);
  }
  out.events = std::move(record.events);
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const auto input = pushbook::fuzz::as_text(data + 1, size - 1);
  const std::size_t cut = input.empty() ? 0 : data[0] % (input.size() + 1);
  const auto whole = run(input, input.size());
  const auto split = run(input, cut);
  FUZZ_CHECK(whole.failure == split.failure);
  FUZZ_CHECK(whole.events == split.events);
  return 0;
}
