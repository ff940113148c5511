// open_store(): a store from a URL, so hosts and pushbook-server take one option for it.
#include <pushbook/booking_store.hpp>
#include <pushbook/postgres_store.hpp>
#include <pushbook/sqlite_store.hpp>

#include <fmt/format.h>

namespace pushbook {

result<std::shared_ptr<BookingStore>> open_store(std::string_view url) {
  if (url == "memory:" || url == "memory")
    return std::shared_ptr<BookingStore>(std::make_shared<MemoryStore>());
  // libpq takes the whole URI (host, port, database, user, password, sslmode, ...).
  if (url.starts_with("postgresql://") || url.starts_with("postgres://")) {
    auto store = PostgresStore::open(std::string(url));
    if (!store) return store.error();
    return std::shared_ptr<BookingStore>(std::move(*store));
  }
  constexpr std::string_view sqlite = "sqlite:";
  if (!url.starts_with(sqlite))
    return Error(
        errc::bad_request,
        fmt::format("unknown store '{}': use memory: or sqlite:PATH[?sync=normal|full], or postgresql://...",
                    url));
  auto rest = url.substr(sqlite.size());
  std::string_view path = rest, query;
  if (auto q = rest.find('?'); q != std::string_view::npos) {
    path = rest.substr(0, q);
    query = rest.substr(q + 1);
  }
  if (path.empty()) return Error(errc::bad_request, "sqlite: needs a file path, e.g. sqlite:pushbook.db");
  SqliteOptions options;
  while (!query.empty()) {
    const auto amp = query.find('&');
    const auto item = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view{} : query.substr(amp + 1);
    if (item == "sync=normal")
      options.sync = SqliteSync::normal;
    else if (item == "sync=full")
      options.sync = SqliteSync::full;
    else
      return Error(errc::bad_request,
                   fmt::format("unknown sqlite option '{}' (known: sync=normal, sync=full)", item));
  }
  auto store = SqliteStore::open(std::string(path), options);
  if (!store) return store.error();
  return std::shared_ptr<BookingStore>(std::move(*store));
}

}  // namespace pushbook
