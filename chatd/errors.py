"""One error tree for chatd.

Every error a handler can see is a :class:`ChatdError`. Each class carries the
stable wire ``code`` sent in protocol error frames and the HTTP ``status`` used by
the HTTP API, so the transport layers never have to guess. Third-party exceptions
(psycopg, jwt, OS errors) are mapped to these where they enter chatd.
"""

from __future__ import annotations

from typing import Any


class ChatdError(Exception):
    """Base of every error chatd raises on purpose."""

    code = "internal"
    status = 500

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


# --- configuration and start-up ------------------------------------------------


class ConfigError(ChatdError):
    """chatd.toml or CHATD_* environment is wrong. ``problems`` lists each one."""

    code = "config_invalid"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


class StartupError(ChatdError):
    """chatd cannot start (port in use, database cannot be started, ...)."""

    code = "startup_failed"


class EmbeddedDatabaseError(StartupError):
    """The embedded PostgreSQL could not be prepared, started or stopped."""

    code = "embedded_db_failed"


# --- client errors (the peer did something wrong) -------------------------------


class ClientError(ChatdError):
    status = 400


class BadFrame(ClientError):
    code = "bad_frame"


class UnsupportedVersion(ClientError):
    code = "unsupported_version"


class UnknownCommand(ClientError):
    code = "unknown_command"


class InvalidField(ClientError):
    code = "invalid_field"
    status = 422


class TooLarge(ClientError):
    code = "too_large"
    status = 413


class Unauthorized(ClientError):
    code = "unauthorized"
    status = 401


class TokenExpired(Unauthorized):
    code = "token_expired"


class Forbidden(ClientError):
    code = "forbidden"
    status = 403


class NotFound(ClientError):
    code = "not_found"
    status = 404


class Conflict(ClientError):
    code = "conflict"
    status = 409


class RateLimited(ClientError):
    code = "rate_limited"
    status = 429

    def __init__(self, message: str = "", *, retry_after: float, **details: Any) -> None:
        super().__init__(message, retry_after=retry_after, **details)
        self.retry_after = retry_after


# --- server-side errors ----------------------------------------------------------


class Unavailable(ChatdError):
    """A dependency (the database) cannot be reached now; the client may retry."""

    code = "unavailable"
    status = 503

    def __init__(self, message: str = "", *, retry_after: float = 1.0, **details: Any) -> None:
        super().__init__(message, retry_after=retry_after, **details)
        self.retry_after = retry_after


class Contention(Unavailable):
    """Two writers raced (serialization failure, deadlock, a key committed meanwhile): retry."""

    code = "unavailable"

    def __init__(self, message: str = "write contention, retry", **details: Any) -> None:
        super().__init__(message, retry_after=0.05, **details)


class Timeout(Unavailable):
    """A wait on the outside world passed its configured deadline."""

    code = "unavailable"

    def __init__(self, message: str = "timed out", **details: Any) -> None:
        super().__init__(message, **details)


class Internal(ChatdError):
    code = "internal"
    status = 500
