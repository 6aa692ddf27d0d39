"""chatd.toml + CHATD_* environment -> one frozen :class:`Config`.

The schema lives in the dataclasses below: each field's ``metadata`` holds its
meaning (``doc``), its allowed range or choices, and whether it is a secret. The
loader, ``chatd check-config``, docs/config.md and config/chatd.example.toml are
all derived from these classes, so they cannot drift apart.

Only this module reads files or the environment (STYLE.md convention 6).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from chatd.errors import ConfigError

ENV_PREFIX = "CHATD_"


def _f(default: Any, doc: str, **meta: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc, **meta})
    return field(default=default, metadata={"doc": doc, **meta})


@dataclass(frozen=True)
class HttpConfig:
    host: str = _f("127.0.0.1", "Address the HTTP API listens on.")
    port: int = _f(8080, "TCP port of the HTTP API (0 = any free port).", min=0, max=65535)


@dataclass(frozen=True)
class WebSocketConfig:
    host: str = _f("127.0.0.1", "Address the WebSocket listener binds.")
    port: int = _f(8081, "TCP port of the WebSocket listener (0 = any free port).", min=0, max=65535)
    path: str = _f("/ws", "URL path clients connect to.", pattern=r"^/[\x21-\x7e]*$")
    backlog: int = _f(4096, "listen() backlog of the WebSocket socket.", min=16, max=65535)
    handshake_timeout: float = _f(10.0, "Seconds a new TCP connection has to finish the HTTP upgrade.", min=0.1, max=300)
    hello_timeout: float = _f(10.0, "Seconds after the upgrade within which `hello` must arrive (close 4001).", min=0.1, max=300)
    close_timeout: float = _f(5.0, "Seconds to wait for the peer's close frame before dropping the socket.", min=0.1, max=60)
    max_frame_bytes: int = _f(262144, "Largest WebSocket message accepted from a client (close 1009 beyond).", min=1024, max=16 * 1024 * 1024)
    max_pending_bytes: int = _f(1024 * 1024, "Bytes queued for one slow client before it is closed with 4008 (slow consumer).", min=4096, max=256 * 1024 * 1024)
    ping_interval: float = _f(30.0, "Seconds between server pings on an idle connection (0 = never).", min=0, max=3600)
    max_bad_frames: int = _f(20, "Malformed frames tolerated per connection before close 1008.", min=1, max=100000)


@dataclass(frozen=True)
class EmbeddedConfig:
    state_dir: Path = _f(Path(".state"), "Directory for the embedded PostgreSQL data, socket and log (relative to the config file).")
    port: int = _f(0, "TCP port of the embedded PostgreSQL on 127.0.0.1 (0 = pick a free one, then keep it).", min=0, max=65535)
    run_as: str = _f("auto", "OS account the embedded PostgreSQL runs as when chatd runs as root ('auto' = nobody).")
    start_timeout: float = _f(60.0, "Seconds to wait for the embedded PostgreSQL to accept connections.", min=1, max=600)
    stop_timeout: float = _f(10.0, "Seconds to wait for the embedded PostgreSQL to stop before it is killed.", min=1, max=600)


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = _f("", "PostgreSQL (>= 14) URL, e.g. postgresql://chatd:pw@db:5432/chatd. Empty = embedded PostgreSQL.", secret=True)
    name: str = _f("chatd", "Database name created and used on the embedded PostgreSQL.", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    pool_size: int = _f(10, "Connections kept in the pool for reads (hello, sync, history, the HTTP API); the writer has writer.pipeline connections of its own.", min=1, max=500)
    acquire_timeout: float = _f(5.0, "Seconds to wait for a free pooled connection.", min=0.01, max=600)
    connect_timeout: float = _f(5.0, "Seconds to open one database connection.", min=0.1, max=600)
    query_timeout: float = _f(15.0, "Seconds any single query or transaction may take.", min=0.1, max=3600)
    migrate_on_start: bool = _f(True, "Apply pending migrations when `chatd serve` starts.")
    search_merge_interval: float = _f(1.0, "Seconds between merges of the message search index's pending entries into the index, done in the background on a pooled connection. Without them PostgreSQL merges inside whichever send batch finds the pending list over its limit (8 MB), stalling that batch's acks; keep the interval short enough that the list stays well under it.", min=0.05, max=60)
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig, metadata={"doc": "Embedded PostgreSQL (used when url is empty)."})


@dataclass(frozen=True)
class AuthConfig:
    hs256_secret: str = _f("", "Shared secret for HS256 access tokens (also used by `chatd token issue`).", secret=True)
    public_key_files: list[str] = _f([], "PEM files with RS256/ES256/EdDSA public keys that verify access tokens.")
    jwks_url: str = _f("", "JWKS URL whose keys verify access tokens (fetched with jwks_timeout, cached jwks_cache_seconds).")
    jwks_timeout: float = _f(5.0, "Seconds to fetch the JWKS document.", min=0.1, max=120)
    jwks_cache_seconds: float = _f(300.0, "Seconds a fetched JWKS stays cached.", min=1, max=86400)
    audience: str = _f("", "Required `aud` claim (empty = not checked).")
    issuer: str = _f("", "Required `iss` claim (empty = not checked).")
    leeway: float = _f(30.0, "Clock skew tolerated on exp/nbf, in seconds.", min=0, max=600)
    default_ttl: float = _f(3600.0, "Lifetime of tokens minted by `chatd token issue`, in seconds.", min=10, max=31 * 86400)


@dataclass(frozen=True)
class LimitsConfig:
    max_body_chars: int = _f(4000, "Longest message body, in characters.", min=1, max=100000)
    history_page_max: int = _f(100, "Most events one history page returns.", min=1, max=5000)
    sync_page_max: int = _f(100, "Most events per room one sync page returns.", min=1, max=10000)
    retention_events: int = _f(1000, "A client further behind than this many events in a room gets a snapshot instead of the gap (sync_gap_max in welcome).", min=1, max=10_000_000)
    typing_ttl: float = _f(6.0, "Seconds a typing indicator lasts without a refresh or stop.", min=0.5, max=120)
    presence_window: float = _f(0.25, "Seconds presence changes are coalesced before they are sent.", min=0, max=30)
    max_reactions_per_message: int = _f(50, "Distinct emoji allowed on one message.", min=1, max=1000)
    max_group_members: int = _f(10000, "Largest group size.", min=2, max=100000)
    commands_per_second: float = _f(50.0, "Sustained commands per second per connection before rate_limited.", min=1, max=100000)
    command_burst: int = _f(200, "Burst of commands allowed above the sustained rate.", min=1, max=100000)


@dataclass(frozen=True)
class WriterConfig:
    max_batch: int = _f(1000, "Most mutations committed in one group-commit transaction.", min=1, max=100000)
    queue_size: int = _f(20000, "Mutations waiting for the writer before senders are told unavailable.", min=1, max=10_000_000)
    pipeline: int = _f(2, "Batches of sends in flight at once, each on its own connection: a batch's statement runs while the one before is still publishing. The writer opens this many database connections of its own, besides database.pool_size. 1 = strictly one batch at a time.", min=1, max=16)
    linger: float = _f(0.002, "Seconds a batch may wait for more mutations before it starts. It waits only while they arrive fast enough that more are expected in that time than are queued, and only until that many have arrived: fuller batches cost the writer and the database less per message, for at most this much added ack latency. A send on a quiet server never waits. 0 = never wait.", min=0, max=0.1)


@dataclass(frozen=True)
class LogConfig:
    format: str = _f("console", "Log format: json (production) or console (development).", choices=("json", "console"))
    level: str = _f("info", "Lowest level logged.", choices=("debug", "info", "warning", "error"))


@dataclass(frozen=True)
class ServerConfig:
    shutdown_grace: float = _f(10.0, "Seconds SIGTERM/SIGINT allow for draining before everything is cancelled.", min=0.1, max=600)
    gc_freeze_interval: float = _f(0.02, "Seconds between passes that collect the young generations and gc.freeze() what survived, so full collections never walk long-lived connection state; a pass also runs after every 256 commands (0 = freeze only at start, no passes).", min=0, max=3600)
    gc_full_interval: float = _f(3600.0, "Seconds between full collections of everything, frozen objects included, which reclaim garbage cycles that were frozen (0 = never). One such pause grows with the number of live objects.", min=0, max=7 * 86400)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig, metadata={"doc": "Process-wide settings."})
    http: HttpConfig = field(default_factory=HttpConfig, metadata={"doc": "The HTTP API."})
    websocket: WebSocketConfig = field(default_factory=WebSocketConfig, metadata={"doc": "The WebSocket listener."})
    database: DatabaseConfig = field(default_factory=DatabaseConfig, metadata={"doc": "PostgreSQL."})
    auth: AuthConfig = field(default_factory=AuthConfig, metadata={"doc": "Access tokens."})
    limits: LimitsConfig = field(default_factory=LimitsConfig, metadata={"doc": "Protocol limits."})
    writer: WriterConfig = field(default_factory=WriterConfig, metadata={"doc": "The group-commit writer."})
    log: LogConfig = field(default_factory=LogConfig, metadata={"doc": "Logging."})
    source: str = field(default="<defaults>", metadata={"internal": True})


# --- loading ---------------------------------------------------------------------


def load(path: Path | str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (if given) and ``CHATD_*`` variables from ``env`` into a Config.

    Relative paths in the file are resolved against the file's directory.
    Raises ConfigError listing every problem, each naming the key, the file and
    line, and the expected form.
    """
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    text = ""
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    problems: list[str] = []
    locate = _Locator(source, text)
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        keys = [part.lower() for part in name[len(ENV_PREFIX):].split("__")]
        _set_path(raw, keys, _parse_env_value(value))
        locate.env[tuple(keys)] = name
    base = path.parent if path is not None else Path.cwd()
    config = _build(Config, raw, (), locate, problems, base)
    auth = config.auth
    if not problems and not (auth.hs256_secret or auth.public_key_files or auth.jwks_url):
        problems.append(
            f"{locate.where(('auth',))}: [auth] needs at least one of hs256_secret, public_key_files, "
            "jwks_url (chatd cannot verify access tokens without a key)"
        )
    if problems:
        raise ConfigError(problems)
    state_dir = config.database.embedded.state_dir
    if not state_dir.is_absolute():
        embedded = dataclasses.replace(config.database.embedded, state_dir=base / state_dir)
        config = dataclasses.replace(config, database=dataclasses.replace(config.database, embedded=embedded))
    return dataclasses.replace(config, source=source)


def _parse_env_value(value: str) -> Any:
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def _set_path(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        nxt = raw.setdefault(key, {})
        if not isinstance(nxt, dict):
            nxt = raw[key] = {}
        raw = nxt
    raw[keys[-1]] = value


class _Locator:
    """Finds the line of a dotted key in the TOML text, for error messages."""

    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.env: dict[tuple[str, ...], str] = {}
        self.lines: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        for number, line in enumerate(text.splitlines(), start=1):
            stripped = line.strip()
            header = re.match(r"^\[\s*([A-Za-z0-9_.\s\"-]+?)\s*\]", stripped)
            if header:
                table = tuple(p.strip().strip('"') for p in header.group(1).split("."))
                self.lines.setdefault(table, number)
                continue
            key = re.match(r"^([A-Za-z0-9_.\"-]+)\s*=", stripped)
            if key:
                parts = tuple(p.strip('"') for p in key.group(1).split("."))
                self.lines.setdefault(table + parts, number)

    def where(self, keys: tuple[str, ...]) -> str:
        if keys in self.env:
            return f"environment variable {self.env[keys]}"
        line = self.lines.get(keys)
        return f"{self.source}:{line}" if line else self.source


def _build(cls: type, raw: Any, prefix: tuple[str, ...], locate: _Locator, problems: list[str], base: Path) -> Any:
    dotted = ".".join(prefix) or "(top level)"
    if not isinstance(raw, dict):
        problems.append(f"{locate.where(prefix)}: [{dotted}] must be a table")
        return cls()
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in raw:
        if key not in known:
            keys = prefix + (key,)
            choices = ", ".join(sorted(known))
            problems.append(f"{locate.where(keys)}: unknown key '{'.'.join(keys)}' (known keys here: {choices})")
    values: dict[str, Any] = {}
    for name, f in known.items():
        if name not in raw:
            continue
        keys = prefix + (name,)
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name], keys, locate, problems, base)
            continue
        problem, value = _convert(hint, raw[name], f.metadata, base)
        if problem:
            problems.append(f"{locate.where(keys)}: '{'.'.join(keys)}' {problem}")
        else:
            values[name] = value
    return cls(**values)


def _convert(hint: Any, value: Any, meta: Mapping[str, Any], base: Path) -> tuple[str | None, Any]:
    shown = repr(value)
    if hint is bool:
        if not isinstance(value, bool):
            return f"must be true or false, got {shown}", None
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, got {shown}", None
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {shown}", None
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            return f"must be a string, got {shown}", None
    elif hint is Path:
        if not isinstance(value, str) or not value:
            return f"must be a path string, got {shown}", None
        value = Path(value) if Path(value).is_absolute() else (base / value)
    elif typing.get_origin(hint) is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return f"must be a list of strings, got {shown}", None
    else:  # pragma: no cover - a schema mistake, not a user one
        raise TypeError(f"unsupported config type {hint}")
    low, high = meta.get("min"), meta.get("max")
    if low is not None and value < low or high is not None and value > high:
        return f"must be between {low} and {high}, got {shown}", None
    choices = meta.get("choices")
    if choices and value not in choices:
        return f"must be one of {', '.join(choices)}, got {shown}", None
    pattern = meta.get("pattern")
    if pattern and not re.match(pattern, value):
        return f"has the wrong form {shown} (expected to match {pattern})", None
    return None, value


# --- presenting ------------------------------------------------------------------


def effective(config: Config) -> dict[str, Any]:
    """The config as a nested dict with secrets masked (for `chatd check-config`)."""

    def walk(obj: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            if f.metadata.get("internal"):
                continue
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                out[f.name] = walk(value)
            elif f.metadata.get("secret") and value:
                out[f.name] = _mask_secret(value)
            else:
                out[f.name] = str(value) if isinstance(value, Path) else value
        return out

    return walk(config)


def _mask_secret(value: str) -> str:
    # Keep a URL's shape readable but hide any password in it.
    masked = re.sub(r"(://[^:/@]+:)[^@]+@", r"\1***@", value)
    return masked if masked != value else "***"


def to_toml(data: Mapping[str, Any]) -> str:
    """Render a nested dict (as from :func:`effective`) as TOML."""
    lines: list[str] = []

    def emit(table: Mapping[str, Any], prefix: str) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
        if prefix and scalars:
            lines.append(f"[{prefix}]")
        for key, value in scalars.items():
            lines.append(f"{key} = {_toml_value(value)}")
        if scalars:
            lines.append("")
        for key, value in table.items():
            if isinstance(value, Mapping):
                emit(value, f"{prefix}.{key}" if prefix else key)

    emit(data, "")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _describe(cls: type, prefix: str) -> list[tuple[str, Any, dataclasses.Field]]:
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        name = f"{prefix}.{f.name}" if prefix else f.name
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows.append((name, hint, f))
            rows.extend(_describe(hint, name))
        else:
            rows.append((name, hint, f))
    return rows


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return "list of strings"
    return {bool: "boolean", int: "integer", float: "number", str: "string", Path: "path"}.get(hint, str(hint))


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _constraint(meta: Mapping[str, Any]) -> str:
    if "choices" in meta:
        return "one of " + ", ".join(meta["choices"])
    if "min" in meta:
        return f"{meta['min']} to {meta['max']}"
    if "pattern" in meta:
        return f"matches `{meta['pattern']}`"
    return ""


def render_markdown() -> str:
    """docs/config.md, generated from the schema (a test keeps the file in step)."""
    out = [
        "# chatd configuration",
        "",
        "chatd reads one TOML file (`chatd serve --config chatd.toml`; default `chatd.toml` in the",
        "working directory). Every key is optional; unknown keys, wrong types and out-of-range values",
        "stop chatd before it binds anything, naming the key, the file and line, and the expected form.",
        "`chatd check-config [PATH]` prints the effective configuration (secrets masked) or the errors.",
        "",
        "Any key can be overridden from the environment as `CHATD_<SECTION>__<KEY>` (nested sections",
        "joined by `__`), e.g. `CHATD_DATABASE__URL=postgresql://...` or",
        "`CHATD_DATABASE__EMBEDDED__PORT=5433`. Values are read as TOML values when they parse",
        "(numbers, booleans, `[\"lists\"]`), else as strings.",
        "",
        "This file is generated from `chatd/config.py` by `chatd check-config --docs`.",
        "",
    ]
    for name, hint, f in _describe(Config, ""):
        if dataclasses.is_dataclass(hint):
            out += [f"## [{name}]", "", f.metadata.get("doc", ""), "", "| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
            continue
        default = _default_of(f)
        shown = _toml_value(str(default) if isinstance(default, Path) else default)
        secret = " (secret: masked in output)" if f.metadata.get("secret") else ""
        out.append(f"| `{name.rsplit('.', 1)[-1]}` | {_type_name(hint)} | `{shown}` | {_constraint(f.metadata)} | {f.metadata['doc']}{secret} |")
        if f is dataclasses.fields(Config)[-1]:
            out.append("")
    text = "\n".join(out)
    return re.sub(r"\|\n## ", "|\n\n## ", text) + "\n"


def render_example() -> str:
    """config/chatd.example.toml: every key at its default, with its meaning."""
    out = ["# chatd.example.toml: every key, at its default value. Generated by `chatd check-config --example`.", ""]
    current = None
    for name, hint, f in _describe(Config, ""):
        if dataclasses.is_dataclass(hint):
            continue
        table, key = name.rsplit(".", 1)
        if table != current:
            out += ([""] if current else []) + [f"[{table}]"]
            current = table
        default = _default_of(f)
        allowed = _constraint(f.metadata)
        out.append(f"# {f.metadata['doc']} ({_type_name(hint)}{'; ' + allowed if allowed else ''})")
        out.append(f"{key} = {_toml_value(str(default) if isinstance(default, Path) else default)}")
    return "\n".join(out) + "\n"
