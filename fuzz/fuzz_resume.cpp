// The resume point of an event stream, from any Last-Event-ID header or ?since=/&epoch= query a
// client can send (resume_point, as GET /v1/events calls it), and the long-poll ?wait=.
// Differential: an accepted resume point must print back to the text it came from, so a value
// the server misread (a wrapped sequence number, a truncated epoch) fails here.
#include "fuzz_check.hpp"

#include "gateway/http_request.hpp"

#include <pushbook/event_bus.hpp>

#include <boost/url/parse.hpp>

#include <algorithm>
#include <string>

using namespace pushbook;
using namespace pushbook::detail;

namespace {

std::string lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(),
                 [](char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c; });
  return out;
}

// A decimal number as the server prints it back: no leading zeros.
std::string canonical_decimal(std::string_view s) {
  while (s.size() > 1 && s.front() == '0') s.remove_prefix(1);
  return std::string(s);
}

// An epoch as the server prints it back: 8 lower-case hex digits.
std::string canonical_epoch(std::string_view s) {
  return std::string(8 - std::min<std::size_t>(8, s.size()), '0') + lower(s);
}

void check_last_event_id(std::string_view value) {
  // What Beast's parser can hand over: no CR, LF or NUL, no surrounding whitespace.
  if (value.find_first_of(std::string_view("\r\n\0", 3)) != std::string_view::npos) return;
  if (!value.empty() &&
      (value.front() == ' ' || value.front() == '\t' || value.back() == ' ' || value.back() == '\t'))
    return;
  Request req{http::verb::get, "/v1/events?topic=resource/r&since=1", 11};
  req.set("Last-Event-ID", value);
  const auto url = boost::urls::parse_origin_form(req.target());
  FUZZ_CHECK(url.has_value());
  const auto resume = resume_point(req, *url);  // the header wins over ?since=
  if (!resume) {
    FUZZ_CHECK(resume.error().is(errc::bad_request));
    return;
  }
  const auto colon = value.find(':');
  const auto seq_text = colon == std::string_view::npos ? value : value.substr(colon + 1);
  const auto epoch_text = colon == std::string_view::npos ? std::string_view{} : value.substr(0, colon);
  FUZZ_CHECK(resume->since.has_value() == !seq_text.empty());
  if (resume->since) FUZZ_CHECK(std::to_string(*resume->since) == canonical_decimal(seq_text));
  FUZZ_CHECK(resume->epoch.has_value() == (colon != std::string_view::npos));
  if (resume->epoch) FUZZ_CHECK(format_epoch(*resume->epoch) == canonical_epoch(epoch_text));
}

void check_query(std::string_view query) {
  const auto target = "/v1/events?" + std::string(query);
  const auto url = boost::urls::parse_origin_form(target);
  if (!url) return;
  Request req{http::verb::get, target, 11};
  const auto resume = resume_point(req, *url);
  const auto since = query_param(*url, "since");
  const auto epoch = query_param(*url, "epoch");
  if (resume) {
    FUZZ_CHECK(resume->since.has_value() == (since && !since->empty()));
    if (resume->since) FUZZ_CHECK(std::to_string(*resume->since) == canonical_decimal(*since));
    FUZZ_CHECK(resume->epoch.has_value() == (epoch && !epoch->empty()));
    if (resume->epoch) FUZZ_CHECK(format_epoch(*resume->epoch) == canonical_epoch(*epoch));
  } else {
    FUZZ_CHECK(resume.error().is(errc::bad_request));
  }
  const auto wait = long_poll_wait(*url, std::chrono::seconds(60));
  if (wait)
    FUZZ_CHECK(wait->count() >= 0 && wait->count() <= 60);
  else
    FUZZ_CHECK(wait.error().is(errc::bad_request));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto text = pushbook::fuzz::as_text(data, size);
  check_last_event_id(text);
  check_query(text);
  return 0;
}
