"""Enums and exceptions of pushbook (pure Python; the C++ core raises and returns these)."""
import enum


class Status(str, enum.Enum):
    """A booking's state. A str: ``Status.CONFIRMED == "confirmed"``."""

    PROCESSING = "processing"
    HELD = "held"
    CONFIRMED = "confirmed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    RELEASED = "released"
    EXPIRED = "expired"

    def __str__(self):
        return self.value


class Reason(str, enum.Enum):
    """Why a booking was rejected."""

    SOLD_OUT = "sold_out"
    REJECTED_BY_HANDLER = "rejected_by_handler"
    HANDLER_TIMEOUT = "handler_timeout"
    HANDLER_ERROR = "handler_error"
    SHUTDOWN = "shutdown"
    RECOVERY = "recovery"

    def __str__(self):
        return self.value


class Error(Exception):
    """Base of every pushbook error. ``.code`` is the stable error code ("not_found", ...)."""

    def __init__(self, message, code="internal"):
        super().__init__(message)
        self.message = message
        self.code = code


class ValidationError(Error, ValueError):
    """The request is malformed or impossible (bad quantity, unknown field type, too many units)."""


class NotFound(Error, LookupError):
    """No such booking or resource."""


class AlreadyExists(Error):
    """A resource with that id exists already."""


class IdempotencyConflict(Error):
    """The idempotency key was used before for a different request."""


class InvalidTransition(Error):
    """The booking's state does not allow this (e.g. cancelling a rejected booking)."""


class Overloaded(Error):
    """A bounded queue is full, or the component is shutting down: back off and retry."""


class QuotaExceeded(Error):
    """A per-user quota (bookings being decided, units held) is used up: retry once some are
    decided."""


class Unauthorized(Error):
    """Missing or bad credentials, or not allowed."""


# Shown as pushbook.NotFound (not pushbook._types.NotFound) in tracebacks and reprs: the package
# is where users import them from.
for _cls in (Status, Reason, Error, ValidationError, NotFound, AlreadyExists, IdempotencyConflict,
             InvalidTransition, Overloaded, QuotaExceeded, Unauthorized):
    _cls.__module__ = "pushbook"
del _cls
