"""The ``chatd`` command line.

    chatd serve [--config PATH]
    chatd migrate [--config PATH]
    chatd check-config [PATH] [--docs | --example]
    chatd token issue --user NAME [--ttl SECONDS] [--create-user] [--config PATH]
    chatd user create NAME [--display-name TEXT] | chatd user disable NAME
    chatd bench ...            (see docs/performance.md)

Exit codes: 0 ok, 1 runtime failure, 2 configuration or usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import trio

from chatd import config as config_mod
from chatd import errors, log

DEFAULT_CONFIG = "chatd.toml"


def _config_path(given: str | None) -> Path | None:
    path = given or os.environ.get("CHATD_CONFIG")
    if path:
        return Path(path)
    return Path(DEFAULT_CONFIG) if Path(DEFAULT_CONFIG).exists() else None


def _load(given: str | None) -> config_mod.Config:
    cfg = config_mod.load(_config_path(given))
    log.configure(cfg.log)
    return cfg


def cmd_serve(args: argparse.Namespace) -> int:
    from chatd.app import serve

    cfg = _load(args.config)
    trio.run(serve, cfg)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from chatd.store.database import open_database
    from chatd.store.migrate import applied_version, migrate

    cfg = _load(args.config)

    async def run() -> None:
        async with open_database(dataclasses.replace(cfg.database, migrate_on_start=False)) as db:
            done = await migrate(db.pool)
            print(f"schema at version {await applied_version(db.pool)} ({len(done)} applied now) on {db.description}")

    trio.run(run)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    if args.docs:
        sys.stdout.write(config_mod.render_markdown())
        return 0
    if args.example:
        sys.stdout.write(config_mod.render_example())
        return 0
    path = _config_path(args.path)
    cfg = config_mod.load(path)
    print(f"# effective configuration from {cfg.source} (secrets masked)")
    print(config_mod.to_toml(config_mod.effective(cfg)))
    return 0


def cmd_token_issue(args: argparse.Namespace) -> int:
    from chatd.auth.tokens import mint

    cfg = _load(args.config)
    if not cfg.auth.hs256_secret:
        raise errors.ConfigError(["auth.hs256_secret is empty: `chatd token issue` signs with it"])
    if args.create_user:
        _with_db(cfg, lambda pool: pool.execute("INSERT INTO users (id) VALUES (%s) ON CONFLICT DO NOTHING", (args.user,)))
    ttl = args.ttl if args.ttl is not None else cfg.auth.default_ttl
    print(mint(cfg.auth.hs256_secret, args.user, ttl=ttl, audience=cfg.auth.audience, issuer=cfg.auth.issuer))
    return 0


def cmd_user(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if args.user_command == "create":
        query = "INSERT INTO users (id, display_name) VALUES (%s, %s) ON CONFLICT (id) DO UPDATE SET display_name = excluded.display_name"
        _with_db(cfg, lambda pool: pool.execute(query, (args.name, args.display_name or "")))
        print(f"user {args.name} ready")
    else:
        _with_db(cfg, lambda pool: pool.execute("UPDATE users SET disabled = true WHERE id = %s", (args.name,)))
        print(f"user {args.name} disabled")
    return 0


def _with_db(cfg: config_mod.Config, work) -> None:
    from chatd.store.database import open_database

    async def run() -> None:
        async with open_database(cfg.database) as db:
            await work(db.pool)

    trio.run(run)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chatd", description="chatd: a realtime chat server")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the server")
    s.add_argument("--config", help=f"TOML file (default: $CHATD_CONFIG or ./{DEFAULT_CONFIG})")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("migrate", help="apply pending database migrations")
    s.add_argument("--config")
    s.set_defaults(func=cmd_migrate)

    s = sub.add_parser("check-config", help="print the effective config or its errors")
    s.add_argument("path", nargs="?")
    s.add_argument("--docs", action="store_true", help="print docs/config.md generated from the schema")
    s.add_argument("--example", action="store_true", help="print config/chatd.example.toml")
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("token", help="access tokens")
    tsub = s.add_subparsers(dest="token_command", required=True)
    t = tsub.add_parser("issue", help="mint a development token with auth.hs256_secret")
    t.add_argument("--user", required=True)
    t.add_argument("--ttl", type=float, help="lifetime in seconds (default auth.default_ttl)")
    t.add_argument("--create-user", action="store_true", help="also create the user in the database")
    t.add_argument("--config")
    t.set_defaults(func=cmd_token_issue)

    s = sub.add_parser("user", help="manage users")
    usub = s.add_subparsers(dest="user_command", required=True)
    u = usub.add_parser("create")
    u.add_argument("name")
    u.add_argument("--display-name")
    u.add_argument("--config")
    u.set_defaults(func=cmd_user)
    u = usub.add_parser("disable")
    u.add_argument("name")
    u.add_argument("--config")
    u.set_defaults(func=cmd_user)

    sub.add_parser("bench", help="benchmarks: chatd bench --help")  # dispatched in main()
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the bench has its own parser (and --help)
        from chatd.bench.main import main as bench_main

        return bench_main(argv[1:])
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except errors.ConfigError as exc:
        print(f"chatd: {exc}", file=sys.stderr)
        return 2
    except errors.ChatdError as exc:
        print(f"chatd: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
