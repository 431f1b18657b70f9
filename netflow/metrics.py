"""The NetFlow worker's Prometheus metrics, one place for the receiver and the shipper (labelled by worker)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

RECEIVED = Counter("netflow_packets_received", "Packets journaled by the worker", ["worker"])
RECEIVED_BYTES = Counter("netflow_bytes_received", "UDP payload bytes journaled", ["worker"])
DROPS = Counter("netflow_drops", "Packets or flows lost or refused, by reason "
                "(kernel: receive buffer overflow; exporter: unknown exporter; undecodable; "
                "missing_template: data sets whose template never came; sequence_gap: flows/packets "
                "the exporter numbered but we never received; disk_full: the journal's volume refused them)",
                ["worker", "reason"])
FLOWS = Counter("netflow_flows_decoded", "Flow records decoded", ["worker"])
SHIPPED = Counter("netflow_batches_shipped", "Batches the core committed", ["worker"])
UNBILLED = Counter("netflow_unbilled_bytes", "Bytes of legs with no account or no class (kept in raw storage)",
                   ["worker"])
RCVBUF = Gauge("netflow_rcvbuf_bytes", "Socket receive buffer the kernel granted", ["worker"],
               multiprocess_mode="livemax")
JOURNAL_BYTES = Gauge("netflow_journal_bytes", "Bytes of journal on disk", ["worker"], multiprocess_mode="livemax")
JOURNAL_LAG = Gauge("netflow_journal_lag_bytes", "Journal bytes received but not yet committed by the core",
                    ["worker"], multiprocess_mode="livemax")
JOURNAL_ALARM = Gauge("netflow_journal_over_limit", "1 while the journal exceeds journal_max_bytes", ["worker"],
                      multiprocess_mode="livemax")
JOURNAL_FREE = Gauge("netflow_journal_free_bytes", "Free bytes on the journal's volume", ["worker"],
                     multiprocess_mode="livemin")
JOURNAL_DISK_LOW = Gauge("netflow_journal_disk_low", "1 while the journal's volume has less than "
                         "journal_min_free_bytes free", ["worker"], multiprocess_mode="livemax")
JOURNAL_DISK_FULL = Gauge("netflow_journal_disk_full", "1 while the journal's volume refuses writes "
                          "(packets are dropped, counted as disk_full)", ["worker"], multiprocess_mode="livemax")
EPOCHS = Counter("netflow_journal_epochs", "Journal epochs begun, by reason (replaced: the journal is not the one "
                 "the watermark counts; truncated: it ends below the watermark; first, adopted: routine)",
                 ["worker", "reason"])
CORE_CONNECTED = Gauge("netflow_core_connected", "1 while the worker holds a session with the core", ["worker"],
                       multiprocess_mode="livemax")
