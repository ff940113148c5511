#include "gateway/http_request.hpp"

#include <charconv>
#include <cmath>
#include <stdexcept>

namespace pushbook::detail {

namespace {

std::string trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return std::string(s);
}

}  // namespace

std::optional<std::string> query_param(const boost::urls::url_view& url, std::string_view key) {
  for (auto p : url.params())
    if (p.key == key) return std::string(p.value);
  return std::nullopt;
}

result<Identity> authenticate(const GatewayContext& ctx, const Request& req, const boost::urls::url_view& url,
                              bool allow_subprotocol) {
  std::string token;
  if (auto it = req.find(http::field::authorization); it != req.end()) {
    const std::string_view v = it->value();
    if (v.size() < 7 || (v.substr(0, 7) != "Bearer " && v.substr(0, 7) != "bearer "))
      return Error(errc::unauthorized, "Authorization must be \"Bearer <token>\"");
    token = trim(v.substr(7));
  }
  if (token.empty()) {
    if (auto t = query_param(url, "access_token")) token = *t;
  }
  if (token.empty() && allow_subprotocol) {
    if (auto it = req.find(http::field::sec_websocket_protocol); it != req.end()) {
      std::string_view list = it->value();
      while (!list.empty()) {
        const auto comma = list.find(',');
        const auto item = trim(list.substr(0, comma));
        if (item.starts_with("bearer.")) token = item.substr(7);
        list = comma == std::string_view::npos ? std::string_view{} : list.substr(comma + 1);
      }
    }
  }
  if (!token.empty()) {
    auto claims = ctx.verify(token);
    if (!claims) return claims.error();
    return Identity{claims->subject, claims->expires_at};
  }
  if (ctx.options.dev_insecure) {
    std::string user;
    user = query_param(url, "user").value_or("");
    if (user.empty())
      if (auto it = req.find("X-Pushbook-User"); it != req.end()) user = std::string(it->value());
    if (is_valid_id(user)) return Identity{user, std::nullopt};
    return Error(errc::unauthorized, "dev mode: name the user with ?user=<id> or X-Pushbook-User");
  }
  return Error(errc::unauthorized,
               "missing token: send \"Authorization: Bearer <jwt>\" (or access_token=<jwt> in the query)");
}

result<ResumePoint> resume_point(const Request& req, const boost::urls::url_view& url) {
  if (auto it = req.find("Last-Event-ID"); it != req.end())
    return parse_resume_point(std::string_view(it->value()), {}, {});
  return parse_resume_point(std::nullopt, query_param(url, "since").value_or(""),
                            query_param(url, "epoch").value_or(""));
}

result<std::chrono::seconds> long_poll_wait(const boost::urls::url_view& url, std::chrono::seconds max) {
  std::chrono::seconds wait{0};
  for (auto p : url.params()) {
    if (p.key != "wait") continue;
    try {
      std::size_t used = 0;
      const double seconds = std::stod(std::string(p.value), &used);
      if (used != p.value.size() || std::isnan(seconds) || seconds < 0) throw std::invalid_argument("wait");
      // Capped before the conversion: inf or 1e300 seconds is "as long as allowed", not undefined.
      const double cap = static_cast<double>(max.count());
      wait = std::chrono::seconds(static_cast<std::int64_t>(std::min(seconds, cap)));
    } catch (...) {
      return Error(errc::bad_request, "wait must be a number of seconds");
    }
  }
  return wait;
}

}  // namespace pushbook::detail
