#!/usr/bin/env python3
"""Render deploy/freeradius/template/ into a FreeRADIUS 3.2 config directory.

Theory of operation
-------------------
The template is a complete, minimal FreeRADIUS configuration (radiusd.conf,
clients.conf, proxy.conf, mods-enabled/{eap,always}, sites-enabled/{default,
inner-tunnel}) with ``@NAME@`` placeholders.  This script fills them with the
operator's values — billcore's RADIUS address, ports and shared secret, the
NAS clients, the EAP server certificate — and writes the result to ``--out``.
Nothing else is generated: what runs is what the template says.

Every value is checked before anything is written: addresses must parse,
ports be 1..65535, secrets be printable ASCII without ``"``, ``\\`` or ``$``
(FreeRADIUS would read those as quoting or expansion), the certificate files
must exist.  A bad value is an error naming the option; no partial copy is
left behind.  Only the standard library is used: it runs on a FreeRADIUS box
without billcore installed.

    render.py --out /etc/freeradius/billcore --billcore-host 10.0.0.2 \\
        --billcore-secret-file /root/billcore-radius.secret \\
        --client ap-floor1=10.20.0.0/24:ap-secret \\
        --cert /etc/ssl/radius/server.pem --key /etc/ssl/radius/server.key \\
        --ca /etc/ssl/radius/ca.pem --user freerad --group freerad
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "template"
PLACEHOLDER = re.compile(r"@([A-Z_]+)@")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class RenderError(Exception):
    """A value the operator gave cannot go into the configuration."""


def secret(text: str, option: str) -> str:
    if not 1 <= len(text) <= 128:
        raise RenderError(f"{option}: a secret of 1..128 characters is needed")
    if any(not (32 < ord(c) < 127) or c in '"\\$' for c in text):
        raise RenderError(f'{option}: use printable ASCII without spaces, ", \\ or $')
    return text


def port(text: str | int, option: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise RenderError(f"{option}: {text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise RenderError(f"{option}: {value} is not in 1..65535")
    return value


def address(text: str, option: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise RenderError(f"{option}: {text!r} is not an IP address") from None


def client_block(spec: str) -> str:
    """``NAME=ADDRESS[/PREFIX]:SECRET`` → a clients.conf ``client`` section."""
    name, eq, rest = spec.partition("=")
    where, colon, key = rest.rpartition(":") if "]" not in rest else rest.partition("]:")
    if not eq or not colon or not NAME.match(name):
        raise RenderError(f"--client {spec!r}: expected NAME=ADDRESS[/PREFIX]:SECRET")
    where = where.lstrip("[")
    try:
        network = ipaddress.ip_network(where, strict=True)
    except ValueError:
        raise RenderError(f"--client {name}: {where!r} is not an address or a network") from None
    key = secret(key, f"--client {name}")
    field = "ipaddr" if network.version == 4 else "ipv6addr"
    return (f"client {name} {{\n\t{field} = {network}\n\tsecret = \"{key}\"\n"
            f"\trequire_message_authenticator = yes\n\tshortname = {name}\n}}\n")


def readable(path: str, option: str) -> str:
    p = Path(path).resolve()
    if not p.is_file():
        raise RenderError(f"{option}: {path} is not a file")
    return str(p)


def values(args: argparse.Namespace, out: Path) -> dict[str, str]:
    if args.billcore_secret_file:
        billcore_secret = Path(args.billcore_secret_file).read_text().strip()
    else:
        billcore_secret = args.billcore_secret or ""
    if not args.client:
        raise RenderError("--client: name at least one NAS (NAME=ADDRESS[/PREFIX]:SECRET)")
    user = ""
    if args.user:
        if not NAME.match(args.user) or not NAME.match(args.group or args.user):
            raise RenderError("--user/--group: not a user or group name")
        user = f"\tuser = {args.user}\n\tgroup = {args.group or args.user}"
    key_password = args.key_password or ""
    if key_password:
        secret(key_password, "--key-password")
    return {
        "CONFDIR": str(out),
        "LOGDIR": str(Path(args.logdir).resolve()) if args.logdir else str(out / "log"),
        "RUNDIR": str(Path(args.rundir).resolve()) if args.rundir else str(out / "run"),
        "SECURITY_USER": user,
        "CLIENTS": "\n".join(client_block(c) for c in args.client),
        "BILLCORE_HOST": address(args.billcore_host, "--billcore-host"),
        "BILLCORE_AUTH_PORT": str(port(args.billcore_auth_port, "--billcore-auth-port")),
        "BILLCORE_ACCT_PORT": str(port(args.billcore_acct_port, "--billcore-acct-port")),
        "BILLCORE_SECRET": secret(billcore_secret, "--billcore-secret"),
        "LISTEN_HOST": address(args.listen_host, "--listen-host") if args.listen_host != "*" else "*",
        "AUTH_PORT": str(port(args.auth_port, "--auth-port")),
        "ACCT_PORT": str(port(args.acct_port, "--acct-port")),
        "SERVER_CERT": readable(args.cert, "--cert"),
        "SERVER_KEY": readable(args.key, "--key"),
        "CA_CERT": readable(args.ca, "--ca"),
        "KEY_PASSWORD": key_password,
    }


MARKER = ".billcore-render"


def render(args: argparse.Namespace) -> Path:
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        # over a distribution's config (/etc/freeradius/3.0) its other modules and
        # sites would stay enabled, and its sites-enabled symlinks be written through
        raise RenderError(f"--out: {out} is not empty and not a render.py output; render into a new directory"
                          " (e.g. /etc/freeradius/billcore) and start FreeRADIUS with -d pointing at it")
    fill = values(args, out)
    staging = Path(tempfile.mkdtemp(prefix=".render-", dir=out.parent if out.parent.exists() else None))
    try:
        for src in sorted(TEMPLATE.rglob("*")):
            dst = staging / src.relative_to(TEMPLATE)
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
                continue

            def one(m: re.Match[str], src: Path = src) -> str:
                if m.group(1) not in fill:
                    raise RenderError(f"template {src.name}: unknown placeholder @{m.group(1)}@")
                return fill[m.group(1)]

            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(PLACEHOLDER.sub(one, src.read_text()))
            # secrets and the key password are in these files
            os.chmod(dst, 0o640)
        # policy.d is empty (radiusd.conf includes it) and git keeps no empty directory
        for d in ("log", "run", "policy.d"):
            (staging / d).mkdir(exist_ok=True)
        (staging / MARKER).write_text("rendered by deploy/freeradius/render.py; edit the template, render again\n")
        out.mkdir(parents=True, exist_ok=True)
        for item in staging.iterdir():
            target = out / item.name
            if item.is_dir():
                shutil.copytree(item, target, dirs_exist_ok=True)
            else:
                shutil.copy2(item, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory to write (FreeRADIUS -d)")
    p.add_argument("--billcore-host", required=True, help="billcore's RADIUS address")
    p.add_argument("--billcore-auth-port", default="1812")
    p.add_argument("--billcore-acct-port", default="1813")
    p.add_argument("--billcore-secret", help="the secret of FreeRADIUS's NAS entry in billcore")
    p.add_argument("--billcore-secret-file", help="read that secret from a file instead")
    p.add_argument("--client", action="append", default=[], metavar="NAME=ADDRESS[/PREFIX]:SECRET",
                   help="a NAS (access point, controller) allowed to talk to this FreeRADIUS; repeat")
    p.add_argument("--listen-host", default="*", help="address FreeRADIUS listens on (* = all)")
    p.add_argument("--auth-port", default="1812")
    p.add_argument("--acct-port", default="1813")
    p.add_argument("--cert", required=True, help="EAP server certificate (PEM, chain after it)")
    p.add_argument("--key", required=True, help="its private key (PEM)")
    p.add_argument("--ca", required=True, help="the CA the supplicants are told to trust (PEM)")
    p.add_argument("--key-password", help="the private key's password, if it has one")
    p.add_argument("--user", help="drop privileges to this user (Debian: freerad)")
    p.add_argument("--group", help="and this group (default: the user's name)")
    p.add_argument("--logdir", help="log directory (default: OUT/log)")
    p.add_argument("--rundir", help="pid file directory (default: OUT/run)")
    args = p.parse_args(argv)
    try:
        out = render(args)
    except (RenderError, OSError) as exc:
        print(f"render.py: {exc}", file=sys.stderr)
        return 2
    print(f"rendered {out}; check it with: freeradius -XC -d {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
