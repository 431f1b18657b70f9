"""``billcore``: the server and its operations.

    billcore serve [-c FILE]          run the supervisor and every process
    billcore migrate [-c FILE]        apply pending schema migrations
    billcore config example|check     print the documented config / check one
    billcore verify                   check every ledger invariant (cron-friendly)
    billcore admin create LOGIN       bootstrap an administrator
    billcore system create LOGIN      a service login (remote collector…)
    billcore periodic run-now         run the periodic charges due now (idempotent, with progress)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from billcore.common.config import Config, ConfigError, example_config, load_config
from billcore.common.log import setup_logging

if TYPE_CHECKING:  # the commands import the database side lazily: `billcore --help` stays fast
    import asyncpg

    from billcore.db.rows import DbConnection

__all__ = ["main", "with_database", "with_pool"]

CommandFn = Callable[[argparse.Namespace, Config], int]
COMMANDS: dict[str, CommandFn] = {}


def _config_path(args: argparse.Namespace) -> str | None:
    return args.config or os.environ.get("BILLCORE_CONFIG") or None


async def with_database(config: Config, work: Callable[[DbConnection], Awaitable[int]]) -> int:
    """Run ``work(conn)`` on the configured database, starting the embedded
    one (or attaching to a running one) when no DSN is set."""

    async def one(pool: asyncpg.Pool) -> int:
        async with pool.acquire() as conn:
            result: int = await work(conn)
            return result

    return await with_pool(config, one)


async def with_pool(config: Config, work: Callable[[asyncpg.Pool], Awaitable[int]]) -> int:
    """``with_database`` for work that needs several connections: ``work(pool)``."""
    import asyncpg

    from billcore.db.embedded import EmbeddedPostgres
    from billcore.db.pool import DatabaseUnavailable, open_pool

    embedded = None
    dsn = config.database.dsn
    if not dsn:
        embedded = EmbeddedPostgres(config.data_dir)
        dsn = await asyncio.to_thread(embedded.start)
    try:
        try:
            pool = await open_pool(dsn, config.database, deadline=config.database.connect_timeout)
        except DatabaseUnavailable as exc:
            print(f"billcore: {exc}", file=sys.stderr)
            return 1
        try:
            result: int = await work(pool)
            return result
        finally:
            await pool.close()
    except asyncpg.PostgresError as exc:
        print(f"billcore: database error: {exc}", file=sys.stderr)
        return 1
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    from billcore.server.supervisor import serve

    return serve(config)


def cmd_migrate(args: argparse.Namespace, config: Config) -> int:
    from billcore.db.migrate import MigrationError, migrate

    async def work(conn: DbConnection) -> int:
        try:
            applied = await migrate(conn)
        except MigrationError as exc:
            print(f"billcore: {exc}", file=sys.stderr)
            return 1
        if applied:
            for migration in applied:
                print(f"applied {migration.version:04d}_{migration.name}")
        else:
            print("database is up to date")
        return 0

    return asyncio.run(with_database(config, work))


def _password(args: argparse.Namespace) -> str | None:
    if args.password_env:
        value = os.environ.get(args.password_env)
        if not value:
            print(f"billcore: environment variable {args.password_env} is empty or unset", file=sys.stderr)
            return None
        return value
    import getpass

    try:
        first = getpass.getpass("password: ")
        second = getpass.getpass("again: ")
    except (EOFError, KeyboardInterrupt):
        print("\nbillcore: no password given (or use --password-env VAR)", file=sys.stderr)
        return None
    if first != second:
        print("billcore: the passwords differ", file=sys.stderr)
        return None
    return first


def cmd_admin(args: argparse.Namespace, config: Config) -> int:
    from billcore.server.principals import create_admin

    password = _password(args)
    if not password:
        return 2
    if len(password) < 8:
        print("billcore: a password has at least 8 characters", file=sys.stderr)
        return 2

    async def work(conn: DbConnection) -> int:
        import asyncpg

        from billcore.db.migrate import migrate

        await migrate(conn)
        try:
            admin_id = await create_admin(conn, args.login, password, args.group or ["superusers"], args.full_name)
        except ValueError as exc:
            print(f"billcore: {exc}", file=sys.stderr)
            return 1
        except asyncpg.UniqueViolationError:
            print(f"billcore: an administrator named {args.login!r} exists already", file=sys.stderr)
            return 1
        print(f"administrator {args.login} created (id {admin_id}, groups: {', '.join(args.group or ['superusers'])})")
        return 0

    return asyncio.run(with_database(config, work))


def cmd_system(args: argparse.Namespace, config: Config) -> int:
    from billcore.server.principals import create_system_login

    password = _password(args)
    if not password:
        return 2

    async def work(conn: DbConnection) -> int:
        from billcore.db.migrate import migrate

        await migrate(conn)
        rights = [right for right in args.rights.split(",") if right]
        login_id = await create_system_login(conn, args.login, password, rights)
        print(f"system login {args.login} ready (id {login_id}, rights: {', '.join(rights) or 'none'})")
        return 0

    return asyncio.run(with_database(config, work))


def cmd_verify(args: argparse.Namespace, config: Config) -> int:
    """Exit 0 when every invariant holds; 1 and one line per problem when not."""
    from billcore.billing.verify import verify
    from billcore.ops.checks import WATERMARK_STATE, extra_checks

    def progress(check: str, seconds: float) -> None:
        if not args.quiet:  # stderr: the problem lines on stdout stay parseable
            print(f"verify: {check} checked in {seconds:.1f} s", file=sys.stderr, flush=True)

    async def work(conn: DbConnection) -> int:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            problems = (await verify(conn, progress=progress)
                        + await extra_checks(conn, state_file=config.data_dir / WATERMARK_STATE, progress=progress))
        for problem in problems:
            print(f"PROBLEM {problem}")
        if args.quiet and not problems:
            return 0
        print(f"verify: {len(problems)} problem(s)" if problems else "verify: ok, every invariant holds")
        return 1 if problems else 0

    return asyncio.run(with_database(config, work))


def cmd_periodic(args: argparse.Namespace, config: Config) -> int:
    """``periodic run-now``: the scheduler's own pass (``billcore.server.core.periodic_once``), now."""
    import dataclasses

    from billcore.api.periodic import summary
    from billcore.clients.billctl import periodic_progress_text
    from billcore.common.money import format_money
    from billcore.server.context import CoreContext
    from billcore.server.core import periodic_once

    def progress(p: Any) -> None:
        print(periodic_progress_text(dataclasses.asdict(p)), file=sys.stderr, flush=True)

    def waiting() -> None:
        print("periodic: another run holds the lock (the core's scheduler?); waiting for it to finish",
              file=sys.stderr, flush=True)

    async def work(pool: asyncpg.Pool) -> int:
        import getpass

        from billcore.billing.audit import Who, record

        core = CoreContext(pool=pool, config=config)
        done = summary(await periodic_once(core, progress=progress, waiting=waiting))
        async with pool.acquire() as conn:   # audited as the URFA call is: who ran it, from the shell
            await record(conn, Who("cli", 0, getpass.getuser(), "local"), "periodic.run", "periodic",
                         after=done, now=core.now())
        print(f"periodic run done: {done['accounts']} account(s), {done['charges']} charge(s),"
              f" {format_money(done['amount'])} booked, {done['periods_closed']} period(s) closed"
              + ("" if done["charges"] else " (nothing was due)"))
        if done["blocks_changed"]:
            # no URFA here: RADIUS refuses blocked accounts at their next request, but sessions
            # already online are not disconnected; `billctl periodic-run` runs it in the core
            print(f"{done['blocks_changed']} block change(s): sessions online stay until their next"
                  " RADIUS request (run `billctl periodic-run` to have the core disconnect them at once)")
        return 0

    return asyncio.run(with_pool(config, work))


def cmd_config(args: argparse.Namespace, config: Config) -> int:
    if args.action == "example":
        sys.stdout.write(example_config())
    else:
        print(f"{config.source or 'defaults'}: ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="billcore", description="billcore ISP billing core")
    parser.add_argument("-c", "--config", help="TOML config file (default: $BILLCORE_CONFIG, else built-in defaults)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run billcore: supervisor, core and enabled edges")
    sub.add_parser("migrate", help="apply pending schema migrations")
    p = sub.add_parser("config", help="print the documented example config, or check one")
    p.add_argument("action", choices=["example", "check"])
    p = sub.add_parser("verify", help="check every ledger invariant; non-zero exit names the broken accounts")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing when all is well (for cron)")
    p = sub.add_parser("admin", help="manage administrators")
    p.add_argument("action", choices=["create"])
    p.add_argument("login")
    p.add_argument("--group", action="append", help="admin group (repeatable; default: superusers)")
    p.add_argument("--full-name", default="")
    p.add_argument("--password-env", metavar="VAR", help="read the password from this environment variable instead of prompting")
    p = sub.add_parser("system", help="manage system logins (services such as a remote NetFlow collector)")
    p.add_argument("action", choices=["create"])
    p.add_argument("login")
    p.add_argument("--rights", default="", help="comma-separated rights, e.g. netflow.*,events.subscribe")
    p.add_argument("--password-env", metavar="VAR", help="read the password from this environment variable instead of prompting")
    p = sub.add_parser("periodic", help="periodic charges")
    p.add_argument("action", choices=["run-now"], help="run-now: charge what is due now, as the scheduler"
                   " would (idempotent: what is booked is never booked twice)")
    COMMANDS.update(periodic=cmd_periodic)
    COMMANDS.update(serve=cmd_serve, migrate=cmd_migrate, config=cmd_config, admin=cmd_admin, system=cmd_system,
                    verify=cmd_verify)
    for extend in _EXTENSIONS:
        extend(sub, COMMANDS)
    return parser


# Subsystems add their commands here: fn(subparsers, commands) registers
# parsers and puts the command's function under its name in ``commands``.
def _plugin_commands(sub: Any, commands: dict[str, CommandFn]) -> None:
    from billcore.plugins.cli import add_commands

    add_commands(sub, commands)


def _ops_commands(sub: Any, commands: dict[str, CommandFn]) -> None:
    from billcore.ops.cli import add_commands

    add_commands(sub, commands)


_EXTENSIONS: list[Callable[[Any, dict[str, CommandFn]], None]] = [_plugin_commands, _ops_commands]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(_config_path(args))
    except ConfigError as exc:
        print(f"billcore: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging("cli" if args.command != "serve" else "supervisor", config.core.log_level)
    return COMMANDS[args.command](args, config)


if __name__ == "__main__":
    sys.exit(main())
