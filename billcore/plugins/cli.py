"""``billcore plugin keygen | sign | verify | new`` — tools for plugin authors.

``add_commands(subparsers)`` adds the ``plugin`` parser; each command sets
``args.func`` to a function ``(args) -> int`` (the exit status).  The core
CLI passes its ``commands`` table too (``billcore.cli._EXTENSIONS``): then
``plugin`` is dispatched as ``commands["plugin"](args, config)``, and
``verify`` defaults to the configured key directory and installation id.
Refusals print one line with the reason and exit 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from billcore.plugins.api import PLUGIN_API_VERSION
from billcore.plugins.bundle import LICENCE_FILE, MANIFEST_FILE, read_bundle
from billcore.plugins.errors import PluginError
from billcore.plugins.manifest import check_name, parse_manifest
from billcore.plugins.signing import Keyring, generate_keypair, load_signing_key, sign_files, utc_text, verify_bundle

__all__ = ["add_commands", "main"]

EXAMPLE = "example"


def _timestamp(text: str) -> int:
    """ISO date or date-time (UTC unless an offset is given) → unix seconds."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO date like 2026-12-31") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return int(when.timestamp())


def cmd_keygen(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    private, public = out / f"{args.name}.key", out / f"{args.name}.pub"
    try:
        kid = generate_keypair(private, public)
    except FileExistsError as e:
        print(f"refused: {e.filename} exists; not overwriting a key", file=sys.stderr)
        return 1
    print(f"key id {kid}\nprivate key {private} (keep it secret, mode 0600)\n"
          f"public key  {public} (give it to operators for their plugin key directory)")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    plugin = Path(args.plugin)
    if not plugin.is_dir():
        print("refused: sign a plugin directory, then archive it if you like", file=sys.stderr)
        return 1
    bundle = read_bundle(plugin)
    manifest = parse_manifest(bundle.files[MANIFEST_FILE])
    licence = sign_files(bundle.signed_files(), load_signing_key(args.key), plugin=manifest.name,
                         version=manifest.version, not_before=args.not_before,
                         not_after=args.not_after, installation_id=args.installation_id)
    (plugin / LICENCE_FILE).write_bytes(licence.to_bytes())
    print(f"signed {manifest.name} {manifest.version} with {licence.key_id}: "
          f"{len(bundle.signed_files())} files, {plugin / LICENCE_FILE}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if args.keydir is None:
        raise PluginError("give --keydir, the directory of trusted public keys")
    bundle = read_bundle(args.plugin)
    now = time.time() if args.at is None else args.at
    licence = verify_bundle(bundle, Keyring.from_dir(args.keydir), now, args.installation_id)
    manifest = parse_manifest(bundle.files[MANIFEST_FILE])
    if (licence.plugin, licence.version) != (manifest.name, manifest.version):
        raise PluginError(f"licence is for {licence.plugin} {licence.version}, "
                          f"manifest says {manifest.name} {manifest.version}")
    if manifest.api != args.api:
        raise PluginError(f"plugin needs API {manifest.api}; checking against {args.api}")
    print(f"ok: {manifest.name} {manifest.version} signed by {licence.key_id}, "
          f"valid {utc_text(licence.not_before)}..{utc_text(licence.not_after)}, "
          f"installation {licence.installation_id or 'any'}")
    return 0


def example_dir() -> Path:
    import plugins

    return Path(plugins.__file__).parent / EXAMPLE


def cmd_new(args: argparse.Namespace) -> int:
    name = check_name(args.name)
    dest = Path(args.dest) / name
    if dest.exists():
        print(f"refused: {dest} exists", file=sys.stderr)
        return 1
    shutil.copytree(example_dir(), dest,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", LICENCE_FILE))
    word = re.compile(rf"\b{EXAMPLE}\b")
    for path in dest.rglob("*"):
        if path.is_file() and path.suffix in (".py", ".toml", ".sql", ".md"):
            path.write_text(word.sub(name, path.read_text("utf-8")), "utf-8")
    print(f"created {dest}: edit plugin.toml and __init__.py, then `billcore plugin sign`")
    return 0


def _guard(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except (PluginError, OSError) as e:
            print(f"refused: {e}", file=sys.stderr)
            return 1
    return run


def _from_config(args: argparse.Namespace, config: Any) -> int:
    """Entry from the core CLI: fill what the operator's config knows."""
    if getattr(args, "keydir", "") is None:
        args.keydir = getattr(config, "plugin_key_dir", None)
    if getattr(args, "installation_id", "") is None and args.plugin_command == "verify":
        args.installation_id = getattr(getattr(config, "plugins", None), "installation_id", None) or None
    return int(args.func(args))


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
                 commands: dict[str, Callable[[argparse.Namespace, Any], int]] | None = None) -> None:
    if commands is not None:
        commands["plugin"] = _from_config
    plugin = subparsers.add_parser("plugin", help="create, sign and verify plugins")
    sub = plugin.add_subparsers(dest="plugin_command", required=True)

    p = sub.add_parser("keygen", help="make a signing key pair")
    p.add_argument("--out", default=".", help="directory for NAME.key and NAME.pub")
    p.add_argument("--name", default="plugin-signing", help="file name stem")
    p.set_defaults(func=_guard(cmd_keygen))

    p = sub.add_parser("sign", help="write licence.msgpack into a plugin directory")
    p.add_argument("plugin", help="plugin directory")
    p.add_argument("--key", required=True, help="private key file from keygen")
    p.add_argument("--not-before", type=_timestamp, help="ISO date the licence starts")
    p.add_argument("--not-after", type=_timestamp, help="ISO date the licence ends")
    p.add_argument("--installation-id", help="bind the licence to one installation")
    p.set_defaults(func=_guard(cmd_sign))

    p = sub.add_parser("verify", help="check a plugin as the core would, without running it")
    p.add_argument("plugin", help="plugin directory or archive")
    p.add_argument("--keydir", help="directory of trusted public keys (default: the core's)")
    p.add_argument("--installation-id", help="this installation's id")
    p.add_argument("--api", type=int, default=PLUGIN_API_VERSION, help="plugin API version served")
    p.add_argument("--at", type=_timestamp, help="check validity at this ISO date instead of now")
    p.set_defaults(func=_guard(cmd_verify))

    p = sub.add_parser("new", help="create a plugin directory from the example")
    p.add_argument("name")
    p.add_argument("--dest", default=".", help="parent directory")
    p.set_defaults(func=_guard(cmd_new))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="billcore")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
