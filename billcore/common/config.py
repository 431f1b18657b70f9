"""Configuration: one TOML file, every key with a default and a one-line doc.

Theory of operation
-------------------
Each ``[section]`` of the file is a frozen dataclass below; every field has a
default and a ``doc`` in its metadata.  ``load_config`` refuses unknown
sections, unknown keys and wrong types with a ``ConfigError`` that names the
key (``urfa.port: expected an integer, got 'abc'``), so a typo fails at start
instead of being silently ignored.  ``example_config()`` renders the
documented example (docs/billcore.example.toml is generated from it and a
test keeps the two equal).  No file at all is a valid configuration.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
import zoneinfo
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_origin, get_type_hints

__all__ = ["Config", "ConfigError", "load_config", "example_config", "validate_console", "validate_httpapi",
           "validate_billing", "validate_paygate", "validate_documents"]


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key."""


def _f(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True, slots=True)
class CoreSection:
    data_dir: str = _f("var", "Directory for the embedded database, journals, sockets and state (relative to the working directory).")
    log_level: str = _f("info", "Log level of every process: debug, info, warning or error.")
    timezone: str = _f("UTC", "The operator's time zone: day and month boundaries and time ranges are evaluated in it.")
    secret_key_file: str = _f("", "File holding the 32-byte key that encrypts recoverable secrets at rest (empty: <data_dir>/secret.key, created on first start).")


@dataclass(frozen=True, slots=True)
class DatabaseSection:
    dsn: str = _f("", "PostgreSQL DSN; empty starts an embedded PostgreSQL in <data_dir>/pg.")
    pool_min: int = _f(2, "Connections the core keeps open at least.")
    pool_max: int = _f(10, "Connections the core opens at most (at least 3: a periodic run holds three).")
    connect_timeout: float = _f(10.0, "Seconds to wait for one connection attempt.")
    retry_max_backoff: float = _f(15.0, "Longest pause, in seconds, between attempts while the database is unreachable at start.")
    command_timeout: float = _f(60.0, "Seconds a single statement may run before it is cancelled.")


@dataclass(frozen=True, slots=True)
class URFASection:
    host: str = _f("127.0.0.1", "Address the URFA TCP listener binds (0.0.0.0 or :: to face a network).")
    port: int = _f(11758, "URFA TCP port.")
    unix_socket: str = _f("", "URFA Unix socket path (empty: <data_dir>/urfa.sock; 'off' disables it).")
    tls_cert: str = _f("", "PEM certificate of the TCP listener; with tls_key enables TLS.")
    tls_key: str = _f("", "PEM private key of the TCP listener.")
    session_timeout: int = _f(1800, "Seconds a session may stay idle before it is deleted.")
    max_frame: int = _f(1048576, "Largest frame, in bytes, the server accepts; a larger one closes the connection.")
    max_inflight: int = _f(64, "Calls one connection may have in flight; more get the 'busy' error.")
    handshake_timeout: float = _f(10.0, "Seconds a new connection has to finish logging in.")
    login_failures_per_minute: int = _f(10, "Failed logins allowed per source IP and per login each minute.")
    max_connections_per_ip: int = _f(64, "Open TCP connections allowed per source address (IPv6: per /64); more get 'rate_limited' (0: no cap).")
    max_sessions_per_login: int = _f(16, "Live sessions one admin or subscriber may hold; a new login ends the oldest.")
    max_sessions_per_system: int = _f(256, "Live sessions one system login (an edge service) may hold; a new login ends the oldest.")


@dataclass(frozen=True, slots=True)
class MetricsSection:
    enabled: bool = _f(True, "Serve Prometheus metrics of every process on one HTTP endpoint.")
    host: str = _f("127.0.0.1", "Address of the metrics endpoint.")
    port: int = _f(9758, "Port of the metrics endpoint (path /metrics).")


@dataclass(frozen=True, slots=True)
class SupervisorSection:
    restart_backoff_initial: float = _f(0.2, "Seconds before the first restart of a child that died.")
    restart_backoff_max: float = _f(30.0, "Longest pause between restarts of a child that keeps dying.")
    stable_after: float = _f(30.0, "A child that ran this many seconds counts as healthy again (backoff resets).")
    stop_timeout: float = _f(8.0, "Seconds children get to flush and exit after SIGTERM before they are killed.")


@dataclass(frozen=True, slots=True)
class BillingSection:
    promised_amount: str = _f("100.00", "Credit a subscriber may take once a month as a promised payment (currency units).")
    promised_days: int = _f(5, "Days a promised payment lasts before it expires by itself.")
    currency: str = _f("RUB", "The installation's one currency (ISO 4217 code): notifications show it, payment gateways must report it.")
    minor_units: int = _f(2, "Decimals of that currency (ISO 4217: 2 for RUB, USD, EUR; 0 for JPY; 3 for KWD): amounts show them, and a paid amount with more is refused.")


@dataclass(frozen=True, slots=True)
class PeriodicSection:
    enabled: bool = _f(True, "Run the periodic-charge scheduler in the core.")
    interval: float = _f(60.0, "Seconds between checks for due periodic charges.")
    batch_size: int = _f(5000, "Accounts charged per transaction in a periodic run.")


@dataclass(frozen=True, slots=True)
class InvoicesSection:
    series: str = _f("INV", "Number series of invoices (1-12 of A-Z, 0-9): numbers read SERIES-YEAR-000001, gapless per year.")
    credit_series: str = _f("CN", "Number series of credit notes.")
    grace: int = _f(3600, "Seconds after an accounting period ends before the run invoices it (ledger rows are stamped before they commit).")
    auto: bool = _f(True, "Issue the monthly invoices by themselves in the core's periodic pass once periods end.")
    batch_size: int = _f(5000, "Accounts invoiced per transaction in a run.")
    workers: int = _f(2, "Batches of a run in flight at once (each holds a database connection while it runs).")


@dataclass(frozen=True, slots=True)
class PluginsSection:
    key_dir: str = _f("", "Directory of trusted Ed25519 public keys, one NAME.pub file per key (empty: <data_dir>/plugin-keys).")
    dir: str = _f("", "Directory that plugins.load names refer to (empty: <data_dir>/plugins).")
    load: tuple[str, ...] = _f((), "Plugins (names inside dir) to load at start, in order.")
    installation_id: str = _f("", "This installation's id; a licence bound to another installation is refused.")
    config_dir: str = _f("", "Directory of operators' plugin settings, NAME.toml per plugin, over the plugin's defaults (empty: <data_dir>/plugin-config).")


@dataclass(frozen=True, slots=True)
class RadiusSection:
    enabled: bool = _f(True, "Run the RADIUS server process (a URFA client of the core).")
    host: str = _f("0.0.0.0", "Address the RADIUS authentication and accounting sockets bind.")
    auth_port: int = _f(1812, "Access-Request and Status-Server port.")
    acct_port: int = _f(1813, "Accounting-Request port.")
    max_inflight: int = _f(1024, "Requests being decided at once; more are dropped and counted.")
    decision_timeout: float = _f(3.0, "Seconds to wait for the core before leaving a request unanswered (the NAS retries).")
    dedup_ttl: float = _f(30.0, "Seconds a reply stays in the duplicate-request cache (RFC 5080).")
    dedup_max: int = _f(65536, "Most entries in the duplicate-request cache.")
    stale_timeout: int = _f(0, "Seconds of NAS silence before an accounting session is closed (0: 3 hours).")
    stale_check: float = _f(60.0, "Seconds between sweeps for stale sessions.")
    coa_timeout: float = _f(2.0, "Seconds to wait for each Disconnect/CoA answer from a NAS.")
    coa_retries: int = _f(2, "Retransmissions of a Disconnect/CoA request.")
    processes: int = _f(1, "RADIUS server processes. Above 1 they share the ports with SO_REUSEPORT (bound by the supervisor, strangers on the port detected); a NAS's retransmissions stay on one process. Recommended: 1 on 2 cores; beyond, about one per 4 cores while the radius process is the one at 100% of a core (docs/radius.md).")
    radsec_port: int = _f(0, "RadSec (RADIUS over TLS, RFC 6614) TCP port, 2083 by convention (0: off).")
    radsec_host: str = _f("0.0.0.0", "Address the RadSec listener binds.")
    radsec_cert: str = _f("", "RadSec server certificate (PEM, chain after it).")
    radsec_key: str = _f("", "Private key of radsec_cert (PEM).")
    radsec_ca: str = _f("", "CA certificate(s) (PEM) a RadSec client's certificate must chain to; required.")
    radsec_handshake_timeout: float = _f(10.0, "Seconds a RadSec client has to finish the TLS handshake.")
    radsec_idle_timeout: float = _f(300.0, "Seconds a RadSec connection may stay silent before it is closed.")
    radsec_packet_timeout: float = _f(10.0, "Seconds a RadSec client has to send the rest of a packet it began.")


@dataclass(frozen=True, slots=True)
class NetflowSection:
    enabled: bool = _f(True, "Run the NetFlow collector workers (URFA clients of the core).")
    host: str = _f("0.0.0.0", "Address the NetFlow UDP port binds.")
    port: int = _f(2055, "NetFlow/IPFIX UDP port, shared by every worker (SO_REUSEPORT).")
    workers: int = _f(0, "Worker processes (0: one per CPU core).")
    rcvbuf: int = _f(67108864, "Socket receive buffer asked for, in bytes (granted size is logged and exported).")
    exporters: tuple[str, ...] = _f(("127.0.0.1", "::1"), "Exporter addresses or prefixes accepted; packets from others are dropped and counted.")
    sampling: tuple[str, ...] = _f((), "Configured sampling per exporter, 'ADDRESS=N' (1-in-N); overrides what the exporter declares.")
    journal_dir: str = _f("", "Directory of the workers' packet journals (empty: <data_dir>/netflow/journal).")
    journal_max_bytes: int = _f(17179869184, "Journal size per worker above which a loud alarm is raised (nothing is dropped).")
    journal_min_free_bytes: int = _f(1073741824, "Free bytes on the journal's volume below which netflow_journal_disk_low warns (a full volume drops packets).")
    segment_bytes: int = _f(67108864, "Size of one journal segment file.")
    fsync_interval: float = _f(0.2, "Seconds between journal fsyncs (a batch of packets per fsync).")
    ship_interval: float = _f(1.0, "Seconds between aggregate batches shipped to the core.")
    raw_dir: str = _f("", "Directory of hourly Parquet files of raw flows (empty: <data_dir>/netflow/raw).")
    raw_retention_days: int = _f(90, "Days raw flow files are kept (0: for ever).")
    raw_flush_rows: int = _f(2000000, "Raw flow rows buffered per worker before a Parquet file is written.")
    raw_flush_interval: float = _f(60.0, "Longest seconds raw flow rows wait before they are written to Parquet.")
    core_address: str = _f("", "URFA address 'host:port' of the core for a remote collector (empty: the local Unix socket).")
    login: str = _f("netflow", "System login the workers use.")
    password_file: str = _f("", "File with the system login's password (empty: <data_dir>/system/netflow.password).")


@dataclass(frozen=True, slots=True)
class PortalSection:
    enabled: bool = _f(True, "Run the subscribers' web office (a URFA client of the core, no database access).")
    host: str = _f("127.0.0.1", "Address the web office binds (0.0.0.0 or :: to face a network).")
    port: int = _f(8080, "HTTP(S) port of the web office.")
    tls_cert: str = _f("", "PEM certificate; with tls_key the office speaks HTTPS.")
    tls_key: str = _f("", "PEM private key of the office's certificate.")
    language: str = _f("en", "Language when the browser asks for none we have: en or ru.")
    cookie_secure: bool = _f(True, "Send the session cookie only over HTTPS (turn off only for plain-HTTP tests).")
    trust_forwarded: bool = _f(False, "Take the browser's address from X-Forwarded-For (only behind your own reverse proxy).")
    login_failures_per_minute: int = _f(5, "Failed logins allowed per browser address each minute; more get HTTP 429.")
    max_body: int = _f(16384, "Largest request body, in bytes; a larger one gets HTTP 413.")
    request_timeout: float = _f(15.0, "Seconds one request may take, core calls included; then HTTP 503.")
    core_timeout: float = _f(5.0, "Seconds to wait for the core to answer one call or to connect.")
    secret_file: str = _f("", "File with the key that signs CSRF tokens (empty: <data_dir>/system/portal.secret, created on first start).")


@dataclass(frozen=True, slots=True)
class ConsoleSection:
    enabled: bool = _f(True, "Run the operators' web console (a URFA client of the core, no database access).")
    host: str = _f("127.0.0.1", "Address the console binds; any but a loopback address needs tls_cert and tls_key.")
    port: int = _f(8445, "HTTP(S) port of the console.")
    tls_cert: str = _f("", "PEM certificate; with tls_key the console speaks HTTPS.")
    tls_key: str = _f("", "PEM private key of the console's certificate.")
    language: str = _f("en", "Language when the browser asks for none we have: en or ru.")
    cookie_secure: bool = _f(True, "Send the session cookie only over HTTPS (turn off only for plain-HTTP tests on loopback).")
    trust_forwarded: bool = _f(False, "Take the browser's address from X-Forwarded-For (only behind your own reverse proxy).")
    login_failures_per_minute: int = _f(5, "Failed logins allowed per browser address each minute; more get HTTP 429.")
    max_body: int = _f(65536, "Largest request body, in bytes; a larger one gets HTTP 413.")
    request_timeout: float = _f(30.0, "Seconds one request may take, core calls included; then HTTP 503.")
    core_timeout: float = _f(10.0, "Seconds to wait for the core to answer one call or to connect.")
    secret_file: str = _f("", "File with the key that signs CSRF tokens (empty: <data_dir>/system/console.secret, created on first start).")


@dataclass(frozen=True, slots=True)
class HttpapiSection:
    enabled: bool = _f(False, "Run the HTTP/JSON API for integrators (a URFA client of the core, no database access).")
    host: str = _f("127.0.0.1", "Address the API binds; any but a loopback address needs tls_cert and tls_key.")
    port: int = _f(8446, "HTTP(S) port of the API.")
    tls_cert: str = _f("", "PEM certificate; with tls_key the API speaks HTTPS.")
    tls_key: str = _f("", "PEM private key of the API's certificate.")
    trust_forwarded: bool = _f(False, "Take the client's address from X-Forwarded-For (only behind your own reverse proxy).")
    max_body: int = _f(1048576, "Largest request body, in bytes; a larger one gets HTTP 413.")
    call_timeout: float = _f(30.0, "Seconds one call may take (a streamed call: between two chunks); then HTTP 504.")
    rate: float = _f(50.0, "Requests per second each token may make on average (token bucket); more get HTTP 429.")
    burst: int = _f(100, "Requests a token may make at once above its rate (the bucket's size).")
    max_rows: int = _f(100000, "Most rows one non-streamed answer may carry (more: HTTP 502); streamed calls are not capped (they stream).")
    core_timeout: float = _f(10.0, "Seconds to wait for the core to connect or to answer a login.")


@dataclass(frozen=True, slots=True)
class OutboxSection:
    max_attempts: int = _f(10, "Tries of one outbox delivery (a hook, a Disconnect, an email ...) before it is dead (kept for an operator's retry).")
    backoff_base: float = _f(10.0, "Seconds before the second try of a failed delivery; each later pause doubles.")
    backoff_cap: float = _f(3600.0, "Longest pause, in seconds, between two tries of a failed delivery.")
    keep_days: int = _f(30, "Days delivered deliveries and fully dispatched events are kept before they are pruned (dead ones stay).")
    lease: float = _f(60.0, "Seconds a claimed delivery stays with its deliverer; unanswered, it is tried again.")
    poll_interval: float = _f(5.0, "Seconds between the dispatcher's and deliverers' checks when no notification wakes them.")


@dataclass(frozen=True, slots=True)
class GatewaySection:
    name: str = _f("", "The gateway's name: its callback is POST /callback/<name>; payments are method gateway:<name>.")
    secret_file: str = _f("", "File holding the HMAC secret shared with the gateway (at least 16 bytes; mode 0600).")
    currency: str = _f("", "Currency the gateway reports (empty: [billing] currency); another is refused.")
    amount_format: str = _f("major", "How the gateway writes amounts: major (decimal string '100.50') or minor (integer '10050').")
    pay_url: str = _f("", "The gateway's payment page the office redirects to for 'pay online' (empty: no pay-online).")


@dataclass(frozen=True, slots=True)
class PaygateSection:
    enabled: bool = _f(False, "Run the payment gateways' callback edge (a URFA client of the core, no database access).")
    host: str = _f("127.0.0.1", "Address the callback edge binds; any but a loopback address needs tls_cert and tls_key, or behind_proxy.")
    port: int = _f(8447, "HTTP(S) port of the callback edge.")
    tls_cert: str = _f("", "PEM certificate; with tls_key the edge speaks HTTPS.")
    tls_key: str = _f("", "PEM private key of the edge's certificate.")
    behind_proxy: bool = _f(False, "Plain HTTP on a non-loopback address is allowed: your own TLS proxy fronts the edge.")
    window: int = _f(300, "Seconds a callback's timestamp may be off the edge's clock; older or newer is refused (401).")
    max_body: int = _f(16384, "Largest callback body, in bytes; a larger one gets HTTP 413.")
    read_timeout: float = _f(10.0, "Seconds a callback's body may take to arrive; then HTTP 408.")
    core_timeout: float = _f(5.0, "Seconds to wait for the core to answer one call or to connect; then HTTP 503 (the gateway retries).")
    office_gateway: str = _f("", "The gateway the web office's 'pay online' uses (a name from [[paygate.gateways]]; empty: no pay-online).")
    office_url: str = _f("", "The office's public base URL (https://…) the gateway sends the browser back to (empty: the request's own).")
    gateways: tuple[GatewaySection, ...] = _f((), "Payment gateways, one [[paygate.gateways]] table each (keys: name, secret_file, currency, amount_format, pay_url).")


@dataclass(frozen=True, slots=True)
class NotifySection:
    enabled: bool = _f(False, "Run the notify process: emails and webhooks from the outbox (a URFA client of the core).")
    language: str = _f("en", "Language of notifications for subscribers who chose none: en or ru.")
    low_balance: str = _f("", "Balance under which balance.low fires, like '10.00' (empty: only accounts with their own threshold).")
    smtp_host: str = _f("127.0.0.1", "SMTP server (relay) that takes the notification emails.")
    smtp_port: int = _f(25, "SMTP port (587 with starttls, 465 with tls).")
    smtp_starttls: bool = _f(False, "Upgrade the SMTP connection with STARTTLS.")
    smtp_tls: bool = _f(False, "Speak SMTP over TLS from the first byte (port 465).")
    smtp_user: str = _f("", "SMTP AUTH login (empty: no AUTH).")
    smtp_password_file: str = _f("", "File holding the SMTP AUTH password.")
    smtp_ca_file: str = _f("", "PEM file of the CA that signed the SMTP server's certificate (empty: the system's CAs).")
    smtp_timeout: float = _f(30.0, "Seconds one SMTP conversation may take.")
    mail_from: str = _f("billing@localhost", "From address of the notification emails.")
    webhook_timeout: float = _f(10.0, "Seconds one webhook POST may take, connect included.")
    webhook_max_response: int = _f(65536, "Bytes of a webhook receiver's answer read at most (the rest is dropped).")
    concurrency: int = _f(16, "Emails and webhooks being sent at once.")
    batch: int = _f(100, "Deliveries claimed per call.")
    poll_interval: float = _f(5.0, "Seconds between claims when no outbox event woke the process.")
    core_address: str = _f("", "URFA address 'host:port' of the core (empty: the local Unix socket).")
    login: str = _f("notify", "System login the notify process uses.")
    password_file: str = _f("", "File with the system login's password (empty: <data_dir>/system/notify.password).")


@dataclass(frozen=True, slots=True)
class DocumentsSection:
    name: str = _f("", "The ISP's name as invoices and statements show it (the issuer).")
    address: str = _f("", "The ISP's postal address on documents (several lines: separate them with \\n).")
    tax_id: str = _f("", "The ISP's tax number on documents (INN/KPP, VAT id ...).")
    bank_details: str = _f("", "Bank details printed under the issuer (several lines: separate them with \\n).")
    logo: str = _f("", "PNG file of the ISP's logo drawn on PDF and HTML documents (empty: no logo).")
    font: str = _f("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "TrueType font of PDF documents; it must have the glyphs of the text (Cyrillic: DejaVu Sans, Debian's fonts-dejavu-core).")
    font_bold: str = _f("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", "Bold TrueType font of PDF documents' headings and totals.")
    language: str = _f("en", "Language of documents when none is asked for: en or ru.")


@dataclass(frozen=True, slots=True)
class Config:
    core: CoreSection = field(default_factory=CoreSection)
    database: DatabaseSection = field(default_factory=DatabaseSection)
    urfa: URFASection = field(default_factory=URFASection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    supervisor: SupervisorSection = field(default_factory=SupervisorSection)
    billing: BillingSection = field(default_factory=BillingSection)
    periodic: PeriodicSection = field(default_factory=PeriodicSection)
    invoices: InvoicesSection = field(default_factory=InvoicesSection)
    plugins: PluginsSection = field(default_factory=PluginsSection)
    radius: RadiusSection = field(default_factory=RadiusSection)
    netflow: NetflowSection = field(default_factory=NetflowSection)
    portal: PortalSection = field(default_factory=PortalSection)
    console: ConsoleSection = field(default_factory=ConsoleSection)
    httpapi: HttpapiSection = field(default_factory=HttpapiSection)
    outbox: OutboxSection = field(default_factory=OutboxSection)
    paygate: PaygateSection = field(default_factory=PaygateSection)
    notify: NotifySection = field(default_factory=NotifySection)
    documents: DocumentsSection = field(default_factory=DocumentsSection)
    source: str = ""  # the file it was read from ("" = defaults)

    # -- derived paths ----------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return Path(self.core.data_dir).absolute()

    @property
    def plugin_key_dir(self) -> Path:
        return Path(self.plugins.key_dir) if self.plugins.key_dir else self.data_dir / "plugin-keys"

    @property
    def plugin_dir(self) -> Path:
        return Path(self.plugins.dir) if self.plugins.dir else self.data_dir / "plugins"

    @property
    def secret_key_path(self) -> Path:
        return Path(self.core.secret_key_file) if self.core.secret_key_file else self.data_dir / "secret.key"

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        """The operator's time zone (checked when the config was loaded)."""
        return zoneinfo.ZoneInfo(self.core.timezone)

    @property
    def netflow_workers(self) -> int:
        return self.netflow.workers or os.cpu_count() or 1

    @property
    def urfa_socket(self) -> Path | None:
        if self.urfa.unix_socket == "off":
            return None
        return Path(self.urfa.unix_socket) if self.urfa.unix_socket else self.data_dir / "urfa.sock"


SECTIONS: dict[str, type] = {
    name: hint for name, hint in get_type_hints(Config).items() if name != "source"
}

_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", tuple: "a list of strings"}


def _check_value(key: str, hint: Any, value: Any) -> Any:
    typ = get_origin(hint) or hint  # tuple[str, ...] → tuple
    item = getattr(hint, "__args__", (None,))[0]
    if typ is tuple and dataclasses.is_dataclass(item):   # an array of tables: [[section.key]]
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ConfigError(f"{key}: expected [[{key}]] tables, got {value!r}")
        return tuple(_table(f"{key}[{i}]", item, v) for i, v in enumerate(value))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {_TYPE_WORDS[int]}, got {value!r}")
    if typ is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected {_TYPE_WORDS[tuple]}, got {value!r}")
        return tuple(value)
    if not isinstance(value, typ):
        raise ConfigError(f"{key}: expected {_TYPE_WORDS.get(typ, typ.__name__)}, got {value!r}")
    return value


def _table(key: str, table_type: Any, value: dict[str, Any]) -> Any:
    hints = get_type_hints(table_type)
    known = {f.name for f in fields(table_type)}
    values: dict[str, Any] = {}
    for name, v in value.items():
        if name not in known:
            raise ConfigError(f"{key}.{name}: unknown key (known: {', '.join(sorted(known))})")
        values[name] = _check_value(f"{key}.{name}", hints[name], v)
    return table_type(**values)


def config_from_dict(data: dict[str, Any], source: str = "") -> Config:
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        section_type = SECTIONS.get(name)
        if section_type is None:
            raise ConfigError(f"{name}: unknown section (known: {', '.join(SECTIONS)})")
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a [{name}] table")
        hints = get_type_hints(section_type)
        known = {f.name for f in fields(section_type)}
        values: dict[str, Any] = {}
        for key, v in value.items():
            if key not in known:
                raise ConfigError(f"{name}.{key}: unknown key (known: {', '.join(sorted(known))})")
            values[key] = _check_value(f"{name}.{key}", hints[key], v)
        kwargs[name] = section_type(**values)
    config = Config(**kwargs, source=source)
    _validate(config)
    return config


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_console(console: ConsoleSection) -> None:
    """The [console] section's own rules (also for ``python -m console``'s flags)."""
    if console.language not in ("en", "ru"):
        raise ConfigError(f"console.language: en or ru, got {console.language!r}")
    if bool(console.tls_cert) != bool(console.tls_key):
        raise ConfigError("console.tls_cert and console.tls_key go together")
    # the browser's WebCrypto (the login's SCRAM) runs only on a secure context, and an
    # operator's session must not cross a network in the clear
    if not console.tls_cert and not _loopback(console.host):
        raise ConfigError(f"console.host: {console.host!r} is not a loopback address: set console.tls_cert and"
                          " console.tls_key (or bind 127.0.0.1 behind your own TLS proxy)")


def validate_httpapi(api: HttpapiSection) -> None:
    """The [httpapi] section's own rules (also for ``python -m httpapi``'s flags)."""
    if bool(api.tls_cert) != bool(api.tls_key):
        raise ConfigError("httpapi.tls_cert and httpapi.tls_key go together")
    # a bearer token must not cross a network in the clear
    if not api.tls_cert and not _loopback(api.host):
        raise ConfigError(f"httpapi.host: {api.host!r} is not a loopback address: set httpapi.tls_cert and"
                          " httpapi.tls_key (or bind 127.0.0.1 behind your own TLS proxy)")
    for key, value in (("max_body", api.max_body), ("call_timeout", api.call_timeout), ("rate", api.rate),
                       ("burst", api.burst), ("max_rows", api.max_rows), ("core_timeout", api.core_timeout)):
        if value <= 0:
            raise ConfigError(f"httpapi.{key}: must be positive, got {value!r}")


CURRENCY_CODE_LENGTH = 3
AMOUNT_FORMATS = ("major", "minor")


def validate_billing(billing: BillingSection) -> None:
    """The installation's currency: an ISO 4217 code and its decimals."""
    if len(billing.currency) != CURRENCY_CODE_LENGTH or not billing.currency.isascii() \
            or not billing.currency.isalpha() or not billing.currency.isupper():
        raise ConfigError(f"billing.currency: a three-letter ISO 4217 code like 'RUB', got {billing.currency!r}")
    if type(billing.minor_units) is not int or not 0 <= billing.minor_units <= 6:
        raise ConfigError(f"billing.minor_units: 0 to 6 (micro-units hold six), got {billing.minor_units!r}")


def validate_paygate(pay: PaygateSection, currency: str) -> None:
    """The [paygate] section's own rules (also for ``python -m paygate``'s flags); ``currency`` is
    the installation's ([billing] currency)."""
    if bool(pay.tls_cert) != bool(pay.tls_key):
        raise ConfigError("paygate.tls_cert and paygate.tls_key go together")
    # a callback carries no secret, but its answer and the edge's logs do say who paid what
    if not pay.tls_cert and not pay.behind_proxy and not _loopback(pay.host):
        raise ConfigError(f"paygate.host: {pay.host!r} is not a loopback address: set paygate.tls_cert and"
                          " paygate.tls_key, or paygate.behind_proxy = true behind your own TLS proxy")
    for key, value in (("window", pay.window), ("max_body", pay.max_body), ("read_timeout", pay.read_timeout),
                       ("core_timeout", pay.core_timeout)):
        if value <= 0:
            raise ConfigError(f"paygate.{key}: must be positive, got {value!r}")
    names: set[str] = set()
    for i, gw in enumerate(pay.gateways):
        where = f"paygate.gateways[{i}]"
        if not gw.name or not gw.name.isascii() or not all(c.isalnum() or c in "-_" for c in gw.name) \
                or len(gw.name) > 32:
            raise ConfigError(f"{where}.name: 1 to 32 of a-z 0-9 - _, got {gw.name!r}")
        if gw.name in names:
            raise ConfigError(f"{where}.name: {gw.name!r} is configured twice")
        names.add(gw.name)
        if not gw.secret_file:
            raise ConfigError(f"{where}.secret_file: the file of the secret shared with {gw.name!r} is required")
        if gw.currency and gw.currency != currency:
            raise ConfigError(f"{where}.currency: {gw.currency!r} is not the installation's {currency!r}"
                              " (one currency per installation)")
        if gw.amount_format not in AMOUNT_FORMATS:
            raise ConfigError(f"{where}.amount_format: major or minor, got {gw.amount_format!r}")
        if gw.pay_url and not gw.pay_url.startswith(("https://", "http://")):
            raise ConfigError(f"{where}.pay_url: an http(s) URL, got {gw.pay_url!r}")
    if pay.office_gateway and pay.office_gateway not in names:
        raise ConfigError(f"paygate.office_gateway: {pay.office_gateway!r} is not a configured gateway")
    if pay.office_url and not pay.office_url.startswith(("https://", "http://")):
        raise ConfigError(f"paygate.office_url: an http(s) URL, got {pay.office_url!r}")


def validate_notify(notify: NotifySection) -> None:
    """The [notify] section's own rules."""
    from billcore.common.money import parse_money

    if notify.language not in ("en", "ru"):
        raise ConfigError(f"notify.language: en or ru, got {notify.language!r}")
    if notify.low_balance:
        try:
            parse_money(notify.low_balance)
        except ValueError as exc:
            raise ConfigError(f"notify.low_balance: an amount like '10.00' or empty: {exc}") from None
    if notify.smtp_tls and notify.smtp_starttls:
        raise ConfigError("notify.smtp_tls and notify.smtp_starttls exclude each other")
    if not 0 < notify.smtp_port < 65536:
        raise ConfigError(f"notify.smtp_port: not a TCP port: {notify.smtp_port}")
    for key in ("smtp_timeout", "webhook_timeout", "webhook_max_response", "concurrency", "batch", "poll_interval"):
        if getattr(notify, key) <= 0:
            raise ConfigError(f"notify.{key}: must be positive, got {getattr(notify, key)!r}")
    if notify.batch > 1000:
        raise ConfigError(f"notify.batch: at most 1000, got {notify.batch}")


def validate_documents(documents: DocumentsSection) -> None:
    """The [documents] section's own rules (files are read when a document is rendered)."""
    if documents.language not in ("en", "ru"):
        raise ConfigError(f"documents.language: en or ru, got {documents.language!r}")
    if not documents.font or not documents.font_bold:
        raise ConfigError("documents.font and documents.font_bold: TrueType font files are required")
    if documents.logo and not documents.logo.lower().endswith(".png"):
        raise ConfigError(f"documents.logo: a PNG file, got {documents.logo!r}")


def _validate(config: Config) -> None:
    def positive(key: str, value: float) -> None:
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value!r}")

    for key, series in (("invoices.series", config.invoices.series),
                        ("invoices.credit_series", config.invoices.credit_series)):
        if not 1 <= len(series) <= 12 or not all(c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" for c in series):
            raise ConfigError(f"{key}: 1-12 of A-Z and 0-9, got {series!r}")
    if config.invoices.series == config.invoices.credit_series:
        raise ConfigError("invoices.credit_series: must differ from invoices.series")
    if not 0 <= config.invoices.grace <= 7 * 86400:
        raise ConfigError(f"invoices.grace: 0..604800 seconds, got {config.invoices.grace!r}")
    if not 1 <= config.radius.processes <= 64:
        raise ConfigError(f"radius.processes: 1..64, got {config.radius.processes!r}")
    if not 1 <= config.invoices.batch_size <= 50000:
        raise ConfigError(f"invoices.batch_size: 1..50000, got {config.invoices.batch_size!r}")
    if not 1 <= config.invoices.workers <= 16:
        raise ConfigError(f"invoices.workers: 1..16, got {config.invoices.workers!r}")

    for key, port in (("urfa.port", config.urfa.port), ("metrics.port", config.metrics.port),
                      ("radius.auth_port", config.radius.auth_port), ("radius.acct_port", config.radius.acct_port),
                      ("netflow.port", config.netflow.port), ("portal.port", config.portal.port),
                      ("console.port", config.console.port), ("httpapi.port", config.httpapi.port),
                      ("paygate.port", config.paygate.port)):
        if not 0 < port < 65536:
            raise ConfigError(f"{key}: not a TCP port: {port}")
    if not 0 <= config.radius.radsec_port < 65536:
        raise ConfigError(f"radius.radsec_port: 0 (off) or a TCP port, got {config.radius.radsec_port!r}")
    if config.radius.radsec_port and not (config.radius.radsec_cert and config.radius.radsec_key
                                          and config.radius.radsec_ca):
        raise ConfigError("radius.radsec_port is set: radius.radsec_cert, radsec_key and radsec_ca are needed"
                          " (RadSec clients must present a certificate of radsec_ca)")
    for key in ("radsec_handshake_timeout", "radsec_idle_timeout", "radsec_packet_timeout"):
        if not 0 < getattr(config.radius, key) <= 3600:
            raise ConfigError(f"radius.{key}: seconds in (0, 3600], got {getattr(config.radius, key)!r}")
    if config.core.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"core.log_level: one of debug, info, warning, error; got {config.core.log_level!r}")
    if bool(config.urfa.tls_cert) != bool(config.urfa.tls_key):
        raise ConfigError("urfa.tls_cert and urfa.tls_key go together")
    positive("urfa.session_timeout", config.urfa.session_timeout)
    positive("urfa.max_frame", config.urfa.max_frame)
    positive("urfa.max_inflight", config.urfa.max_inflight)
    positive("urfa.max_sessions_per_login", config.urfa.max_sessions_per_login)
    positive("urfa.max_sessions_per_system", config.urfa.max_sessions_per_system)
    if config.urfa.max_connections_per_ip < 0:
        raise ConfigError(f"urfa.max_connections_per_ip: 0 (no cap) or more, got {config.urfa.max_connections_per_ip!r}")
    if type(config.database.pool_max) is not int or config.database.pool_max < 3:
        # a periodic run holds three: its lock, its page reader and one batch writer
        raise ConfigError(f"database.pool_max: at least 3, got {config.database.pool_max!r}")
    positive("periodic.interval", config.periodic.interval)
    positive("billing.promised_days", config.billing.promised_days)
    try:
        from billcore.common.money import parse_money

        if parse_money(config.billing.promised_amount) <= 0:
            raise ValueError("not positive")
    except ValueError as exc:  # MoneyFormatError and MoneyRangeError are ValueErrors
        raise ConfigError(f"billing.promised_amount: a positive amount like '100.00': {exc}") from None
    if config.portal.language not in ("en", "ru"):
        raise ConfigError(f"portal.language: en or ru, got {config.portal.language!r}")
    if bool(config.portal.tls_cert) != bool(config.portal.tls_key):
        raise ConfigError("portal.tls_cert and portal.tls_key go together")
    validate_console(config.console)
    validate_httpapi(config.httpapi)
    validate_billing(config.billing)
    validate_paygate(config.paygate, config.billing.currency)
    validate_notify(config.notify)
    validate_documents(config.documents)
    if config.netflow.workers < 0:
        raise ConfigError(f"netflow.workers: 0 or more, got {config.netflow.workers}")
    for text in config.netflow.exporters:
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ConfigError(f"netflow.exporters: not an address or prefix: {text!r}") from None
    for text in config.netflow.sampling:
        addr, sep, n = text.rpartition("=")
        try:
            ipaddress.ip_address(addr)
            ok = sep == "=" and int(n) >= 1
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"netflow.sampling: expected 'ADDRESS=N' with N >= 1, got {text!r}")
    positive("periodic.batch_size", config.periodic.batch_size)
    for key, value in (("max_attempts", config.outbox.max_attempts), ("backoff_base", config.outbox.backoff_base),
                       ("backoff_cap", config.outbox.backoff_cap), ("keep_days", config.outbox.keep_days),
                       ("lease", config.outbox.lease), ("poll_interval", config.outbox.poll_interval)):
        positive(f"outbox.{key}", value)
    if config.outbox.lease > 3600:
        raise ConfigError(f"outbox.lease: at most 3600 seconds, got {config.outbox.lease!r}")
    if config.database.pool_min > config.database.pool_max:
        raise ConfigError("database.pool_min: larger than database.pool_max")
    try:
        zoneinfo.ZoneInfo(config.core.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(f"core.timezone: unknown time zone {config.core.timezone!r}") from exc


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read and check the file; ``None`` means all defaults."""
    if path is None:
        return config_from_dict({})
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
    return config_from_dict(data, source=str(p.absolute()))


def _toml_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def example_config() -> str:
    """The documented example: every section, key, default and its doc."""
    lines = [
        "# billcore configuration. Every key is optional; shown here with its default.",
        "# Generated from billcore/common/config.py (billcore config example).",
    ]
    for name, section_type in SECTIONS.items():
        lines.append("")
        lines.append(f"[{name}]")
        tables = []
        for f in fields(section_type):
            item = getattr(get_type_hints(section_type)[f.name], "__args__", (None,))[0]
            if dataclasses.is_dataclass(item):   # an array of tables: after the section's keys, commented
                tables.append((f, item))
                continue
            lines.append(f"# {f.metadata['doc']}")
            lines.append(f"{f.name} = {_toml_value(f.default)}")
        for f, item in tables:
            lines.append(f"# {f.metadata['doc']}")
            lines.append(f"# [[{name}.{f.name}]]")
            for g in fields(item):
                lines.append(f"# {g.name} = {_toml_value(g.default)}   # {g.metadata['doc']}")
    return "\n".join(lines) + "\n"


def replace(config: Config, **sections: dict[str, Any]) -> Config:
    """A copy with some keys of some sections changed (for tests and the CLI)."""
    changes = {name: dataclasses.replace(getattr(config, name), **values) for name, values in sections.items()}
    return dataclasses.replace(config, **changes)
