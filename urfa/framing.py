"""Length-prefixed msgpack frames, sans-IO.

Theory of operation
-------------------
A frame is a 4-byte big-endian unsigned length ``n`` followed by ``n`` bytes
holding exactly one msgpack map.  ``FrameDecoder.feed`` takes whatever bytes
the transport read; ``next_message`` returns one decoded map or ``None`` when
the buffer does not hold a whole frame yet.  The length is checked as soon as
its 4 bytes arrive, so a peer can never make us buffer more than one frame
cap plus one transport read.  Anything that is not a single well-formed map
raises ``RemoteProtocolError`` and the decoder refuses further input: after a
framing error the byte stream is unsynchronized and the connection must close.

Timestamps travel as the msgpack Timestamp extension (type -1) and decode to
aware UTC ``datetime``; every other extension type is refused.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack  # type: ignore[import-untyped]   # no stubs published

from .errors import FRAME_TOO_LARGE, LocalProtocolError, RemoteProtocolError

__all__ = ["DEFAULT_MAX_FRAME", "MAX_FEED", "FrameDecoder", "FrameEncoder", "decode_body"]

DEFAULT_MAX_FRAME = 1 << 20
# Most bytes one ``feed`` may add beyond a frame cap.  A transport read is
# far smaller (uvloop reads 256 KiB); a peer that sends more than this ahead
# of what we decoded is refused rather than buffered.
MAX_FEED = 1 << 20
_INITIAL_BUFFER = 16 * 1024   # per connection; grows with what is actually in flight
_HEADER = struct.Struct(">I")
# Nesting limit: msgpack's own stack limit (1024) applies too; this keeps
# hostile inputs cheap and our handlers' recursion safe.
_UNPACK_ERRORS = (ValueError, TypeError, OverflowError, msgpack.UnpackException)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not part of URFA")


def decode_body(body: bytes | memoryview, max_frame: int = DEFAULT_MAX_FRAME) -> dict[str, Any]:
    """Decode one frame body; only ``RemoteProtocolError`` escapes."""
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            timestamp=3,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            max_str_len=max_frame,
            max_bin_len=max_frame,
            max_array_len=max_frame,
            max_map_len=max_frame,
            max_ext_len=16,
        )
    except _UNPACK_ERRORS as exc:
        raise RemoteProtocolError(f"undecodable frame: {type(exc).__name__}") from None
    except RecursionError:
        raise RemoteProtocolError("frame nested too deeply") from None
    if type(obj) is not dict:
        raise RemoteProtocolError("frame is not a msgpack map")
    return obj


class FrameDecoder:
    """Bytes in, maps out.  Raises ``RemoteProtocolError`` on any bad frame.

    One ``msgpack.Unpacker`` per connection is fed everything the transport
    reads; frame bodies are decoded straight out of its buffer (no slicing, no
    per-frame unpacker set-up), and ``tell()`` proves that each body held
    exactly one object of exactly the announced length.
    """

    __slots__ = ("max_frame", "_unpacker", "_fed", "_pos", "_need", "_broken")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._unpacker = msgpack.Unpacker(
            raw=False,
            timestamp=3,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            max_buffer_size=max_frame + 4 + MAX_FEED,
            read_size=min(max_frame + 4 + MAX_FEED, _INITIAL_BUFFER),   # msgpack would allocate 1 MiB up front
            max_str_len=max_frame,
            max_bin_len=max_frame,
            max_array_len=max_frame,
            max_map_len=max_frame,
            max_ext_len=16,
        )
        self._fed = 0          # bytes fed so far
        self._pos = 0          # bytes consumed so far (the unpacker's tell())
        self._need = -1        # body length of the frame whose header we consumed
        self._broken = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded (bounded by cap + one read)."""
        return self._fed - self._pos + (4 if self._need >= 0 else 0)

    def feed(self, data: bytes) -> None:
        if self._broken:
            raise RemoteProtocolError("input after a framing error")
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull:
            self._broken = True
            raise RemoteProtocolError("input buffer over its cap (peer does not wait for answers)") from None
        self._fed += len(data)

    def next_message(self) -> dict[str, Any] | None:
        if self._broken:
            return None
        unpacker = self._unpacker
        n = self._need
        start = self._pos
        if n < 0:
            if self._fed - start < 4:
                return None
            n = int.from_bytes(unpacker.read_bytes(4), "big")
            start += 4
            self._pos = start
            if n > self.max_frame:
                self._broken = True
                raise RemoteProtocolError(f"frame of {n} bytes over the cap of {self.max_frame}", FRAME_TOO_LARGE)
            self._need = n
        if self._fed - start < n:
            return None
        self._need = -1
        try:
            obj = unpacker.unpack()
        except msgpack.OutOfData:   # the whole body is here: it is truncated msgpack
            obj = None
        except _UNPACK_ERRORS as exc:
            self._broken = True
            raise RemoteProtocolError(f"undecodable frame: {type(exc).__name__}") from None
        except RecursionError:
            self._broken = True
            raise RemoteProtocolError("frame nested too deeply") from None
        end: int = unpacker.tell()
        self._pos = end
        if end - start != n:
            self._broken = True
            raise RemoteProtocolError("frame body is not exactly one msgpack object")
        if type(obj) is not dict:
            self._broken = True
            raise RemoteProtocolError("frame is not a msgpack map")
        return obj


class FrameEncoder:
    """Maps out as frame bytes.  Raises ``LocalProtocolError`` if unencodable."""

    __slots__ = ("max_frame", "_packer")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._packer = msgpack.Packer(use_bin_type=True, datetime=True, autoreset=True,
                                      buf_size=_INITIAL_BUFFER)   # msgpack's default: 256 KiB each

    def encode(self, message: dict[str, Any]) -> bytes:
        try:
            body: bytes = self._packer.pack(message)
        except (TypeError, ValueError, OverflowError) as exc:
            self._packer.reset()
            raise LocalProtocolError(f"cannot encode message: {exc}") from None
        if len(body) > self.max_frame:
            raise LocalProtocolError(f"message of {len(body)} bytes over the frame cap {self.max_frame}")
        return _HEADER.pack(len(body)) + body

