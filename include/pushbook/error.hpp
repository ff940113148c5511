// pushbook/error.hpp: the library's error codes and the result type its synchronous calls return.
#pragma once

#include <pushbook/export.hpp>

#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <variant>

namespace pushbook {

/// Error codes of pushbook. Values are stable; `to_string(errc)` gives the stable wire name.
enum class errc {
  /// The request is malformed: a field is missing, has the wrong type or is out of range.
  bad_request = 1,
  /// A booking or resource named in the request does not exist.
  not_found,
  /// A resource with this id already exists.
  already_exists,
  /// A booking line asks for more units than the resource has at all.
  exceeds_capacity,
  /// An idempotency key was reused with a different request.
  idempotency_conflict,
  /// Not enough units were free when the booking was decided.
  sold_out,
  /// The transition is not allowed from the booking's current state.
  invalid_transition,
  /// Capacity cannot drop below the units already held or confirmed.
  capacity_in_use,
  /// A bounded queue is full; the caller should back off and retry.
  overloaded,
  /// A subscriber fell too far behind and its subscription was ended.
  slow_consumer,
  /// The topic or subscription pattern is not valid.
  invalid_topic,
  /// The component is shutting down and takes no new work.
  shutting_down,
  /// The booking store failed to persist a change.
  store_failed,
  /// The caller is not authenticated.
  unauthorized,
  /// The caller may not do this.
  forbidden,
  /// The caller sends too fast.
  rate_limited,
  /// A message or body exceeds its size limit.
  too_large,
  /// An unexpected internal failure.
  internal,
  /// A per-user quota is used up (bookings in flight, units held); retry once some are decided.
  quota_exceeded,
  /// The event bus cannot reach its backend (Redis): nothing was published; retry later.
  bus_unavailable,
};

/// The error category of `errc`.
PUSHBOOK_EXPORT const std::error_category& error_category() noexcept;

inline std::error_code make_error_code(errc e) noexcept { return {static_cast<int>(e), error_category()}; }

/// The stable snake_case name of an error code, as used on the wire ("sold_out").
PUSHBOOK_EXPORT const char* to_string(errc e) noexcept;

/// An error code with a message for humans that names the offending input.
struct Error {
  std::error_code code;
  std::string message;

  Error() = default;
  Error(errc e, std::string msg) : code(make_error_code(e)), message(std::move(msg)) {}
  Error(std::error_code ec, std::string msg) : code(ec), message(std::move(msg)) {}

  /// True when this error carries pushbook's `e`.
  bool is(errc e) const noexcept { return code == make_error_code(e); }
};

/// Thrown by `result<T>::value()` when it holds an error.
class PUSHBOOK_EXPORT Exception : public std::system_error {
 public:
  explicit Exception(const Error& error) : std::system_error(error.code, error.message) {}
};

/// Either a value or an `Error` (std::expected is C++23; this is the subset pushbook needs).
template <class T>
class [[nodiscard]] result {
 public:
  result(T value) : v_(std::in_place_index<0>, std::move(value)) {}
  result(Error error) : v_(std::in_place_index<1>, std::move(error)) {}

  bool has_value() const noexcept { return v_.index() == 0; }
  explicit operator bool() const noexcept { return has_value(); }

  T& value() & {
    check();
    return std::get<0>(v_);
  }
  const T& value() const& {
    check();
    return std::get<0>(v_);
  }
  T&& value() && {
    check();
    return std::get<0>(std::move(v_));
  }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

  /// The error; only valid when `!has_value()`.
  const Error& error() const { return std::get<1>(v_); }

 private:
  void check() const {
    if (v_.index() != 0) throw Exception(std::get<1>(v_));
  }
  std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] result<void> {
 public:
  result() = default;
  result(Error error) : error_(std::move(error)), failed_(true) {}

  bool has_value() const noexcept { return !failed_; }
  explicit operator bool() const noexcept { return !failed_; }
  void value() const {
    if (failed_) throw Exception(error_);
  }
  const Error& error() const { return error_; }

 private:
  Error error_;
  bool failed_ = false;
};

}  // namespace pushbook

template <>
struct std::is_error_code_enum<pushbook::errc> : std::true_type {};
