// PostgresStore: see pushbook/postgres_store.hpp and docs/architecture.md ("PostgresStore").
#include <pushbook/postgres_store.hpp>

#include <libpq-fe.h>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <variant>

namespace pushbook {
namespace {

using steady = std::chrono::steady_clock;

// The schema version this build writes and reads; migrate() upgrades older databases to it.
constexpr int current_schema_version = 5;
// pg_advisory_xact_lock key under which a process creates or upgrades the schema ("PshB"):
// processes starting together upgrade once, one after the other.
constexpr const char* migration_lock_sql = "SELECT pg_advisory_xact_lock(1349740610)";

// Version 1: bookings and resources as SqliteStore keeps them, capacity in the engine's memory.
// Names carry a pushbook_ prefix: the database may well be the host application's own.
// `seq` is the first-stored order (recovery re-queues processing bookings in it); `lines` is
// [{"resource": ..., "quantity": ...}] so that SQL can sum units; `booking` is the whole booking
// as to_json() writes it (metadata included), which load() returns.
constexpr const char* schema_v1 = R"sql(
CREATE TABLE pushbook_schema_version (version integer NOT NULL);
INSERT INTO pushbook_schema_version VALUES (0);
CREATE TABLE pushbook_resources (
  id       text PRIMARY KEY,
  capacity bigint NOT NULL CHECK (capacity >= 0)
);
CREATE TABLE pushbook_bookings (
  seq         bigserial NOT NULL,
  id          text PRIMARY KEY,
  user_id     text NOT NULL,
  status      text NOT NULL,
  version     bigint NOT NULL,
  idem_key    text,
  fingerprint text,
  created_at  timestamptz NOT NULL,
  updated_at  timestamptz NOT NULL,
  expires_at  timestamptz,
  lines       json NOT NULL,
  booking     json NOT NULL,
  UNIQUE (user_id, idem_key)
);
-- Recovery reads the live bookings in first-stored order and the recent keys, not every row.
CREATE INDEX pushbook_bookings_live ON pushbook_bookings (seq) WHERE status IN ('processing', 'held');
CREATE INDEX pushbook_bookings_keys ON pushbook_bookings (created_at) WHERE idem_key IS NOT NULL;
)sql";

// Version 2: capacity in the database. Counters beside capacity, filled from the bookings that
// are there (held: reserved, confirmed: confirmed), a CHECK that makes overbooking impossible
// whatever a client does, and the function each booking version is stored with.
//
// pushbook_put_booking stores one version and applies the units its status change implies
// (units(new status) - units(stored status)), in the caller's transaction. It changes nothing
// and returns 'sold_out<TAB>resource<TAB>free<TAB>wanted' when a line does not fit, or
// 'duplicate_key<TAB>booking id' when the user already has a booking with this key; 'ok' when
// stored. p_resources and p_units are the lines added up per resource, sorted by id in byte
// order (COLLATE "C", the order every lock is taken in); each resource row is locked (FOR
// UPDATE) before it is read, so "free" is what it is at commit. Re-storing the same status
// changes no units: a commit retried after an unknown outcome (the connection broke during
// COMMIT) is harmless. Simple statements on primary keys, in a loop, rather than joins over the
// lines: plpgsql keeps their plans, and a confirm costs half the time the join version did.
constexpr const char* schema_v2 = R"sql(
ALTER TABLE pushbook_resources
  ADD COLUMN reserved bigint NOT NULL DEFAULT 0,
  ADD COLUMN confirmed bigint NOT NULL DEFAULT 0;
UPDATE pushbook_resources r SET reserved = u.reserved, confirmed = u.confirmed
  FROM (SELECT l.resource,
               coalesce(sum(l.quantity) FILTER (WHERE b.status = 'held'), 0) AS reserved,
               coalesce(sum(l.quantity) FILTER (WHERE b.status = 'confirmed'), 0) AS confirmed
          FROM pushbook_bookings b, json_to_recordset(b.lines) AS l(resource text, quantity bigint)
         WHERE b.status IN ('held', 'confirmed')
         GROUP BY l.resource) u
 WHERE r.id = u.resource;
ALTER TABLE pushbook_resources ADD CONSTRAINT pushbook_resources_units
  CHECK (reserved >= 0 AND confirmed >= 0 AND reserved + confirmed <= capacity);

CREATE FUNCTION pushbook_put_booking(
    p_id text, p_user text, p_status text, p_version bigint, p_key text, p_fingerprint text,
    p_created_ms bigint, p_updated_ms bigint, p_expires_ms bigint, p_lines json, p_booking json,
    p_resources text[], p_units bigint[])
  RETURNS text LANGUAGE plpgsql AS $fn$
DECLARE
  v_prev text;
  v_reserved bigint;
  v_confirmed bigint;
  v_free bigint;
  v_existing text;
BEGIN
  SELECT status INTO v_prev FROM pushbook_bookings WHERE id = p_id FOR UPDATE;
  v_reserved := (p_status = 'held')::int - coalesce((v_prev = 'held')::int, 0);
  v_confirmed := (p_status = 'confirmed')::int - coalesce((v_prev = 'confirmed')::int, 0);
  IF v_reserved <> 0 OR v_confirmed <> 0 THEN
    FOR i IN 1 .. coalesce(array_length(p_resources, 1), 0) LOOP
      SELECT capacity - reserved - confirmed INTO v_free FROM pushbook_resources WHERE id = p_resources[i] FOR UPDATE;
      IF v_reserved + v_confirmed > 0 AND (v_free IS NULL OR v_free < p_units[i] * (v_reserved + v_confirmed)) THEN
        RETURN 'sold_out' || chr(9) || p_resources[i] || chr(9) || coalesce(v_free, 0) || chr(9) || p_units[i];
      END IF;
    END LOOP;
  END IF;
  IF v_prev IS NULL THEN
    INSERT INTO pushbook_bookings (id, user_id, status, version, idem_key, fingerprint, created_at,
                                   updated_at, expires_at, lines, booking)
    VALUES (p_id, p_user, p_status, p_version, p_key, p_fingerprint,
            timestamptz 'epoch' + p_created_ms * interval '1 millisecond',
            timestamptz 'epoch' + p_updated_ms * interval '1 millisecond',
            timestamptz 'epoch' + p_expires_ms * interval '1 millisecond', p_lines, p_booking)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
      SELECT id INTO v_existing FROM pushbook_bookings WHERE user_id = p_user AND idem_key = p_key;
      RETURN 'duplicate_key' || chr(9) || coalesce(v_existing, p_id);
    END IF;
  ELSE
    UPDATE pushbook_bookings SET
        user_id = p_user, status = p_status, version = p_version, idem_key = p_key,
        fingerprint = coalesce(fingerprint, p_fingerprint),
        created_at = timestamptz 'epoch' + p_created_ms * interval '1 millisecond',
        updated_at = timestamptz 'epoch' + p_updated_ms * interval '1 millisecond',
        expires_at = timestamptz 'epoch' + p_expires_ms * interval '1 millisecond',
        lines = p_lines, booking = p_booking
      WHERE id = p_id;
  END IF;
  IF v_reserved <> 0 OR v_confirmed <> 0 THEN
    FOR i IN 1 .. coalesce(array_length(p_resources, 1), 0) LOOP
      UPDATE pushbook_resources SET reserved = reserved + p_units[i] * v_reserved,
                                    confirmed = confirmed + p_units[i] * v_confirmed
       WHERE id = p_resources[i];
    END LOOP;
  END IF;
  RETURN 'ok';
END
$fn$;
)sql";

// Version 3: the outbox. One row per booking whose latest stored version is not known to be
// published (BookingStore::published): written by a trigger in the transaction that stores the
// version (an upsert: a newer version replaces an older one; only statements that set `version`
// fire it, not claims or lease renewals), deleted once the engine says the
// version's events reached the bus. Bookings stored before the upgrade count as published (their
// engine published right after each commit, and nothing recorded whether it got there).
// `node` is the store that wrote the version. recover() returns what its own node left and what
// any node left for longer than the lease, in first-stored order, for the engine to relay (not
// what live processes are publishing right now); a row older
// than the lease (its process died between commit and publish) is relayed by a live process
// (`stale_outbox`, which stamps the row again so that one node relays it per lease; recover()
// stamps the rows it returns the same way, `stamp_outbox`).
constexpr const char* schema_v3 = R"sql(
CREATE TABLE pushbook_outbox (
  booking_id text PRIMARY KEY,
  version    bigint NOT NULL,
  stored_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
  node       text
);
CREATE FUNCTION pushbook_outbox_put() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
  INSERT INTO pushbook_outbox (booking_id, version, node)
    VALUES (NEW.id, NEW.version, current_setting('pushbook.node', true))
    ON CONFLICT (booking_id) DO UPDATE
      SET version = excluded.version, stored_at = excluded.stored_at, node = excluded.node;
  RETURN NULL;
END
$fn$;
CREATE TRIGGER pushbook_outbox_put AFTER INSERT OR UPDATE OF version ON pushbook_bookings
  FOR EACH ROW EXECUTE FUNCTION pushbook_outbox_put();
)sql";

// Version 4: the claim queue. A processing booking is claimed by the process (node) that decides
// it, for a lease that its store renews while it lives; `attempt` counts the claims. A booking
// is claimed by the node that stores its first version; when a lease runs out (the node died),
// any node claims it (FOR UPDATE SKIP LOCKED) and decides it. pushbook_put_booking now refuses
// ('conflict<TAB>stored version<TAB>stored status<TAB>claimed by') a version that does not follow
// the stored one (another process changed the booking meanwhile) and the decision of a
// processing booking that another node has claimed, so that each booking is decided once. The
// connection's node and lease are the session settings pushbook.node and pushbook.lease_ms.
// Processing bookings from before the upgrade have no claim: the first store to look claims them.
constexpr const char* schema_v4 = R"sql(
ALTER TABLE pushbook_bookings
  ADD COLUMN claimed_by  text,
  ADD COLUMN lease_until timestamptz,
  ADD COLUMN attempt     integer NOT NULL DEFAULT 0,
  ADD COLUMN written_by  text;
CREATE INDEX pushbook_bookings_claims ON pushbook_bookings (lease_until) WHERE status = 'processing';

CREATE OR REPLACE FUNCTION pushbook_put_booking(
    p_id text, p_user text, p_status text, p_version bigint, p_key text, p_fingerprint text,
    p_created_ms bigint, p_updated_ms bigint, p_expires_ms bigint, p_lines json, p_booking json,
    p_resources text[], p_units bigint[])
  RETURNS text LANGUAGE plpgsql AS $fn$
DECLARE
  v_node text := current_setting('pushbook.node', true);
  v_prev text;
  v_claimed text;
  v_stored bigint;
  v_writer text;
  v_reserved bigint;
  v_confirmed bigint;
  v_free bigint;
  v_existing text;
BEGIN
  SELECT status, claimed_by, version, written_by INTO v_prev, v_claimed, v_stored, v_writer
    FROM pushbook_bookings WHERE id = p_id FOR UPDATE;
  -- A version follows the stored one (or is the stored one again, from the node that stored it:
  -- a commit retried after an unknown outcome; another node's equal version is a second
  -- decision), and a processing booking is decided only by the node that claimed it.
  IF v_prev IS NOT NULL AND (
       NOT (v_stored = p_version - 1
            OR (v_stored = p_version AND v_prev = p_status AND v_writer IS NOT DISTINCT FROM v_node))
       OR (v_prev = 'processing' AND p_status <> 'processing' AND v_claimed IS DISTINCT FROM v_node)) THEN
    RETURN 'conflict' || chr(9) || v_stored || chr(9) || v_prev || chr(9) || coalesce(v_claimed, '');
  END IF;
  v_reserved := (p_status = 'held')::int - coalesce((v_prev = 'held')::int, 0);
  v_confirmed := (p_status = 'confirmed')::int - coalesce((v_prev = 'confirmed')::int, 0);
  IF v_reserved <> 0 OR v_confirmed <> 0 THEN
    FOR i IN 1 .. coalesce(array_length(p_resources, 1), 0) LOOP
      SELECT capacity - reserved - confirmed INTO v_free FROM pushbook_resources WHERE id = p_resources[i] FOR UPDATE;
      IF v_reserved + v_confirmed > 0 AND (v_free IS NULL OR v_free < p_units[i] * (v_reserved + v_confirmed)) THEN
        RETURN 'sold_out' || chr(9) || p_resources[i] || chr(9) || coalesce(v_free, 0) || chr(9) || p_units[i];
      END IF;
    END LOOP;
  END IF;
  IF v_prev IS NULL THEN
    INSERT INTO pushbook_bookings (id, user_id, status, version, idem_key, fingerprint, created_at,
                                   updated_at, expires_at, lines, booking, claimed_by, lease_until, attempt,
                                   written_by)
    VALUES (p_id, p_user, p_status, p_version, p_key, p_fingerprint,
            timestamptz 'epoch' + p_created_ms * interval '1 millisecond',
            timestamptz 'epoch' + p_updated_ms * interval '1 millisecond',
            timestamptz 'epoch' + p_expires_ms * interval '1 millisecond', p_lines, p_booking,
            CASE WHEN p_status = 'processing' THEN v_node END,
            CASE WHEN p_status = 'processing'
                 THEN clock_timestamp() + coalesce(current_setting('pushbook.lease_ms', true), '10000')::bigint
                                          * interval '1 millisecond' END,
            (p_status = 'processing')::int, v_node)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
      SELECT id INTO v_existing FROM pushbook_bookings WHERE user_id = p_user AND idem_key = p_key;
      RETURN 'duplicate_key' || chr(9) || coalesce(v_existing, p_id);
    END IF;
  ELSE
    UPDATE pushbook_bookings SET
        user_id = p_user, status = p_status, version = p_version, idem_key = p_key,
        fingerprint = coalesce(fingerprint, p_fingerprint),
        created_at = timestamptz 'epoch' + p_created_ms * interval '1 millisecond',
        updated_at = timestamptz 'epoch' + p_updated_ms * interval '1 millisecond',
        expires_at = timestamptz 'epoch' + p_expires_ms * interval '1 millisecond',
        lines = p_lines, booking = p_booking,
        claimed_by = CASE WHEN p_status = 'processing' THEN claimed_by END,
        lease_until = CASE WHEN p_status = 'processing' THEN lease_until END,
        written_by = v_node
      WHERE id = p_id;
  END IF;
  IF v_reserved <> 0 OR v_confirmed <> 0 THEN
    FOR i IN 1 .. coalesce(array_length(p_resources, 1), 0) LOOP
      UPDATE pushbook_resources SET reserved = reserved + p_units[i] * v_reserved,
                                    confirmed = confirmed + p_units[i] * v_confirmed
       WHERE id = p_resources[i];
    END LOOP;
  END IF;
  RETURN 'ok';
END
$fn$;
)sql";

// Version 5: each resource row numbers the transactions that changed it (`version`, starting
// from the time it was created or upgraded in Unix milliseconds, above any seq a bus gave the
// topic when an older build numbered its events there), so that the counts every process publishes after its
// transactions reach subscribers in the database's order (the engine publishes resource/<id> with seq =
// version; the bus drops an older one that comes late). A store whose engine takes counts
// (on_resource_counts) counts the version up once per group transaction, for each resource the group locked,
// and reads the counts back in the same statement ("counts"); a trigger per row update would cost a function
// call for every booking version.
constexpr const char* schema_v5 = R"sql(
ALTER TABLE pushbook_resources
  ADD COLUMN version bigint NOT NULL DEFAULT (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
)sql";

// Prepared on every connection once the schema is current.
struct prepared_statement {
  const char* name;
  const char* sql;
};
constexpr prepared_statement prepared_statements[] = {
    {"put_booking", "SELECT pushbook_put_booking($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"},
    // Only when it leaves room for the units in use; no row back means it does not.
    // One row back: whether it was stored (1 or 0), and the units in use. The row is locked by
    // the group already, so `used` is what the upsert compared with.
    {"put_resource",
     "WITH used AS (SELECT reserved + confirmed AS units FROM pushbook_resources WHERE id = $1), "
     "stored AS (INSERT INTO pushbook_resources AS r (id, capacity) VALUES ($1, $2) "
     "ON CONFLICT (id) DO UPDATE SET capacity = excluded.capacity "
     "WHERE r.reserved + r.confirmed <= excluded.capacity RETURNING r.id) "
     "SELECT (SELECT count(*) FROM stored), coalesce((SELECT units FROM used), 0)"},
    // A group's resource rows, all locked before anything else and in id order: two groups that
    // touch the same resources lock them in the same order and never deadlock.
    // The counts a group's transaction leaves on the resources it locked, numbered (the rows are
    // locked by the group already): read before its COMMIT (on_resource_counts).
    {"counts",
     "UPDATE pushbook_resources SET version = version + 1 "
     "WHERE id IN (SELECT json_array_elements_text($1::json)) "
     "RETURNING id, capacity, reserved, confirmed, version"},
    {"lock_resources",
     "SELECT id FROM pushbook_resources WHERE id IN (SELECT json_array_elements_text($1::json)) "
     "ORDER BY id COLLATE \"C\" FOR UPDATE"},
    {"load", "SELECT booking, idem_key FROM pushbook_bookings WHERE id = $1"},
    {"find_key",
     "SELECT coalesce(fingerprint, ''), id, (extract(epoch FROM created_at) * 1000)::bigint "
     "FROM pushbook_bookings WHERE user_id = $1 AND idem_key = $2"},
    {"resources",
     "SELECT id, capacity, reserved, confirmed, version FROM pushbook_resources ORDER BY id COLLATE \"C\""},
    // Held bookings, and the processing ones this node has claimed ($1).
    {"live",
     "SELECT id, status, booking, idem_key, attempt FROM pushbook_bookings "
     "WHERE status IN ('processing', 'held') AND (status = 'held' OR claimed_by = $1) ORDER BY seq"},
    // Claims processing bookings whose lease ran out (or that never had one), at most $3, for
    // node $1 for $2 ms; a row another transaction has locked (being decided, or claimed by
    // another node right now) is skipped.
    {"claim",
     "UPDATE pushbook_bookings SET claimed_by = $1, "
     "lease_until = clock_timestamp() + $2::bigint * interval '1 millisecond', attempt = attempt + 1 "
     "WHERE id IN (SELECT id FROM pushbook_bookings WHERE status = 'processing' "
     "AND (lease_until IS NULL OR lease_until < clock_timestamp()) ORDER BY seq LIMIT $3 "
     "FOR UPDATE SKIP LOCKED) "
     "RETURNING seq, id, booking, idem_key, attempt"},
    // At recovery: this node's own claims (a restart under the same node_id), their attempt
    // counted up (the handler may have run before the restart).
    {"reclaim",
     "UPDATE pushbook_bookings SET lease_until = clock_timestamp() + $2::bigint * interval '1 millisecond', "
     "attempt = attempt + 1 WHERE status = 'processing' AND claimed_by = $1"},
    // Outbox rows older than $1 ms (their process died between commit and publish, or its bus
    // has been refusing for that long), at most $2: stamped again (no other node takes them for
    // another while) and returned with their bookings.
    {"stale_outbox",
     "WITH stale AS (SELECT booking_id FROM pushbook_outbox "
     "WHERE stored_at < clock_timestamp() - $1::bigint * interval '1 millisecond' "
     "ORDER BY stored_at LIMIT $2 FOR UPDATE SKIP LOCKED), "
     "touched AS (UPDATE pushbook_outbox o SET stored_at = clock_timestamp() FROM stale "
     "WHERE o.booking_id = stale.booking_id RETURNING o.booking_id) "
     "SELECT b.seq, b.id, b.booking, b.idem_key FROM pushbook_bookings b JOIN touched t ON t.booking_id = "
     "b.id"},
    // Extends this node's claims on the bookings its engine holds ($3, text[]); a row being
    // written right now (decided) is skipped rather than waited for.
    {"renew",
     "UPDATE pushbook_bookings SET lease_until = clock_timestamp() + $2::bigint * interval '1 millisecond' "
     "WHERE id IN (SELECT id FROM pushbook_bookings WHERE id = ANY($3::text[]) AND status = 'processing' "
     "AND claimed_by = $1 FOR UPDATE SKIP LOCKED)"},
    // A store closing: the claims it holds ($2, text[]) lapse now, the outbox rows of the
    // versions it stored and never saw published ($3) become stale, and the other stores are
    // woken (LISTEN pushbook_handover) to take both at once. Only this store object's: another
    // live one under the same node id (a replacement opened before this one closed) keeps its own.
    {"hand_off",
     "WITH released AS (UPDATE pushbook_bookings SET lease_until = NULL "
     "WHERE id = ANY($2::text[]) AND status = 'processing' AND claimed_by = $1 RETURNING 1), "
     "stale AS (UPDATE pushbook_outbox SET stored_at = stored_at - interval '100 years' "
     "WHERE booking_id = ANY($3::text[]) AND node = $1 RETURNING 1) "
     "SELECT pg_notify('pushbook_handover', $1), (SELECT count(*) FROM released), (SELECT count(*) FROM "
     "stale)"},
    // The outbox rows of versions a recovery hands to its engine to relay ($1, text[]): stamped
    // now, so that stale_outbox (any live process's, this one's too) leaves them for a lease.
    {"stamp_outbox",
     "UPDATE pushbook_outbox SET stored_at = clock_timestamp() WHERE booking_id = ANY($1::text[])"},
    // What node $1 left unpublished, and what any node left for longer than $2 ms.
    {"unpublished",
     "SELECT b.id, b.booking, b.idem_key FROM pushbook_outbox o JOIN pushbook_bookings b "
     "ON b.id = o.booking_id WHERE o.node IS NOT DISTINCT FROM $1 OR o.node IS NULL "
     "OR o.stored_at < clock_timestamp() - $2::bigint * interval '1 millisecond' ORDER BY b.seq"},
    // Published marks, a batch at a time (text[] and bigint[]): a mark of an older version
    // leaves a newer one in the outbox.
    {"unmark",
     "DELETE FROM pushbook_outbox o USING unnest($1::text[], $2::bigint[]) AS m(id, version) "
     "WHERE o.booking_id = m.id AND o.version <= m.version"},
    {"keys",
     "SELECT user_id, idem_key, coalesce(fingerprint, ''), id, "
     "(extract(epoch FROM created_at) * 1000)::bigint FROM pushbook_bookings "
     "WHERE idem_key IS NOT NULL AND created_at >= timestamptz 'epoch' + $1::bigint * interval '1 "
     "millisecond'"},
};

struct conn_deleter {
  void operator()(PGconn* c) const noexcept { PQfinish(c); }
};
struct result_deleter {
  void operator()(PGresult* r) const noexcept { PQclear(r); }
};
using pg_result = std::unique_ptr<PGresult, result_deleter>;

// A connection and whether it can still be used: a statement cut off by the client's deadline
// leaves the protocol in the middle of a reply, so the connection is dropped, not reused.
struct connection {
  std::unique_ptr<PGconn, conn_deleter> conn;
  bool broken = false;
  bool usable() const noexcept {
    return conn && !broken && PQstatus(conn.get()) == CONNECTION_OK &&
           PQtransactionStatus(conn.get()) == PQTRANS_IDLE;
  }
};

// libpq's message on one line (it spreads hints over several, indented with tabs): messages go
// into logs and HTTP error bodies.
std::string trimmed(const char* message) {
  std::string s;
  for (const char* p = message ? message : ""; *p; ++p) {
    if (*p != '\n' && *p != '\t') {
      s += *p;
    } else if (!s.empty() && s.back() != ' ') {
      s += ' ';
    }
  }
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s.empty() ? "unknown error" : s;
}

std::int64_t unix_ms(wall_clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count();
}

// Statuses whose version can change units: a version becoming processing or rejected never
// does (processing is only a first version, rejected only follows processing).
bool may_change_units(BookingStatus s) {
  return s != BookingStatus::processing && s != BookingStatus::rejected;
}

// One queued booking version, serialised on the committing thread (text parameters).
struct booking_row {
  std::string id, user, status, version, key, fingerprint, created_ms, updated_ms, expires_ms;
  bool has_key = false, has_fingerprint = false, has_expiry = false;
  std::string lines, json;
  // The lines added up per resource, sorted by id (byte order): text[] and bigint[] literals.
  std::string resources, units;
  std::vector<std::string> lock;  // resources whose rows this version may change
};

struct resource_row {
  std::string id;
  std::string capacity;
};

struct pending {
  std::variant<booking_row, resource_row> row;
  CommitCallback done;
  result<void> outcome;  // this change's own refusal (sold_out, ...) when the group committed
};

// Waits for one queued change: how commit() and put_resource() wait for the writer thread.
struct waiter {
  std::mutex mutex;
  std::condition_variable cv;
  std::optional<result<void>> outcome;

  CommitCallback callback(const std::shared_ptr<waiter>& self) {
    return [self](result<void> r) {
      std::lock_guard lock(self->mutex);
      self->outcome = std::move(r);
      self->cv.notify_one();
    };
  }
  result<void> wait() {
    std::unique_lock lock(mutex);
    cv.wait(lock, [&] { return outcome.has_value(); });
    return std::move(*outcome);
  }
};

thread_local const void* current_writer = nullptr;  // the store whose callbacks run on this thread

// Appends `text` to a PostgreSQL array literal as one quoted element.
void append_array_text(std::string& literal, std::string_view text) {
  literal += '"';
  for (char ch : text) {
    if (ch == '"' || ch == '\\') literal += '\\';
    literal += ch;
  }
  literal += '"';
}

// A text[] literal of what `element` gives for each of `items` (a string or a string_view).
template <typename Range, typename Element>
std::string text_array(const Range& items, Element element) {
  std::string literal = "{";
  for (const auto& item : items) {
    if (literal.size() > 1) literal += ',';
    append_array_text(literal, element(item));
  }
  return literal + '}';
}

// Published marks (BookingStore::published) waiting for the writer's next transaction.
struct published_marks {
  std::vector<std::pair<std::string, std::uint64_t>> marks;
  bool empty() const noexcept { return marks.empty(); }
  // The unmark statement's parameters: a text[] and a bigint[] literal.
  std::pair<std::string, std::string> literals() const {
    std::string ids = "{", versions = "{";
    for (const auto& [id, version] : marks) {
      if (ids.size() > 1) {
        ids += ',';
        versions += ',';
      }
      append_array_text(ids, id);
      versions += std::to_string(version);
    }
    return {ids + '}', versions + '}'};
  }
};

}  // namespace

struct PostgresStore::impl {
  std::string conninfo;
  PostgresOptions options;
  std::string label;     // "PostgreSQL database 'x' on host:port", for messages (never the password)
  std::string node;      // this store's claims (PostgresOptions::node_id)
  std::string lease_ms;  // PostgresOptions::lease, in ms, as text

  connection writer_conn;  // the writer thread's
  std::atomic<bool> healthy{false};
  std::atomic<std::uint64_t> transactions{0};

  // The last failed connection attempt: until reconnect_interval passed, use fails at once.
  mutable std::mutex connect_mutex;
  mutable steady::time_point last_failure{};
  mutable std::string last_failure_message;

  mutable std::mutex queue_mutex;
  std::condition_variable queue_cv;
  std::deque<pending> queue;
  published_marks marks;  // for the next transaction
  bool stopping = false;
  bool closed = false;
  std::thread writer;

  std::mutex done_mutex;
  std::condition_variable done_cv;
  struct done_group {
    std::vector<pending> changes;
    result<void> outcome;
    std::vector<ResourceState> counts;  // what the group left on its resources (committed only)
  };
  std::deque<done_group> done_queue;
  bool writer_finished = false;
  std::thread completer;

  mutable std::mutex readers_mutex;
  mutable std::condition_variable readers_cv;
  mutable std::vector<std::unique_ptr<connection>> idle_readers;

  // The lease thread: renews this node's claims and takes over bookings whose lease ran out.
  std::atomic<bool> lease_stopping{false};
  int wake_fd = -1;  // an eventfd: wakes the lease thread (stop, a new taker)
  std::thread lease_thread;
  // on_resource_counts's callback; held while it runs, so that clearing it waits for a call.
  std::mutex counter_mutex;
  std::function<void(std::vector<ResourceState>)> counter;
  std::atomic<bool> wants_counts{false};
  // on_takeover's callback; held while it runs, so that clearing it waits for a call.
  std::mutex taker_mutex;
  std::function<void(Booking, Takeover)> taker;
  // The claims this node renews (hold_claim).
  mutable std::mutex claims_mutex;
  mutable std::unordered_set<std::string> holding;
  // Booking id -> the latest version this store stored and was not told is published.
  mutable std::unordered_map<std::string, std::uint64_t> unmarked;
  std::atomic<std::uint64_t> taken_over{0};

  impl(std::string info, PostgresOptions o) : conninfo(std::move(info)), options(std::move(o)) {
    options.max_group = std::max<std::size_t>(options.max_group, 1);
    options.pool_size = std::max<std::size_t>(options.pool_size, 1);
    options.statement_timeout = std::max(options.statement_timeout, std::chrono::milliseconds(1));
    options.lease = std::max(options.lease, std::chrono::milliseconds(100));
    node = options.node_id.empty() ? default_node_id() : options.node_id;
    lease_ms = std::to_string(options.lease.count());
    wake_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (wake_fd < 0) throw std::system_error(errno, std::generic_category(), "eventfd");
  }
  ~impl() {
    if (wake_fd >= 0) ::close(wake_fd);
  }
  impl(const impl&) = delete;
  impl& operator=(const impl&) = delete;

  void wake_leases() const noexcept {
    const std::uint64_t one = 1;
    (void)!::write(wake_fd, &one, sizeof one);
  }

  // host:pid:random, unique per store object: a restarted process is a new node, whose
  // predecessor's claims are taken over once their lease runs out.
  static std::string default_node_id() {
    char host[256] = {};
    if (::gethostname(host, sizeof host - 1) != 0) std::snprintf(host, sizeof host, "host");
    std::random_device rd;
    char tail[32];
    std::snprintf(tail, sizeof tail, ":%ld:%08x", static_cast<long>(::getpid()), rd());
    return std::string(host).substr(0, 200) + tail;
  }

  const std::string& where() const { return label; }

  Error failure(std::string_view doing, std::string message) const {
    return Error(errc::store_failed, label + ": " + std::string(doing) + ": " + message);
  }

  // ---- connections ----

  // The label from the parsed conninfo; bad_request when it does not parse.
  result<void> parse_conninfo() {
    char* error = nullptr;
    PQconninfoOption* parsed = PQconninfoParse(conninfo.c_str(), &error);
    if (!parsed) {
      Error e(errc::bad_request, "PostgreSQL conninfo cannot be parsed: " + trimmed(error));
      PQfreemem(error);
      return e;
    }
    std::string host, port, dbname, user;
    for (auto* o = parsed; o->keyword; ++o) {
      const std::string_view k = o->keyword;
      const std::string v = o->val ? o->val : "";
      if (k == "host" || (k == "hostaddr" && host.empty())) host = v;
      if (k == "port") port = v;
      if (k == "dbname") dbname = v;
      if (k == "user") user = v;
    }
    PQconninfoFree(parsed);
    label = "PostgreSQL database '" + (dbname.empty() ? user : dbname) + "' on " +
            (host.empty() ? "the default socket" : host) + (port.empty() ? "" : ":" + port);
    return {};
  }

  result<connection> connect() const {
    {
      std::lock_guard lock(connect_mutex);
      if (last_failure != steady::time_point{} && steady::now() - last_failure < options.reconnect_interval)
        return failure("unreachable", last_failure_message + " (next attempt within " +
                                          std::to_string(options.reconnect_interval.count()) + " ms)");
    }
    auto outcome = try_connect();
    std::lock_guard lock(connect_mutex);
    if (outcome) {
      last_failure = {};
    } else {
      last_failure = steady::now();
      last_failure_message =
          outcome.error().message.substr(std::min(label.size() + 2, outcome.error().message.size()));
    }
    return outcome;
  }

  result<connection> try_connect() const {
    const auto timeout_s =
        std::to_string(std::max<std::int64_t>(1, (options.connect_timeout.count() + 999) / 1000));
    // Our defaults first: the expanded conninfo that follows overrides them when it sets them.
    const char* keywords[] = {"connect_timeout", "application_name", "dbname", nullptr};
    const char* values[] = {timeout_s.c_str(), "pushbook", conninfo.c_str(), nullptr};
    connection c;
    c.conn.reset(PQconnectdbParams(keywords, values, 1));
    if (!c.conn) return failure("connecting", "out of memory");
    if (PQstatus(c.conn.get()) != CONNECTION_OK)
      return failure("cannot connect", trimmed(PQerrorMessage(c.conn.get())));
    // The server's own limit, lock waits included; the client's deadline (run) covers a server
    // that stopped answering altogether.
    const std::string settings =
        "SET statement_timeout = " + std::to_string(options.statement_timeout.count()) +
        "; SET client_min_messages = warning";
    if (auto r = run(c, "configuring the connection", settings.c_str(), {}, false); !r) return r.error();
    // Who this store is, for pushbook_put_booking's claims.
    if (auto r =
            run(c, "configuring the connection",
                "SELECT set_config('pushbook.node', $1, false), set_config('pushbook.lease_ms', $2, false)",
                {node.c_str(), lease_ms.c_str()}, false);
        !r)
      return r.error();
    return c;
  }

  result<void> prepare(connection& c) const {
    for (const auto& s : prepared_statements) {
      pg_result r(PQprepare(c.conn.get(), s.name, s.sql, 0, nullptr));
      if (!r || PQresultStatus(r.get()) != PGRES_COMMAND_OK) {
        c.broken = true;
        return failure(std::string("preparing ") + s.name,
                       trimmed(r ? PQresultErrorMessage(r.get()) : PQerrorMessage(c.conn.get())));
      }
    }
    return {};
  }

  result<connection> connect_prepared() const {
    auto c = connect();
    if (!c) return c.error();
    if (auto r = prepare(*c); !r) return r.error();
    return c;
  }

  // Waits until the connection has a whole result to hand out, or the deadline passes.
  result<void> wait_ready(connection& c, steady::time_point deadline, std::string_view doing) const {
    PGconn* pg = c.conn.get();
    while (PQisBusy(pg)) {
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - steady::now()).count();
      if (left <= 0) {
        c.broken = true;
        return failure(doing, "no answer within " + std::to_string(options.statement_timeout.count()) +
                                  " ms (statement_timeout) plus 1 s; the connection is dropped");
      }
      pollfd p{PQsocket(pg), POLLIN, 0};
      const int rc = ::poll(&p, 1, static_cast<int>(std::min<std::int64_t>(left, 1000)));
      if (rc < 0 && errno != EINTR) {
        c.broken = true;
        return failure(doing, "poll failed");
      }
      if (rc > 0 && !PQconsumeInput(pg)) {
        c.broken = true;
        return failure(doing, trimmed(PQerrorMessage(pg)));
      }
    }
    return {};
  }

  // Runs one statement (a prepared one by name, or SQL; SQL without parameters may hold several
  // statements) and returns its last result. Null `params` are SQL NULLs.
  result<pg_result> run(connection& c, std::string_view doing, const char* command,
                        const std::vector<const char*>& params, bool is_prepared) const {
    PGconn* pg = c.conn.get();
    const int n = static_cast<int>(params.size());
    const int sent = is_prepared ? PQsendQueryPrepared(pg, command, n, params.data(), nullptr, nullptr, 0)
                     : n == 0
                         ? PQsendQuery(pg, command)
                         : PQsendQueryParams(pg, command, n, nullptr, params.data(), nullptr, nullptr, 0);
    if (!sent) {
      c.broken = PQstatus(pg) != CONNECTION_OK;
      return failure(doing, trimmed(PQerrorMessage(pg)));
    }
    const auto deadline = steady::now() + options.statement_timeout + std::chrono::seconds(1);
    pg_result last;
    std::optional<Error> error;
    for (;;) {
      if (auto r = wait_ready(c, deadline, doing); !r) return r.error();
      pg_result next(PQgetResult(pg));
      if (!next) break;
      const auto st = PQresultStatus(next.get());
      if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK && !error)
        error = result_failure(c, next.get(), doing);
      last = std::move(next);
    }
    if (error) return *error;
    if (!last) {
      c.broken = true;
      return failure(doing, trimmed(PQerrorMessage(pg)));
    }
    return last;
  }

  Error result_failure(connection& c, const PGresult* r, std::string_view doing) const {
    if (PQstatus(c.conn.get()) != CONNECTION_OK) c.broken = true;
    std::string message = trimmed(PQresultErrorMessage(r));
    const char* state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
    if (state && std::string_view(state) == "57014")
      message += " (statement_timeout is " + std::to_string(options.statement_timeout.count()) + " ms)";
    if (state && std::string_view(state).starts_with("08")) c.broken = true;  // connection exception
    return failure(doing, std::move(message));
  }

  result<pg_result> run_prepared(connection& c, std::string_view doing, const char* name,
                                 const std::vector<const char*>& params) const {
    return run(c, doing, name, params, true);
  }

  // Ends a failed transaction so the connection can be reused; drops the connection otherwise.
  void rollback(connection& c) const {
    if (!c.conn || c.broken || PQstatus(c.conn.get()) != CONNECTION_OK) return;
    if (PQtransactionStatus(c.conn.get()) == PQTRANS_IDLE) return;
    if (!run(c, "rolling back", "ROLLBACK", {}, false)) c.broken = true;
  }

  // ---- schema ----

  result<int> stored_schema_version(connection& c) const {
    auto exists = run(c, "reading the schema version",
                      "SELECT to_regclass('pushbook_schema_version') IS NOT NULL, "
                      "to_regclass('pushbook_bookings') IS NOT NULL",
                      {}, false);
    if (!exists) return exists.error();
    const bool has_version = PQgetvalue(exists->get(), 0, 0)[0] == 't';
    const bool has_bookings = PQgetvalue(exists->get(), 0, 1)[0] == 't';
    if (!has_version) {
      if (has_bookings)
        return Error(errc::store_failed, label + " has a pushbook_bookings table but no schema version");
      return 0;
    }
    auto v = run(c, "reading the schema version", "SELECT version FROM pushbook_schema_version", {}, false);
    if (!v) return v.error();
    if (PQntuples(v->get()) != 1)
      return Error(errc::store_failed, label + ": pushbook_schema_version has " +
                                           std::to_string(PQntuples(v->get())) + " rows, not one");
    const int version = std::atoi(PQgetvalue(v->get(), 0, 0));
    if (version > current_schema_version)
      return Error(errc::store_failed, label + ": database schema version " + std::to_string(version) +
                                           " is newer than this pushbook (knows " +
                                           std::to_string(current_schema_version) + ")");
    return version;
  }

  // Upgrades the schema by one version, inside the caller's transaction. Every future schema
  // change is one more case here; databases never go back.
  result<void> migrate_step(connection& c, int from) const {
    const char* sql = from == 0   ? schema_v1
                      : from == 1 ? schema_v2
                      : from == 2 ? schema_v3
                      : from == 3 ? schema_v4
                      : from == 4 ? schema_v5
                                  : nullptr;
    if (!sql)
      return Error(errc::store_failed, label + ": no migration from schema version " + std::to_string(from));
    auto r = run(c, "upgrading the schema to version " + std::to_string(from + 1), sql, {}, false);
    if (!r) return r.error();
    return {};
  }

  result<void> migrate(connection& c) const {
    auto step = [&](const char* sql, std::string_view doing) -> result<void> {
      auto r = run(c, doing, sql, {}, false);
      if (!r) return r.error();
      return {};
    };
    result<void> outcome = step("BEGIN", "starting the schema upgrade");
    if (outcome) outcome = step(migration_lock_sql, "waiting for the schema lock");
    if (outcome) {
      // Read under the lock: another process may have upgraded while we waited for it.
      auto version = stored_schema_version(c);
      if (!version) outcome = version.error();
      for (int v = version ? *version : current_schema_version; v < current_schema_version && outcome; ++v)
        outcome = migrate_step(c, v);
      if (outcome && *version < current_schema_version) {
        const auto stamp =
            "UPDATE pushbook_schema_version SET version = " + std::to_string(current_schema_version);
        outcome = step(stamp.c_str(), "writing the schema version");
      }
    }
    if (outcome) outcome = step("COMMIT", "committing the schema upgrade");
    if (!outcome) rollback(c);
    return outcome;
  }

  // ---- reading ----

  // A connection of the pool for one call, connected (again) when it is not usable.
  class reader_lease {
   public:
    explicit reader_lease(const impl& owner) : owner_(owner) {
      std::unique_lock lock(owner_.readers_mutex);
      owner_.readers_cv.wait(lock, [&] { return !owner_.idle_readers.empty(); });
      conn_ = std::move(owner_.idle_readers.back());
      owner_.idle_readers.pop_back();
    }
    ~reader_lease() {
      if (!conn_->usable()) *conn_ = connection{};
      {
        std::lock_guard lock(owner_.readers_mutex);
        owner_.idle_readers.push_back(std::move(conn_));
      }
      owner_.readers_cv.notify_one();
    }
    reader_lease(const reader_lease&) = delete;
    reader_lease& operator=(const reader_lease&) = delete;

    result<connection*> get() {
      if (!conn_->usable()) {
        auto c = owner_.connect_prepared();
        if (!c) return c.error();
        *conn_ = std::move(*c);
      }
      return conn_.get();
    }

   private:
    const impl& owner_;
    std::unique_ptr<connection> conn_;
  };

  result<Booking> booking_of(std::string_view id, std::string_view json, std::string_view key) const {
    boost::system::error_code ec;
    auto value = boost::json::parse(json, ec);
    if (ec)
      return Error(errc::store_failed,
                   label + ": booking '" + std::string(id) + "' is stored as malformed JSON");
    auto b = booking_from_json(value);
    if (!b)
      return Error(errc::store_failed,
                   label + ": booking '" + std::string(id) + "' is stored malformed: " + b.error().message);
    b->idempotency_key = std::string(key);
    return b;
  }

  result<std::optional<Booking>> load(std::string_view booking_id) const {
    reader_lease lease(*this);
    auto c = lease.get();
    if (!c) return c.error();
    const std::string id(booking_id);
    auto r = run_prepared(**c, "loading booking '" + id + "'", "load", {id.c_str()});
    if (!r) return r.error();
    if (PQntuples(r->get()) == 0) return std::optional<Booking>{};
    auto b = booking_of(id, PQgetvalue(r->get(), 0, 0), PQgetvalue(r->get(), 0, 1));
    if (!b) return b.error();
    return std::optional<Booking>{std::move(*b)};
  }

  result<std::optional<StoredKey>> find_key(std::string_view user, std::string_view key) const {
    reader_lease lease(*this);
    auto c = lease.get();
    if (!c) return c.error();
    const std::string u(user), k(key);
    auto r = run_prepared(**c, "looking up idempotency key '" + k + "'", "find_key", {u.c_str(), k.c_str()});
    if (!r) return r.error();
    if (PQntuples(r->get()) == 0) return std::optional<StoredKey>{};
    const auto* row = r->get();
    return std::optional<StoredKey>{
        StoredKey{u, k, PQgetvalue(row, 0, 0), PQgetvalue(row, 0, 1),
                  wall_clock::time_point(std::chrono::duration_cast<wall_clock::duration>(
                      std::chrono::milliseconds(std::atoll(PQgetvalue(row, 0, 2)))))}};
  }

  result<RecoveredState> recover(wall_clock::time_point keys_since) const {
    reader_lease lease(*this);
    auto c = lease.get();
    if (!c) return c.error();
    connection& conn = **c;
    // Every processing booking nobody holds a live claim on becomes this node's (a process that
    // died, or this one's predecessor); the snapshot below returns those this node holds.
    const std::string no_limit = std::to_string(std::numeric_limits<std::int64_t>::max());
    if (auto r = run_prepared(conn, "claiming undecided bookings", "claim",
                              {node.c_str(), lease_ms.c_str(), no_limit.c_str()});
        !r)
      return r.error();
    if (auto r =
            run_prepared(conn, "taking back this node's claims", "reclaim", {node.c_str(), lease_ms.c_str()});
        !r)
      return r.error();
    // One snapshot for every query below.
    if (auto r = run(conn, "recovering", "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", {}, false); !r)
      return r.error();
    auto outcome = recover_in_transaction(conn, keys_since);
    rollback(conn);
    if (outcome && !outcome->unpublished.empty()) {
      // The engine relays these now: without the stamp, rows that another store handed over at
      // its close (stale on purpose) would also be relayed by this store's first takeover pass
      // while the engine is still publishing them, a second relay of each (dropped by the bus as
      // a duplicate, but work). A failed stamp costs only that, so it does not fail recovery.
      const auto ids =
          text_array(outcome->unpublished, [](const Booking& b) -> const std::string& { return b.id; });
      (void)run_prepared(conn, "stamping the outbox being relayed", "stamp_outbox", {ids.c_str()});
    }
    return outcome;
  }

  static bool parse_count(const char* text, std::uint32_t& out) {
    const std::string_view s = text;
    auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
    return ec == std::errc() && ptr == s.data() + s.size();
  }

  result<RecoveredState> recover_in_transaction(connection& c, wall_clock::time_point keys_since) const {
    RecoveredState state;
    auto resources = run_prepared(c, "recovering resources", "resources", {});
    if (!resources) return resources.error();
    for (int i = 0; i < PQntuples(resources->get()); ++i) {
      ResourceState r;
      r.id = PQgetvalue(resources->get(), i, 0);
      if (!parse_count(PQgetvalue(resources->get(), i, 1), r.capacity) ||
          !parse_count(PQgetvalue(resources->get(), i, 2), r.reserved) ||
          !parse_count(PQgetvalue(resources->get(), i, 3), r.confirmed))
        return Error(errc::store_failed, label + ": resource '" + r.id + "' has counts out of range");
      r.version = std::strtoull(PQgetvalue(resources->get(), i, 4), nullptr, 10);
      state.resources.push_back(std::move(r));
    }
    auto live = run_prepared(c, "recovering bookings", "live", {node.c_str()});
    if (!live) return live.error();
    for (int i = 0; i < PQntuples(live->get()); ++i) {
      const std::string_view id = PQgetvalue(live->get(), i, 0), status_text = PQgetvalue(live->get(), i, 1);
      auto b = booking_of(id, PQgetvalue(live->get(), i, 2), PQgetvalue(live->get(), i, 3));
      if (!b) return b.error();
      if (b->status == BookingStatus::processing) {
        (void)parse_count(PQgetvalue(live->get(), i, 4), b->attempt);
        hold_claim(b->id);
      }
      if (to_string(b->status) != status_text)
        return Error(errc::store_failed, label + ": booking '" + std::string(id) + "' has status '" +
                                             std::string(status_text) + "' but its JSON says '" +
                                             to_string(b->status) + "'");
      (b->status == BookingStatus::processing ? state.processing : state.held).push_back(std::move(*b));
    }
    auto unpublished =
        run_prepared(c, "recovering the outbox", "unpublished", {node.c_str(), lease_ms.c_str()});
    if (!unpublished) return unpublished.error();
    for (int i = 0; i < PQntuples(unpublished->get()); ++i) {
      const auto* u = unpublished->get();
      auto b = booking_of(PQgetvalue(u, i, 0), PQgetvalue(u, i, 1), PQgetvalue(u, i, 2));
      if (!b) return b.error();
      state.unpublished.push_back(std::move(*b));
    }
    const auto since = std::to_string(unix_ms(keys_since));
    auto keys = run_prepared(c, "recovering idempotency keys", "keys", {since.c_str()});
    if (!keys) return keys.error();
    for (int i = 0; i < PQntuples(keys->get()); ++i) {
      const auto* k = keys->get();
      state.keys.push_back(StoredKey{PQgetvalue(k, i, 0), PQgetvalue(k, i, 1), PQgetvalue(k, i, 2),
                                     PQgetvalue(k, i, 3),
                                     wall_clock::time_point(std::chrono::duration_cast<wall_clock::duration>(
                                         std::chrono::milliseconds(std::atoll(PQgetvalue(k, i, 4)))))});
    }
    return state;
  }

  // ---- writing ----

  void enqueue(pending p) {
    {
      std::unique_lock lock(queue_mutex);
      if (!closed) {
        queue.push_back(std::move(p));
        lock.unlock();
        queue_cv.notify_one();
        return;
      }
    }
    if (p.done) p.done(Error(errc::store_failed, label + ": the store is closed"));
  }

  // The parameters of a version's put_booking call (pointing into `row`).
  static std::vector<const char*> params_of(const booking_row& row) {
    return {row.id.c_str(),
            row.user.c_str(),
            row.status.c_str(),
            row.version.c_str(),
            row.has_key ? row.key.c_str() : nullptr,
            row.has_fingerprint ? row.fingerprint.c_str() : nullptr,
            row.created_ms.c_str(),
            row.updated_ms.c_str(),
            row.has_expiry ? row.expires_ms.c_str() : nullptr,
            row.lines.c_str(),
            row.json.c_str(),
            row.resources.c_str(),
            row.units.c_str()};
  }

  // A version's own outcome from its reply ('ok', 'sold_out ...', 'duplicate_key ...'); the
  // group's transaction goes on either way. An error (not a refusal) fails the whole group.
  result<void> outcome_of(const booking_row& row, std::string_view reply,
                          std::optional<Error>& group_error) const {
    if (reply == "ok") return {};
    std::vector<std::string_view> parts;
    for (std::string_view rest = reply;;) {
      const auto tab = rest.find('\t');
      parts.push_back(rest.substr(0, tab));
      if (tab == std::string_view::npos) break;
      rest.remove_prefix(tab + 1);
    }
    if (parts[0] == "sold_out" && parts.size() == 4)
      return Error(errc::sold_out, label + ": booking '" + row.id + "' cannot become " + row.status +
                                       ": resource '" + std::string(parts[1]) + "' has " +
                                       std::string(parts[2]) + " units free, the booking needs " +
                                       std::string(parts[3]) + " (nothing of this version was stored)");
    if (parts[0] == "conflict" && parts.size() == 4) {
      // parts: stored version, stored status, the node that claimed it (processing only).
      if (parts[2] == "processing")
        return Error(
            errc::invalid_transition,
            label + ": booking '" + row.id + "' is being decided by another process (" +
                (parts[3].empty() ? std::string("nobody's claim") : "node '" + std::string(parts[3]) + "'") +
                "); this process's claim on it ran out, and its " + row.status + " version was not stored");
      return Error(errc::invalid_transition,
                   label + ": booking '" + row.id + "' was changed by another process meanwhile: version " +
                       std::string(parts[1]) + " is stored as " + std::string(parts[2]) + "; this " +
                       row.status + " version " + row.version + " was not stored");
    }
    if (parts[0] == "duplicate_key" && parts.size() == 2)
      return Error(errc::idempotency_conflict, label + ": user '" + row.user + "' already has booking '" +
                                                   std::string(parts[1]) + "' with idempotency key '" +
                                                   row.key + "' (booking '" + row.id + "' was not stored)");
    if (!group_error)
      group_error =
          failure("storing booking '" + row.id + "'", "unexpected reply '" + std::string(reply) + "'");
    return {};
  }

  // put_resource's reply: one row (updated or inserted: 1 or 0, units in use).
  result<void> outcome_of(const resource_row& row, const PGresult* r) const {
    if (PQntuples(r) == 1 && std::string_view(PQgetvalue(r, 0, 0)) == "1") return {};
    const std::string in_use = PQntuples(r) == 1 ? PQgetvalue(r, 0, 1) : "?";
    return Error(errc::capacity_in_use, label + ": resource '" + row.id + "' cannot get capacity " +
                                            row.capacity + ": " + in_use +
                                            " units are reserved or confirmed");
  }

  // Sends whatever libpq still buffers, reading replies meanwhile (the server stops reading
  // when its own output is not read: both sides' buffers full would be a deadlock).
  result<void> flush(connection& c, steady::time_point deadline) const {
    PGconn* pg = c.conn.get();
    for (;;) {
      const int rc = PQflush(pg);
      if (rc == 0) return {};
      if (rc < 0) {
        c.broken = true;
        return failure("sending", trimmed(PQerrorMessage(pg)));
      }
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - steady::now()).count();
      if (left <= 0) {
        c.broken = true;
        return failure("sending", "the server took nothing for " +
                                      std::to_string(options.statement_timeout.count()) + " ms plus 1 s");
      }
      pollfd p{PQsocket(pg), POLLIN | POLLOUT, 0};
      const int ready = ::poll(&p, 1, static_cast<int>(std::min<std::int64_t>(left, 1000)));
      if (ready > 0 && (p.revents & POLLIN) && !PQconsumeInput(pg)) {
        c.broken = true;
        return failure("sending", trimmed(PQerrorMessage(pg)));
      }
    }
  }

  // One transaction for the whole group, sent as one libpq pipeline: BEGIN, the resource locks,
  // every change's statement, COMMIT, then all the replies. One round trip per group instead of
  // one per change. Returns the group's outcome; each change's own refusal (which stored
  // nothing of it) is in its `outcome`.
  result<void> write_group(std::vector<pending>& group, const published_marks& group_marks,
                           std::vector<ResourceState>& counts) noexcept {
    try {
      if (!writer_conn.usable()) {
        writer_conn = connection{};
        auto c = connect_prepared();
        if (!c) return c.error();
        writer_conn = std::move(*c);
      }
      auto outcome = write_pipeline(group, group_marks, counts);
      PGconn* pg = writer_conn.conn.get();
      if (PQpipelineStatus(pg) != PQ_PIPELINE_OFF && !PQexitPipelineMode(pg)) writer_conn.broken = true;
      if (!writer_conn.broken && PQsetnonblocking(pg, 0) != 0) writer_conn.broken = true;
      if (!outcome) rollback(writer_conn);
      return outcome;
    } catch (const std::exception& e) {
      writer_conn.broken = true;  // whatever state the pipeline is in, the connection is not reused
      return Error(errc::store_failed, label + ": " + e.what());
    }
  }

  result<void> write_pipeline(std::vector<pending>& group, const published_marks& group_marks,
                              std::vector<ResourceState>& counts) {
    connection& c = writer_conn;
    PGconn* pg = c.conn.get();
    const auto deadline = steady::now() + options.statement_timeout + std::chrono::seconds(1);
    if (PQsetnonblocking(pg, 1) != 0 || !PQenterPipelineMode(pg)) {
      c.broken = true;
      return failure("starting a pipeline", trimmed(PQerrorMessage(pg)));
    }
    std::set<std::string> lock;
    for (const auto& p : group) {
      if (const auto* b = std::get_if<booking_row>(&p.row)) lock.insert(b->lock.begin(), b->lock.end());
      if (const auto* r = std::get_if<resource_row>(&p.row)) lock.insert(r->id);
    }
    std::string lock_json;
    if (!lock.empty()) {
      boost::json::array ids;
      for (const auto& id : lock) ids.emplace_back(id);
      lock_json = boost::json::serialize(ids);
    }

    // Send everything. Nothing is read until the sync: a failed send breaks the connection.
    bool sent = PQsendQueryParams(pg, "BEGIN", 0, nullptr, nullptr, nullptr, nullptr, 0);
    // Marks alone need not wait for the disk: a mark lost in a crash only has its version
    // relayed again.
    const bool marks_only = group.empty();
    if (sent && marks_only)
      sent = PQsendQueryParams(pg, "SET LOCAL synchronous_commit TO off", 0, nullptr, nullptr, nullptr,
                               nullptr, 0);
    const char* lock_param = lock_json.c_str();
    if (sent && !lock.empty())
      sent = PQsendQueryPrepared(pg, "lock_resources", 1, &lock_param, nullptr, nullptr, 0);
    for (std::size_t i = 0; i < group.size() && sent; ++i) {
      if (const auto* b = std::get_if<booking_row>(&group[i].row)) {
        const auto params = params_of(*b);
        sent = PQsendQueryPrepared(pg, "put_booking", static_cast<int>(params.size()), params.data(), nullptr,
                                   nullptr, 0);
      } else {
        const auto& r = std::get<resource_row>(group[i].row);
        const char* params[] = {r.id.c_str(), r.capacity.c_str()};
        sent = PQsendQueryPrepared(pg, "put_resource", 2, params, nullptr, nullptr, 0);
      }
    }
    std::pair<std::string, std::string> mark_params;
    if (sent && !group_marks.empty()) {
      mark_params = group_marks.literals();
      const char* params[] = {mark_params.first.c_str(), mark_params.second.c_str()};
      sent = PQsendQueryPrepared(pg, "unmark", 2, params, nullptr, nullptr, 0);
    }
    // What the group left on its resources, for the engine to publish (only when it asked).
    const bool read_counts = !lock.empty() && wants_counts.load(std::memory_order_acquire);
    if (sent && read_counts) sent = PQsendQueryPrepared(pg, "counts", 1, &lock_param, nullptr, nullptr, 0);
    if (sent) sent = PQsendQueryParams(pg, "COMMIT", 0, nullptr, nullptr, nullptr, nullptr, 0);
    if (sent) sent = PQpipelineSync(pg);
    if (!sent) {
      c.broken = true;
      return failure("sending a transaction", trimmed(PQerrorMessage(pg)));
    }
    if (auto r = flush(c, deadline); !r) return r;

    // Read every reply, in the order sent; the first error is the group's (after it, the server
    // skips the rest: PGRES_PIPELINE_ABORTED).
    std::optional<Error> group_error;
    auto next_reply = [&](std::string_view doing, auto&& on_result) -> result<void> {
      for (;;) {
        if (auto r = wait_ready(c, deadline, doing); !r) return r;
        pg_result r(PQgetResult(pg));
        if (!r) return {};
        const auto st = PQresultStatus(r.get());
        if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) {
          on_result(r.get());
        } else if (st != PGRES_PIPELINE_ABORTED && !group_error) {
          group_error = result_failure(c, r.get(), doing);
        }
      }
    };
    auto ignore = [](const PGresult*) {};
    if (auto r = next_reply("starting a transaction", ignore); !r) return r;
    if (marks_only)
      if (auto r = next_reply("starting a transaction", ignore); !r) return r;
    if (!lock.empty())
      if (auto r = next_reply("locking resources", ignore); !r) return r;
    for (auto& p : group) {
      result<void> step;
      if (const auto* b = std::get_if<booking_row>(&p.row)) {
        step = next_reply("storing booking '" + b->id + "'", [&](const PGresult* r) {
          p.outcome = outcome_of(*b, PQntuples(r) == 1 ? PQgetvalue(r, 0, 0) : "", group_error);
        });
      } else {
        const auto& row = std::get<resource_row>(p.row);
        step = next_reply("storing resource '" + row.id + "'",
                          [&](const PGresult* r) { p.outcome = outcome_of(row, r); });
      }
      if (!step) return step;
    }
    if (!group_marks.empty())
      if (auto r = next_reply("marking versions published", ignore); !r) return r;
    if (read_counts) {
      auto r = next_reply("reading resource counts", [&](const PGresult* rows) {
        for (int i = 0; i < PQntuples(rows); ++i) {
          ResourceState st;
          st.id = PQgetvalue(rows, i, 0);
          if (!parse_count(PQgetvalue(rows, i, 1), st.capacity) ||
              !parse_count(PQgetvalue(rows, i, 2), st.reserved) ||
              !parse_count(PQgetvalue(rows, i, 3), st.confirmed))
            continue;  // counts beyond 32 bits (another program's rows): not published
          st.version = std::strtoull(PQgetvalue(rows, i, 4), nullptr, 10);
          counts.push_back(std::move(st));
        }
      });
      if (!r) return r;
    }
    if (auto r = next_reply("committing", ignore); !r) return r;
    // The sync's own result ends the pipeline.
    if (auto r = wait_ready(c, deadline, "committing"); !r) return r;
    pg_result sync(PQgetResult(pg));
    if (!sync || PQresultStatus(sync.get()) != PGRES_PIPELINE_SYNC) {
      c.broken = true;
      if (!group_error) group_error = failure("committing", "the pipeline did not end where expected");
    }
    if (group_error) return *group_error;
    return {};
  }

  static void run_writer(std::shared_ptr<impl> self) { self->writer_loop(); }

  void writer_loop() {
    std::vector<pending> group;
    published_marks group_marks;
    for (;;) {
      try {
        {
          std::unique_lock lock(queue_mutex);
          queue_cv.wait(lock, [&] { return stopping || !queue.empty() || !marks.empty(); });
          if (queue.empty() && marks.empty()) {
            closed = true;
            break;
          }
          while (!queue.empty() && group.size() < options.max_group) {
            group.push_back(std::move(queue.front()));
            queue.pop_front();
          }
          std::swap(group_marks, marks);
        }
        // The marks ride along (no transaction of their own while changes come); when the
        // transaction fails they are forgotten, which at worst has a version relayed again
        // after a restart (the bus drops it as a duplicate).
        std::vector<ResourceState> counts;
        auto outcome = write_group(group, group_marks, counts);
        if (!outcome) counts.clear();  // rolled back: nothing changed
        group_marks.marks.clear();
        healthy.store(outcome.has_value(), std::memory_order_relaxed);
        if (outcome) track_claims(group);
        transactions.fetch_add(1, std::memory_order_relaxed);
        hand_over(std::move(group), std::move(outcome), std::move(counts));
      } catch (const std::exception& e) {
        hand_over(std::move(group), Error(errc::store_failed, label + ": " + e.what()), {});
      }
      group = {};
    }
    writer_conn = connection{};
    {
      std::lock_guard lock(done_mutex);
      writer_finished = true;
    }
    done_cv.notify_one();
  }

  void hand_over(std::vector<pending> group, result<void> outcome,
                 std::vector<ResourceState> counts) noexcept {
    try {
      {
        std::lock_guard lock(done_mutex);
        done_queue.emplace_back(std::move(group), std::move(outcome), std::move(counts));
      }
      done_cv.notify_one();
    } catch (...) {
      finish(group, Error(errc::store_failed, label + ": out of memory"));
    }
  }

  static void run_completer(std::shared_ptr<impl> self) { self->completer_loop(); }

  void completer_loop() {
    current_writer = this;  // callbacks run here: commit() from one must not wait for itself
    for (;;) {
      done_group next;
      {
        std::unique_lock lock(done_mutex);
        done_cv.wait(lock, [&] { return writer_finished || !done_queue.empty(); });
        if (done_queue.empty()) break;
        next = std::move(done_queue.front());
        done_queue.pop_front();
      }
      // Counts first: once a change's callback ran, its engine may take it as done (shutdown
      // clears on_resource_counts once nothing is in flight), and the counts must be out by then.
      report_counts(next.counts);
      finish(next.changes, next.outcome);
    }
    current_writer = nullptr;
  }

  // Runs the callbacks of a group in commit order, each once: the group's failure, or each
  // change's own outcome when the group committed.
  static void finish(std::vector<pending>& group, const result<void>& outcome) noexcept {
    for (auto& p : group) {
      if (!p.done) continue;
      auto done = std::move(p.done);
      p.done = nullptr;
      try {
        done(outcome ? p.outcome : outcome);
      } catch (...) {
        // A throwing callback must not stop the writer nor keep the others from running.
      }
    }
  }

  // Before a group's callbacks, on the completion thread (commit order): its resources' counts to
  // on_resource_counts's callback.
  void report_counts(std::vector<ResourceState>& counts) noexcept {
    if (counts.empty()) return;
    std::lock_guard lock(counter_mutex);
    if (!counter) return;
    try {
      counter(std::move(counts));
    } catch (...) {
      // The engine's callback must not stop the completion thread.
    }
  }

  bool on_writer_thread() const noexcept { return current_writer == this; }

  // ---- claims ----

  static void run_leases(std::shared_ptr<impl> self) { self->lease_loop(); }

  // On a connection of its own: renews this node's claims every lease/3 and, while an engine
  // takes them (on_takeover), claims bookings whose lease ran out, every lease/5 (at most
  // 500 ms). A failure (the database away) is tried again at the next turn.
  void lease_loop() {
    connection conn;
    const auto renew_every = options.lease / 3;
    const auto poll_every =
        options.poll_interval.count() > 0
            ? options.poll_interval
            : std::min<std::chrono::milliseconds>(options.lease / 5, std::chrono::milliseconds(500));
    // After a failure: a new attempt this long after, never sooner (no spinning while the
    // database is away), never later than a renewal is due.
    const auto retry_every = std::min<std::chrono::milliseconds>(poll_every, renew_every);
    auto next_renew = steady::now() + renew_every;
    auto next_poll = steady::now();  // the first turn at once: connected and listening from the start
    for (;;) {
      const bool woken = wait_for_turn(conn, std::min(next_renew, next_poll));
      if (lease_stopping.load()) break;
      try {
        if (!conn.usable()) {
          conn = connection{};
          if (auto c = connect_prepared()) {
            conn = std::move(*c);
            // Another store closing says so (hand_off); the poll is the fallback for one that died.
            if (!run(conn, "listening for hand-overs", "LISTEN pushbook_handover", {}, false))
              conn.broken = true;
          }
        }
        bool ok = conn.usable();
        const auto now = steady::now();
        const bool renew_due = now >= next_renew;
        if (ok && renew_due) {
          // Also the health probe of an idle store (the writer's transactions are the other).
          const auto ids = held_claims();
          ok = ids == "{}" ? bool(run(conn, "probing the database", "SELECT 1", {}, false))
                           : bool(run_prepared(conn, "renewing claims", "renew",
                                               {node.c_str(), lease_ms.c_str(), ids.c_str()}));
        }
        if (renew_due || !ok) healthy.store(ok, std::memory_order_relaxed);
        if (ok && (woken || now >= next_poll)) {
          take_over_expired(conn);
          next_poll = steady::now() + poll_every;
        }
        if (!ok) {
          next_renew = steady::now() + retry_every;
          next_poll = next_renew;
        } else if (renew_due) {
          next_renew = steady::now() + renew_every;
        }
      } catch (const std::exception&) {
        conn.broken = true;  // out of memory or the like: a new connection next turn
      }
    }
    hand_off(conn);
  }

  // Waits until `until`, the store stops, wake_leases(), or a notification on `conn` (another
  // store handed its work over). True when woken early for work.
  bool wait_for_turn(connection& conn, steady::time_point until) {
    bool woken = false;
    for (;;) {
      if (lease_stopping.load()) return false;
      if (conn.usable())
        while (PGnotify* n = PQnotifies(conn.conn.get())) {
          woken = true;
          PQfreemem(n);
        }
      if (woken) return true;
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(until - steady::now()).count();
      if (left <= 0) return false;
      pollfd fds[2] = {{wake_fd, POLLIN, 0}, {conn.usable() ? PQsocket(conn.conn.get()) : -1, POLLIN, 0}};
      if (::poll(fds, 2, static_cast<int>(std::min<std::int64_t>(left, 60000))) < 0 && errno != EINTR) {
        std::this_thread::sleep_for(std::chrono::milliseconds(std::min<std::int64_t>(left, 100)));
        continue;
      }
      if (fds[0].revents & POLLIN) {
        std::uint64_t count = 0;
        (void)!::read(wake_fd, &count, sizeof count);
        woken = true;
      }
      if ((fds[1].revents & (POLLIN | POLLERR | POLLHUP)) && !PQconsumeInput(conn.conn.get()))
        conn.broken = true;  // the server went away: the next turn reconnects
    }
  }

  // The store is closing (its engine has shut down): the bookings this node still claims (its
  // engine did not decide them) and the versions it left unpublished go to the other stores now,
  // not once the lease runs out; NOTIFY wakes them. With the database away (no connection within
  // connect_timeout), the lease does it.
  void hand_off(connection& conn) noexcept {
    try {
      const auto claims = held_claims(), versions = unpublished_versions();
      if (claims == "{}" && versions == "{}") return;  // nothing to hand over
      if (!conn.usable()) {
        conn = connection{};
        if (auto c = connect_prepared()) conn = std::move(*c);
      }
      if (conn.usable())
        (void)run_prepared(conn, "handing over", "hand_off",
                           {node.c_str(), claims.c_str(), versions.c_str()});
    } catch (...) {
      // Nothing handed over: the lease runs out instead.
    }
  }

  // The processing bookings this node's engine is deciding: the claims the lease thread renews
  // (a booking the engine no longer holds, a first version whose commit outcome was unknown,
  // say, is not renewed: its claim runs out and any node takes it over).
  void hold_claim(const std::string& id) const {
    std::lock_guard lock(claims_mutex);
    holding.insert(id);
  }
  void drop_claim(const std::string& id) const {
    std::lock_guard lock(claims_mutex);
    holding.erase(id);
  }
  bool holds_claim(const std::string& id) const {
    std::lock_guard lock(claims_mutex);
    return holding.contains(id);
  }
  // The bookings whose latest version this store stored and was not told is published (for
  // hand_off), as a text[] literal.
  std::string unpublished_versions() const {
    std::lock_guard lock(claims_mutex);
    return text_array(unmarked, [](const auto& entry) -> const std::string& { return entry.first; });
  }
  void mark_published(std::string_view id, std::uint64_t version) const {
    std::lock_guard lock(claims_mutex);
    if (auto it = unmarked.find(std::string(id)); it != unmarked.end() && it->second <= version)
      unmarked.erase(it);
  }

  std::string held_claims() const {
    std::lock_guard lock(claims_mutex);
    return text_array(holding, [](const std::string& id) -> const std::string& { return id; });
  }

  // After a group committed: its processing versions are this node's to decide, its other
  // versions (and decisions refused as another node's) no longer.
  void track_claims(const std::vector<pending>& group) const {
    for (const auto& p : group) {
      const auto* b = std::get_if<booking_row>(&p.row);
      if (!b) continue;
      if (p.outcome) {
        std::lock_guard lock(claims_mutex);
        auto& latest = unmarked[b->id];
        latest = std::max<std::uint64_t>(latest, std::strtoull(b->version.c_str(), nullptr, 10));
      }
      if (p.outcome && b->status == "processing")
        hold_claim(b->id);
      else if (p.outcome || p.outcome.error().is(errc::invalid_transition))
        drop_claim(b->id);
    }
  }

  // Claims processing bookings whose lease ran out, a batch at a time, and hands each to the
  // engine in first-stored order. Under taker_mutex: on_takeover(nullptr) waits for this, and
  // nothing is claimed without an engine to decide it.
  void take_over_expired(connection& conn) {
    std::lock_guard hold(taker_mutex);
    constexpr int batch = 100;
    const std::string limit = std::to_string(batch);
    while (taker) {
      auto r = run_prepared(conn, "relaying what other processes left", "stale_outbox",
                            {lease_ms.c_str(), limit.c_str()});
      if (!r) return;
      hand_over(r->get(), -1, Takeover::relay);
      if (PQntuples(r->get()) < batch) break;
    }
    while (taker) {
      auto r = run_prepared(conn, "taking over bookings", "claim",
                            {node.c_str(), lease_ms.c_str(), limit.c_str()});
      if (!r) return;
      hand_over(r->get(), 4, Takeover::decide);
      if (PQntuples(r->get()) < batch) return;
    }
  }

  // Hands rows (seq, id, booking, idem_key[, attempt at column `attempt_column`]) to the taker in
  // seq order. Under taker_mutex.
  void hand_over(const PGresult* rows, int attempt_column, Takeover what) {
    std::vector<std::pair<std::int64_t, Booking>> got;
    for (int i = 0; i < PQntuples(rows); ++i) {
      auto b = booking_of(PQgetvalue(rows, i, 1), PQgetvalue(rows, i, 2), PQgetvalue(rows, i, 3));
      if (!b) continue;  // malformed in the database: no engine can take it
      if (attempt_column >= 0) (void)parse_count(PQgetvalue(rows, i, attempt_column), b->attempt);
      got.emplace_back(std::atoll(PQgetvalue(rows, i, 0)), std::move(*b));
    }
    std::sort(got.begin(), got.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
    for (auto& [seq, b] : got) {
      const std::string id = b.id;
      if (what == Takeover::decide) {
        // Its own claim ran out (the database was away longer than the lease) while its engine
        // still decides it: claimed again, not handed over twice.
        if (holds_claim(id)) continue;
        hold_claim(id);
      }
      taken_over.fetch_add(1, std::memory_order_relaxed);
      try {
        taker(std::move(b), what);
      } catch (...) {
        // The engine could not take it (out of memory): its claim is not renewed, so it is
        // taken over again once it runs out; a relay, once its outbox stamp is older than the
        // lease.
        if (what == Takeover::decide) drop_claim(id);
      }
    }
  }

  void stop_leases() {
    lease_stopping.store(true);
    wake_leases();
    if (!lease_thread.joinable()) return;
    if (lease_thread.get_id() == std::this_thread::get_id())
      lease_thread.detach();
    else
      lease_thread.join();
  }
};

PostgresStore::PostgresStore(std::shared_ptr<impl> state) : impl_(std::move(state)) {}

PostgresStore::~PostgresStore() {
  {
    std::lock_guard lock(impl_->queue_mutex);
    impl_->stopping = true;
  }
  impl_->queue_cv.notify_one();
  if (impl_->on_writer_thread()) {
    impl_->writer.detach();
    impl_->completer.detach();
  } else {
    if (impl_->writer.joinable()) impl_->writer.join();
    if (impl_->completer.joinable()) impl_->completer.join();
  }
  // Claims are no longer renewed: another process takes over what this one did not decide
  // once the lease runs out.
  impl_->stop_leases();
}

result<std::shared_ptr<PostgresStore>> PostgresStore::open(const std::string& conninfo,
                                                           PostgresOptions options) {
  try {
    auto state = std::make_shared<impl>(conninfo, options);
    if (auto r = state->parse_conninfo(); !r) return r.error();
    auto c = state->try_connect();
    if (!c) return c.error();
    if (auto r = state->migrate(*c); !r) return r.error();
    if (auto r = state->prepare(*c); !r) return r.error();
    state->writer_conn = std::move(*c);
    state->healthy = true;
    // Readers connect on first use (and again after a failure).
    for (std::size_t i = 0; i < state->options.pool_size; ++i)
      state->idle_readers.push_back(std::make_unique<connection>());
    state->completer = std::thread(&impl::run_completer, state);
    state->writer = std::thread(&impl::run_writer, state);
    state->lease_thread = std::thread(&impl::run_leases, state);
    return std::shared_ptr<PostgresStore>(new PostgresStore(std::move(state)));
  } catch (const std::exception& e) {
    return Error(errc::store_failed, "cannot open PostgreSQL store: " + std::string(e.what()));
  }
}

void PostgresStore::commit_async(const StateChange& change, CommitCallback done) {
  pending p;
  try {
    const Booking& b = change.booking;
    booking_row row;
    row.id = b.id;
    row.user = b.user;
    row.status = to_string(b.status);
    row.version = std::to_string(b.version);
    row.has_key = !b.idempotency_key.empty();
    row.key = b.idempotency_key;
    row.has_fingerprint = !change.fingerprint.empty();
    row.fingerprint = std::string(change.fingerprint);
    row.created_ms = std::to_string(unix_ms(b.created_at));
    row.updated_ms = std::to_string(unix_ms(b.updated_at));
    row.has_expiry = b.expires_at.has_value();
    if (b.expires_at) row.expires_ms = std::to_string(unix_ms(*b.expires_at));
    boost::json::array lines;
    std::map<std::string, std::uint64_t> units;  // std::string's order is byte order, as COLLATE "C"
    for (const auto& l : b.lines) {
      lines.push_back(boost::json::object{{"resource", l.resource}, {"quantity", l.quantity}});
      units[l.resource] += l.quantity;
    }
    row.resources = "{";
    row.units = "{";
    for (const auto& [resource, quantity] : units) {
      if (row.resources.size() > 1) {
        row.resources += ',';
        row.units += ',';
      }
      append_array_text(row.resources, resource);
      row.units += std::to_string(quantity);
      if (may_change_units(b.status)) row.lock.push_back(resource);
    }
    row.resources += '}';
    row.units += '}';
    row.lines = boost::json::serialize(lines);
    row.json = boost::json::serialize(to_json(b));
    p.row = std::move(row);
  } catch (const std::exception& e) {
    if (done) done(Error(errc::store_failed, impl_->where() + ": cannot serialise booking: " + e.what()));
    return;
  }
  p.done = std::move(done);
  impl_->enqueue(std::move(p));
}

result<void> PostgresStore::commit(const StateChange& change) {
  if (impl_->on_writer_thread())
    return Error(errc::store_failed,
                 impl_->where() + ": commit() called from a commit callback would wait for itself");
  auto w = std::make_shared<waiter>();
  commit_async(change, w->callback(w));
  return w->wait();
}

result<void> PostgresStore::put_resource(std::string_view resource_id, std::uint32_t capacity) {
  if (impl_->on_writer_thread())
    return Error(errc::store_failed,
                 impl_->where() + ": put_resource() called from a commit callback would wait for itself");
  auto w = std::make_shared<waiter>();
  impl_->enqueue(
      pending{resource_row{std::string(resource_id), std::to_string(capacity)}, w->callback(w), {}});
  return w->wait();
}

result<std::optional<Booking>> PostgresStore::load(std::string_view booking_id) const {
  try {
    return impl_->load(booking_id);
  } catch (const std::exception& e) {
    return Error(errc::store_failed, impl_->where() + ": " + e.what());
  }
}

result<RecoveredState> PostgresStore::recover(wall_clock::time_point keys_since) {
  try {
    return impl_->recover(keys_since);
  } catch (const std::exception& e) {
    return Error(errc::store_failed, impl_->where() + ": " + e.what());
  }
}

void PostgresStore::published(std::string_view booking_id, std::uint64_t version) {
  try {
    impl_->mark_published(booking_id, version);
    {
      std::lock_guard lock(impl_->queue_mutex);
      if (impl_->closed) return;  // the writer is gone: relayed again after a restart
      impl_->marks.marks.emplace_back(booking_id, version);
    }
    impl_->queue_cv.notify_one();
  } catch (...) {
    // Out of memory: the mark is lost, and the version at worst relayed again after a restart.
  }
}

result<std::optional<StoredKey>> PostgresStore::find_key(std::string_view user, std::string_view key) const {
  try {
    return impl_->find_key(user, key);
  } catch (const std::exception& e) {
    return Error(errc::store_failed, impl_->where() + ": " + e.what());
  }
}

bool PostgresStore::on_resource_counts(std::function<void(std::vector<ResourceState>)> report) {
  impl_->wants_counts.store(static_cast<bool>(report), std::memory_order_release);
  std::lock_guard lock(impl_->counter_mutex);
  impl_->counter = std::move(report);
  return true;
}

void PostgresStore::on_takeover(std::function<void(Booking, Takeover)> take) {
  {
    std::lock_guard lock(impl_->taker_mutex);
    impl_->taker = std::move(take);
  }
  impl_->wake_leases();
}

const std::string& PostgresStore::node_id() const noexcept { return impl_->node; }
std::uint64_t PostgresStore::taken_over() const noexcept {
  return impl_->taken_over.load(std::memory_order_relaxed);
}

bool PostgresStore::available() const noexcept { return impl_->healthy.load(std::memory_order_relaxed); }
std::uint64_t PostgresStore::transactions() const noexcept {
  return impl_->transactions.load(std::memory_order_relaxed);
}
std::size_t PostgresStore::queued() const {
  std::lock_guard lock(impl_->queue_mutex);
  return impl_->queue.size();
}
int PostgresStore::schema_version() noexcept { return current_schema_version; }

}  // namespace pushbook
