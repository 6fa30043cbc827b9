"""kimi_proxy: model APIs in front of Kimi's web chat (www.kimi.com).

Paste a token of your Kimi web account (its ``refresh_token``; several, joined by commas, are
used in turn) as the API key, and a client of the OpenAI Chat Completions API can chat with Kimi
through this server:

    pip install -r requirements.txt && python kimi_proxy.py        # serves on 0.0.0.0:8000
    curl -N localhost:8000/v1/chat/completions -H "Authorization: Bearer $KIMI_TOKEN" \
         -d '{"model": "kimi", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'

Every Kimi chat the proxy creates for a request is deleted when that request ends, unless the
client asked to keep it with ``"conversation_id": "new"``. Kimi's web chat has no functions of
its own: tools and JSON answers are emulated by prompting, and what Kimi answers is checked
before a client sees it as a tool call or as JSON.

How a request flows, and the sections below in that order (each uses only those above it):

    client body -> Request -> Question -> KimiSession -> events -> parts -> client API

    §1  Configuration            §11 The neutral answer: events -> parts -> Answer
    §2  Errors                   §12 JSON as Kimi writes it: read leniently, schema checks
    §3  App and request keys     §13 Tools and JSON answers (emulated, checked, repaired)
    §4  Files                    §14 The core: plan (Request -> Question), answer parts
    §5  Kimi over HTTP, shared   §15 Server-sent events: framing, the writer, renderers
    §6  The legacy dialect       §16 Client API: Chat Completions
    §7  Connect: the wire        §17 Client API: Responses
    §8  Connect: models, client  §18 Client API: Anthropic Messages
    §9  A request's use of Kimi  §19 HTTP: credentials, bodies, the answer handler, errors, logs
    §10 The neutral request      §20 App factory
                                 §21 main

The Kimi side (§4-§9) never names a client API; a client API (§16-§18) never names a dialect; the
core (§10-§14) names neither wire format.

Settings (environment; ``--host`` and ``--port`` flags win over HOST and PORT):
    HOST, PORT                 where to listen (0.0.0.0, 8000)
    KIMI_PROTOCOL              Kimi's dialect: connect (www.kimi.com today) or legacy (REST + SSE)
    KIMI_BASE_URL              Kimi's address (https://www.kimi.com, legacy: https://kimi.moonshot.cn)
    KIMI_AUTH_URL              where connect tokens are renewed (https://auth.kimi.com for www.kimi.com,
                               https://auth.kimi.ai for www.kimi.ai, else KIMI_BASE_URL)
    KIMI_TOKEN_STORE           a file that keeps the newest (rotated) refresh tokens across restarts (none)
    UPSTREAM_CONNECT_TIMEOUT   seconds to connect to Kimi (10)
    UPSTREAM_READ_TIMEOUT      seconds without a byte from Kimi before giving up (120)
    KEEPALIVE_INTERVAL         seconds of silence before an SSE keep-alive comment (15)
    MAX_BODY_MB                largest request body accepted, in MiB (20)
    BODY_READ_TIMEOUT          seconds a client has to send its request body (30)
    MAX_OPEN_REQUESTS          requests handled at once; more get 503 at once (4096)
    SHUTDOWN_GRACE             seconds open answers may run on after SIGTERM/SIGINT (30)
    LOG_LEVEL                  DEBUG, INFO, WARNING or ERROR (INFO)
    KIMI_TOKENS                a server-side pool of Kimi tokens, comma-separated (none)
    API_KEYS                   the keys clients must send to use the pool (required with KIMI_TOKENS)
    ALLOW_PASSTHROUGH          1: with a pool, a value that is not a key is the client's own tokens (0)
    MAX_STREAMS_PER_TOKEN      answers one Kimi token serves at once (4)
    QUEUE_TIMEOUT              seconds a request waits for a free token before 429 (10)
    MAX_MESSAGES               most messages in one request (1000)
    MAX_FILE_MB                largest file or image a request may attach, in MiB (100)
    FILE_PARSE_TIMEOUT         seconds Kimi may take to read an attached document (120)
    ALLOW_PRIVATE_FILE_URLS    1: fetch file URLs on private and local networks too (0)
    CLAUDE_MODEL               the Kimi model a claude-* model name means (kimi: the default model)
    RESPONSES_STORE            most responses kept in memory for previous_response_id (200)
    RESPONSES_TTL              seconds a kept response lives (3600)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextvars
import dataclasses
import email.utils
import fcntl
import functools
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import math
import mimetypes
import os
import random
import re
import secrets
import socket
import string
import sys
import tempfile
import time
import traceback
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import aclosing, asynccontextmanager, contextmanager
from typing import NamedTuple

import aiohttp
import aiohttp.abc
import orjson
import yarl
from aiohttp import hdrs, web
from multidict import istr

log = logging.getLogger("kimi_proxy")


def loggable(text: str, limit: int = 200) -> str:
    """A client's string as it may appear in a log line: control characters escaped (no forged
    lines), cut to a sane length."""
    text = text[:limit]
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


# ---------------------------------------------------------------------------------------------
# §1 Configuration: one frozen Config, read from the environment once
# ---------------------------------------------------------------------------------------------

PROTOCOLS = {"connect": "https://www.kimi.com", "legacy": "https://kimi.moonshot.cn"}
AUTH_HOSTS = {"https://www.kimi.com": "https://auth.kimi.com", "https://www.kimi.ai": "https://auth.kimi.ai"}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(ValueError):
    """An invalid setting; its message names the variable and is shown as is at start-up."""


# Readers of settings: each checks a variable's text and converts it, or says what is wrong
def as_text(name: str, raw: str) -> str:
    return raw


def as_url(name: str, raw: str) -> str:
    value = raw.rstrip("/")
    if not re.match(r"https?://[^/\s]+", value):
        raise ConfigError(f"{name} must be an http(s) URL, got {raw!r}")
    return value


def as_one_of(*choices: str):
    def as_choice(name: str, raw: str) -> str:
        for choice in choices:
            if raw.lower() == choice.lower():
                return choice
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return as_choice


def as_port(name: str, raw: str) -> int:
    if not raw.isdigit() or not 0 <= int(raw) <= 65535:
        raise ConfigError(f"{name} must be a port number from 0 to 65535, got {raw!r}")
    return int(raw)


def as_positive(name: str, raw: str, whole: bool = False) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf") or (whole and not value.is_integer()):
        raise ConfigError(f"{name} must be a positive {'whole ' if whole else ''}number, got {raw!r}")
    return int(value) if whole else value


def as_count(name: str, raw: str) -> int:
    return as_positive(name, raw, whole=True)


def as_flag(name: str, raw: str) -> bool:
    if raw.lower() not in ("0", "1", "false", "true", "no", "yes"):
        raise ConfigError(f"{name} must be 0 or 1, got {raw!r}")
    return raw.lower() in ("1", "true", "yes")


def as_list(name: str, raw: str) -> tuple[str, ...]:
    return tuple(split_list(raw))


def split_list(value: str) -> list[str]:
    """A comma-separated list (tokens, keys), without blanks."""
    return [item.strip() for item in value.split(",") if item.strip()]


def setting(variable: str, default, read, secret: bool = False):
    """A field set by an environment variable: `read(variable, its stripped text)` checks and
    converts it; an unset or blank variable keeps the default."""
    return dataclasses.field(default=default, repr=not secret, metadata={"variable": variable, "read": read})


@dataclasses.dataclass(frozen=True)
class Config:
    host: str = setting("HOST", "0.0.0.0", as_text)
    port: int = setting("PORT", 8000, as_port)
    kimi_protocol: str = setting("KIMI_PROTOCOL", "connect", as_one_of(*PROTOCOLS))
    kimi_base_url: str = setting("KIMI_BASE_URL", PROTOCOLS["connect"], as_url)  # else the protocol's own
    kimi_auth_url: str = setting("KIMI_AUTH_URL", AUTH_HOSTS[PROTOCOLS["connect"]], as_url)  # else by base URL
    kimi_token_store: str | None = setting("KIMI_TOKEN_STORE", None, as_text)
    upstream_connect_timeout: float = setting("UPSTREAM_CONNECT_TIMEOUT", 10.0, as_positive)
    upstream_read_timeout: float = setting("UPSTREAM_READ_TIMEOUT", 120.0, as_positive)
    keepalive_interval: float = setting("KEEPALIVE_INTERVAL", 15.0, as_positive)
    max_body_mb: float = setting("MAX_BODY_MB", 20.0, as_positive)  # a data URI costs about 3 times its size decoded
    body_read_timeout: float = setting("BODY_READ_TIMEOUT", 30.0, as_positive)
    max_open_requests: int = setting("MAX_OPEN_REQUESTS", 4096, as_count)
    shutdown_grace: float = setting("SHUTDOWN_GRACE", 30.0, as_positive)
    log_level: str = setting("LOG_LEVEL", "INFO", as_one_of(*LOG_LEVELS))
    kimi_tokens: tuple[str, ...] = setting("KIMI_TOKENS", (), as_list, secret=True)
    api_keys: tuple[str, ...] = setting("API_KEYS", (), as_list, secret=True)
    allow_passthrough: bool = setting("ALLOW_PASSTHROUGH", False, as_flag)
    max_streams_per_token: int = setting("MAX_STREAMS_PER_TOKEN", 4, as_count)
    queue_timeout: float = setting("QUEUE_TIMEOUT", 10.0, as_positive)
    max_messages: int = setting("MAX_MESSAGES", 1000, as_count)
    max_file_mb: float = setting("MAX_FILE_MB", 100.0, as_positive)
    file_parse_timeout: float = setting("FILE_PARSE_TIMEOUT", 120.0, as_positive)
    allow_private_file_urls: bool = setting("ALLOW_PRIVATE_FILE_URLS", False, as_flag)
    claude_model: str = setting("CLAUDE_MODEL", "kimi", as_text)  # what a claude-* model name means
    responses_store: int = setting("RESPONSES_STORE", 200, as_count)
    responses_ttl: float = setting("RESPONSES_TTL", 3600.0, as_positive)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Config":
        env = os.environ if env is None else env
        values = {}
        for field in dataclasses.fields(cls):
            variable, read = field.metadata["variable"], field.metadata["read"]
            raw = env.get(variable, "").strip()
            if raw:
                values[field.name] = read(variable, raw)
        base_url = values.setdefault("kimi_base_url", PROTOCOLS[values.get("kimi_protocol", cls.kimi_protocol)])
        values.setdefault("kimi_auth_url", AUTH_HOSTS.get(base_url, base_url))
        if values.get("kimi_tokens") and not values.get("api_keys"):
            raise ConfigError("KIMI_TOKENS is set but API_KEYS is not: anyone who can reach this server could "
                              "use your Kimi accounts (an open relay). Set API_KEYS to the keys clients must send.")
        return cls(**values)


# ---------------------------------------------------------------------------------------------
# §2 Errors: what a client sees when something fails, in no client API's terms
# ---------------------------------------------------------------------------------------------


RATE_LIMIT_COOL_DOWN = 60.0  # seconds a rate-limited token rests when Kimi gives no hint
OUTAGE_COOL_DOWN = 5.0       # seconds a token rests after Kimi failed with a 5xx
DEAD_TOKEN_RETRY = 600.0     # seconds before a token Kimi rejected is tried again
MAX_TOKENS_PER_REQUEST = 32  # tokens one API key may carry, comma-separated
MAX_TRIES_PER_REQUEST = 5    # tokens one request tries before it gives up
MAX_MODEL_NAME = 256         # characters: the model name is echoed in every chunk and logged


class ProxyError(Exception):
    """A failure the client sees, in no client API's terms: each client API renders it in its own
    envelope (before the stream) or event (after it)."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after
        self.cool_down: float | None = None  # seconds the token that met this error should rest


def bad_request(message: str, param: str | None = None) -> ProxyError:
    return ProxyError(400, message, param=param)


def upstream_error(message: str) -> ProxyError:
    return ProxyError(502, message, code="upstream_error")


def upstream_timeout(message: str) -> ProxyError:
    return ProxyError(504, message, code="upstream_timeout")


def internal_error() -> ProxyError:
    return ProxyError(500, "Internal error in kimi_proxy", code="internal_error")


def conversation_not_found() -> ProxyError:
    return ProxyError(404, "Kimi does not know this conversation on this account", code="conversation_not_found",
                      param="conversation_id")


class TokenRejected(ProxyError):
    """Kimi refused this credential; the request may move on to the next token."""

    def __init__(self, message: str = "Kimi rejected the token: send a valid Kimi refresh_token as the API key"):
        super().__init__(401, message, code="invalid_api_key")


class RateLimited(ProxyError):
    """Kimi is limiting this account; the request may move on to the next token, and the token
    cools down for a while."""

    def __init__(self, message: str, retry_after: int | None = None, code: str = "rate_limit_exceeded"):
        super().__init__(429, message, code=code, retry_after=retry_after)
        self.cool_down = retry_after or RATE_LIMIT_COOL_DOWN


class QuotaExhausted(RateLimited):
    """This account's quota for a feature is used up: other tokens may still have it, and cooling
    would not bring it back."""

    def __init__(self, message: str):
        super().__init__(message, code="insufficient_quota")
        self.cool_down = None


def kimi_outage(message: str) -> ProxyError:
    """Kimi failing in a way that says nothing about the token: 502, and the token rests briefly."""
    error = upstream_error(message)
    error.cool_down = OUTAGE_COOL_DOWN
    return error


def retry_after_seconds(value: str | None) -> int | None:
    """Seconds from a Retry-After header (a number or an HTTP date); None for anything else."""
    if not value:
        return None
    if re.fullmatch(r"[0-9]{1,7}", value.strip()):
        return int(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0, min(86400, math.ceil(when.timestamp() - time.time())))


# ---------------------------------------------------------------------------------------------
# §3 App and request keys, and the proxy's own headers
# ---------------------------------------------------------------------------------------------


CONFIG = web.AppKey("config", Config)
KIMI = web.AppKey("kimi", "KimiHTTP")
JANITOR = web.AppKey("janitor", "Janitor")
CHAT_OWNERS = web.AppKey("chat_owners", "BoundedMap")  # kept chat id -> the credential that created it
TOKEN_TURN = web.AppKey("token_turn", itertools.count)
TOKEN_HEALTH = web.AppKey("token_health", "TokenHealth")
TOKEN_STORE = web.AppKey("token_store", "TokenStore")
OPEN_REQUESTS = web.AppKey("open_requests", "OpenRequests")
STARTED_AT = web.AppKey("started_at", float)
LIMITS = web.AppKey("limits", "Limits")  # what parsers enforce from the settings
KEEPALIVE_CLOCK = web.AppKey("keepalive_clock", "KeepAliveClock")
RESPONSES = web.AppKey("responses", "ResponseStore")  # recent responses, for previous_response_id
# what the request log line reports
MODEL = web.RequestKey("model", str)
CHUNKS_SENT = web.RequestKey("chunks_sent", int)
CLIENT_GONE = web.RequestKey("client_gone", bool)
REQUEST_ID = web.RequestKey("request_id", str)
CLIENT_API = web.RequestKey("client_api", "ClientAPI")  # the API a request's failures are written in
CALLER = web.RequestKey("caller", str)  # a hash of the key a request came with: who owns what it stores
# our own response headers, as istr like the Kimi ones: aiohttp keeps each keep-alive connection's
# last response (and its headers) until the next one is answered
X_REQUEST_ID, X_CONVERSATION_ID, X_ACCEL_BUFFERING, X_API_KEY, REQUEST_ID_HEADER = map(
    istr, ("X-Request-ID", "X-Conversation-Id", "X-Accel-Buffering", "X-Api-Key", "Request-Id"))


# ---------------------------------------------------------------------------------------------
# §4 Files: attachments, data URIs, and fetching what clients point at, safely
# ---------------------------------------------------------------------------------------------


DOWNLOAD_READ_GAP = 30.0    # seconds without a byte from a file's server
DOWNLOAD_DEADLINE = 600.0   # seconds for a whole download
UPLOAD_DEADLINE = 600.0     # seconds for a whole upload to Kimi's storage
MAX_REDIRECTS = 3
CHUNK = 64 * 1024           # bytes read and written at a time: memory stays flat for any size
SPOOL_IN_MEMORY = 1024 * 1024  # a source of unknown length is spooled to disk past this
MEDIA_TYPE = re.compile(r"[\w.+-]+/[\w.+-]+")
HOST_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


@dataclasses.dataclass(frozen=True, slots=True)
class Attachment:
    """A file or image of the last message: a data URI already decoded, or an http(s) URL."""

    part: str                # where the client put it, e.g. messages[2].content[1]
    kind: str                # "image" or "file"
    name: str
    mime: str
    url: str | None = None
    data: bytes | bytearray | None = None


DATA_URI_HEADER = re.compile(r"data:([^;,]*)((?:;[^;,]*)*);base64")
WHITESPACE = re.compile(r"\s+")
BASE64_PIECE = 4 * 2**20  # characters decoded at a time (a multiple of 4: padding stays at the end)
DEFAULT_NAMES = {"image": "image", "file": "file"}


def to_attachment(kind: str, url: object, filename: object, where: str, max_bytes: int) -> Attachment:
    """An attachment ("image" or "file") from what a client API's part gives: a base64 data URI or
    an http(s) URL, and maybe a file name. Raises 400 (or 413) naming the part."""
    attachment_kind = kind
    if not isinstance(url, str) or not url.strip():
        raise bad_request(f"'{where}' has no URL or data", where)
    url = url.strip()
    name = filename if isinstance(filename, str) and filename.strip() else None
    if url.startswith("data:"):
        data, mime = from_data_uri(url, where, max_bytes)
        if mime.startswith("image/"):
            attachment_kind = "image"
        return Attachment(where, attachment_kind, to_file_name(name, None, mime, attachment_kind), mime, data=data)
    parsed = to_http_url(url, where)
    return Attachment(where, attachment_kind, to_file_name(name, parsed.path, "", attachment_kind),
                      "application/octet-stream", url=url)


def to_base64_attachment(kind: str, data: object, media_type: object, filename: object, where: str,
                         max_bytes: int) -> Attachment:
    """An attachment given as bare base64 and its media type (Anthropic's sources)."""
    if not isinstance(data, str) or not isinstance(media_type, str):
        raise bad_request(f"'{where}' needs base64 'data' and a 'media_type'", where)
    mime = to_media_type(media_type, where)
    name = filename if isinstance(filename, str) and filename.strip() else None
    kind = "image" if mime.startswith("image/") else kind
    return Attachment(where, kind, to_file_name(name, None, mime, kind), mime,
                      data=from_base64(data, 0, where, max_bytes))


def file_id_refused(where: str) -> ProxyError:
    return bad_request(f"'{where}': a file_id needs a Files API this server does not have; send file_data or a "
                       "file_url", where)


def from_data_uri(uri: str, where: str, max_bytes: int) -> tuple[bytearray, str]:
    """(bytes, media type) of a base64 data URI. A data URI may be most of a large request, so it
    is decoded piece by piece into one buffer, never copied whole."""
    comma = uri.find(",")
    found = DATA_URI_HEADER.fullmatch(uri, 0, max(comma, 0))
    if found is None:
        raise bad_request(f"'{where}' must be a base64 data URI (data:<type>;base64,...)", where)
    mime = to_media_type(found[1], where)
    return from_base64(uri, comma + 1, where, max_bytes), mime


def to_media_type(given: str, where: str) -> str:
    mime = given.strip().lower() or "application/octet-stream"
    if not MEDIA_TYPE.fullmatch(mime):
        raise bad_request(f"'{where}' has a media type that is not one (type/subtype)", where)
    return mime


def from_base64(text: str, start: int, where: str, max_bytes: int) -> bytearray:
    """The bytes of the base64 in `text` from `start` on, decoded piece by piece into one buffer:
    it may be most of a large request, so it is never copied whole."""
    if WHITESPACE.search(text, start):  # line-wrapped base64: rare, and worth one copy
        text, start = WHITESPACE.sub("", text[start:]), 0
    if (len(text) - start) * 3 // 4 > max_bytes + 3:
        raise file_too_large(where, max_bytes)
    data = bytearray((len(text) - start) // 4 * 3 - (len(text) - len(text.rstrip("="))))  # filled, never grown
    try:
        filled = 0
        for offset in range(start, len(text), BASE64_PIECE):
            piece = binascii.a2b_base64(text[offset:offset + BASE64_PIECE], strict_mode=True)
            data[filled:filled + len(piece)] = piece
            filled += len(piece)
    except ValueError:
        raise bad_request(f"'{where}' is not valid base64", where) from None
    if filled != len(data):
        raise bad_request(f"'{where}' is not valid base64", where)
    if not data:
        raise bad_request(f"'{where}' is empty", where)
    return data


def to_file_name(given: str | None, path: str | None, mime: str, kind: str) -> str:
    """A plain file name: the client's, else the URL's last path segment, else one from the type."""
    name = given or (path or "").rstrip("/").rsplit("/", 1)[-1]
    name = re.sub(r"[\\/\x00-\x1f]", "_", name).strip(". ") if name else ""
    if name:
        return name[:200]
    return DEFAULT_NAMES[kind] + (mimetypes.guess_extension(mime) or "")


def to_http_url(url: str | yarl.URL, where: str) -> yarl.URL:
    """A file URL checked for what a connection needs: http(s), a host name of valid labels or an
    IP literal, a usable port. Anything else is the client's mistake: 400 naming the part."""
    try:
        parsed = url if isinstance(url, yarl.URL) else yarl.URL(url)
        usable = parsed.scheme in ("http", "https") and bool(parsed.port) and is_host(parsed.raw_host or "")
    except ValueError:  # (UnicodeError included) a bad port, IPv6 literal or IDNA label
        usable = False
    if not usable:
        raise bad_request(f"'{where}' must be an http(s) URL with a valid host and port, or a data: URI", where)
    return parsed


def is_host(host: str) -> bool:
    """An IP literal, or a name whose labels DNS and IDNA accept."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True
    except ValueError:
        labels = host.removesuffix(".").split(".")
        return 0 < len(host) <= 253 and all(HOST_LABEL.fullmatch(label) and is_idna(label) for label in labels)


def is_idna(label: str) -> bool:
    try:
        label.encode("ascii").decode("idna")
    except UnicodeError:
        return False
    return True


def is_public_address(address: str) -> bool:
    """Whether an IP address is on the public internet (not loopback, private, link-local,
    multicast, reserved or unspecified), looking through IPv6 forms that embed an IPv4 one."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and any(ip in network for network in EMBEDS_IPV4):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public_address(str(embedded))
    return ip.is_global and not ip.is_multicast


# IPv6 ranges whose last 32 bits are an IPv4 address: NAT64 (well-known and local-use),
# IPv4-translated and the deprecated IPv4-compatible form
EMBEDS_IPV4 = tuple(map(ipaddress.ip_network, ("64:ff9b::/96", "64:ff9b:1::/48", "::ffff:0:0:0/96", "::/96")))


class PrivateAddress(OSError):
    """A file URL's host resolves only to addresses this server does not fetch from."""


class PublicOnlyResolver(aiohttp.abc.AbstractResolver):
    """Resolves a host once and keeps only public addresses, so the connection goes to an address
    that was checked (no second lookup that could answer differently)."""

    def __init__(self) -> None:
        self._resolver = aiohttp.DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list:
        public = [found for found in await self._resolver.resolve(host, port, family)
                  if is_public_address(found["host"])]
        if not public:
            raise PrivateAddress(f"{host} has no public address")
        return public

    async def close(self) -> None:
        await self._resolver.close()


class FileBytes:
    """A file's bytes on their way to Kimi: size and type known, read in chunks once."""

    def __init__(self, name: str, mime: str, size: int, chunks: AsyncIterator[bytes]) -> None:
        self.name, self.mime, self.size, self.chunks = name, mime, size, chunks


def file_too_large(part: str, max_bytes: int) -> ProxyError:
    return ProxyError(413, f"'{part}' is larger than the {max_bytes / 2**20:g} MiB limit (MAX_FILE_MB)",
                      code="file_too_large", param=part)


class FileFetcher:
    """Downloads the files clients name by URL: http(s) only, public addresses only (unless
    ALLOW_PRIVATE_FILE_URLS), every redirect checked, size capped, never held in memory whole."""

    def __init__(self, session: aiohttp.ClientSession, config: Config) -> None:
        self._session = session
        self._allow_private = config.allow_private_file_urls
        self._max_bytes = int(config.max_file_mb * 2**20)

    @staticmethod
    def session(config: Config) -> aiohttp.ClientSession:
        resolver = aiohttp.DefaultResolver() if config.allow_private_file_urls else PublicOnlyResolver()
        timeout = aiohttp.ClientTimeout(total=DOWNLOAD_DEADLINE, sock_connect=config.upstream_connect_timeout,
                                        sock_read=DOWNLOAD_READ_GAP)
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False),
                                     timeout=timeout)

    @asynccontextmanager
    async def source(self, attachment: "Attachment"):
        """The attachment's bytes: decoded data, a download streamed as it comes when its length
        is known, else one spooled to a temporary file first (Kimi's storage wants a length)."""
        if attachment.data is not None:
            yield FileBytes(attachment.name, attachment.mime, len(attachment.data), one_chunk(attachment.data))
            return
        part = attachment.part
        try:
            async with self._open(attachment) as response:
                mime = response.content_type or attachment.mime
                declared = response.content_length
                if declared is not None and declared > self._max_bytes:
                    raise file_too_large(part, self._max_bytes)
                if declared is not None:
                    yield FileBytes(attachment.name, mime, declared, self._capped(response, part, declared))
                    return
                with tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY) as spool:
                    size = 0
                    async for chunk in self._capped(response, part, self._max_bytes):
                        spool.write(chunk)
                        size += len(chunk)
                    spool.seek(0)
                    yield FileBytes(attachment.name, mime, size, read_spool(spool))
        except asyncio.TimeoutError:
            raise ProxyError(504, f"Fetching '{part}' timed out", code="file_timeout", param=part) from None
        except aiohttp.ClientConnectorDNSError as error:
            if isinstance(error.os_error, PrivateAddress):
                raise self._refused(part) from None
            raise bad_request(f"Could not fetch '{part}': its host name does not resolve", part) from None
        except (aiohttp.ClientError, ValueError):  # ValueError: a URL aiohttp cannot use after all
            raise bad_request(f"Could not fetch '{part}': the connection to its server failed", part) from None

    @asynccontextmanager
    async def _open(self, attachment: "Attachment"):
        """The file's response, following at most 3 redirects and checking every address."""
        url = yarl.URL(attachment.url)
        for _ in range(MAX_REDIRECTS + 1):
            self._check(url, attachment.part)
            async with self._session.get(url, allow_redirects=False) as response:
                if response.status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                    try:
                        url = url.join(yarl.URL(response.headers["Location"]))
                    except ValueError:
                        raise bad_request(f"Could not fetch '{attachment.part}': it redirects to a URL that is "
                                          "not one", attachment.part) from None
                    continue
                if response.status != 200:
                    raise bad_request(f"Could not fetch '{attachment.part}': its server answered HTTP "
                                      f"{response.status}", attachment.part)
                yield response
                return
        raise bad_request(f"Could not fetch '{attachment.part}': more than {MAX_REDIRECTS} redirects",
                          attachment.part)

    def _check(self, url: yarl.URL, part: str) -> None:
        to_http_url(url, part)
        if self._allow_private:
            return
        try:
            literal = ipaddress.ip_address(url.host.strip("[]").split("%", 1)[0])
        except ValueError:
            return  # a host name: PublicOnlyResolver checks what it resolves to
        if not is_public_address(str(literal)):
            raise self._refused(part)

    @staticmethod
    def _refused(part: str) -> ProxyError:
        return bad_request(f"'{part}' points to a private or local network address, which this server does not "
                           "fetch from (ALLOW_PRIVATE_FILE_URLS=1 allows it on a trusted network)", part)

    @staticmethod
    async def _capped(response: aiohttp.ClientResponse, part: str, max_bytes: int) -> AsyncIterator[bytes]:
        received = 0
        async for chunk in response.content.iter_chunked(CHUNK):
            received += len(chunk)
            if received > max_bytes:
                raise file_too_large(part, max_bytes)
            yield chunk


async def one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def read_spool(spool) -> AsyncIterator[bytes]:
    while chunk := spool.read(CHUNK):
        yield chunk


class KimiFile(NamedTuple):
    id: str
    name: str
    size: int
    kind: str       # "image" or "file"
    detail: dict    # Kimi's file object, as registered


# ---------------------------------------------------------------------------------------------
# §5 Kimi over HTTP, shared by the dialects: the question and its events, tokens, the pool, the client
# ---------------------------------------------------------------------------------------------


# The efforts a question may ask for, on one scale with Kimi's (a dialect maps them to its own)
REASONING_EFFORTS = {"none": 0, "minimal": 1, "low": 2, "medium": 3, "high": 4}


@dataclasses.dataclass(frozen=True, slots=True)
class Question:
    """What Kimi is asked for one answer, in Kimi's terms: planned from a client's request (§14),
    asked by a dialect."""

    model: str                   # the name Kimi's model is chosen by
    prompt: str
    agent_id: str | None = None  # a Kimi+ agent named by the model
    search: bool = False
    research: bool = False
    reasoning: bool = False
    reasoning_effort: str | None = None  # one of REASONING_EFFORTS
    math: bool = False
    silent: bool = False         # no web sources in the answer
    chat_id: str | None = None   # an existing Kimi chat to continue
    keep: bool = False           # the client manages the conversation: report its id, never delete it
    attachments: tuple = ()      # files and images of the last turn


# Dialect-neutral events that every Kimi dialect yields for one answer.
TEXT = "text"            # answer text delta
REASONING = "reasoning"  # thinking text delta
SOURCE = "source"        # one web-search source (title, url, its number in the answer); none when silent
LENGTH = "length"        # the answer was cut at Kimi's length limit
DONE = "done"            # the answer is complete (a dialect ends every answer with DONE, or raises)
CHAT = "chat"            # the Kimi chat id the answer lives in


class Event(NamedTuple):
    kind: str
    text: str = ""
    url: str = ""
    number: int = 0


VISIBLE = frozenset((TEXT, REASONING, SOURCE))  # events that put something in front of the client
DONE_EVENT = Event(DONE)
LENGTH_EVENT = Event(LENGTH)
# the model names of the original proxy; every dialect offers them
LEGACY_NAMES = ["kimi", "kimi-search", "kimi-research", "kimi-k1", "kimi-thinking", "kimi-math",
                "kimi-silent", "kimi-search-silent"]
KIMI_ID = re.compile(r"[0-9A-Za-z_-]{1,128}")  # any id Kimi hands out that is safe in a path or a header
XID = re.compile(r"[0-9a-z]{20}")  # the shape of legacy chat ids and of Kimi+ agent ids
RETRY_BACKOFF = (0.25, 0.75)  # seconds before the 2nd and 3rd try of a call that hit a 5xx or a dead connection
ACCESS_TOKEN_DEFAULT_LIFETIME = 300.0


class Janitor:
    """Owns background clean-up calls (chat deletions) so that they outlive the request that
    started them, never delay its answer, and are awaited at shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout: float) -> None:
        """Let pending work finish for up to `timeout` seconds, then cancel what is left."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        leftovers = set(self._tasks)
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)


class BoundedMap(OrderedDict):
    """A dict that forgets its oldest entries past `size` (for per-chat memory)."""

    def __init__(self, size: int = 10_000) -> None:
        super().__init__()
        self._size = size

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        if len(self) > self._size:
            self.popitem(last=False)


def jwt_claims(token: str) -> dict:
    """The payload of a JWT, unverified; {} for anything that is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


def is_access_token(credential: str) -> bool:
    """Told apart by the JWT's own `typ` claim: an access token cannot be renewed."""
    return jwt_claims(credential).get("typ") == "access"


class Grant(NamedTuple):
    access_token: str
    renew_at: float  # loop time after which the access token is renewed
    headers: dict    # what every call with this access token sends, built once


def renewal_time(access_token: str, now_wall: float, now_loop: float) -> float:
    """When to renew an access token: a little before its JWT exp (a fifth of its life, at most
    four minutes early), else after the default lifetime."""
    exp = jwt_claims(access_token).get("exp")
    if not isinstance(exp, (int, float)):
        return now_loop + ACCESS_TOKEN_DEFAULT_LIFETIME
    lifetime = exp - now_wall
    return now_loop + max(0.0, lifetime - min(240.0, lifetime * 0.2))


class AccessTokens:
    """Access tokens cached per credential, renewed before expiry, one renewal in flight per token."""

    def __init__(self, renew) -> None:
        self._renew = renew
        self._grants: dict[str, Grant] = {}
        self._pending: dict[str, asyncio.Future] = {}

    async def get(self, credential: str) -> Grant:
        grant = self._grants.get(credential)
        if grant is not None and asyncio.get_running_loop().time() < grant.renew_at:
            return grant
        pending = self._pending.get(credential)
        if pending is None:
            pending = asyncio.ensure_future(self._renew(credential))
            self._pending[credential] = pending
            pending.add_done_callback(lambda done: self._settle(credential, done))
        # shield: a waiter that goes away must not cancel the renewal the others wait for
        return await asyncio.shield(pending)

    def _settle(self, credential: str, done: asyncio.Future) -> None:
        self._pending.pop(credential, None)
        if not done.cancelled() and done.exception() is None:
            self._grants[credential] = done.result()

    def discard_if_current(self, credential: str, grant: Grant) -> None:
        """Forget `grant` (unless a newer one has replaced it already)."""
        if self._grants.get(credential) is grant:
            del self._grants[credential]

    def discard(self, credential: str) -> None:
        self._grants.pop(credential, None)

    def close(self) -> None:
        for pending in self._pending.values():
            pending.cancel()


@dataclasses.dataclass(slots=True)
class TokenState:
    token: str               # the one copy of the token that its requests use while they are answered
    dead_until: float = 0.0  # loop time; a dead token is tried again after a while, so a pool heals
    cool_until: float = 0.0  # loop time
    resting_after: str = ""  # what made it rest: "a rate limit" or "a Kimi failure"
    in_flight: int = 0

    def is_dead(self, now: float) -> bool:
        return self.dead_until > now


class NoTokenLeft(Exception):
    """Every token of the request is dead or has been tried."""


def fingerprint(token: str) -> str:
    """A short id for a token that cannot be turned back into it (for /healthz)."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()[:12]


class TokenHealth:
    """Which Kimi tokens are alive, resting or dead, and how many answers each serves. Hands out
    the healthy token with the fewest answers in flight, at most `cap` at once per token."""

    def __init__(self, pool: tuple[str, ...], cap: int, queue_timeout: float) -> None:
        self._pool = {token: TokenState(token) for token in pool}
        self._seen = BoundedMap()  # passthrough tokens, forgotten oldest first
        self._cap = cap
        self._queue_timeout = queue_timeout
        self._released = asyncio.Event()

    def state(self, token: str) -> TokenState:
        state = self._pool.get(token) or self._seen.get(token)
        if state is None:
            state = self._seen[token] = TokenState(token)
        return state

    async def acquire(self, candidates: list[str], tried: list[str]) -> str:
        """A token for one answer; waits (within the queue timeout) while all are at the cap."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._queue_timeout
        while True:
            now = loop.time()
            alive = [token for token in candidates if token not in tried and not self.state(token).is_dead(now)]
            if not alive or len(tried) >= MAX_TRIES_PER_REQUEST:
                raise NoTokenLeft()
            ready = [token for token in alive if self.state(token).cool_until <= now]
            if not ready:
                rest = min(self.state(token).cool_until for token in alive) - now
                reasons = sorted({self.state(token).resting_after for token in alive})
                raise RateLimited(f"Every Kimi token of this request is resting after {' or '.join(reasons)}",
                                  retry_after=max(1, math.ceil(rest)))
            best = min(ready, key=lambda token: self.state(token).in_flight)  # ties: the turn's order
            if self.state(best).in_flight < self._cap:
                self.state(best).in_flight += 1
                return best
            if now >= deadline:
                raise RateLimited("Every Kimi token is busy with other answers; try again shortly", retry_after=1)
            released = self._released
            try:
                async with asyncio.timeout(deadline - now):
                    await released.wait()
            except TimeoutError:
                pass

    def release(self, token: str) -> None:
        state = self.state(token)  # (recreated if >10,000 passthrough tokens pushed it out meanwhile)
        state.in_flight = max(0, state.in_flight - 1)
        self._released.set()
        self._released = asyncio.Event()

    def learn_from(self, token: str, error: ProxyError) -> None:
        """What an error says about the token that met it."""
        now = asyncio.get_running_loop().time()
        if isinstance(error, TokenRejected):
            self.state(token).dead_until = now + DEAD_TOKEN_RETRY
        elif error.cool_down:
            state = self.state(token)
            if now + error.cool_down > state.cool_until:
                state.cool_until = now + error.cool_down
                state.resting_after = "a rate limit" if isinstance(error, RateLimited) else "a Kimi failure"

    def report(self) -> list[dict]:
        now = asyncio.get_running_loop().time()
        return [{"id": fingerprint(token),
                 "state": "dead" if state.is_dead(now) else "cooling" if state.cool_until > now else "alive",
                 "in_flight": state.in_flight, "cooling_s": max(0, math.ceil(state.cool_until - now))}
                for token, state in itertools.chain(self._pool.items(), self._seen.items())]


class TokenStore:
    """The newest refresh token for each token a user configured or sent: Kimi rotates refresh
    tokens on every renewal and refuses the spent one. Kept in memory, and with KIMI_TOKEN_STORE
    also in that file (mode 0600, replaced atomically, keyed by a hash of the original token) so
    that the original token still works after a restart, and on any instance that shares the
    file: a renewal reads the file and writes it back under a file lock, so two instances never
    spend the same token and each picks up what the other renewed."""

    def __init__(self, path: str | None) -> None:
        self._path = path
        self._newest: dict[str, str] = read_token_store(path) if path else {}

    @asynccontextmanager
    async def renewing(self, credential: str) -> AsyncIterator[str]:
        """The newest refresh token for `credential`; with a store file, locked until the block
        (the renewal and its save) is over."""
        if self._path is None:
            yield self._newest.get(token_key(credential), credential)
            return
        with await lock_file(self._path + ".lock"):
            try:
                self._newest = read_token_store(self._path)
            except ConfigError as error:  # (written atomically, so only a person can break it)
                log.error("%s; renewing with the tokens in memory", error)
            yield self._newest.get(token_key(credential), credential)

    def save(self, credential: str, refresh_token: str) -> None:
        """Called inside `renewing`, so that the file is written under its lock."""
        key = token_key(credential)
        if self._newest.get(key) == refresh_token:
            return
        self._newest[key] = refresh_token
        if self._path is None:
            return
        try:
            write_token_store(self._path, self._newest)
        except OSError as error:  # the token still lives in memory: this process keeps working
            log.error("could not write KIMI_TOKEN_STORE %s: %s", self._path, error.strerror or error)


async def lock_file(path: str, timeout: float = 60.0):
    """An open file holding an exclusive flock on `path` (closing it unlocks). Tried without
    blocking, so that waiting for another instance can be cancelled like any await."""
    file = open(path, "a")  # the caller closes it
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return file
                except BlockingIOError:
                    await asyncio.sleep(0.02)
    except TimeoutError:
        file.close()
        raise ProxyError(503, "The token store stayed locked by another instance (KIMI_TOKEN_STORE)",
                         code="token_store_busy", retry_after=5) from None
    except BaseException:
        file.close()
        raise


def token_key(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def read_token_store(path: str) -> dict[str, str]:
    """The store's tokens; a store that cannot be used stops the start with a ConfigError."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ConfigError(f"KIMI_TOKEN_STORE {path}: its folder does not exist or is not writable")
    try:
        with open(path, "rb") as file:
            stored = orjson.loads(file.read())
    except FileNotFoundError:
        return {}
    except (OSError, orjson.JSONDecodeError) as error:
        raise ConfigError(f"KIMI_TOKEN_STORE {path} cannot be read: {error}") from None
    tokens = stored.get("tokens") if isinstance(stored, dict) else None
    if not isinstance(tokens, dict) or not all(isinstance(v, str) and v for v in tokens.values()):
        raise ConfigError(f"KIMI_TOKEN_STORE {path} is not a token store (expected {{\"tokens\": {{...}}}})")
    return dict(tokens)


def write_token_store(path: str, tokens: dict[str, str]) -> None:
    """Written to a temporary file beside it and renamed over it: a crash leaves the old or the new."""
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".kimi-tokens-")
    try:
        with os.fdopen(handle, "wb") as file:  # mkstemp creates it 0600
            file.write(orjson.dumps({"tokens": tokens}))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


# Header names for Kimi are istr (aiohttp.hdrs has the standard ones): aiohttp case-folds a plain
# str name anew on every call and keeps that copy while the answer streams.
X_MSH_PLATFORM, X_MSH_VERSION, X_MSH_DEVICE_ID, X_MSH_SESSION_ID, X_TRAFFIC_ID, X_LANGUAGE, R_TIMEZONE = map(
    istr, ("X-Msh-Platform", "X-Msh-Version", "X-Msh-Device-Id", "X-Msh-Session-Id", "X-Traffic-Id", "X-Language",
           "R-Timezone"))


def browser_headers(base_url: str) -> dict[str, str]:
    """Headers Kimi's web app sends on every call (as of 2026-09); the device ids are fixed per process."""
    return {
        hdrs.ACCEPT: "*/*",
        hdrs.ACCEPT_LANGUAGE: "zh-CN,zh;q=0.9,en-US;q=0.8,en;q=0.7",
        hdrs.ORIGIN: base_url,
        hdrs.USER_AGENT: ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
                          "(KHTML, like Gecko) Chrome/142.0.0.0 Safari/537.36"),
        X_MSH_PLATFORM: "web",
        X_MSH_VERSION: "2.2.0",
        X_LANGUAGE: "en-US",
        R_TIMEZONE: "UTC",
        X_MSH_DEVICE_ID: "7" + "".join(random.choices("0123456789", k=18)),
        X_MSH_SESSION_ID: "17" + "".join(random.choices("0123456789", k=17)),
    }


def json_body(value: object) -> bytes:
    """A request body for Kimi. orjson's bytes keep the 4 KB buffer they were written into, and
    aiohttp holds a body as long as its answer streams, so the body is copied to its own size."""
    return bytes(memoryview(orjson.dumps(value)))


PROMPT_MARK = "\ue000kimi-proxy: the prompt\ue000"  # stands for the prompt in the JSON around it
PROMPT_SLICE = 2**18  # characters of the prompt written into the request at a time


def json_with_text(value: object, text: str) -> list[bytes]:
    """`value` as JSON in parts, with `text` where PROMPT_MARK stands in one of its strings. The
    text, which may be most of a large request, is written a slice at a time: orjson would keep
    a UTF-8 copy of it beside the text and make more while it writes."""
    head, tail = orjson.dumps(value).split(PROMPT_MARK.encode(), 1)
    slices = [json.encoder.encode_basestring(text[start:start + PROMPT_SLICE])[1:-1].encode()
              for start in range(0, len(text), PROMPT_SLICE)]
    return [head, *slices, tail]


class Pieces:
    """A request body of several parts, sent a piece at a time as often as a call is tried: no
    copy of the whole is made (a prompt may be most of a large request), and the socket's buffer
    holds a piece of it, not all of it."""

    def __init__(self, *parts: bytes) -> None:
        self.parts = parts
        self.size = sum(map(len, parts))

    async def pieces(self) -> AsyncIterator[bytes]:
        if self.size <= CHUNK:  # most bodies: one write
            yield b"".join(self.parts)
            return
        for part in self.parts:
            view = memoryview(part)
            for start in range(0, len(part), CHUNK):
                yield view[start:start + CHUNK]


async def read_kimi_json(response: aiohttp.ClientResponse) -> object:
    """A Kimi JSON body, or None when it is not JSON."""
    try:
        return orjson.loads(await response.read())
    except orjson.JSONDecodeError:
        return None


def not_a_web_page(response: aiohttp.ClientResponse) -> aiohttp.ClientResponse:
    """The response itself, unless Kimi redirected (kimi.moonshot.cn sends visitors outside
    mainland China to www.kimi.com) or answered with an HTML page instead of its API."""
    if 300 <= response.status < 400:
        response.release()
        raise kimi_outage(f"Kimi redirected this API call (HTTP {response.status}) instead of answering: "
                          "check KIMI_BASE_URL and KIMI_PROTOCOL (kimi.moonshot.cn redirects visitors outside "
                          "mainland China; use the connect dialect)")
    if response.status < 300 and response.content_type == "text/html":
        response.release()
        raise kimi_outage("Kimi answered with a web page instead of its API: check KIMI_BASE_URL and KIMI_PROTOCOL")
    return response


@contextmanager
def upload_failures(part: str):
    """A failed upload to Kimi, as the client sees it."""
    try:
        yield
    except asyncio.TimeoutError:
        raise upstream_timeout(f"Uploading '{part}' to Kimi timed out") from None
    except aiohttp.ClientError:
        raise upstream_error(f"Uploading '{part}' to Kimi failed") from None


class KimiHTTP:
    """What both dialects share: the session, retries of failed calls, access tokens that are
    renewed before expiry and once more when Kimi rejects them, and the REST file upload.

    A dialect is a subclass that defines what the rest of the proxy reads: `chat_ids` and
    `chat_id_shape` (the chat ids it issues), `agent_ids` (the model names that are Kimi+ agent
    ids), `mark_links` (user text as the web app sends it), `model_ids`, `check_token` and
    `converse` (ask a question: yields the events of each network read together, CHAT with the
    chat id as soon as a chat exists); and the hooks this class calls: `_grant` (a credential ->
    a Grant), `_delete` (a chat), `_is_auth_failure` (whether a failed call means a rejected token),
    `_error_for` (what else a failed call means) and `_token_rejection` (the TokenRejected to raise).
    A token Kimi rejects is renewed once in three places, as the wire makes it show: a call's
    HTTP status (`_call`), an error inside an answer stream (connect's `converse`) and an upload's
    status (connect's `_upload_file`)."""

    json_headers: dict = {}  # what the dialect's JSON calls carry besides the credentials

    agent_ids = XID

    @staticmethod
    def mark_links(text: str) -> str:
        return text

    def __init__(self, session: aiohttp.ClientSession, config: Config, fetcher: "FileFetcher",
                 store: TokenStore, janitor: Janitor) -> None:
        self._session = session
        self._janitor = janitor  # background calls (cancels) that outlive the request
        self._fetcher = fetcher
        self._base = config.kimi_base_url
        self._headers = browser_headers(config.kimi_base_url)
        self._read_timeout = config.upstream_read_timeout
        self._parse_timeout = config.file_parse_timeout
        self._refresh_tokens = store
        self.tokens = AccessTokens(self._grant)

    def _token_rejection(self, credential: str) -> TokenRejected:
        return TokenRejected()

    def _error_for_response(self, response: aiohttp.ClientResponse, body: object) -> ProxyError:
        """What a failed Kimi answer means for the client (and for its token: a 5xx rests it)."""
        error = self._error_for(response.status, body, response.headers.get("Retry-After"))
        if response.status >= 500:
            error.cool_down = OUTAGE_COOL_DOWN
        return error

    def _new_grant(self, access_token: str, user_id: str, renew_at: float) -> Grant:
        return Grant(access_token, renew_at, self._auth_headers(access_token, user_id))

    def _auth_headers(self, access_token: str, user_id: str) -> dict[str, str]:
        return {**self._headers, hdrs.AUTHORIZATION: f"Bearer {access_token}", X_TRAFFIC_ID: user_id}

    async def delete_chat(self, credential: str, chat_id: str) -> None:
        try:
            await self._delete(credential, chat_id)
        except ProxyError as error:
            log.warning("could not delete Kimi chat %s: %s", chat_id, error.message)
        else:
            log.debug("deleted Kimi chat %s", chat_id)

    def close(self) -> None:
        self.tokens.close()

    async def quota(self, credential: str) -> dict | None:
        """The account's usage windows, where the dialect can tell them."""
        return None

    async def _exchange(self, refresh_token: str) -> tuple[str, str]:
        """Trade a refresh token for (access token, next refresh token) at Kimi's REST endpoint,
        which both dialects use."""
        headers = {**self._headers, hdrs.AUTHORIZATION: f"Bearer {refresh_token}"}
        async with await self._send("GET", "/api/auth/token/refresh", headers) as response:
            return self._tokens_from_renewal(response, await read_kimi_json(response), refresh_token)

    def _tokens_from_renewal(self, response: aiohttp.ClientResponse, body: object, refresh_token: str) -> tuple[str, str]:
        """(access token, next refresh token) from a renewal's answer, REST or RPC, in either
        spelling. Only a definite answer kills a token: an auth error in Kimi's own JSON. A web page
        (a firewall in front of Kimi) or a body of the wrong shape is Kimi failing: 502, short rest."""
        status = response.status
        if status >= 500 or status == 429:
            raise self._error_for_response(response, body)
        tokens = body.get("data", body) if isinstance(body, dict) else None
        tokens = tokens if isinstance(tokens, dict) else {}
        access = tokens.get("access_token") or tokens.get("accessToken") or tokens.get("token")
        refresh = tokens.get("refresh_token") or tokens.get("refreshToken")
        if status < 300 and isinstance(access, str) and access:
            return access, refresh if isinstance(refresh, str) and refresh else refresh_token
        if body is not None and (status in (400, 401, 403) or self._is_auth_failure(status, body)):
            raise TokenRejected()
        raise kimi_outage(f"Kimi's token renewal answered HTTP {status} without tokens")

    async def _json_call(self, credential: str, method: str, path: str, body: dict | None = None) -> object:
        """An authenticated JSON call's answer (None when it is not JSON)."""
        data = None if body is None else json_body(body)
        async with await self._call(credential, method, path, data, self.json_headers) as response:
            return await read_kimi_json(response)

    async def _call(self, credential: str, method: str, path: str, data: "bytes | Pieces | None" = None,
                    headers: dict | None = None) -> aiohttp.ClientResponse:
        """An authenticated call that answered 2xx; an access token Kimi rejects is renewed once."""
        for _ in range(2):
            grant = await self.tokens.get(credential)
            response = await self._send(method, path, {**grant.headers, **headers} if headers else grant.headers, data)
            if response.status < 300:
                return response
            async with response:
                failure = await read_kimi_json(response)
            if not self._is_auth_failure(response.status, failure):
                log.warning("Kimi answered %s %s with HTTP %d", method, path, response.status)
                raise self._error_for_response(response, failure)
            self.tokens.discard_if_current(credential, grant)
        raise self._token_rejection(credential)

    async def _stream(self, credential: str, path: str, data: "bytes | Pieces", headers: dict, decode) -> AsyncIterator[list]:
        """A streamed Kimi answer, decoded as it arrives: `decode(data, batch)` appends what each
        network read holds to `batch` and says whether the answer is over. A Kimi error inside a
        read is raised after what came before it; transport failures become ProxyErrors; the
        response is closed when reading ends, however it ends."""
        async with await self._call(credential, "POST", path, data, headers) as response:
            del data  # sent: an answer may stream for minutes, and its request may be most of a large body
            if response.content_type == "application/json":  # an error body with status 200 instead of a stream
                raise self._error_for(response.status, await read_kimi_json(response), None)
            try:
                async for read in response.content.iter_any():
                    batch: list = []
                    try:
                        over = decode(read, batch)
                    except ProxyError:
                        if batch:
                            yield batch
                        raise
                    if batch:
                        yield batch
                    if over:
                        return
            except asyncio.TimeoutError:
                raise upstream_timeout(f"Kimi sent nothing for {self._read_timeout:g} s") from None
            except aiohttp.ClientError:
                raise upstream_error("The connection to Kimi broke off mid-answer") from None

    async def _send(self, method: str, path: str, headers: dict, data: "bytes | Pieces | None" = None) -> aiohttp.ClientResponse:
        """One HTTP call to `path` on Kimi (or a full URL), tried again (twice at most) on a dead
        connection or a 5xx. Redirects are never followed, and a web page is no API answer."""
        if data is not None and hdrs.CONTENT_TYPE not in headers:
            headers = {**headers, hdrs.CONTENT_TYPE: "application/json"}
        if isinstance(data, Pieces):
            headers = {**headers, hdrs.CONTENT_LENGTH: str(data.size)}
        url = path if path.startswith("http") else self._base + path
        for backoff in (*RETRY_BACKOFF, None):
            try:
                body = data.pieces() if isinstance(data, Pieces) else data
                response = await self._session.request(method, url, headers=headers, data=body, allow_redirects=False)
            except asyncio.TimeoutError:
                raise upstream_timeout("Kimi did not answer in time") from None
            except aiohttp.ClientError as error:
                if backoff is None:
                    raise upstream_error("Could not reach Kimi") from None
                log.info("retrying a Kimi call after %s", type(error).__name__)
            else:
                if response.status < 500 or backoff is None:
                    return not_a_web_page(response)
                response.release()
                log.info("retrying a Kimi call after HTTP %d", response.status)
            await asyncio.sleep(backoff)
        raise AssertionError("unreachable")

    # -- files ---------------------------------------------------------------------------------------

    async def upload_all(self, credential: str, question: "Question", chat_id: str | None) -> list[KimiFile]:
        """Upload the question's attachments concurrently; the first failure cancels the rest."""
        if not question.attachments:
            return []
        try:
            async with asyncio.TaskGroup() as group:
                uploads = [group.create_task(self._upload(credential, attachment, chat_id))
                           for attachment in question.attachments]
        except ExceptionGroup as failures:
            first = failures.exceptions[0]
            raise first if isinstance(first, ProxyError) else failures from None
        return [upload.result() for upload in uploads]

    async def _upload(self, credential: str, attachment: "Attachment", chat_id: str | None) -> KimiFile:
        """Pre-sign, PUT the bytes to Kimi's storage, register the file, wait until Kimi has read it."""
        async with self._fetcher.source(attachment) as source:
            kind = "image" if attachment.kind == "image" or source.mime.startswith("image/") else "file"
            signed = await self._json_call(credential, "POST", "/api/pre-sign-url",
                                           {"action": kind, "name": source.name, "size": source.size})
            if not isinstance(signed, dict) or not isinstance(signed.get("url"), str):
                raise upstream_error(f"Kimi did not give an upload address for '{attachment.part}'")
            await self._put(signed["url"], source, attachment.part)
        registered = await self._json_call(credential, "POST", "/api/file",
                                           self._registration(kind, source, signed, chat_id))
        if not isinstance(registered, dict) or not isinstance(registered.get("id"), str):
            raise upstream_error(f"Kimi did not register '{attachment.part}'")
        if kind == "file":
            await self._wait_until_read(credential, registered["id"], attachment.part, registered.get("status"))
        return KimiFile(registered["id"], source.name, source.size, kind, registered)

    def _registration(self, kind: str, source: FileBytes, signed: dict, chat_id: str | None) -> dict:
        return {"type": kind, "name": source.name, "size": source.size, "file_id": signed.get("file_id", ""),
                "object_name": signed.get("object_name", "")}

    async def _put(self, url: str, source: FileBytes, part: str) -> None:
        # only the storage's own signature: a browser sends it no Kimi credentials
        headers = {hdrs.CONTENT_TYPE: source.mime, hdrs.CONTENT_LENGTH: str(source.size)}
        with upload_failures(part):
            async with self._session.put(url, data=source.chunks, headers=headers, allow_redirects=False,
                                         timeout=aiohttp.ClientTimeout(total=UPLOAD_DEADLINE)) as response:
                if response.status >= 300:
                    raise upstream_error(f"Kimi's storage refused '{part}' (HTTP {response.status})")

    async def _wait_until_read(self, credential: str, file_id: str, part: str, status: object = None) -> None:
        """Kimi reads (parses) a file after it is uploaded: follow its progress ("parsed",
        "failed" or anything else for not yet), backing off, under one deadline."""
        delay = 0.25
        deadline = asyncio.timeout(self._parse_timeout)
        try:
            async with deadline:
                while status != "parsed":
                    if status == "failed":
                        raise ProxyError(422, f"Kimi could not read '{part}'", code="file_unreadable", param=part)
                    status = await self._parse_progress(credential, file_id)
                    if status not in ("parsed", "failed"):
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 2.0)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise ProxyError(504, f"Kimi did not finish reading '{part}' within {self._parse_timeout:g} s "
                             "(FILE_PARSE_TIMEOUT)", code="file_timeout", param=part) from None

    async def _parse_progress(self, credential: str, file_id: str) -> str | None:
        """The last status the parse_process stream reports (it ends when parsing ends, or earlier)."""
        decoder, statuses = SSEDecoder(), [None]

        def decode(data: bytes, batch: list) -> bool:
            statuses.extend(filter(None, map(from_parse_event, decoder.feed(data))))
            return statuses[-1] in ("parsed", "failed")

        async with aclosing(self._stream(credential, "/api/file/parse_process", json_body({"ids": [file_id]}), {},
                                         decode)) as reads:
            async for _ in reads:
                pass
        return statuses[-1]


def from_parse_event(payload: bytes) -> str | None:
    """The status in one parse_process event. Sources disagree on its shape, so take either."""
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    info = event.get("file_info", event) if isinstance(event, dict) else None
    status = info.get("status") if isinstance(info, dict) else None
    return status if isinstance(status, str) else None


class SSEDecoder:
    """Server-sent events from network reads: yields each event's data as bytes.

    Lines are split on the raw bytes and decoded (by orjson) only once whole, so a multi-byte
    character split across two reads comes out intact."""

    def __init__(self) -> None:
        self._tail = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        lines = (self._tail + chunk).split(b"\n")
        self._tail = lines.pop()
        events = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                self._data.append(line[6:] if line[5:6] == b" " else line[5:])
        return events


# ---------------------------------------------------------------------------------------------
# §6 The legacy dialect (kimi.moonshot.cn): REST + server-sent events
# ---------------------------------------------------------------------------------------------


K1_AGENT_ID = "crm40ee9e5jvhsn7ptcg"  # the Kimi+ agent id that selects the K1 reasoning model
MAX_CONTINUATIONS = 3
URL = re.compile(r"https?://[^\s<>\"'，。！？；）】」]+")


class LegacyKimi(KimiHTTP):
    """Kimi's REST + SSE dialect (kimi.moonshot.cn): refresh token -> access token -> chat."""

    chat_ids = XID
    chat_id_shape = "20 characters of 0-9a-z"

    @staticmethod
    def mark_links(text: str) -> str:
        """Kimi's web app marks links in user text this way; without the mark Kimi does not open them."""
        return URL.sub(mark_link, text)

    async def model_ids(self, credential: str | None = None) -> list[str]:
        return LEGACY_NAMES

    async def check_token(self, credential: str) -> bool:
        try:
            await self._exchange(credential)
        except TokenRejected:
            return False
        return True

    async def converse(self, credential: str, question: "Question") -> AsyncIterator[list[Event]]:
        """Open (or reuse) a chat and stream the answer; a length-cut answer is continued up to
        3 times in the same chat."""
        if question.research:
            await self._check_research_quota(credential)
        chat_id = question.chat_id or await self._create_chat(credential, question)
        yield [Event(CHAT, chat_id)]
        body, text = to_legacy_completion(question, await self.upload_all(credential, question, chat_id))
        for continuation in range(MAX_CONTINUATIONS + 1):
            segment = SegmentState(silent=question.silent)
            async with aclosing(self._stream_segment(credential, chat_id, body, text, segment)) as batches:
                async for batch in batches:
                    yield batch
            if not segment.truncated:
                yield [DONE_EVENT]
                return
            if segment.id is None or continuation == MAX_CONTINUATIONS:
                break
            body, text = to_legacy_continuation(question, segment.id)
        yield [LENGTH_EVENT, DONE_EVENT]

    def _registration(self, kind: str, source: FileBytes, signed: dict, chat_id: str | None) -> dict:
        if kind == "image":
            return {"type": "image", "file_id": signed.get("file_id", ""), "name": source.name}
        return {"type": "file", "name": source.name, "object_name": signed.get("object_name", ""), "file_id": "",
                "chat_id": chat_id}

    async def _create_chat(self, credential: str, question: "Question") -> str:
        chat = await self._json_call(credential, "POST", "/api/chat", to_legacy_new_chat(question))
        chat_id = chat.get("id") if isinstance(chat, dict) else None
        if not isinstance(chat_id, str) or not KIMI_ID.fullmatch(chat_id):
            raise upstream_error("Kimi did not return a usable chat id")
        return chat_id

    async def _delete(self, credential: str, chat_id: str) -> None:
        async with await self._call(credential, "DELETE", f"/api/chat/{chat_id}"):
            pass

    async def _stream_segment(self, credential: str, chat_id: str, body: dict, text: str,
                              segment: "SegmentState") -> AsyncIterator[list[Event]]:
        decoder = SSEDecoder()

        def decode(data: bytes, batch: list[Event]) -> bool:
            for payload in decoder.feed(data):
                event = from_legacy_payload(payload, segment)
                if event is not None:
                    batch.append(event)
                if segment.finished:  # nothing after the end counts
                    return True
            return False

        path, headers = f"/api/chat/{chat_id}/completion/stream", {hdrs.REFERER: f"{self._base}/chat/{chat_id}"}
        async with aclosing(self._stream(credential, path, Pieces(*json_with_text(body, text)), headers,
                                         decode)) as batches:
            async for batch in batches:
                yield batch
        if not (segment.finished or segment.truncated):
            raise upstream_error("Kimi ended the answer stream before finishing the answer")

    async def _grant(self, credential: str) -> Grant:
        access_token, _ = await self._exchange(credential)  # the old refresh token stays valid here
        headers = {**self._headers, hdrs.AUTHORIZATION: f"Bearer {access_token}"}
        async with await self._send("GET", "/api/user", headers) as response:
            user = await read_kimi_json(response)
        if response.status >= 500 or response.status == 429:
            raise self._error_for_response(response, user)
        user_id = user.get("id") if isinstance(user, dict) else None
        if response.status >= 300 or not isinstance(user_id, str) or not user_id:
            raise TokenRejected()
        log.debug("renewed a Kimi access token")
        return self._new_grant(access_token, user_id,
                               renewal_time(access_token, time.time(), asyncio.get_running_loop().time()))

    def _is_auth_failure(self, status: int, body: object) -> bool:
        return status == 401 or (isinstance(body, dict) and body.get("error_type") == "auth.token.invalid")

    def _error_for(self, status: int, body: object, retry_after: str | None) -> ProxyError:
        return from_legacy_failure(status, body, retry_after)

    async def _check_research_quota(self, credential: str) -> None:
        usage = await self._json_call(credential, "GET", "/api/chat/research/usage")
        if isinstance(usage, dict) and isinstance(usage.get("used"), int) and isinstance(usage.get("total"), int) \
                and usage["used"] >= usage["total"]:
            raise QuotaExhausted("The research quota of this Kimi account is used up")


def mark_link(match: re.Match) -> str:
    link = match[0].rstrip(".,;:!?")  # sentence punctuation after a link is not part of it
    return f'<url id="" type="url" status="" title="" wc="">{link}</url>{match[0][len(link):]}'


def from_legacy_failure(status: int, body: object, retry_after: str | None) -> ProxyError:
    """Map a non-2xx legacy answer (other than token rejection) to what the client sees."""
    error_type = body.get("error_type") if isinstance(body, dict) else None
    message = body.get("message") if isinstance(body, dict) else None
    if status == 429 or (isinstance(message, str) and "次数超过" in message):
        return RateLimited(f"Kimi is rate limiting this account: {message or 'too many requests'}",
                           retry_after_seconds(retry_after))
    if status == 404:
        return conversation_not_found()
    detail = f"{message} ({error_type})" if isinstance(message, str) and error_type else f"HTTP {status}"
    return upstream_error(f"Kimi refused the request: {detail}")


def to_kimiplus_id(question: Question) -> str:
    """The legacy dialect picks agents, and the K1 reasoning model, by a Kimi+ id."""
    return question.agent_id or (K1_AGENT_ID if question.reasoning else "kimi")


def to_legacy_new_chat(question: Question) -> dict:
    return {"enter_method": "new_chat", "is_example": False, "kimiplus_id": to_kimiplus_id(question), "name": "未命名会话"}


def to_legacy_completion(question: Question, files: list = ()) -> tuple[dict, str]:
    """(the completion request, the message's text to write where PROMPT_MARK stands in it)."""
    # the web app ends every message with a newline, and describes each file as its upload widget does
    return {"kimiplus_id": to_kimiplus_id(question), "messages": [{"role": "user", "content": PROMPT_MARK + "\n"}],
            "refs": [file.id for file in files], "refs_file": [to_legacy_ref_file(file) for file in files],
            "use_math": question.math, "use_research": question.research, "use_search": question.search,
            "extend": {"sidebar": True}}, question.prompt


def to_legacy_ref_file(file: "KimiFile") -> dict:
    return {"detail": file.detail, "done": True, "file": {}, "file_info": file.detail, "id": file.id,
            "name": file.name, "parse_status": "success", "size": file.size, "upload_progress": 100,
            "upload_status": "success"}


def to_legacy_continuation(question: Question, segment_id: str) -> tuple[dict, str]:
    return {"segment_id": segment_id, "action": "continue", "messages": [{"role": "user", "content": PROMPT_MARK}],
            "kimiplus_id": to_kimiplus_id(question), "extend": {"sidebar": True}}, " "


@dataclasses.dataclass(slots=True)
class SegmentState:
    """What one legacy answer stream said about itself besides the answer."""

    id: str | None = None      # the `req` event id: what a continuation refers to
    silent: bool = False       # the question wants no web sources
    sources: int = 0           # web sources so far
    truncated: bool = False    # a `length` event came
    finished: bool = False     # `all_done` came


def from_legacy_payload(payload: bytes, segment: SegmentState) -> Event | None:
    """One legacy SSE data payload -> a neutral event (None for the many events we ignore).
    Kimi aborting the answer (an `error` event) is raised."""
    try:
        kimi = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(kimi, dict):
        return None
    name = kimi.get("event")
    if name == "cmpl":
        text = kimi.get("text")
        return Event(TEXT, text) if isinstance(text, str) and text else None
    if name == "k1":
        text = kimi.get("text")
        return Event(REASONING, text) if isinstance(text, str) and text else None
    if name == "search_plus":
        found = kimi.get("msg")
        if isinstance(found, dict) and found.get("type") == "get_res" and isinstance(found.get("url"), str) \
                and not segment.silent:
            title = found.get("title")
            segment.sources += 1
            return Event(SOURCE, title if isinstance(title, str) and title else found["url"], found["url"],
                         segment.sources)
    elif name == "req":
        if isinstance(kimi.get("id"), str):
            segment.id = kimi["id"]
    elif name == "length":
        segment.truncated = True
    elif name == "all_done":
        segment.finished = True
    elif name == "error":
        error = kimi.get("error")
        message = error.get("message") if isinstance(error, dict) else None
        raise upstream_error(f"Kimi stopped the answer: {message if isinstance(message, str) and message else 'no details'}")
    return None


# ---------------------------------------------------------------------------------------------
# §7 The Connect dialect (www.kimi.com), on the wire: framing, uploads, errors, citations, events
# ---------------------------------------------------------------------------------------------


CONNECT_PROTOCOL_VERSION = istr("Connect-Protocol-Version")  # on every Connect call but uploads
CHAT_HEADERS = {hdrs.CONTENT_TYPE: "application/connect+json", CONNECT_PROTOCOL_VERSION: "1"}
CHAT_RPC = "/apiv2/kimi.gateway.chat.v1.ChatService/Chat"
MODELS_RPC = "/apiv2/kimi.gateway.config.v1.ConfigService/GetAvailableModels"
SUBSCRIPTION_RPC = "/apiv2/kimi.gateway.order.v1.SubscriptionService/GetSubscription"
DELETE_CHAT_RPC = "/apiv2/kimi.chat.v1.ChatService/DeleteChat"
CANCEL_CHAT_RPC = "/apiv2/kimi.gateway.chat.v1.ChatService/CancelChat"
QUOTA_RPC = "/apiv2/kimi.gateway.membership.v2.MembershipService/GetSubscriptionStats"
QUOTA_TTL = 60.0  # seconds an account's quota is remembered (one call a token a minute at most)
REFRESH_RPC = "/api/account.gateway.v1.AuthService/RefreshToken"  # on KIMI_AUTH_URL
UPLOAD_PATH = "/apiv2-files/file/upload"
PARSE_PROGRESS_RPC = "/apiv2-files/kimi.gateway.file.v1.FileService/GetFileParseProgress"
PARSE_STATUSES = {"PROCESS_STATUS_SUCCESS": "parsed", 3: "parsed", "PROCESS_STATUS_FAILED": "failed", 4: "failed"}
CATALOG_TTL = 300.0  # seconds a fetched model catalog is used
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
EXPIRED_ACCESS_TOKEN = ("Kimi rejected this access token or it has expired (access tokens live 15 minutes), and an "
                        "access token cannot be renewed: send your refresh_token (the site's Local Storage), so that "
                        "the proxy can renew access by itself")
COOKIE_TOKEN = ("This is the kimi-auth cookie, which Kimi refuses since 2026-07-30: send the refresh_token from the "
                "site's Local Storage instead (developer tools, Application, Local Storage, refresh_token)")
COOKIE_ISSUER = "user-center"  # the issuer of the retired kimi-auth cookie (Local Storage tokens: "account")


def to_multipart(source: FileBytes) -> tuple[str, int, AsyncIterator[bytes]]:
    """(content type, length, body) of the multipart form Kimi's upload takes: one part named
    `file`, streamed from the source, with its exact length as a browser sends it."""
    boundary = "----KimiProxyBoundary" + secrets.token_hex(12)
    name = source.name.replace('"', "%22")
    mime = source.mime if MEDIA_TYPE.fullmatch(source.mime) else "application/octet-stream"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: {mime}\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", len(head) + source.size + len(tail), \
        between(head, source.chunks, tail)


async def between(head: bytes, chunks: AsyncIterator[bytes], tail: bytes) -> AsyncIterator[bytes]:
    yield head
    async for chunk in chunks:
        yield chunk
    yield tail


END_STREAM = 0x02   # the last envelope of a server stream: {} or {"error": ...}
COMPRESSED = 0x01   # never seen from Kimi (we ask for no compression)
MAX_FRAME = 16 * 1024 * 1024


def to_envelope(chat: dict) -> Pieces:
    """The Chat request as one Connect envelope (flags byte 0, big-endian uint32 length, the
    JSON), its prompt written in slices, so that framing makes no copy of the whole either.
    (`chat` is the request's own dict: its prompt is taken out of it.)"""
    text = chat["message"]["blocks"][0]["text"]
    prompt, text["content"] = text["content"], PROMPT_MARK
    parts = json_with_text(chat, prompt)
    return Pieces(b"\0" + sum(map(len, parts)).to_bytes(4, "big"), *parts)


class FrameDecoder:
    """Connect envelopes from network reads: (flags, payload) once a frame is whole, so a frame
    or a multi-byte character split across reads comes out intact."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buffer = self._buffer
        buffer += data
        frames, offset = [], 0
        while len(buffer) - offset >= 5:
            length = int.from_bytes(buffer[offset + 1:offset + 5], "big")
            if length > MAX_FRAME:
                raise upstream_error("Kimi sent a malformed answer stream")
            end = offset + 5 + length
            if end > len(buffer):
                break
            frames.append((buffer[offset], bytes(buffer[offset + 5:end])))
            offset = end
        del buffer[:offset]
        return frames


class StreamUnauthenticated(TokenRejected):
    """Kimi refused the access token inside the answer stream (renew once and ask again)."""


def connect_error_code(body: object) -> str | None:
    error = body.get("error", body) if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


OVERLOAD_RETRY_AFTER = 30  # seconds a client is told to wait when Kimi is full for free users


def from_connect_error(error: dict, retry_after: int | None = None, status: int | None = None) -> ProxyError:
    """A Connect error (in the stream, or a unary answer's body) -> what the client sees."""
    code = error.get("code")
    debug = error.get("debug") if isinstance(error.get("debug"), dict) else {}
    details = error.get("details")
    for detail in details if isinstance(details, list) else ():
        if isinstance(detail, dict) and isinstance(detail.get("debug"), dict):
            debug = detail["debug"]
    localized = debug.get("localizedMessage")
    said = (localized.get("message") if isinstance(localized, dict) else None) or error.get("message") \
        or debug.get("reason") or code
    said = said if isinstance(said, str) and said else "no details"
    if code == "unauthenticated":
        return StreamUnauthenticated()
    if debug.get("reason") == "REASON_SERVER_OVERLOADED_FOR_FREE_USER":
        return ProxyError(503, f"Kimi is overloaded: {said}", code="server_is_overloaded",
                          retry_after=retry_after or OVERLOAD_RETRY_AFTER)
    if code == "resource_exhausted" or status == 429:
        if "paywall" in debug:
            return QuotaExhausted(f"Kimi says this needs a paid Kimi plan: {said}")
        return RateLimited(f"Kimi is rate limiting this account: {said}", retry_after)
    if code in ("unavailable", "deadline_exceeded"):
        return ProxyError(503, f"Kimi is overloaded or unavailable: {said}", code="server_is_overloaded",
                          retry_after=retry_after)
    if code == "permission_denied":
        return ProxyError(403, f"Kimi does not allow this account to do that: {said}", code="permission_denied")
    if code == "not_found":
        return conversation_not_found()
    if code == "invalid_argument" and re.search(r"model|scenario", said, re.I):
        return ModelRefused(f"Kimi refused the model it was asked for: {said}")
    if code == "invalid_argument":
        log.error("Kimi called our request invalid (invalid_argument): its protocol may have changed")
    return upstream_error(f"Kimi failed ({code}): {said}")


class ModelRefused(ProxyError):
    """Kimi refuses the model a request names (options.model): this host's catalog may differ."""

    def __init__(self, message: str) -> None:
        super().__init__(502, message, code="upstream_error")


CITE_OPEN, CITE_SEPARATOR, CITE_CLOSE = "\ue3a0", "\ue3a3", "\ue3a8"
TOOL_MARK, ARTICLE_END = "\U0001F6E0", "\U0001F3A8"  # 🛠 and 🎨, the 2026-08 marker style
REF_OPEN, REF_CLOSE = "<REF>", "</REF>"  # stored answers of late 2026: <REF>cite✦tools://web_search:1#0:~:text=...</REF>
CITATION_OPENER = re.compile(f"{CITE_OPEN}|{TOOL_MARK}|{REF_OPEN}")
PARTIAL_REF_OPEN = re.compile(r"<(?:R(?:EF?)?)?\Z")  # a piece that ends where a <REF> may begin
REF_INDEX = re.compile(r"[A-Za-z_]+:\d+#\d+")
MAX_MARKER = 2000  # characters held back waiting for a marker to close


class CitationRewriter:
    """Turns Kimi's private-use citation markers in answer text into `[^N]` references that match
    the `【检索 N】` source lines (or drops them when sources are silent). A marker split across
    deltas is held back until it closes."""

    def __init__(self) -> None:
        self._pending = ""

    def feed(self, text: str, sources: dict[str, int], silent: bool) -> str:
        if not self._pending and CITE_OPEN not in text and TOOL_MARK not in text and "<" not in text:
            return text
        text, self._pending = self._pending + text, ""
        out, position = [], 0
        while True:
            opener = CITATION_OPENER.search(text, position)
            if opener is None:
                partial = PARTIAL_REF_OPEN.search(text, position)
                out.append(text[position:partial.start()] if partial else text[position:])
                self._pending = text[partial.start():] if partial else ""
                break
            start = opener.start()
            out.append(text[position:start])
            end = marker_end(text, start)
            if end < 0:
                if len(text) - start > MAX_MARKER:  # not a marker after all: let it through
                    out.append(text[start:])
                else:
                    self._pending = text[start:]
                break
            out.append(to_references(text[start:end], sources, silent))
            position = end
        return "".join(out)

    def flush(self) -> str:
        pending, self._pending = self._pending, ""
        return pending.replace(CITE_OPEN, "")


def marker_end(text: str, start: int) -> int:
    """Where the citation marker starting at `start` ends (exclusive), or -1 if not yet closed."""
    if text.startswith(REF_OPEN, start):
        close = text.find(REF_CLOSE, start)
        return close + len(REF_CLOSE) if close >= 0 else -1
    if text[start] == TOOL_MARK:  # an inline reference: 🛠ref🛠
        close = text.find(TOOL_MARK, start + 1)
        return close + 1 if close >= 0 else -1
    separator = min((i for i in (text.find(CITE_SEPARATOR, start), text.find(TOOL_MARK, start)) if i >= 0), default=-1)
    if separator < 0:
        close = text.find(CITE_CLOSE, start)
        return close + 1 if close >= 0 else -1
    kind = text[start + 1:separator]
    if text[separator] == CITE_SEPARATOR:
        closers = (CITE_CLOSE,)
    elif kind == "article":
        closers = (ARTICLE_END, CITE_CLOSE)
    else:
        closers = (TOOL_MARK, CITE_CLOSE)
    ends = [i for i in (text.find(closer, separator + 1) for closer in closers) if i >= 0]
    return min(ends) + 1 if ends else -1


def to_references(marker: str, sources: dict[str, int], silent: bool) -> str:
    if silent or marker.startswith(CITE_OPEN + "article"):
        return ""
    if marker[0] == TOOL_MARK and not REF_INDEX.fullmatch(marker[1:-1].split(":~:")[0]):
        return marker  # an ordinary 🛠 in the text, not a reference
    if marker.startswith(REF_OPEN) and "tools://" not in marker:
        return marker  # an ordinary <REF> in the text
    numbers = dict.fromkeys(sources[ref] for ref in REF_INDEX.findall(marker) if ref in sources)
    return "".join(f"[^{n}]" for n in numbers)


@dataclasses.dataclass(slots=True)
class ConnectState:
    """What one Connect answer stream has said so far, besides its events."""

    silent: bool = False
    chat_id: str | None = None
    user_message_id: str | None = None
    message_id: str | None = None     # the assistant message: the next turn's parent_id
    answered: bool = False            # text or thinking arrived
    done: bool = False
    ended: bool = False               # the end-stream envelope arrived
    text_block: str | None = None
    sources: dict = dataclasses.field(default_factory=dict)   # refIndex -> citation number
    citations: CitationRewriter = dataclasses.field(default_factory=CitationRewriter)


def from_connect_frame(flags: int, payload: bytes, state: ConnectState) -> list[Event]:
    """One Connect envelope -> neutral events. Errors are raised; heartbeats, stages,
    notifications and unknown masks say nothing."""
    if flags & COMPRESSED:
        return []
    try:
        message = orjson.loads(payload)
    except orjson.JSONDecodeError:
        message = None
    if not isinstance(message, dict):
        state.ended = state.ended or bool(flags & END_STREAM)
        return []
    if isinstance(message.get("error"), dict):
        state.ended = True  # Kimi ended the answer itself
        raise from_connect_error(message["error"])
    if flags & END_STREAM:
        state.ended = True
        return []
    if "done" in message:
        state.done = True  # an error may still follow: keep reading until the stream ends
        return []
    events = []
    chat = message.get("chat")
    if isinstance(chat, dict) and isinstance(chat.get("id"), str) and state.chat_id is None:
        if not KIMI_ID.fullmatch(chat["id"]):
            raise upstream_error("Kimi named its chat with an id that is not one")
        state.chat_id = chat["id"]  # from `set chat` on a new chat, from `chat.lastRequest` on any
        events.append(Event(CHAT, chat["id"]))
    turn = message.get("message")
    if isinstance(turn, dict):
        identify_message(turn, message.get("mask"), state)
        refs = turn.get("refs")
        if isinstance(refs, dict):
            events += from_search_results(refs.get("searchChunks"), state)
    block = message.get("block")
    if isinstance(block, dict):
        events += from_connect_block(block, state)
    notice = message.get("notification")
    if isinstance(notice, dict) and notice.get("type") == "TYPE_MODEL_DEGRADE":
        log.info("Kimi answered with a lighter model than asked for (TYPE_MODEL_DEGRADE)")
    return events


ROLES = {"user": "user", "assistant": "assistant", "system": "system", 2: "user", 3: "assistant", 1: "system"}


def identify_message(turn: dict, mask: object, state: ConnectState) -> None:
    """Which message is the user's and which the answer's, even when Kimi leaves out the role
    (protobuf JSON drops enum fields left at their default): the answer is the child of the user
    message, or the message whose final status arrives. A new chat's system message has the
    chat's own id."""
    message_id = turn.get("id")
    role = turn.get("role")
    role = ROLES.get(role) if isinstance(role, (str, int)) else None
    if not isinstance(message_id, str) or message_id == state.chat_id or role == "system":
        return
    if role == "user":
        state.user_message_id = message_id
        return
    parent = turn.get("parentId", turn.get("parent_id"))
    child_of_user = state.user_message_id is not None and parent == state.user_message_id
    if role == "assistant" or (message_id != state.user_message_id and (child_of_user or mask == "message.status")):
        state.message_id = message_id


def from_connect_block(block: dict, state: ConnectState) -> list[Event]:
    """Thinking and answer told apart by the kind of block (`think` or `text`), never by the
    stage events around them. A `block.exception` is Kimi refusing to go on: raised."""
    if isinstance(block.get("exception"), dict):
        state.ended = True
        raise from_block_exception(block["exception"])
    events = []
    owner = block.get("messageId", block.get("message_id"))
    if state.message_id is None and isinstance(owner, str) and owner and owner != state.user_message_id:
        state.message_id = owner
    think = block.get("think")
    if isinstance(think, dict) and isinstance(think.get("content"), str) and think["content"]:
        events.append(Event(REASONING, think["content"]))
    text = block.get("text")
    if isinstance(text, dict) and isinstance(text.get("content"), str):
        if text.get("flags") == "thinking":  # the 2025 shape of a thinking block
            if text["content"]:
                events.append(Event(REASONING, text["content"]))
        else:
            content = state.citations.feed(text["content"], state.sources, state.silent)
            block_id = block.get("id")
            if isinstance(block_id, str):
                if state.text_block is not None and block_id != state.text_block and content:
                    content = "\n" + content  # a new text block, e.g. after a search round
                state.text_block = block_id
            if content:
                events.append(Event(TEXT, content))
    if events:
        state.answered = True  # text or thinking; sources alone are no answer
    tool = block.get("tool")
    if isinstance(tool, dict):
        events += from_search_results(tool.get("contents"), state)
    return events


def from_search_results(items: object, state: ConnectState) -> list[Event]:
    """New web-search sources, numbered in arrival order (the same numbers as the citation lines)."""
    events = []
    for item in items if isinstance(items, list) else ():
        found = item.get("searchResult") if isinstance(item, dict) else None
        base = found.get("base") if isinstance(found, dict) else None
        if not isinstance(base, dict) or not isinstance(base.get("url"), str):
            continue
        ref = found.get("refIndex") if isinstance(found.get("refIndex"), str) else base["url"]
        if ref in state.sources:
            continue
        number = state.sources[ref] = len(state.sources) + 1
        title = base.get("title")
        if not state.silent:
            events.append(Event(SOURCE, title if isinstance(title, str) and title else base["url"], base["url"], number))
    return events


def from_block_exception(exception: dict) -> ProxyError:
    """Kimi's refusal inside an answer: a full chat is the client's to fix (a new conversation)."""
    error = exception.get("error") if isinstance(exception.get("error"), dict) else exception
    localized = error.get("localizedMessage")
    said = localized.get("message") if isinstance(localized, dict) else None
    reason = error.get("reason") if isinstance(error.get("reason"), str) else "no reason given"
    said = said if isinstance(said, str) and said else reason
    if reason == "REASON_TOKEN_LENGTH_TOO_LONG":
        return ProxyError(400, f"Kimi's chat is full: {said}", code="context_length_exceeded")
    return upstream_error(f"Kimi stopped the answer ({reason}): {said}")


def from_connect_ending(state: ConnectState) -> list[Event]:
    """The last events once the stream is over, or the failure it ended in."""
    rest = state.citations.flush()
    if rest:
        state.answered = True
    if not (state.done or state.ended):
        raise upstream_error("The connection to Kimi broke off mid-answer")
    if not state.answered:
        raise upstream_error("Kimi ended the answer without any text (it may be overloaded)")
    return [Event(TEXT, rest), DONE_EVENT] if rest else [DONE_EVENT]


# ---------------------------------------------------------------------------------------------
# §8 The Connect dialect: the model catalog, the Chat request, the client
# ---------------------------------------------------------------------------------------------


NO_REASONING = "REASONING_EFFORT_NONE"
# Kimi's efforts on the scale of REASONING_EFFORTS, to find the nearest offered one
EFFORT_RANKS = {NO_REASONING: 0, "REASONING_EFFORT_MINIMAL": 1, "REASONING_EFFORT_LOW": 2,
                "REASONING_EFFORT_MEDIUM": 3, "REASONING_EFFORT_HIGH": 4, "REASONING_EFFORT_MAX": 5}


class CatalogModel(NamedTuple):
    name: str                  # our readable id, e.g. kimi-k3
    id: str                    # Kimi's own id, sent as options.model
    scenario: str
    efforts: tuple[str, ...]   # the reasoning efforts it offers
    default_effort: str | None
    kimiplus_id: str | None
    agent_mode: str | None
    key: str | None

    @property
    def thinking_optional(self) -> bool:
        return NO_REASONING in self.efforts and len(self.efforts) > 1


# Used when Kimi's catalog cannot be fetched: the entries of www.kimi.ai's catalog of 2026-09.
FALLBACK_CATALOG = {
    "availableModels": [
        {"id": "k2d6-chat", "key": "k2d6", "scenario": "SCENARIO_CHAT", "defaultReasoningEffort": "REASONING_EFFORT_LOW",
         "reasoningEffortOptions": [{"effort": NO_REASONING}, {"effort": "REASONING_EFFORT_LOW"}]},
        *({"id": kimi_id, "key": key, "scenario": scenario, "kimiPlusId": "ok-computer", "agentMode": mode,
           "defaultReasoningEffort": "REASONING_EFFORT_HIGH",
           "reasoningEffortOptions": [{"effort": "REASONING_EFFORT_LOW"}, {"effort": "REASONING_EFFORT_HIGH"},
                                      {"effort": "REASONING_EFFORT_MAX"}]}
          for kimi_id, key, scenario, mode in (
              ("k28-agent-preview", "k28-preview", "SCENARIO_OK_COMPUTER", "TYPE_NORMAL"),
              ("k3-agent", "k3", "SCENARIO_OK_COMPUTER", "TYPE_NORMAL"),
              ("k3-agent-swarm", "k3-agent-ultra", "SCENARIO_OK_COMPUTER_SWARM", "TYPE_ULTRA")))],
    "defaultScenario": {"scenario": "SCENARIO_CHAT", "model": "k2d6-chat"},
}


MODEL_SUFFIXES = ("-search", "-silent", "-thinking")


class Catalog:
    """Kimi's models under readable ids, and which one a requested model name means."""

    def __init__(self, models: list[CatalogModel], default: CatalogModel) -> None:
        self.default = default
        self._names: dict[str, CatalogModel] = {}
        for model in models:  # Kimi's ids and keys answer too, e.g. k3-agent or k3
            for name in (model.name, model.id, model.key):
                if name:
                    self._names.setdefault(name.lower(), model)
        self._models = models

    @classmethod
    def from_rpc(cls, answer: dict) -> "Catalog | None":
        entries = answer.get("availableModels")
        models: list[CatalogModel] = []
        for entry in entries if isinstance(entries, list) else ():
            model = to_catalog_model(entry, {model.name for model in models})
            if model is not None:
                models.append(model)
        if not models:
            return None
        wanted = answer.get("defaultScenario") if isinstance(answer.get("defaultScenario"), dict) else {}
        default = next((m for m in models if m.id == wanted.get("model")), None) \
            or next((m for m in models if m.scenario == wanted.get("scenario")), models[0])
        return cls(models, default)

    def model_ids(self) -> list[str]:
        ids = []
        for model in self._models:
            ids.append(model.name)
            if model.thinking_optional:
                ids.append(model.name + "-thinking")
        return ids + [name for name in LEGACY_NAMES if name not in ids]

    def resolve(self, model_name: str) -> CatalogModel:
        """The catalog model a name means (less its -search, -silent and -thinking), else the default."""
        name = model_name.lower()
        while name.endswith(MODEL_SUFFIXES):
            name = name.rsplit("-", 1)[0]
        return self._names.get(name) or self.default


def to_model_name(kimi_id: str) -> str:
    """A readable, stable id from Kimi's: k2d6-chat -> kimi-k2.6, k28-agent-preview -> kimi-k2.8,
    k3-agent-swarm -> kimi-k3-swarm."""
    words = re.findall(r"[a-z0-9]+", kimi_id.lower())
    if words:
        version = re.fullmatch(r"k(\d)d?(\d*)", words[0])
        if version:
            words[0] = f"k{version[1]}.{version[2]}" if version[2] else f"k{version[1]}"
    words = [word for word in words if word not in ("chat", "agent", "preview", "instant", "kimi")]
    return "-".join(["kimi", *words])


def to_catalog_model(entry: object, taken: set[str]) -> CatalogModel | None:
    """One catalog entry; None for an entry without the id and scenario a request needs."""
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"] \
            or not isinstance(entry.get("scenario"), str):
        return None
    options = entry.get("reasoningEffortOptions")
    efforts = tuple(option["effort"] for option in (options if isinstance(options, list) else ())
                    if isinstance(option, dict) and option.get("effort") in EFFORT_RANKS)
    default_effort = entry.get("defaultReasoningEffort")
    name = to_model_name(entry["id"])
    if name in taken:
        name = "kimi-" + re.sub(r"[^a-z0-9.]+", "-", entry["id"].lower())

    def text(field: str) -> str | None:
        return entry[field] if isinstance(entry.get(field), str) and entry[field] else None

    return CatalogModel(name, entry["id"], entry["scenario"], efforts,
                        default_effort if default_effort in efforts else None,
                        text("kimiPlusId") or text("kimiplusId"), text("agentMode"), text("key"))


def to_reasoning_effort(model: CatalogModel, thinking: bool, asked: str | None) -> str | None:
    """The effort to send: one the model offers, never another. NONE where it offers NONE and no
    thinking was asked for; else the asked effort's nearest (ties go up), else its default."""
    if not model.efforts:
        return None
    reasoning = [effort for effort in model.efforts if effort != NO_REASONING]
    if not reasoning or (NO_REASONING in model.efforts and (asked == "none" or (asked is None and not thinking))):
        return NO_REASONING
    if asked is None or asked == "none":
        return model.default_effort if model.default_effort in reasoning else reasoning[0]
    rank = REASONING_EFFORTS[asked]
    return min(reasoning, key=lambda effort: (abs(EFFORT_RANKS[effort] - rank), -EFFORT_RANKS[effort]))


def to_connect_chat(question: "Question", catalog: Catalog, parent_id: str | None, files: list = (),
                    name_model: bool = True) -> dict:
    """The Chat RPC request, shaped like the web app's: the folded prompt as one text block,
    then the file blocks, on a new or a kept chat. The model is named by its catalog id
    (`name_model`), or, where the host refuses that, by its scenario alone."""
    model = catalog.resolve(question.model)
    effort = to_reasoning_effort(model, question.reasoning, question.reasoning_effort)
    options = {"thinking": effort != NO_REASONING if effort else question.reasoning}
    if name_model:
        options["model"] = model.id
    if effort:
        options["reasoning_effort"] = effort
    blocks = [{"message_id": "", "text": {"content": question.prompt or " "}}]
    blocks += [{"file": {"id": file.id, "status": "PROCESS_STATUS_SUCCESS"}} for file in files]
    message = {"role": "user", "blocks": blocks, "scenario": model.scenario}
    if question.chat_id and parent_id:
        message["parent_id"] = parent_id
    chat = {"scenario": model.scenario,
            "tools": [{"type": "TOOL_TYPE_SEARCH", "search": {}}] if question.search else [],
            "message": message, "options": options}
    if question.chat_id:
        chat["chat_id"] = question.chat_id
    kimiplus_id = question.agent_id or model.kimiplus_id
    if kimiplus_id:
        chat["kimiplus_id"] = kimiplus_id
    if model.agent_mode:
        chat["agent_mode"] = model.agent_mode
    return chat


class UploadPathMissing(Exception):
    """Kimi has no /apiv2-files/ upload here (404): the older pre-sign flow is used instead."""


class ConnectKimi(KimiHTTP):
    """Kimi's current dialect (www.kimi.com): Connect-RPC with 5-byte framed JSON messages.
    The client may send a refresh token or an access token (the kimi-auth value)."""

    chat_ids = UUID
    chat_id_shape = "a UUID"
    json_headers = {CONNECT_PROTOCOL_VERSION: "1"}

    def __init__(self, session: aiohttp.ClientSession, config: Config, fetcher: "FileFetcher",
                 store: TokenStore, janitor: Janitor) -> None:
        super().__init__(session, config, fetcher, store, janitor)
        self._auth_base = config.kimi_auth_url
        self._headers = {**self._headers, hdrs.REFERER: self._base + "/"}
        self._parents = BoundedMap()       # chat id -> last assistant message id
        self._catalog: Catalog | None = None
        self._catalog_until = 0.0
        self._catalog_lock = asyncio.Lock()
        self._refresh_route: str | None = None  # "rpc" or "rest", once one has answered
        self._presigned_uploads = False         # the /apiv2-files/ upload answered 404
        self._cancels: dict[str, asyncio.Task] = {}  # chat id -> the cancel of its abandoned answer
        self._cancel_failed = False             # (a failed cancel is logged once at WARNING)
        self._quotas = BoundedMap()             # credential -> (until, its quota)
        self._no_model_option: set[str] = set()  # models this host refuses by options.model

    async def model_ids(self, credential: str | None = None) -> list[str]:
        return (await self._current_catalog(credential)).model_ids()

    async def check_token(self, credential: str) -> bool:
        try:
            answer = await self._json_call(credential, "POST", SUBSCRIPTION_RPC, {})
        except TokenRejected:
            return False
        return isinstance(answer, dict) and bool(answer.get("subscription"))

    async def quota(self, credential: str) -> dict | None:
        """The account's usage windows and balance, remembered for a minute (None when Kimi does
        not tell)."""
        loop = asyncio.get_running_loop()
        until, known = self._quotas.get(credential, (0.0, None))
        if loop.time() < until:
            return known
        try:
            answer = await self._json_call(credential, "POST", QUOTA_RPC, {"domain": "DOMAIN_KIMI"})
        except ProxyError:
            answer = None
        known = to_quota(answer) if isinstance(answer, dict) else None
        self._quotas[credential] = (loop.time() + QUOTA_TTL, known)
        return known

    async def converse(self, credential: str, question: "Question") -> AsyncIterator[list[Event]]:
        await self.tokens.get(credential)  # a token Kimi refuses fails here, not in the catalog call
        if question.chat_id:
            await self._cancelled(question.chat_id)  # its last answer, if the proxy stopped reading it
        catalog = await self._current_catalog(credential)
        files = await self.upload_all(credential, question, None)
        model = catalog.resolve(question.model)
        if question.chat_id:
            yield [Event(CHAT, question.chat_id)]  # a continued chat's stream need not name it
        renewed = False
        while True:
            named = model.id not in self._no_model_option
            chat = to_connect_chat(question, catalog, self._parents.get(question.chat_id), files, name_model=named)
            state = ConnectState(silent=question.silent, chat_id=question.chat_id)
            try:
                async with aclosing(self._stream_chat(credential, chat, state)) as batches:
                    async for batch in batches:
                        yield batch
            except StreamUnauthenticated:
                # like an HTTP 401: renew the access token once and ask again, if nothing was shown yet
                if state.answered or renewed or is_access_token(credential):
                    raise self._token_rejection(credential) from None
                self.tokens.discard(credential)
                renewed = True
                continue
            except ModelRefused:
                # a host whose catalog differs: ask once more by the scenario alone, for good
                if state.answered or not named:
                    raise
                log.warning("Kimi refuses options.model %s at %s: asking for it by its scenario only", model.id,
                            self._base)
                self._no_model_option.add(model.id)
                continue
            except RateLimited as error:
                await self._add_quota_note(credential, error)
                raise
            finally:
                self._after_answer(credential, state)
            return

    def _after_answer(self, credential: str, state: "ConnectState") -> None:
        """Remember the answer for the chat's next turn (a kept chat's, or a repair); an answer the
        proxy stopped reading is cancelled, since Kimi goes on writing it otherwise, and refuses a
        new turn in that chat meanwhile. (The consumer may stop reading at DONE, so this cannot
        wait until after the stream.)"""
        if not (state.chat_id and state.message_id):
            return
        self._parents[state.chat_id] = state.message_id
        if not (state.done or state.ended):
            task = asyncio.ensure_future(self._cancel(credential, state.chat_id, state.message_id))
            self._cancels[state.chat_id] = task
            self._janitor.spawn(task)

    async def _cancel(self, credential: str, chat_id: str, message_id: str) -> None:
        """Stop Kimi writing an answer nobody reads; best effort, never a failure of the request."""
        try:
            await self._json_call(credential, "POST", CANCEL_CHAT_RPC, {"chatId": chat_id, "messageId": message_id})
        except ProxyError as error:
            log.log(logging.DEBUG if self._cancel_failed else logging.WARNING,
                    "could not stop Kimi's answer in chat %s: %s", chat_id, error.message)
            self._cancel_failed = True
        else:
            log.debug("stopped Kimi's answer in chat %s", chat_id)
        finally:
            if self._cancels.get(chat_id) is asyncio.current_task():
                del self._cancels[chat_id]

    async def _cancelled(self, chat_id: str) -> None:
        """Wait until a cancel of the chat's last answer has been sent, before a new turn in it or
        its deletion."""
        task = self._cancels.get(chat_id)
        if task is not None:
            await asyncio.shield(task)

    async def _add_quota_note(self, credential: str, error: RateLimited) -> None:
        """A request refused for quota says when the account's windows reset."""
        note = to_quota_note(await self.quota(credential))
        if note:
            error.message = f"{error.message} ({note})"

    async def _stream_chat(self, credential: str, chat: dict, state: "ConnectState") -> AsyncIterator[list[Event]]:
        decoder = FrameDecoder()

        def decode(data: bytes, batch: list[Event]) -> bool:
            for flags, payload in decoder.feed(data):
                batch += from_connect_frame(flags, payload, state)
                if state.ended:
                    return True
            return False

        async with aclosing(self._stream(credential, CHAT_RPC, to_envelope(chat), CHAT_HEADERS, decode)) as batches:
            async for batch in batches:
                yield batch
        yield from_connect_ending(state)

    async def _delete(self, credential: str, chat_id: str) -> None:
        await self._cancelled(chat_id)
        self._parents.pop(chat_id, None)
        await self._json_call(credential, "POST", DELETE_CHAT_RPC, {"chat_id": chat_id})

    # -- models --------------------------------------------------------------------------------------

    async def _current_catalog(self, credential: str | None) -> "Catalog":
        """Kimi's model catalog, fetched at most every 5 minutes; the built-in one when Kimi fails."""
        loop = asyncio.get_running_loop()
        async with self._catalog_lock:
            if self._catalog is None or loop.time() >= self._catalog_until:
                self._catalog = await self._fetch_catalog(credential) or self._catalog or Catalog.from_rpc(FALLBACK_CATALOG)
                self._catalog_until = loop.time() + CATALOG_TTL
            return self._catalog

    async def _fetch_catalog(self, credential: str | None) -> "Catalog | None":
        """The web app asks with the user's authorization; without a token at hand, anonymously."""
        headers = self._headers
        if credential:
            try:
                headers = (await self.tokens.get(credential)).headers
            except ProxyError:
                pass  # the request itself will say what is wrong with the token
        try:
            async with await self._send("POST", MODELS_RPC, {**headers, CONNECT_PROTOCOL_VERSION: "1"},
                                        b"{}") as response:
                answer = await read_kimi_json(response) if response.status == 200 else None
        except ProxyError:
            answer = None
        catalog = Catalog.from_rpc(answer) if isinstance(answer, dict) else None
        if catalog is None:
            log.warning("could not read Kimi's model catalog; using the built-in one")
        return catalog

    # -- tokens --------------------------------------------------------------------------------------

    async def _grant(self, credential: str) -> Grant:
        now_wall, now_loop = time.time(), asyncio.get_running_loop().time()
        if jwt_claims(credential).get("iss") == COOKIE_ISSUER:
            raise TokenRejected(COOKIE_TOKEN)
        if is_access_token(credential):
            claims = jwt_claims(credential)
            exp = claims.get("exp")
            if isinstance(exp, (int, float)) and exp <= now_wall:
                raise self._token_rejection(credential)
            until = now_loop + (exp - now_wall if isinstance(exp, (int, float)) else ACCESS_TOKEN_DEFAULT_LIFETIME)
            return self._new_grant(credential, str(claims.get("sub", "")), until)
        async with self._refresh_tokens.renewing(credential) as refresh_token:
            access_token, rotated = await self._renew(refresh_token)
            self._refresh_tokens.save(credential, rotated)
        log.debug("renewed a Kimi access token")
        return self._new_grant(access_token, str(jwt_claims(access_token).get("sub", "")),
                               renewal_time(access_token, now_wall, now_loop))

    async def _renew(self, refresh_token: str) -> tuple[str, str]:
        """(access token, next refresh token) from the 2026 RefreshToken RPC, or from the older
        REST endpoint where the RPC does not exist; the route that worked is remembered."""
        if self._refresh_route != "rest":
            renewed = await self._refresh_by_rpc(refresh_token)
            if renewed is not None:
                if self._refresh_route is None:
                    self._refresh_route = "rpc"
                    log.info("renewing Kimi tokens at %s%s", self._auth_base, REFRESH_RPC)
                return renewed
            if self._refresh_route != "rest":
                self._refresh_route = "rest"
                log.warning("Kimi has no RefreshToken RPC at %s: renewing tokens at %s/api/auth/token/refresh",
                            self._auth_base, self._base)
        return await self._exchange(refresh_token)

    async def _refresh_by_rpc(self, refresh_token: str) -> tuple[str, str] | None:
        headers = {**self._headers, CONNECT_PROTOCOL_VERSION: "1"}
        async with await self._send("POST", self._auth_base + REFRESH_RPC, headers,
                                    json_body({"refresh_token": refresh_token})) as response:
            body = await read_kimi_json(response)
        if response.status in (404, 405) or connect_error_code(body) == "unimplemented":
            return None
        return self._tokens_from_renewal(response, body, refresh_token)

    def _auth_headers(self, access_token: str, user_id: str) -> dict[str, str]:
        headers = super()._auth_headers(access_token, user_id)
        claims = jwt_claims(access_token)
        for header, claim in ((X_MSH_DEVICE_ID, "device_id"), (X_MSH_SESSION_ID, "ssid")):
            if isinstance(claims.get(claim), str):
                headers[header] = claims[claim]
        return headers

    def _is_auth_failure(self, status: int, body: object) -> bool:
        return status == 401 or connect_error_code(body) == "unauthenticated"

    def _error_for(self, status: int, body: object, retry_after: str | None) -> ProxyError:
        error = body.get("error", body) if isinstance(body, dict) else None
        return from_connect_error(error if isinstance(error, dict) else {"code": f"http_{status}"},
                                  retry_after_seconds(retry_after), status)

    def _token_rejection(self, credential: str) -> TokenRejected:
        return TokenRejected(EXPIRED_ACCESS_TOKEN) if is_access_token(credential) else TokenRejected()

    # -- files ---------------------------------------------------------------------------------------

    async def _upload(self, credential: str, attachment: "Attachment", chat_id: str | None) -> KimiFile:
        if not self._presigned_uploads:
            try:
                return await self._upload_file(credential, attachment)
            except UploadPathMissing:
                if not self._presigned_uploads:
                    self._presigned_uploads = True
                    log.warning("Kimi has no %s: uploading files through /api/pre-sign-url", UPLOAD_PATH)
        return await super()._upload(credential, attachment, chat_id)

    async def _upload_file(self, credential: str, attachment: "Attachment") -> KimiFile:
        """One multipart POST, streamed from the source; then wait until Kimi has read the file."""
        async with self._fetcher.source(attachment) as source:
            content_type, size, body = to_multipart(source)
            grant = await self.tokens.get(credential)
            headers = {**grant.headers, hdrs.CONTENT_TYPE: content_type, hdrs.CONTENT_LENGTH: str(size)}
            with upload_failures(attachment.part):
                async with self._session.post(self._base + UPLOAD_PATH, data=body, headers=headers,
                                              allow_redirects=False,
                                              timeout=aiohttp.ClientTimeout(total=UPLOAD_DEADLINE)) as response:
                    if response.status == 404:
                        raise UploadPathMissing()
                    answer = await read_kimi_json(not_a_web_page(response))
        if self._is_auth_failure(response.status, answer):
            self.tokens.discard_if_current(credential, grant)
            raise self._token_rejection(credential)
        if response.status >= 300:
            raise self._error_for_response(response, answer)
        file = answer.get("file") if isinstance(answer, dict) else None
        if not isinstance(file, dict) or not isinstance(file.get("id"), str) or not file["id"]:
            raise upstream_error(f"Kimi did not accept '{attachment.part}'")
        await self._wait_until_read(credential, file["id"], attachment.part)
        kind = "image" if source.mime.startswith("image/") else "file"
        return KimiFile(file["id"], source.name, source.size, kind, file)

    async def _parse_progress(self, credential: str, file_id: str) -> str | None:
        answer = await self._json_call(credential, "POST", PARSE_PROGRESS_RPC, {"file_ids": [file_id]})
        progresses = answer.get("progresses") if isinstance(answer, dict) else None
        for progress in progresses if isinstance(progresses, list) else ():
            if isinstance(progress, dict) and progress.get("fileId", progress.get("file_id")) == file_id:
                status = progress.get("status")
                return PARSE_STATUSES.get(status) if isinstance(status, (str, int)) else None
        return None


def to_quota(answer: dict) -> dict:
    """An account's windows and balance from GetSubscriptionStats (a window's ratio is absent
    while it is unused)."""
    quota = {}
    for name, field, chat_field in (("5h", "ratelimitCode5h", "ratelimit5h"), ("7d", "ratelimitCode7d", "ratelimit7d")):
        window = answer.get(field) or answer.get(chat_field)
        if isinstance(window, dict):
            ratio = window.get("ratio")
            quota[name] = {"used": ratio if isinstance(ratio, (int, float)) else 0.0,
                           "enabled": window.get("enabled") is not False, "resets_at": window.get("resetTime")}
    balance = answer.get("subscriptionBalance")
    if isinstance(balance, dict):
        ratio = balance.get("amountUsedRatio")
        quota["balance"] = {"feature": balance.get("feature"), "unit": balance.get("unit"),
                            "used": ratio if isinstance(ratio, (int, float)) else 0.0,
                            "expires_at": balance.get("expireTime")}
    return quota


def to_quota_note(quota: dict | None) -> str:
    windows = [f"{name} window {round(100 * quota[name]['used'])}% used, resets at {quota[name]['resets_at']}"
               for name in ("5h", "7d") if quota and name in quota and quota[name].get("resets_at")]
    return "Kimi's " + "; ".join(windows) if windows else ""


DIALECTS = {"legacy": LegacyKimi, "connect": ConnectKimi}


# ---------------------------------------------------------------------------------------------
# §9 A request's use of Kimi: the token turn, the session, the strongest refusal
# ---------------------------------------------------------------------------------------------


def credentials_in_turn(app: web.Application, credentials: list[str], question: Question) -> list[str]:
    """The order in which this request tries the client's tokens."""
    if question.chat_id is not None:
        owner = app[CHAT_OWNERS].get(question.chat_id)
        # only a token the caller itself sent: someone else's chat id must not borrow its creator's account
        return [owner if owner in credentials else credentials[0]]
    start = next(app[TOKEN_TURN]) % len(credentials)
    return credentials[start:] + credentials[:start]


class KimiSession:
    """One request's use of Kimi. The first question goes to the healthiest token Kimi accepts: a
    token that Kimi rejects or rate-limits hands over to the next one, as long as nothing has been
    shown. Follow-up questions (a repair turn) go to the same token, in the same chat. Every chat
    the session created is deleted when it closes, unless the client keeps it and has seen it."""

    def __init__(self, app: web.Application, credentials: list[str]) -> None:
        self._app = app
        self._credentials = credentials
        self._credential: str | None = None  # the token that answers, held until close
        self._created: list[str] = []
        self._keep = False
        self._answered = False               # something of Kimi's answer reached the client's side
        self.chat_id: str | None = None      # the chat a follow-up question goes to

    async def ask(self, question: Question) -> AsyncIterator[list[Event]]:
        """The answer's neutral events, a list for each network read."""
        candidates: list[str] = []
        tried: list[str] = []
        refusals: list[ProxyError] = []
        while True:
            handing_over = self._credential is None  # the first question: any of the tokens may answer
            if handing_over:
                self._keep = question.keep
                candidates = candidates or credentials_in_turn(self._app, self._credentials, question)
                try:
                    self._credential = await self._app[TOKEN_HEALTH].acquire(candidates, tried)
                except NoTokenLeft:
                    raise strongest_refusal(refusals) from None
                tried.append(self._credential)
            try:
                async with aclosing(self._app[KIMI].converse(self._credential, question)) as batches:
                    async for batch in batches:
                        self._record(batch, question)
                        yield batch
                return
            except ProxyError as error:
                self._app[TOKEN_HEALTH].learn_from(self._credential, error)
                if not isinstance(error, (TokenRejected, RateLimited)) or self._answered or not handing_over:
                    raise
                log.info("Kimi refused token %s (%s); trying another", fingerprint(self._credential), error.code)
                refusals.append(error)
                self.close()  # the failed attempt's chats go at once

    def _record(self, batch: list[Event], question: Question) -> None:
        """Note the chats a batch names (a kept one with its owner), and whether it shows anything."""
        for event in batch:
            if event.kind == CHAT:
                self.chat_id = self.chat_id or event.text
                if question.chat_id is None and event.text not in self._created:
                    self._created.append(event.text)
                    if question.keep:
                        self._app[CHAT_OWNERS][event.text] = self._credential
            elif event.kind in VISIBLE:
                self._answered = True

    def close(self, seen: bool = True) -> None:
        """Hand the token back and delete the chats (in the background): a kept chat stays only
        once the client has seen its id (`seen`: the answer that names it went out)."""
        if self._credential is None:
            return
        credential, self._credential = self._credential, None
        self._app[TOKEN_HEALTH].release(credential)
        if not (self._keep and self._answered and seen):
            for chat_id in self._created:
                self._app[JANITOR].spawn(self._app[KIMI].delete_chat(credential, chat_id))
        self._created = []
        self.chat_id = None


def strongest_refusal(refusals: list[ProxyError]) -> ProxyError:
    """What to tell a client none of whose tokens could answer: a rate limit says when to come back."""
    limited = [refusal for refusal in refusals if isinstance(refusal, RateLimited)]
    if limited:
        return limited[-1]
    return refusals[-1] if refusals else TokenRejected("Kimi has rejected every token of this request")


# ---------------------------------------------------------------------------------------------
# §10 The neutral request: what every client API's parser produces
# ---------------------------------------------------------------------------------------------


class Call(NamedTuple):
    """A function call: one an assistant turn made (its id is the client's), or one of an answer
    (a random id, which each client API writes with its own prefix)."""

    id: str
    name: str
    arguments: str  # the arguments object, as JSON text


class Turn(NamedTuple):
    """One turn of the conversation a client sends, in any client API."""

    role: str                       # system, user, assistant or tool
    text: str = ""
    where: str = ""                 # where the client put it, e.g. messages[3], for errors that name it
    calls: tuple[Call, ...] = ()    # what an assistant turn called
    call_id: str | None = None      # the call a tool turn answers
    name: str | None = None         # ...and the function that gave it, when the client says so
    error: bool = False             # a tool turn that reports the call failed
    attachments: tuple = ()         # files and images (read in the last turn only)
    has_attachment: bool = False    # the client attached something (read or not)


class Function(NamedTuple):
    name: str
    description: str
    parameters: dict | None  # the JSON schema of its arguments


class ToolUse(NamedTuple):
    """The functions Kimi is asked to call, and how."""

    functions: dict[str, Function]
    required: bool          # a call is required (a named function, or any): the answer must call one
    only: str | None        # the function the choice names
    parallel: bool          # more than one call per answer


class JsonFormat(NamedTuple):
    schema: dict | None  # None: any JSON object


class Limits(NamedTuple):
    """What a parser enforces from the settings."""

    max_messages: int
    max_file_bytes: int


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """A client's request in no client API's terms: what every parser produces, and what the core
    plans a Kimi question from and answers."""

    model: str                         # the model as the client named it: echoed back
    turns: tuple[Turn, ...]
    stream: bool = False
    kimi_model: str | None = None      # the name the Kimi model is chosen by, when not `model`
    tools: ToolUse | None = None       # functions Kimi is asked to call, if any
    json_format: JsonFormat | None = None  # the answer must be JSON
    reasoning: bool = False            # the client asks for thinking
    reasoning_effort: str | None = None  # none, minimal, low, medium or high
    search: bool = False
    conversation: str | None = None    # our kept-conversation field: None, "new" or a Kimi chat id
    stop: tuple[str, ...] = ()         # stop sequences: the answer ends before the first of them
    options: object = None             # the client API's own rendering options (opaque to the core)

    @property
    def must_call(self) -> bool:
        """A call is required: nothing goes out before it is known, not even a keep-alive, so
        that an answer without one gets a real error status."""
        return self.tools is not None and self.tools.required


# Readers every parser shares: each checks a field of the client's body, or raises 400 naming it
JSON_TYPE_NAMES = {str: "a string", bool: "a boolean", int: "an integer", dict: "an object", list: "an array"}


def typed_field(body: dict, field: str, kind, param: str | None = None):
    """The value of an optional field (None when absent or null), checked for its JSON type."""
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise bad_request(f"'{param or field}' must be {JSON_TYPE_NAMES.get(kind, 'a number')}", param or field)
    return value


def model_name(value: object, default: str = "kimi") -> str:
    """The model a client names, echoed in every answer and logged, so its length is capped."""
    if value is None:
        return default
    if not isinstance(value, str):
        raise bad_request("'model' must be a string", "model")
    if len(value) > MAX_MODEL_NAME:
        raise bad_request(f"'model' is longer than {MAX_MODEL_NAME} characters", "model")
    return value or default


def conversation_field(body: dict) -> str | None:
    """Our kept-conversation extension, under one name in every client API: "new" or a chat id
    (its shape is the dialect's, checked when the question is planned)."""
    value = body.get("conversation_id")
    if value is not None and not isinstance(value, str):
        raise bad_request("'conversation_id' must be \"new\" or a Kimi chat id", "conversation_id")
    return value


def count_turns(items: object, field: str, limits: Limits) -> list:
    """The client's list of messages (or items), non-empty and within MAX_MESSAGES."""
    if not isinstance(items, list) or not items:
        raise bad_request(f"'{field}' must be a non-empty array of messages", field)
    if len(items) > limits.max_messages:
        raise bad_request(f"'{field}' holds {len(items)} messages; at most {limits.max_messages} are accepted "
                          "(MAX_MESSAGES)", field)
    return items


def check_last_turn(turns: tuple[Turn, ...], conversation: str | None, field: str) -> None:
    """The newest turn is what Kimi answers: it must say something; in a kept chat (which holds
    the history already) it must be the user's, or the results of Kimi's calls."""
    if not turns:
        raise bad_request(f"'{field}' holds no message to answer", field)
    last = turns[-1]
    if conversation not in (None, "new") and last.role not in ("user", "tool"):
        raise bad_request(f"To continue a conversation the last message must be a user or tool message "
                          f"({last.where})", field)
    if last.role != "tool" and not last.text.strip() and not last.calls and not last.attachments:
        raise bad_request(f"'{last.where}.content' has no text", f"{last.where}.content")


FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def to_function(name: object, description: object, parameters: object, where: str) -> Function:
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        raise bad_request(f"'{where}.name' must be 1 to 64 letters, digits, '_', '.' or '-'", f"{where}.name")
    if description is not None and not isinstance(description, str):
        raise bad_request(f"'{where}.description' must be a string", f"{where}.description")
    if parameters is not None and not isinstance(parameters, dict):
        raise bad_request(f"'{where}.parameters' must be an object", f"{where}.parameters")
    return Function(name, description or "", parameters)


def to_tool_use(functions: list[tuple[str, Function]], required: bool | None, only: str | None, parallel: bool,
                choice_field: str) -> ToolUse | None:
    """The functions of a request and its choice, checked alike for every client API: names are
    unique, and a choice names a function the request defines. None when Kimi calls nothing
    (no functions, or a choice of none)."""
    by_name: dict[str, Function] = {}
    for where, function in functions:
        if function.name in by_name:
            raise bad_request(f"'{where}.name' repeats the function name {function.name}", f"{where}.name")
        by_name[function.name] = function
    if required and (not by_name or (only is not None and only not in by_name)):
        raise bad_request(f"'{choice_field}' names a function the request does not define", choice_field)
    if required is None or not by_name:
        return None
    return ToolUse(by_name, required, only, parallel)


# ---------------------------------------------------------------------------------------------
# §11 The neutral answer: Kimi's events become parts, which streams write and answers fold
# ---------------------------------------------------------------------------------------------


# The kinds of answer parts (TEXT, REASONING and CHAT mean what the events of the same kind mean)
CITATION = "citation"  # a web source, beside the TEXT of its source line: Citation
CALLS = "calls"        # function calls, validated and whole: tuple of Call
FINISH = "finish"      # how the answer ended: Finish
USAGE = "usage"        # the estimate of what the answer cost: Usage
# (CHAT: the id of a chat the client keeps; TEXT, REASONING: deltas of the answer and of the thinking)


class Part(NamedTuple):
    kind: str
    value: object = None


class Citation(NamedTuple):
    number: int
    title: str
    url: str


class Finish(NamedTuple):
    reason: str                       # stop, length (Kimi's limit), calls or stop_sequence
    stop_sequence: str | None = None  # the one that ended the answer


class Usage(NamedTuple):
    """Our documented estimate (Kimi reports none): one token per 4 bytes of UTF-8 text."""

    input_tokens: int
    output_tokens: int
    reasoning_tokens: int = 0  # of the output tokens

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(*(mine + theirs for mine, theirs in zip(self, other)))


STOP, LENGTH_FINISH, CALLS_FINISH = Finish("stop"), Finish("length"), Finish("calls")


def new_id() -> str:
    """24 random letters and digits: the core of an answer's, a call's or a message's id, which
    each client API writes with its own prefix."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(24))


def estimate_tokens(text_bytes: int) -> int:
    """One token per 4 bytes of UTF-8 (about 4 English characters, or 1.3 Chinese characters),
    rounded up."""
    return (text_bytes + 3) // 4


def source_line(citation: Citation) -> str:
    """How a web source is shown in the answer text (the documented `【检索 N】` line)."""
    return f"【检索 {citation.number}】 [{citation.title}]({citation.url})\n"


def prompt_tokens(question: Question) -> int:
    """The estimate of what Kimi is asked (the folded prompt)."""
    return estimate_tokens(utf8_size(question.prompt))


UTF8_SLICE = 2**20  # characters encoded at a time to count a large text's bytes


def utf8_size(text: str) -> int:
    """The UTF-8 size of a text, counted a slice at a time: a prompt may be most of a large
    request, and a copy of it would double what the request costs."""
    if text.isascii():
        return len(text)
    return sum(len(text[start:start + UTF8_SLICE].encode()) for start in range(0, len(text), UTF8_SLICE))


class StopScanner:
    """Answer text cut before the first stop sequence. A piece that ends in what could be the
    start of one is held back until the next piece tells."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._held = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """(the text that may go out, the stop sequence that ended the answer, if one did)."""
        text, self._held = self._held + text, ""
        found = min(((text.find(stop), stop) for stop in self._stops if stop in text), default=None)
        if found is not None:
            return text[:found[0]], found[1]
        keep = max((size for stop in self._stops for size in range(min(len(stop) - 1, len(text)), 0, -1)
                    if text.endswith(stop[:size])), default=0)
        if keep:
            text, self._held = text[:-keep], text[-keep:]
        return text, None

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class AnswerTranslator:
    """Neutral events -> answer parts, shared by streaming and folding. Pure: it writes each web
    source as its documented line (and a CITATION beside it), ends the answer at a stop sequence,
    and counts what usage is estimated from, so that it can tell the usage of an answer that was
    not read to its end."""

    def __init__(self, question: Question, stops: tuple[str, ...] = ()) -> None:
        self._question = question
        self._stops = StopScanner(stops) if stops else None
        self._after_source = self._truncated = False
        self._received = 0               # UTF-8 bytes of answer, thinking and source lines
        self._reasoning = 0              # ...of which thinking
        self.finished = False

    def parts_of(self, events: list[Event]) -> list[Part]:
        parts: list[Part] = []
        for event in events:
            kind = event.kind
            if kind == TEXT:
                text = "\n" + event.text if self._after_source else event.text
                self._after_source = False
                if self._stops is not None:
                    text, stop = self._stops.feed(text)
                    if stop is not None:
                        return parts + self._text(text) + self._end(Finish("stop_sequence", stop))
                parts += self._text(text)
            elif kind == REASONING:
                size = len(event.text.encode())
                self._received += size
                self._reasoning += size
                parts.append(Part(REASONING, event.text))
            elif kind == SOURCE:
                citation = Citation(event.number, event.text, event.url)
                line = source_line(citation)
                self._after_source = True
                self._received += len(line.encode())
                parts += [Part(TEXT, line), Part(CITATION, citation)]
            elif kind == LENGTH:
                self._truncated = True
            elif kind == CHAT:
                if self._question.keep:
                    parts.append(Part(CHAT, event.text))
            elif kind == DONE:
                held = self._stops.flush() if self._stops is not None else ""
                return parts + self._text(held) + self._end(LENGTH_FINISH if self._truncated else STOP)
        return parts

    def _text(self, text: str) -> list[Part]:
        if not text:
            return []
        self._received += len(text.encode())
        return [Part(TEXT, text)]

    def _end(self, finish: Finish) -> list[Part]:
        self.finished = True
        return [Part(FINISH, finish), Part(USAGE, self.usage())]

    def usage(self) -> Usage:
        """The estimate for what has been read so far."""
        return Usage(prompt_tokens(self._question), estimate_tokens(self._received), estimate_tokens(self._reasoning))


async def to_answer_parts(batches: AsyncIterator[list[Event]], question: Question,
                          stops: tuple[str, ...] = ()) -> AsyncIterator[list[Part]]:
    """The answer's parts, a list for each list of events (a dialect ends an answer with DONE or
    raises); at a stop sequence, Kimi's answer is closed unread."""
    translator = AnswerTranslator(question, stops)
    async with aclosing(batches):  # ending here ends the attempt too, so its chat goes at once
        async for batch in batches:
            parts = translator.parts_of(batch)
            if parts:
                yield parts
            if translator.finished:
                return


@dataclasses.dataclass(slots=True)
class Answer:
    """A whole answer: the parts a stream would write, folded (for a client that did not stream)."""

    text: str = ""
    reasoning: str = ""
    calls: tuple[Call, ...] = ()
    citations: tuple[Citation, ...] = ()
    finish: Finish = STOP
    usage: Usage = Usage(0, 0)
    chat_id: str | None = None     # the chat the client keeps


async def fold_answer(batches: AsyncIterator[list[Part]]) -> Answer:
    texts: list[str] = []
    thoughts: list[str] = []
    answer = Answer()
    async for parts in batches:
        for kind, value in parts:
            if kind == TEXT:
                texts.append(value)
            elif kind == REASONING:
                thoughts.append(value)
            elif kind == CALLS:
                answer.calls += value
            elif kind == CITATION:
                answer.citations += (value,)
            elif kind == FINISH:
                answer.finish = value
            elif kind == USAGE:
                answer.usage = value
            elif kind == CHAT:
                answer.chat_id = value
    answer.text, answer.reasoning = "".join(texts), "".join(thoughts)
    return answer


# ---------------------------------------------------------------------------------------------
# §12 JSON as Kimi writes it: read leniently, checked against the schema the client gave
# ---------------------------------------------------------------------------------------------


JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f]")
JSON_SPACE = re.compile(r"[ \t\n\r]*")
JSON_FENCE = re.compile(r"\s*```[\w-]*[ \t]*\n(.*?)\n?[ \t]*```\s*", re.S)


def no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# Python's reader, not orjson's: it keeps integers past 64 bits exact
JSON_READER = json.JSONDecoder(parse_constant=no_constants)


def read_json(text: str) -> tuple[object, str] | None:
    """(the value, the JSON text it was read from) of text that is one JSON value, read the way a
    lenient reader would: raw newlines, tabs and other control characters inside strings (common
    when the value holds code) are escaped first. None when it is no JSON even so."""
    text = text.strip()
    for candidate in (text, escape_controls(text)):
        try:
            return JSON_READER.decode(candidate), candidate
        except ValueError:
            continue
    return None


def escape_controls(text: str) -> str:
    """The control characters inside the JSON strings of `text`, escaped (nothing else changes)."""
    return JSON_STRING.sub(lambda string: CONTROL_CHARACTER.sub(lambda c: f"\\u{ord(c[0]):04x}", string[0]), text)


def inside_string(text: str) -> bool:
    """Whether JSON text ends inside a string (so a closing mark found here is part of a value)."""
    return '"' in JSON_STRING.sub("", text)


def member_text(text: str, name: str) -> str | None:
    """The JSON text of member `name` of the object that `text` (valid JSON) is, exactly as
    written: what the client gets keeps Kimi's numbers and spacing (the last, if it repeats)."""
    at = JSON_SPACE.match(text, 0).end()
    if text[at:at + 1] != "{":
        return None
    found, at = None, JSON_SPACE.match(text, at + 1).end()
    while text[at:at + 1] == '"':
        key, at = json.decoder.scanstring(text, at + 1)
        at = JSON_SPACE.match(text, JSON_SPACE.match(text, at).end() + 1).end()  # past the colon
        end = JSON_READER.raw_decode(text, at)[1]
        found = text[at:end] if key == name else found
        at = JSON_SPACE.match(text, end).end()
        at = JSON_SPACE.match(text, at + 1).end() if text[at:at + 1] == "," else at
    return found


def unfenced(text: str) -> str:
    """Text without a code fence around all of it (Kimi fences JSON it was told not to fence)."""
    fenced = JSON_FENCE.fullmatch(text)
    return fenced[1] if fenced else text


# The JSON Schema that tools and structured outputs use, checked recursively: type, properties,
# required, additionalProperties, items and prefixItems, enum, const, anyOf / oneOf / allOf, $ref
# to $defs or definitions, string lengths and pattern, numeric bounds and multipleOf, array and
# object sizes. Other keywords (format, title, description, default...) are not checked.
JSON_TYPES = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float),
              "boolean": bool, "null": type(None)}
MAX_SCHEMA_DEPTH = 64  # $refs followed before a (recursive) schema is taken as holding


def schema_problem(value: object, schema: object) -> str | None:
    """What in `value` breaks the JSON schema, at its path (`location.city: expected string`),
    or None when it holds."""
    return SchemaCheck(schema).problem(value, schema, "", 0)


class SchemaCheck:
    def __init__(self, root: object) -> None:
        self._root = root

    def problem(self, value: object, schema: object, path: str, depth: int) -> str | None:
        if schema is False:
            return f"{where(path)}: not allowed here"
        if not isinstance(schema, dict) or depth > MAX_SCHEMA_DEPTH:
            return None
        ref = schema.get("$ref")
        if isinstance(ref, str):
            problem = self.problem(value, self._resolve(ref), path, depth + 1)
            if problem:
                return problem
        for check in (type_problem, value_problem, size_problem):
            problem = check(value, schema, path)
            if problem:
                return problem
        return self._combined(value, schema, path, depth) or self._inside(value, schema, path, depth)

    def _resolve(self, ref: str) -> object:
        """A local reference (#/$defs/Name, #/definitions/Name, any JSON pointer); others hold."""
        if not ref.startswith("#"):
            return None
        target = self._root
        for step in filter(None, ref[1:].split("/")):
            step = step.replace("~1", "/").replace("~0", "~")
            target = target.get(step) if isinstance(target, dict) else \
                target[int(step)] if isinstance(target, list) and step.isdigit() and int(step) < len(target) else None
        return target

    def _combined(self, value: object, schema: dict, path: str, depth: int) -> str | None:
        for part in schema.get("allOf") if isinstance(schema.get("allOf"), list) else ():
            problem = self.problem(value, part, path, depth + 1)
            if problem:
                return problem
        for keyword in ("anyOf", "oneOf"):
            choices = schema.get(keyword)
            if not isinstance(choices, list) or not choices:
                continue
            problems = [self.problem(value, choice, path, depth + 1) for choice in choices]
            matched = problems.count(None)
            if not matched:
                return f"{where(path)}: matches none of the schemas it may ({min(problems, key=len)})"
            if keyword == "oneOf" and matched > 1:
                return f"{where(path)}: matches more than one of the schemas of its oneOf"
        return None

    def _inside(self, value: object, schema: dict, path: str, depth: int) -> str | None:
        """The members of an object and the items of an array."""
        if isinstance(value, dict):
            required = schema.get("required")
            for name in required if isinstance(required, list) else ():
                if isinstance(name, str) and name not in value:
                    return f"{joined(path, name)}: missing (required)"
            properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
            extra = schema.get("additionalProperties", True)
            for name, member in value.items():
                problem = self.problem(member, properties[name], joined(path, name), depth + 1) if name in properties \
                    else f"{joined(path, name)}: not allowed (no such property)" if extra is False \
                    else self.problem(member, extra, joined(path, name), depth + 1)
                if problem:
                    return problem
        elif isinstance(value, list):
            prefix = schema.get("prefixItems") if isinstance(schema.get("prefixItems"), list) else []
            items = schema.get("items", True)
            for index, item in enumerate(value):
                part = prefix[index] if index < len(prefix) else items
                problem = self.problem(item, part, f"{path}[{index}]", depth + 1)
                if problem:
                    return problem
        return None


def where(path: str) -> str:
    return path or "the value"


def joined(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def is_json_type(value: object, kind: str) -> bool:
    if isinstance(value, bool):
        return kind == "boolean"
    if kind == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, JSON_TYPES[kind])


def same_json(a: object, b: object) -> bool:
    """JSON equality: 1 and 1.0 are the same number, true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(same_json, a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def type_problem(value: object, schema: dict, path: str) -> str | None:
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds if isinstance(kinds, list) else []
    kinds = [kind for kind in kinds if kind in JSON_TYPES]
    if kinds and not any(is_json_type(value, kind) for kind in kinds):
        return f"{where(path)}: expected {' or '.join(kinds)}"
    return None


def value_problem(value: object, schema: dict, path: str) -> str | None:
    """enum and const."""
    enum = schema.get("enum")
    if isinstance(enum, list) and not any(same_json(value, allowed) for allowed in enum):
        return f"{where(path)}: expected one of {json.dumps(enum, ensure_ascii=False)}"
    if "const" in schema and not same_json(value, schema["const"]):
        return f"{where(path)}: expected {json.dumps(schema['const'], ensure_ascii=False)}"
    return None


def size_problem(value: object, schema: dict, path: str) -> str | None:
    """The bounds of strings, numbers, arrays and objects."""
    if isinstance(value, str):
        return bound_problem(len(value), schema, "minLength", "maxLength", path, "characters") or \
            pattern_problem(value, schema.get("pattern"), path)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return number_problem(value, schema, path)
    if isinstance(value, list):
        return bound_problem(len(value), schema, "minItems", "maxItems", path, "items")
    if isinstance(value, dict):
        return bound_problem(len(value), schema, "minProperties", "maxProperties", path, "properties")
    return None


def bound_problem(size: int, schema: dict, low: str, high: str, path: str, unit: str) -> str | None:
    least, most = schema.get(low), schema.get(high)
    if isinstance(least, int) and size < least:
        return f"{where(path)}: fewer than {least} {unit}"
    if isinstance(most, int) and size > most:
        return f"{where(path)}: more than {most} {unit}"
    return None


def pattern_problem(value: str, pattern: object, path: str) -> str | None:
    if not isinstance(pattern, str):
        return None
    try:
        found = re.search(pattern, value)
    except re.error:  # a pattern Python does not read (ECMA syntax it lacks): not checked
        return None
    return None if found else f"{where(path)}: does not match the pattern {pattern}"


def number_problem(value: float, schema: dict, path: str) -> str | None:
    def number(keyword: str) -> float | None:
        bound = schema.get(keyword)
        return bound if isinstance(bound, (int, float)) and not isinstance(bound, bool) else None

    low, high, step = number("minimum"), number("maximum"), number("multipleOf")
    above, below = number("exclusiveMinimum"), number("exclusiveMaximum")
    if low is not None and value < low:
        return f"{where(path)}: less than the minimum {low}"
    if high is not None and value > high:
        return f"{where(path)}: more than the maximum {high}"
    if above is not None and value <= above:
        return f"{where(path)}: must be more than {above}"
    if below is not None and value >= below:
        return f"{where(path)}: must be less than {below}"
    if step and not float(value / step).is_integer():
        return f"{where(path)}: not a multiple of {step}"
    return None


# ---------------------------------------------------------------------------------------------
# §13 Tools and JSON answers: Kimi's web chat has no functions, so they are emulated by prompting
# ---------------------------------------------------------------------------------------------


# Kimi is asked to write calls as blocks (to_instructions); a conversation's calls and results go
# to Kimi in the same format (to_call_block, to_tool_result); its answer is read for blocks,
# checked, and a bad one gets one repair turn in the same chat (checked_answer_parts).


def to_instructions(tools: ToolUse | None, json_format: JsonFormat | None) -> str:
    """What the proxy asks of Kimi on top of the conversation: how to call functions, or to answer in JSON."""
    lines = []
    if tools:
        lines.append("You can call these functions (each given as JSON: its name, what it does, and the JSON "
                     "schema of its arguments):")
        lines += [orjson.dumps({"name": f.name, "description": f.description, "parameters": f.parameters or {}}).decode()
                  for f in tools.functions.values()]
        lines.append("To call a function, write one block per call, exactly in this form, and write nothing after "
                     'your last block:\n<tool_call>\n{"name": "NAME", "arguments": {...}}\n</tool_call>')
        lines.append(f"You must call the function {tools.only} now." if tools.only else
                     "You must call at least one function now." if tools.required else
                     "Call a function only when it helps; otherwise answer normally.")
        if not tools.parallel:
            lines.append("Call at most one function in an answer.")
        lines.append("Function results come back to you in <tool_result> blocks.")
    if json_format and json_format.schema:
        lines.append("Answer with JSON only, with no text and no code fence around it, matching this JSON schema: "
                     + orjson.dumps(json_format.schema).decode())
    elif json_format:
        lines.append("Answer with JSON only: one JSON object, with no text and no code fence around it.")
    return "\n".join(lines)


def to_call_block(call: Call) -> str:
    """A call of the conversation, as the block Kimi writes (arguments that do not parse are shown
    as the client sent them)."""
    try:
        arguments = orjson.loads(call.arguments) if call.arguments else {}
    except orjson.JSONDecodeError:
        arguments = call.arguments
    return f"<tool_call>\n{orjson.dumps({'name': call.name, 'arguments': arguments or {}}).decode()}\n</tool_call>"


def to_tool_result(name: str | None, text: str, error: bool = False) -> str:
    """A function's result, verbatim, with the name of the function that gave it (and whether the
    call failed, where the client says so)."""
    if name is None:
        return text
    failed = ' error="true"' if error else ""
    return f'<tool_result name="{name}"{failed}>\n{text}\n</tool_result>'


BLOCKS = {"<tool_call>": "</tool_call>", "```tool_call": "```"}  # opening mark -> closing mark
# text ending in what could still grow into an opening mark, or in a code fence's first line, which
# may wrap a block (one regex: this runs for every piece)
PARTIAL_MARK = re.compile(r"(?:```[\w-]*\s*)?(?:" + "|".join(re.escape(mark[:size]) for mark in BLOCKS
                                                           for size in range(len(mark) - 1, 0, -1)) + r")?\Z")
FENCE_AT_END = re.compile(r"```[\w-]*\s*\Z")
FENCE_LINE = re.compile(r"^[ \t]*```[\w-]*[ \t]*$\n?", re.M)
MARK_LOOKBACK = 32  # how far back a partial mark or a fence's first line is looked for


class CallScanner:
    """Streamed answer text -> the prose before the first tool-call block, let out as soon as it
    cannot be the start of a block (trailing blank space waits too); from the first block on,
    everything is kept, read into `segments`: the blocks, and the prose between and after them.
    A block closes at the first closing mark that is not inside one of its JSON strings (an
    argument may hold code, fences and marks included)."""

    def __init__(self) -> None:
        self._pending = ""        # prose that may still turn out to open a block
        self._fences = 0          # code fences in the prose let out so far
        self.held = ""            # the answer from the first block on
        self._scanned = 0         # how far `held` has been read into segments
        self._open: str | None = None  # the mark of the block being read, if one is
        self._opened_at = 0       # where in `held` that block's content starts
        self.segments: list[tuple[str, str]] = []  # ("block", its content) or ("prose", text)
        self.blocks: list[str] = []  # the blocks' contents alone
        self.finished = False

    def feed(self, text: str) -> str:
        """Take more answer text; return the prose that may go out now."""
        if self.held:
            self.held += text
            self._scan()
            return ""
        pending = self._pending + text
        starts = [start for start in map(pending.find, BLOCKS) if start >= 0]
        if starts:
            prose, self._pending, self.held = pending[:min(starts)], "", pending[min(starts):]
            fence = FENCE_AT_END.search(prose)
            if fence and (self._fences + prose.count("```")) % 2:  # a fence of its own around the block
                prose = prose[:fence.start()]
            self._scan()
            return prose.rstrip()
        tail = max(0, len(pending) - MARK_LOOKBACK)  # (most pieces hold neither < nor `: no regex for them)
        kept = PARTIAL_MARK.search(pending, tail).start() if "<" in pending[tail:] or "`" in pending[tail:] else None
        prose = pending[:kept].rstrip()
        self._pending = pending[len(prose):]
        self._fences += prose.count("```")
        return prose

    def finish(self) -> str:
        """The answer ended: the prose still kept back was no block after all; what follows the
        last block is prose."""
        self.finished = True
        prose, self._pending = self._pending, ""
        if not self.held:
            return prose
        if self._open is None:
            self._add_prose(self.held[self._scanned:])
            self._scanned = len(self.held)
        return ""

    @property
    def unclosed(self) -> bool:
        """A block was opened and never closed."""
        return self._open is not None

    def _scan(self) -> None:
        while True:
            if self._open is None:
                rest = self.held[self._scanned:]
                starts = [(at, mark) for mark in BLOCKS if (at := rest.find(mark)) >= 0]
                if not starts:
                    return  # (prose, or the start of a mark: read at the next piece or at the end)
                at, mark = min(starts)
                self._add_prose(rest[:at])
                self._open, self._opened_at = mark, self._scanned + at + len(mark)
                self._scanned = self._opened_at
            close = BLOCKS[self._open]
            end = self.held.find(close, self._scanned)
            while end >= 0 and inside_string(self.held[self._opened_at:end]):
                end = self.held.find(close, end + len(close))
            if end < 0:
                self._scanned = max(self._opened_at, len(self.held) - len(close))
                return
            self.segments.append(("block", self.held[self._opened_at:end]))
            self.blocks.append(self.segments[-1][1])
            self._open, self._scanned = None, end + len(close)

    def _add_prose(self, text: str) -> None:
        """Prose between (or after) blocks, without the fences Kimi may put around a block."""
        text = FENCE_LINE.sub("", text).strip()
        if text:
            self.segments.append(("prose", text))


def to_tool_call(block: str, tools: ToolUse) -> tuple[Call | None, str | None]:
    """The call a block makes, checked against the function's schema, or what is wrong with it.
    The arguments keep Kimi's text; they may come as an object under "arguments" (or
    "parameters", the word the instructions use for the schema), or as a JSON string."""
    found = read_json(unfenced(block))
    if found is None:
        return None, "the JSON in the block does not parse"
    call, text = found
    name = call.get("name") if isinstance(call, dict) else None
    if not isinstance(name, str):
        return None, 'the block is not a JSON object with a "name"'
    if name not in tools.functions:
        return None, f"{name!r} is not a function you may call here"
    key = next((key for key in ("arguments", "parameters") if key in call), None)
    arguments, arguments_text = (call[key], member_text(text, key)) if key else ({}, "{}")
    if arguments is None or arguments == "":  # (null or "" for a function without parameters)
        arguments, arguments_text = {}, "{}"
    elif isinstance(arguments, str):
        found = read_json(arguments)
        if found is None:
            return None, f"the arguments of {name} do not parse (a JSON string that is no JSON)"
        arguments, arguments_text = found
    if not isinstance(arguments, dict):
        return None, f"the arguments of {name} must be a JSON object"
    problem = schema_problem(arguments, tools.functions[name].parameters)
    if problem:
        return None, f"the arguments of {name}: {problem}"
    return Call(new_id(), name, arguments_text.strip()), None


def to_json_answer(text: str, json_format: JsonFormat) -> tuple[str | None, str | None]:
    """The JSON text in an answer, with a code fence or prose around it stripped, or what is wrong."""
    problems = []
    for candidate in json_candidates(text):
        found = read_json(candidate)
        if found is None:
            continue
        value, candidate = found
        problem = schema_problem(value, json_format.schema or {"type": "object"})
        if problem is None:
            return candidate, None
        problems.append(problem)
    return None, problems[0] if problems else "it holds no JSON that parses"  # (the widest JSON's problem)


FENCED = re.compile(r"```[\w-]*[ \t]*\n(.*?)```", re.S)


def json_candidates(text: str):
    yield text.strip()
    yield from (match[1].strip() for match in FENCED.finditer(text))
    for opening, closing in ("{}", "[]"):
        start, end = text.find(opening), text.rfind(closing)
        if 0 <= start < end:
            yield text[start:end + 1]


class AnswerReading:
    """One Kimi answer read for tool calls or JSON (pure). When `live`, the thinking and the prose
    before a call go out as they come; otherwise everything waits for the verdict. Each block is
    checked as soon as it closes, so that the answer can end early where one call is all that
    is wanted; otherwise it is read to its end (every call counts, and a fallback is the whole
    of what Kimi wrote)."""

    def __init__(self, wanted: Request, live: bool) -> None:
        self.tools = wanted.tools
        self.scanner = CallScanner() if wanted.tools else None
        self.stops = wanted.stop
        self.live = live
        self._text: list[str] = []
        self._prose: list[str] = []  # the text before the first block (all of it when there is none)
        self.sent = 0            # characters of the prose that went out
        self.reasoning: list[str] = []  # thinking kept back
        self.checked: list[tuple[Call | None, str | None]] = []  # each closed block's call, or its problem
        self.finish = STOP
        self.usage: Usage | None = None

    @property
    def text(self) -> str:
        """The answer as far as it was read."""
        return "".join(self._text)

    @property
    def prose(self) -> str:
        return "".join(self._prose)

    def answer_with(self, text: str) -> None:
        """What is left to send is `text` instead of the prose (the JSON found in it)."""
        self._prose, self.sent = [text], 0

    @property
    def ended(self) -> bool:
        """One call is all that may be used (parallel calls are off, or the choice names one), and
        it has come: the rest is not read."""
        tools = self.tools
        if tools is None or (tools.parallel and not tools.only):
            return False
        return any(call is not None and call.name == (tools.only or call.name) for call, _ in self.checked)

    def take(self, parts: list[Part]) -> list[Part]:
        """Read the parts of one network read; return those that may go out now."""
        out: list[Part] = []
        for part in parts:
            kind, value = part
            if kind == TEXT:
                self._text.append(value)
                out += self._prose_out(self.scanner.feed(value) if self.scanner else value)
                self._check_new_blocks()
            elif kind == REASONING and not self.live:
                self.reasoning.append(value)
            elif kind == FINISH:
                self.finish = value
            elif kind == USAGE:
                self.usage = value
            else:
                out.append(part)
        return out

    def end(self, translator: AnswerTranslator) -> list[Part]:
        """The answer ended, or was not read further (its usage is then what was read)."""
        self.usage = self.usage or translator.usage()
        if self.scanner is None:
            return []
        out = self._prose_out(self.scanner.finish())
        self._check_new_blocks()
        return out

    def _check_new_blocks(self) -> None:
        blocks = self.scanner.blocks if self.scanner else ()
        if len(blocks) > len(self.checked):
            self.checked += [to_tool_call(block, self.tools) for block in blocks[len(self.checked):]]

    def _prose_out(self, prose: str) -> list[Part]:
        """Keep prose read; when live, it goes out at once."""
        if not prose:
            return []
        self._prose.append(prose)
        if not self.live:
            return []
        self.sent += len(prose)
        return [Part(TEXT, prose)]

    def thinking(self) -> list[Part]:
        return [Part(REASONING, "".join(self.reasoning))] if self.reasoning else []

    def unsent(self) -> list[Part]:
        """The prose before the first block that has not gone out yet."""
        unsent = self.prose[self.sent:]
        return [Part(TEXT, unsent)] if unsent else []

    def as_written(self) -> list[Part]:
        """The whole answer as plain text: what has not gone out of it yet."""
        return self.thinking() + ([Part(TEXT, self.text[self.sent:])] if self.text[self.sent:] else [])


# the end of every repair turn's message about calls
WRITE_THE_CALLS = ('Write each call as its own <tool_call> block holding {"name": ..., "arguments": {...}}, and '
                   'nothing after the last block.')


class BadAnswer(NamedTuple):
    problem: str
    repair: str  # what Kimi is told in the repair turn


def judge(wanted: Request, reading: AnswerReading) -> list[Part] | BadAnswer:
    """The parts that end an answer which passes (its calls with the prose between them, or its
    JSON), after what the reading kept back; or what is wrong with it."""
    tools, scanner = wanted.tools, reading.scanner
    if scanner and (scanner.segments or scanner.unclosed):
        return judge_calls(tools, reading)
    if wanted.must_call:
        asked = f"the function {tools.only}" if tools.only else "a function"
        return BadAnswer(f"the answer calls no function, and {asked} must be called",
                         f"You must call {asked} now. {WRITE_THE_CALLS}")
    if wanted.json_format:
        text, problem = to_json_answer(reading.text, wanted.json_format)
        if problem:
            return BadAnswer(f"the answer is not the JSON asked for: {problem}",
                             f"That answer is not the JSON asked for: {problem}. Answer again with the JSON only.")
        reading.answer_with(text)
    return [Part(FINISH, reading.finish)]


def judge_calls(tools: ToolUse, reading: AnswerReading) -> list[Part] | BadAnswer:
    """Every block is a call, in order, with the prose between them kept (with parallel calls off,
    the first block only). Where the choice names a function, its call is kept and other calls
    are left out. A bad block, or one never closed, is a BadAnswer that says which call it is."""
    checked = reading.checked if tools.parallel else reading.checked[:1]
    if tools.only:
        uses = [call if call is not None and call.name == tools.only else None for call, _ in checked]
        if any(uses):
            return interleaved(reading, uses) + [Part(FINISH, CALLS_FINISH)]
    problems = [(index, problem) for index, (_, problem) in enumerate(checked) if problem]
    count = len(checked)
    if reading.scanner.unclosed and (tools.parallel or not checked):
        problems.append((count, "a <tool_call> block is not closed with </tool_call>"))
        count += 1
    if problems:
        return bad_calls(problems, count)
    if tools.only:
        called = ", ".join(sorted({call.name for call, _ in checked}))
        return BadAnswer(f"the answer calls {called}, not the function {tools.only}",
                         f"You called {called}; you must call the function {tools.only} now. {WRITE_THE_CALLS}")
    return interleaved(reading, [call for call, _ in checked]) + [Part(FINISH, CALLS_FINISH)]


def interleaved(reading: AnswerReading, uses: list[Call | None]) -> list[Part]:
    """The calls used (one for each block, None for a block left out), each where its block stood,
    with the prose between them; the prose after the last block too, when the answer was read to
    its end."""
    parts: list[Part] = []
    waiting: list[str] = []  # prose read since the last call
    wrote = bool(reading.prose.strip())
    blocks = iter(uses)
    for kind, content in reading.scanner.segments:
        if kind == "prose":
            waiting.append(content)
            continue
        call = next(blocks, None)
        if call is not None:
            parts += prose_parts(waiting, wrote) + [Part(CALLS, (call,))]
            wrote, waiting = wrote or bool(waiting), []
    return parts + ([] if reading.ended else prose_parts(waiting, wrote))


def prose_parts(texts: list[str], wrote: bool) -> list[Part]:
    """Prose between calls, set off from the prose before it by a blank line."""
    return [Part(TEXT, "\n\n".join(["", *texts] if wrote else texts))] if texts else []


def bad_calls(problems: list[tuple[int, str]], count: int) -> BadAnswer:
    index, problem = problems[0]
    if count == 1:
        return BadAnswer(f"the function call is not usable: {problem}",
                         f"That function call is not usable: {problem}. {WRITE_THE_CALLS}")
    return BadAnswer(f"call {index + 1} of {count} is not usable: {problem}",
                     f"Call {index + 1} of your {count} calls is not usable: {problem}. Write all {count} calls "
                     f"again, the good ones too. {WRITE_THE_CALLS}")


async def checked_answer_parts(session: KimiSession, wanted: Request, question: Question) -> AsyncIterator[list[Part]]:
    """The answer parts of a request with tools or a JSON format: Kimi's answer is read for calls
    (or JSON) and checked, and a bad one gets one repair turn in the same chat, once the first
    answer has ended. The prose before a call streams as it comes, unless the answer must pass
    before anything goes out (a required call, JSON)."""
    live = wanted.json_format is None and not wanted.must_call
    first = AnswerReading(wanted, live)
    async for parts in read_answer(session.ask(question), question, first):
        yield parts
    verdict = judge(wanted, first)
    usage = first.usage
    if isinstance(verdict, BadAnswer) and session.chat_id is not None:
        # (no web search or research: the repair is about the form of what Kimi already found)
        repair = dataclasses.replace(question, prompt=verdict.repair, chat_id=session.chat_id, attachments=(),
                                     search=False, research=False)
        second = AnswerReading(wanted, live=False)
        try:
            async for parts in read_answer(session.ask(repair), repair, second):
                yield parts
        except ProxyError as error:  # e.g. Kimi still busy writing the first answer: that one stands
            log.warning("Kimi refused the repair turn: %s", error.message)
        else:
            usage += second.usage
            yield repaired(wanted, first, second) + [Part(USAGE, usage)]
            return
    if isinstance(verdict, BadAnswer):
        yield answer_as_written(wanted, first, verdict.problem) + [Part(USAGE, usage)]
        return
    yield first.thinking() + first.unsent() + verdict + [Part(USAGE, usage)]


def repaired(wanted: Request, first: AnswerReading, second: AnswerReading) -> list[Part]:
    """One coherent answer after a repair turn, never a splice of the two: the first answer's
    prose with the repair's calls; the repair's JSON; the repair's prose when it answered without
    calls and nothing of the first has gone out; else the first answer as Kimi wrote it."""
    verdict = judge(wanted, second)
    if isinstance(verdict, BadAnswer):
        return answer_as_written(wanted, first, verdict.problem)
    if any(kind == CALLS for kind, _ in verdict):
        return first.thinking() + first.unsent() + [part for part in verdict if part.kind != TEXT]
    if wanted.json_format or first.sent == 0:
        return first.thinking() + second.thinking() + second.unsent() + verdict
    return answer_as_written(wanted, first, "the repair answered without a call")


async def read_answer(batches: AsyncIterator[list[Event]], question: Question,
                      reading: AnswerReading) -> AsyncIterator[list[Part]]:
    """Read one answer into `reading`, passing on what may go out at once. Once the one call that
    is wanted has come, Kimi's answer is closed unread: nothing after it is used."""
    translator = AnswerTranslator(question, reading.stops)
    async with aclosing(batches):
        async for batch in batches:
            out = reading.take(translator.parts_of(batch))
            if out:
                yield out
            if reading.ended or translator.finished:
                break
    out = reading.end(translator)
    if out:
        yield out


def answer_as_written(wanted: Request, reading: AnswerReading, problem: str) -> list[Part]:
    """A first answer whose calls are still bad after the repair turn is plain text, the whole of
    what Kimi wrote; where a call or JSON was required, that is Kimi failing."""
    if wanted.json_format or wanted.must_call:
        raise ProxyError(502, f"Kimi's answer could not be used, even when asked again: {problem}",
                         code="invalid_kimi_answer")
    return reading.as_written() + [Part(FINISH, STOP)]


# ---------------------------------------------------------------------------------------------
# §14 The core: a request planned into a Kimi question, and answered as parts
# ---------------------------------------------------------------------------------------------


LATEST_MESSAGE_HINT = "关注用户最新的消息"
LATEST_FILE_HINT = "关注用户最新发送文件和消息"


def plan(wanted: Request, kimi: KimiHTTP) -> Question:
    """What Kimi is asked for a request, in the dialect's terms: the model's features, the history
    folded into one prompt (in a kept chat only the newest turn), the files of the last turn."""
    chat_id, keep = to_conversation(wanted.conversation, kimi)
    model = wanted.kimi_model or wanted.model
    flags = model_flags(model, kimi)
    if wanted.reasoning or wanted.reasoning_effort not in (None, "none"):
        flags["reasoning"] = True
    turns = to_kimi_turns(wanted.turns, kimi)
    instructions = to_instructions(wanted.tools, wanted.json_format)
    prompt = (to_continuation_prompt if chat_id else to_folded_prompt)(turns, instructions)
    return Question(model=model, prompt=prompt, chat_id=chat_id, keep=keep, attachments=wanted.turns[-1].attachments,
                    reasoning_effort=wanted.reasoning_effort, **{**flags, "search": flags["search"] or wanted.search})


def to_conversation(value: str | None, kimi: KimiHTTP) -> tuple[str | None, bool]:
    """(chat to continue, keep the chat) from the request's conversation field."""
    if value is None:
        return None, False
    if value == "new":
        return None, True
    if kimi.chat_ids.fullmatch(value):
        return value, True
    raise bad_request(f"'conversation_id' must be \"new\" or a Kimi chat id ({kimi.chat_id_shape})", "conversation_id")


def model_flags(model: str, kimi: KimiHTTP) -> dict:
    """Kimi options from a model name: combinable substrings, or a Kimi+ agent id."""
    if kimi.agent_ids.fullmatch(model):
        return {"agent_id": model, "search": False, "research": False, "reasoning": False,
                "math": False, "silent": False}
    name = model.lower()
    return {"agent_id": None, "search": "search" in name, "research": "research" in name,
            "reasoning": "k1" in name or "thinking" in name, "math": "math" in name, "silent": "silent" in name}


class KimiTurn(NamedTuple):
    """A turn as Kimi reads it: its role and its text, calls and results written as blocks."""

    role: str
    text: str
    has_attachment: bool = False


def to_kimi_turns(turns: tuple[Turn, ...], kimi: KimiHTTP) -> list[KimiTurn]:
    called: dict[str, str] = {}  # call id -> the function's name, for the results that follow
    kimi_turns = []
    for turn in turns:
        text = kimi.mark_links(turn.text) if turn.role == "user" else turn.text
        if turn.role == "assistant":
            for call in turn.calls:
                called[call.id] = call.name
            text = "\n".join(filter(None, [text, *map(to_call_block, turn.calls)]))
        elif turn.role == "tool":
            text = to_tool_result(called.get(turn.call_id) or turn.name, text, turn.error)
        kimi_turns.append(KimiTurn(turn.role, text, turn.has_attachment))
    return kimi_turns


def to_folded_prompt(turns: list[KimiTurn], instructions: str = "") -> str:
    """Kimi takes one message per turn: fold the history into it, with a hint to answer the newest
    (before the newest turn; after the results of the last calls, all of them, when the
    conversation ends with those)."""
    if len(turns) == 1:
        return to_prompt(turns, instructions)
    last = turns[-1]
    hint = KimiTurn("system", LATEST_FILE_HINT if any(turn.has_attachment for turn in newest(turns))
                    else LATEST_MESSAGE_HINT)
    if last.role == "tool":
        return to_prompt([*turns, hint], instructions)
    return to_prompt([*turns[:-1], hint, last], instructions)


def newest(turns: list[KimiTurn]) -> list[KimiTurn]:
    """The newest turn, or the results of the last calls when the conversation ends with them."""
    start = len(turns) - 1
    while start > 0 and turns[-1].role == "tool" and turns[start - 1].role == "tool":
        start -= 1
    return turns[start:]


def to_continuation_prompt(turns: list[KimiTurn], instructions: str = "") -> str:
    """A kept Kimi chat already holds the history: send only the newest user turn, or the
    function results that came after Kimi's last answer."""
    if turns[-1].role == "user":
        return to_prompt(turns[-1:], instructions)
    start = max((i for i, turn in enumerate(turns) if turn.role == "assistant"), default=-1) + 1
    return to_prompt(turns[start:], instructions)


def to_prompt(turns: list[KimiTurn], instructions: str) -> str:
    """One Kimi message: a lone turn as it is, else each turn after its role (the newest even
    without text), with the proxy's own instructions (tools, JSON) first."""
    if instructions:
        turns = [KimiTurn("system", instructions), *turns]
    if len(turns) == 1:
        return turns[0].text
    return "\n".join(f"{turn.role}:{turn.text}" for turn in turns if turn.text or turn is turns[-1])


def answer_parts(session: KimiSession, wanted: Request, question: Question) -> AsyncIterator[list[Part]]:
    """The parts of the answer to a planned request: Kimi's answer as it comes, or, with tools or
    a JSON format, as checked (and repaired)."""
    if wanted.tools is None and wanted.json_format is None:
        return to_answer_parts(session.ask(question), question, wanted.stop)
    return checked_answer_parts(session, wanted, question)


# ---------------------------------------------------------------------------------------------
# §15 Server-sent events: the framing, the writer, and what a client API's stream renderer provides
# ---------------------------------------------------------------------------------------------


def sse_event(payload: object, event: str | None = None) -> bytes:
    """One server-sent event: an `event:` line when the client API names its events, then the JSON
    (orjson writes no newline inside it, so one `data:` line holds it)."""
    data = b"data: " + orjson.dumps(payload) + b"\n\n"
    return b"event: " + event.encode() + b"\n" + data if event else data


class AnswerStream:
    """A client API's rendering of one streamed answer: parts in, the bytes of its events out.
    Each client API subclasses it with the same members: `feed` (the parts of one read from
    Kimi), `error` (a failure after the stream began) and `end` (after the last part, or after
    an error); `opening`, the events that go out before the first of them; `KEEPALIVE`, what
    keeps a silent stream open; and `headers`, set on the response when it starts."""

    KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: every SDK's reader skips it

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.result: dict | None = None  # what the stream ended with, for an API that remembers it

    def kept(self, chat_id: str) -> None:
        """The answer lives in a chat the client keeps: its id goes out as a header too."""
        self.headers[X_CONVERSATION_ID] = chat_id

    def opening(self) -> bytes:
        return b""

    def feed(self, parts: list[Part]) -> bytes:
        raise NotImplementedError

    def error(self, error: ProxyError) -> bytes:
        raise NotImplementedError

    def end(self) -> bytes:
        raise NotImplementedError


class SSEStream:
    """The client's event stream. Its headers go out late, with the first event or keep-alive,
    so that anything failing before then still gets a real HTTP status. While it is kept alive
    (an `async with` of it), the keep-alive clock pings it when it falls silent."""

    def __init__(self, request: web.Request, renderer: AnswerStream, clock: "KeepAliveClock | None") -> None:
        self._request = request
        self._renderer = renderer
        self._clock = clock
        self._start_lock = asyncio.Lock()
        self._ping: asyncio.Task | None = None  # a keep-alive being written
        self.last_write = asyncio.get_running_loop().time()
        self.response = web.StreamResponse(headers={
            hdrs.CONTENT_TYPE: "text/event-stream; charset=utf-8",
            hdrs.CACHE_CONTROL: "no-cache",
            X_ACCEL_BUFFERING: "no",
        })

    @property
    def started(self) -> bool:
        return self.response.prepared

    async def send(self, data: bytes) -> None:
        if not self.response.prepared:
            async with self._start_lock:
                if not self.response.prepared:
                    self.response.headers.update(self._renderer.headers)
                    await self.response.prepare(self._request)
                    data = self._renderer.opening() + data
        self.last_write = asyncio.get_running_loop().time()
        await self.response.write(data)

    async def __aenter__(self) -> "SSEStream":
        if self._clock is not None:
            self._clock.streams.add(self)
        return self

    async def __aexit__(self, *exception) -> None:
        if self._clock is not None:
            self._clock.streams.discard(self)
        if self._ping is not None:  # (before anything else is written)
            self._ping.cancel()
            await asyncio.gather(self._ping, return_exceptions=True)

    def ping(self) -> None:
        """Write the renderer's keep-alive, unless one is being written (the clock does not wait)."""
        if self._ping is None:
            self._ping = asyncio.ensure_future(self._keep_alive())

    async def _keep_alive(self) -> None:
        try:
            await self.send(self._renderer.KEEPALIVE)
        except ConnectionError:
            pass  # the client left; the answer finds out on its own write or by cancellation
        finally:
            self._ping = None


class KeepAliveClock:
    """One clock for every open stream (not a task for each): a stream that has been silent for
    close to KEEPALIVE_INTERVAL seconds gets its keep-alive, so that none stays silent longer."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.tick = interval / 4
        self.streams: set[SSEStream] = set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.tick)
            silent_since = loop.time() - self.interval + self.tick
            for stream in [stream for stream in self.streams if stream.last_write <= silent_since]:
                stream.ping()


# ---------------------------------------------------------------------------------------------
# §16 Client API: OpenAI Chat Completions (POST /v1/chat/completions)
# ---------------------------------------------------------------------------------------------


class ClientAPI:
    """One client API in front of the core. Each subclass has the same members, in the same order
    in its section: `parse` (its body -> a Request), `prepare` (what the Request needs from the
    server before it is planned; most need nothing), `stream` (its AnswerStream renderer),
    `to_body` (a folded Answer -> its answer body), `remember` (what the server keeps of an
    answer; most keep nothing) and `error_body` (a failure before the stream -> its status and
    error envelope)."""

    def parse(self, body: dict, limits: Limits) -> Request:
        raise NotImplementedError

    def prepare(self, wanted: Request, request: web.Request) -> Request:
        return wanted

    def stream(self, wanted: Request, input_tokens: int) -> AnswerStream:
        """The renderer of a streamed answer (`input_tokens`: the estimate of what Kimi is asked)."""
        raise NotImplementedError

    def to_body(self, answer: Answer, wanted: Request) -> dict:
        raise NotImplementedError

    def remember(self, request: web.Request, wanted: Request, result: dict) -> None:
        """`result`: the answer body, or the final response object a stream ended with."""

    def error_body(self, error: ProxyError) -> tuple[int, dict]:
        raise NotImplementedError


class ChatOptions(NamedTuple):
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    deprecated: bool     # asked with `functions`: answered with `function_call`


ROLE_NAMES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
              "tool": "tool", "function": "tool"}
TEXT_PARTS = {"text": "text", "input_text": "text", "refusal": "refusal"}
ATTACHMENT_PARTS = {"image_url", "input_image", "file", "input_file"}
NUMBER_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
INTEGER_FIELDS = ("max_tokens", "max_completion_tokens", "seed")


def parse_chat(body: dict, limits: Limits) -> Request:
    """Validate a Chat Completions request (lenient: unknown fields are ignored). Raises a 400
    ProxyError naming the field."""
    model = model_name(body.get("model"))
    stream = bool(typed_field(body, "stream", bool))
    stream_options = typed_field(body, "stream_options", dict) or {}
    include_usage = stream and bool(typed_field(stream_options, "include_usage", bool, "stream_options.include_usage"))
    n = typed_field(body, "n", int)
    if n is not None and n != 1:
        raise bad_request("Only n=1 is supported: Kimi gives one answer per request", "n")
    tools, deprecated = to_chat_tools(body)
    json_format = to_json_format(body.get("response_format"))
    for field in NUMBER_FIELDS:
        value = typed_field(body, field, (int, float))
        if isinstance(value, bool):
            raise bad_request(f"'{field}' must be a number", field)
    for field in INTEGER_FIELDS:
        typed_field(body, field, int)
    reasoning_effort = typed_field(body, "reasoning_effort", str)
    if reasoning_effort is not None and reasoning_effort not in REASONING_EFFORTS:
        raise bad_request(f"'reasoning_effort' must be one of {', '.join(REASONING_EFFORTS)}", "reasoning_effort")
    conversation = conversation_field(body)
    turns = to_chat_turns(body.get("messages"), limits)
    check_last_turn(turns, conversation, "messages")
    return Request(model=model, turns=turns, stream=stream, tools=tools, json_format=json_format,
                   reasoning_effort=reasoning_effort, search=bool(typed_field(body, "use_search", bool)),
                   conversation=conversation, stop=to_chat_stop(body.get("stop")),
                   options=ChatOptions(include_usage, deprecated))


def to_chat_stop(stop: object) -> tuple[str, ...]:
    """`stop`: a string or up to 4 of them."""
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(item, str) for item in stops):
        raise bad_request("'stop' must be a string or an array of up to 4 strings", "stop")
    return tuple(filter(None, stops))


def to_chat_tools(body: dict) -> tuple[ToolUse | None, bool]:
    """The request's functions (`tools`, or the deprecated `functions`) and its choice, and whether
    it used the deprecated fields. Tools of other types than function are ignored."""
    deprecated = body.get("tools") is None and body.get("functions") is not None
    field, choice_field = ("functions", "function_call") if deprecated else ("tools", "tool_choice")
    entries = body.get(field)
    if entries is not None and not isinstance(entries, list):
        raise bad_request(f"'{field}' must be an array", field)
    functions = []
    for index, entry in enumerate(entries or ()):
        where = f"{field}[{index}]"
        if not deprecated:
            if not isinstance(entry, dict) or entry.get("type") != "function":
                continue
            entry, where = entry.get("function"), where + ".function"
        if not isinstance(entry, dict):
            raise bad_request(f"'{where}' must be an object", where)
        functions.append((where, to_function(entry.get("name"), entry.get("description"), entry.get("parameters"),
                                             where)))
    required, only, allowed = to_chat_tool_choice(body.get(choice_field), choice_field, deprecated)
    if allowed is not None:
        functions = [(where, function) for where, function in functions if function.name in allowed]
    parallel = not deprecated and (not functions or typed_field(body, "parallel_tool_calls", bool) is not False)
    return to_tool_use(functions, required, only, parallel, choice_field), deprecated


def to_chat_tool_choice(choice: object, field: str, deprecated: bool) -> tuple[bool | None, str | None, set | None]:
    """(must a function be called, the one named, the functions allowed (allowed_tools)); a
    first None for "none"."""
    if choice is None or choice == "auto":
        return False, None, None
    if choice == "none":
        return None, None, None
    name = None
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools" and not deprecated:
        spec = choice.get("allowed_tools")
        tools = spec.get("tools") if isinstance(spec, dict) else None
        if isinstance(tools, list) and spec.get("mode", "auto") in ("auto", "required"):
            allowed = {(tool.get("function") or {}).get("name") for tool in tools if isinstance(tool, dict)}
            return spec.get("mode") == "required", None, allowed
    elif isinstance(choice, dict):
        named = choice if deprecated else choice.get("function") if choice.get("type") == "function" else None
        name = named.get("name") if isinstance(named, dict) else None
    elif choice == "required" and not deprecated:
        name = ""
    if not isinstance(name, str):
        shape = '{"name": ...}' if deprecated else \
            '"required", {"type": "function", "function": {"name": ...}} or {"type": "allowed_tools", ...}'
        raise bad_request(f"'{field}' must be \"none\", \"auto\", {shape}", field)
    return True, name or None, None


def to_json_format(value: object) -> JsonFormat | None:
    """response_format: text (nothing to do), json_object or json_schema."""
    kind = value.get("type") if isinstance(value, dict) else None
    if value is None or kind == "text":
        return None
    if kind == "json_object":
        return JsonFormat(None)
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(spec, dict) or not isinstance(schema, (dict, type(None))):
            raise bad_request("'response_format.json_schema' must be an object with a 'schema' object",
                              "response_format.json_schema")
        return JsonFormat(schema)
    raise bad_request("'response_format.type' must be text, json_object or json_schema", "response_format")


def to_chat_turns(messages: object, limits: Limits) -> tuple[Turn, ...]:
    messages = count_turns(messages, "messages", limits)
    last = len(messages) - 1
    return tuple(to_chat_turn(message, index, index == last, limits.max_file_bytes)
                 for index, message in enumerate(messages))


def to_chat_turn(message: object, index: int, is_last: bool, max_file_bytes: int) -> Turn:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad_request(f"'{where}' must be an object", where)
    role = message.get("role")
    role = ROLE_NAMES.get(role) if isinstance(role, str) else None
    if role is None:
        raise bad_request(f"'{where}.role' must be one of {', '.join(ROLE_NAMES)}", f"{where}.role")
    content = message.get("content")
    if content is None and role == "assistant":  # a tool-call turn replayed by the client
        turn = Turn(role, "", where)
    else:
        turn = to_chat_content(role, content, where, is_last, max_file_bytes)
    if role == "assistant":
        return turn._replace(calls=to_chat_calls(message))
    if role == "tool":
        call_id, name = message.get("tool_call_id"), message.get("name")
        return turn._replace(call_id=call_id if isinstance(call_id, str) else None,
                             name=name if isinstance(name, str) else None)
    return turn


def to_chat_content(role: str, content: object, where: str, is_last: bool, max_file_bytes: int) -> Turn:
    if isinstance(content, str):
        return Turn(role, content, where)
    if not isinstance(content, list):
        raise bad_request(f"'{where}.content' must be a string or an array of content parts", f"{where}.content")
    texts, attachments, has_attachment = [], [], False
    for part_index, part in enumerate(content):
        part_where = f"{where}.content[{part_index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        kind = kind if isinstance(kind, str) else None
        if kind in TEXT_PARTS:
            text = part.get(TEXT_PARTS[kind])
            if not isinstance(text, str):
                raise bad_request(f"'{part_where}.{TEXT_PARTS[kind]}' must be a string", part_where)
            texts.append(text)
        elif kind in ATTACHMENT_PARTS:
            has_attachment = True
            if is_last:
                attachments.append(to_chat_attachment(part, kind, part_where, max_file_bytes))
        else:
            raise bad_request(f"'{part_where}.type' must be one of text, image_url, file", f"{part_where}.type")
    return Turn(role, "\n".join(texts), where, attachments=tuple(attachments), has_attachment=has_attachment)


def to_chat_attachment(part: dict, kind: str, where: str, max_bytes: int) -> Attachment:
    """A file or image part, in any of the shapes Chat clients send (the Responses shapes too)."""
    if kind in ("image_url", "input_image"):
        source = part.get("image_url")
        return to_attachment("image", source.get("url") if isinstance(source, dict) else source, None, where, max_bytes)
    if "file_url" in part:
        source = part["file_url"]
        return to_attachment("file", source.get("url") if isinstance(source, dict) else source, None, where, max_bytes)
    source = part.get("file", part)  # input_file puts the fields on the part itself
    source = source if isinstance(source, dict) else {}
    if "file_id" in source and "file_data" not in source:
        raise file_id_refused(where)
    return to_attachment("file", source.get("file_data") or source.get("file_url"), source.get("filename"), where,
                         max_bytes)


def to_chat_calls(message: dict) -> tuple[Call, ...]:
    """The function calls of an assistant message the client replays (the deprecated
    `function_call` too). Entries of another shape are left out."""
    calls = message.get("tool_calls")
    calls = [*(calls if isinstance(calls, list) else ()), {"function": message.get("function_call")}]
    found = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue
        call_id = call.get("id")
        found.append(Call(call_id if isinstance(call_id, str) else "", function["name"],
                          to_arguments_text(function.get("arguments"))))
    return tuple(found)


def to_arguments_text(arguments: object) -> str:
    """A history call's arguments as JSON text, whether the client sent a string or an object."""
    if arguments is None or isinstance(arguments, str):
        return arguments or ""
    return orjson.dumps(arguments).decode()


def new_completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


CHAT_FINISH_REASONS = {"stop": "stop", "length": "length", "calls": "tool_calls", "stop_sequence": "stop"}


def chat_finish_reason(finish: Finish, options: ChatOptions) -> str:
    if finish.reason == "calls" and options.deprecated:
        return "function_call"
    return CHAT_FINISH_REASONS[finish.reason]


def to_chat_message_calls(calls: tuple[Call, ...], options: ChatOptions) -> dict:
    """An assistant message's calls: `tool_calls`, or with the deprecated `functions` the first
    call as `function_call`."""
    if options.deprecated:
        return {"function_call": {"name": calls[0].name, "arguments": calls[0].arguments}}
    return {"tool_calls": [{"id": "call_" + call.id, "type": "function",
                            "function": {"name": call.name, "arguments": call.arguments}} for call in calls]}


class ChatStream(AnswerStream):
    """Answer parts -> chat.completion.chunk events: the role first, then one chunk for each
    part, then `data: [DONE]` (after an error too: clients read until it)."""

    def __init__(self, wanted: Request) -> None:
        super().__init__()
        self._head = {"id": new_completion_id(), "object": "chat.completion.chunk", "created": int(time.time()),
                      "model": wanted.model, "system_fingerprint": None}
        self._options: ChatOptions = wanted.options
        self._role_sent = False
        self._calls = 0  # tool calls streamed so far: the index of the next

    def kept(self, chat_id: str) -> None:
        super().kept(chat_id)
        self._head["conversation_id"] = chat_id

    def feed(self, parts: list[Part]) -> bytes:
        out = []
        for kind, value in parts:
            if kind == TEXT:
                out.append(self._chunk({"content": value}))
            elif kind == REASONING:
                out.append(self._chunk({"reasoning_content": value}))
            elif kind == CALLS:
                out += [self._chunk(delta) for delta in self._call_deltas(value)]
            elif kind == FINISH:
                out.append(self._chunk({}, chat_finish_reason(value, self._options)))
            elif kind == USAGE:
                if self._options.include_usage:
                    out.append(sse_event({**self._head, "choices": [], "usage": to_chat_usage(value)}))
            elif kind == CHAT:
                self.kept(value)
        return b"".join(out)

    def error(self, error: ProxyError) -> bytes:
        return sse_event(openai_error(error))

    def end(self) -> bytes:
        return b"data: [DONE]\n\n"

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> bytes:
        chunk = {**self._head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                            "finish_reason": finish_reason}]}
        if self._options.include_usage:
            chunk["usage"] = None
        if self._role_sent:
            return sse_event(chunk)
        self._role_sent = True
        return self._chunk({"role": "assistant", "content": ""}) + sse_event(chunk)

    def _call_deltas(self, calls: tuple[Call, ...]) -> list[dict]:
        """The deltas that stream calls: for each, its index, id, type and name first, then its
        arguments (clients concatenate repeated fields, so each is sent once)."""
        if self._options.deprecated:
            call = calls[0]
            return [{"function_call": {"name": call.name, "arguments": ""}},
                    {"function_call": {"arguments": call.arguments}}]
        deltas = []
        for call in calls:
            deltas += [{"tool_calls": [{"index": self._calls, "id": "call_" + call.id, "type": "function",
                                        "function": {"name": call.name, "arguments": ""}}]},
                       {"tool_calls": [{"index": self._calls, "function": {"arguments": call.arguments}}]}]
            self._calls += 1
        return deltas


def to_chat_usage(usage: Usage) -> dict:
    return {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens,
            "total_tokens": usage.input_tokens + usage.output_tokens}


def to_chat_body(answer: Answer, wanted: Request) -> dict:
    options: ChatOptions = wanted.options
    message = {"role": "assistant", "content": answer.text, "refusal": None}
    if answer.reasoning:
        message["reasoning_content"] = answer.reasoning
    if answer.calls:
        message.update(to_chat_message_calls(answer.calls, options))
        message["content"] = answer.text or None
    completion = {"id": new_completion_id(), "object": "chat.completion", "created": int(time.time()),
                  "model": wanted.model, "system_fingerprint": None,
                  "choices": [{"index": 0, "message": message, "logprobs": None,
                               "finish_reason": chat_finish_reason(answer.finish, options)}],
                  "usage": to_chat_usage(answer.usage)}
    if answer.chat_id:
        completion["conversation_id"] = answer.chat_id
    return completion


# OpenAI's error types by HTTP status (any other 4xx is invalid_request_error, any other 5xx server_error)
OPENAI_ERROR_TYPES = {403: "permission_error", 429: "rate_limit_error", 503: "service_unavailable_error"}


def openai_error(error: ProxyError) -> dict:
    """OpenAI's error envelope, for Chat Completions and Responses alike."""
    kind = OPENAI_ERROR_TYPES.get(error.status) or ("server_error" if error.status >= 500 else "invalid_request_error")
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}}


class ChatCompletions(ClientAPI):
    def parse(self, body: dict, limits: Limits) -> Request:
        return parse_chat(body, limits)

    def stream(self, wanted: Request, input_tokens: int) -> AnswerStream:
        return ChatStream(wanted)

    def to_body(self, answer: Answer, wanted: Request) -> dict:
        return to_chat_body(answer, wanted)

    def error_body(self, error: ProxyError) -> tuple[int, dict]:
        return error.status, openai_error(error)


CHAT_COMPLETIONS = ChatCompletions()


# ---------------------------------------------------------------------------------------------
# §17 Client API: OpenAI Responses (POST /v1/responses, for Codex, the Agents SDK, responses.*)
# ---------------------------------------------------------------------------------------------


class ResponsesOptions(NamedTuple):
    """What a response object echoes of its request, and what the stored response needs."""

    echo: dict                       # instructions, tools, tool_choice, text, reasoning ... as sent
    namespaces: dict[str, str]       # function name -> the namespace tool it came from
    store: bool                      # keep the response for previous_response_id, GET and DELETE
    previous_response_id: str | None
    instructions: int = 0            # how many leading turns are `instructions` (not carried over)


RESPONSE_ECHO = ("instructions", "max_output_tokens", "metadata", "temperature", "top_p", "reasoning", "text",
                 "truncation", "service_tier")
WEB_SEARCH_TOOLS = {"web_search", "web_search_preview", "web_search_2025_08_26", "web_search_preview_2025_03_11"}


def parse_responses(body: dict, limits: Limits) -> Request:
    """Validate a Responses request. Lenient as Codex and the Agents SDK need: unknown fields, item
    types and built-in tools are accepted (or left out), never refused. Raises a 400 ProxyError
    naming the field."""
    for field, why in (("background", "background responses"), ("conversation", "OpenAI's conversations")):
        if body.get(field):
            raise bad_request(f"'{field}': {why} are not supported here; send the history, or use "
                              "previous_response_id or conversation_id", field)
    instructions = typed_field(body, "instructions", str)
    typed_field(body, "max_output_tokens", int)
    tools, namespaces, search = to_responses_tools(body)
    items = body.get("input")
    items = [{"role": "user", "content": items}] if isinstance(items, str) else items
    turns = to_responses_turns(count_turns(items, "input", limits), limits.max_file_bytes)
    conversation = conversation_field(body)
    check_last_turn(turns, conversation, "input")
    reasoning = typed_field(body, "reasoning", dict) or {}
    effort = reasoning.get("effort")
    effort = {"xhigh": "high"}.get(effort, effort) if isinstance(effort, str) else None
    if effort is not None and effort not in REASONING_EFFORTS:
        raise bad_request(f"'reasoning.effort' must be one of {', '.join(REASONING_EFFORTS)} or xhigh", "reasoning.effort")
    previous = typed_field(body, "previous_response_id", str)
    echo = {field: body.get(field) for field in RESPONSE_ECHO}
    echo.update(tools=body.get("tools") or [], tool_choice=body.get("tool_choice") or "auto",
                parallel_tool_calls=body.get("parallel_tool_calls") is not False,
                text=body.get("text") or {"format": {"type": "text"}}, truncation=body.get("truncation") or "disabled")
    head = (Turn("system", instructions, "instructions"),) if instructions else ()
    return Request(model=model_name(body.get("model")), turns=(*head, *turns),
                   stream=bool(typed_field(body, "stream", bool)), tools=tools,
                   json_format=to_responses_format(body), reasoning_effort=effort, search=search,
                   conversation=conversation,
                   options=ResponsesOptions(echo, namespaces, body.get("store") is not False, previous, len(head)))


def to_responses_tools(body: dict) -> tuple[ToolUse | None, dict[str, str], bool]:
    """(the functions, the namespace each came from, whether web search is on): flat functions and
    the functions of namespace tools; web search turns Kimi's search on; other built-in tools are
    left out with a log line."""
    entries = typed_field(body, "tools", list) or []
    functions, namespaces, search = [], {}, False
    for index, entry in enumerate(entries):
        where = f"tools[{index}]"
        kind = entry.get("type") if isinstance(entry, dict) else None
        if kind == "function":
            functions.append((where, to_function(entry.get("name"), entry.get("description"), entry.get("parameters"),
                                                 where)))
        elif kind == "namespace":
            for inner_index, inner in enumerate(entry.get("tools") if isinstance(entry.get("tools"), list) else ()):
                inner_where = f"{where}.tools[{inner_index}]"
                if isinstance(inner, dict) and inner.get("type", "function") == "function":
                    functions.append((inner_where, to_function(inner.get("name"), inner.get("description"),
                                                               inner.get("parameters"), inner_where)))
                    if isinstance(entry.get("name"), str):
                        namespaces[inner["name"]] = entry["name"]
        elif kind in WEB_SEARCH_TOOLS:
            search = True
        else:
            log.info("leaving out the %s tool: Kimi's web chat cannot run it", loggable(str(kind), 64))
    required, only, allowed = to_responses_tool_choice(body.get("tool_choice"))
    if allowed is not None:
        functions = [(where, function) for where, function in functions if function.name in allowed]
    parallel = typed_field(body, "parallel_tool_calls", bool) is not False
    return to_tool_use(functions, required, only, parallel, "tool_choice"), namespaces, search


def to_responses_tool_choice(choice: object) -> tuple[bool | None, str | None, set[str] | None]:
    """(must a function be called, the one named, the functions allowed) from `tool_choice`:
    auto, none, required, a function, or allowed_tools (a built-in tool's choice means auto)."""
    if choice is None or choice == "auto":
        return False, None, None
    if choice == "none":
        return None, None, None
    if choice == "required":
        return True, None, None
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "function" and isinstance(choice.get("name"), str):
        return True, choice["name"], None
    if kind == "allowed_tools" and isinstance(choice.get("tools"), list) and choice.get("mode", "auto") in ("auto", "required"):
        allowed = {tool.get("name") for tool in choice["tools"] if isinstance(tool, dict)}
        return choice.get("mode") == "required", None, allowed
    if isinstance(kind, str) and kind not in ("function", "allowed_tools"):
        return False, None, None
    raise bad_request("'tool_choice' must be \"auto\", \"none\", \"required\", {\"type\": \"function\", \"name\": ...} "
                      "or {\"type\": \"allowed_tools\", \"mode\": ..., \"tools\": [...]}", "tool_choice")


def to_responses_format(body: dict) -> JsonFormat | None:
    """`text.format`: text (nothing to do), json_object or json_schema."""
    text = typed_field(body, "text", dict) or {}
    spec = text.get("format")
    kind = spec.get("type") if isinstance(spec, dict) else None
    if spec is None or kind == "text":
        return None
    if kind == "json_object":
        return JsonFormat(None)
    if kind == "json_schema" and isinstance(spec.get("schema"), dict):
        return JsonFormat(spec["schema"])
    raise bad_request("'text.format' must be text, json_object or json_schema (with a 'schema' object)", "text.format")


RESPONSES_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
RESPONSES_TEXT_PARTS = {"input_text", "output_text", "text", "refusal", "summary_text"}


def to_responses_turns(items: list, max_bytes: int) -> tuple[Turn, ...]:
    last = len(items) - 1
    turns = (to_item_turn(item, f"input[{index}]", index == last, max_bytes) for index, item in enumerate(items))
    return tuple(turn for turn in turns if turn is not None)


def to_item_turn(item: object, where: str, is_last: bool, max_bytes: int) -> Turn | None:
    """One input item as a turn: a message (its `type` may be missing), a function call or its
    output. Reasoning items and the items of built-in tools are left out."""
    if not isinstance(item, dict):
        raise bad_request(f"'{where}' must be an object", where)
    kind = item.get("type", "message")
    if kind == "message":
        role = RESPONSES_ROLES.get(item.get("role")) if isinstance(item.get("role"), str) else None
        if role is None:
            raise bad_request(f"'{where}.role' must be user, assistant, system or developer", f"{where}.role")
        text, attachments, has_attachment = to_item_content(item.get("content"), f"{where}.content", is_last, max_bytes)
        return Turn(role, text, where, attachments=attachments, has_attachment=has_attachment)
    if kind in ("function_call", "custom_tool_call"):
        call_id, name = item.get("call_id"), item.get("name")
        if not isinstance(call_id, str) or not isinstance(name, str):
            raise bad_request(f"'{where}' must have a string 'call_id' and 'name'", where)
        arguments = item.get("arguments") if kind == "function_call" else orjson.dumps({"input": item.get("input")}).decode()
        return Turn("assistant", "", where, calls=(Call(call_id, name, to_arguments_text(arguments)),))
    if kind in ("function_call_output", "custom_tool_call_output"):
        call_id = item.get("call_id")
        if not isinstance(call_id, str):
            raise bad_request(f"'{where}.call_id' must be a string", f"{where}.call_id")
        text, attachments, has_attachment = to_item_content(item.get("output"), f"{where}.output", is_last, max_bytes)
        return Turn("tool", text, where, call_id=call_id, attachments=attachments, has_attachment=has_attachment)
    return None


def to_item_content(content: object, where: str, is_last: bool, max_bytes: int) -> tuple[str, tuple, bool]:
    """(text, files, whether there were files) of a message's content or a call's output: a
    string, or parts. Parts of other types are left out."""
    if isinstance(content, str):
        return content, (), False
    if not isinstance(content, list):
        raise bad_request(f"'{where}' must be a string or an array of parts", where)
    texts, attachments, has_attachment = [], [], False
    for index, part in enumerate(content):
        part_where = f"{where}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in RESPONSES_TEXT_PARTS:
            text = part.get("refusal" if kind == "refusal" else "text")
            if not isinstance(text, str):
                raise bad_request(f"'{part_where}.text' must be a string", part_where)
            texts.append(text)
        elif kind in ("input_image", "input_file"):
            has_attachment = True
            if is_last:
                attachments.append(to_item_attachment(part, kind, part_where, max_bytes))
    return "\n".join(texts), tuple(attachments), has_attachment


def to_item_attachment(part: dict, kind: str, where: str, max_bytes: int) -> Attachment:
    if part.get("file_id") is not None and not (part.get("image_url") or part.get("file_data") or part.get("file_url")):
        raise file_id_refused(where)
    if kind == "input_image":
        return to_attachment("image", part.get("image_url"), None, where, max_bytes)
    return to_attachment("file", part.get("file_data") or part.get("file_url"), part.get("filename"), where, max_bytes)


def to_response_usage(usage: Usage | None) -> dict | None:
    """Responses' own names (Codex refuses Chat's)."""
    if usage is None:
        return None
    return {"input_tokens": usage.input_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage.output_tokens, "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
            "total_tokens": usage.input_tokens + usage.output_tokens}


def to_response(wanted: Request, response_id: str, created_at: int, status: str, output: list[dict],
                usage: Usage | None = None, error: dict | None = None, chat_id: str | None = None) -> dict:
    """The whole response object: what the stream's lifecycle events carry and what the
    non-streamed body is, from one place."""
    options: ResponsesOptions = wanted.options
    response = {"id": response_id, "object": "response", "created_at": created_at, "status": status, "error": error,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "model": wanted.model, "output": output, "previous_response_id": options.previous_response_id,
                "store": options.store, "usage": to_response_usage(usage), **options.echo}
    if chat_id:
        response["conversation_id"] = chat_id
    return response


def response_status(finish: Finish) -> str:
    return "incomplete" if finish.reason == "length" else "completed"


def to_reasoning_item(item_id: str, text: str) -> dict:
    return {"type": "reasoning", "id": item_id, "summary": [{"type": "summary_text", "text": text}] if text else []}


def to_message_item(item_id: str, text: str, annotations: list[dict], status: str = "completed") -> dict:
    return {"type": "message", "id": item_id, "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": annotations, "logprobs": []}] if text
            or status != "in_progress" else []}


def to_call_item(call: Call, options: ResponsesOptions, status: str = "completed") -> dict:
    item = {"type": "function_call", "id": "fc_" + call.id, "call_id": "call_" + call.id, "name": call.name,
            "arguments": call.arguments if status == "completed" else "", "status": status}
    if call.name in options.namespaces:
        item["namespace"] = options.namespaces[call.name]
    return item


def to_annotation(text: str, citation: Citation, start: int = 0) -> dict | None:
    """A web source as a url_citation over its source line in the text (None if it is not there)."""
    line = source_line(citation).rstrip("\n")
    at = text.find(line, start)
    if at < 0:
        return None
    return {"type": "url_citation", "url": citation.url, "title": citation.title, "start_index": at,
            "end_index": at + len(line)}


def to_output(answer: Answer, options: ResponsesOptions) -> list[dict]:
    """A folded answer's output items: its thinking, its text (with citations), its calls."""
    output = []
    if answer.reasoning:
        output.append(to_reasoning_item("rs_" + new_id(), answer.reasoning))
    if answer.text:
        annotations = [found for found in (to_annotation(answer.text, citation) for citation in answer.citations) if found]
        output.append(to_message_item("msg_" + new_id(), answer.text, annotations))
    return output + [to_call_item(call, options) for call in answer.calls]


def response_error(error: ProxyError) -> dict:
    """A failure as the `error` of a failed response, with the codes Codex acts on."""
    message = error.message
    if error.code == "insufficient_quota" or error.code == "context_length_exceeded":
        code = error.code
    elif error.status == 429:
        code = "rate_limit_exceeded"
        message += f" Please try again in {error.retry_after or 1}s."
    else:
        code = "server_error"
    return {"code": code, "message": message}


class ResponsesStream(AnswerStream):
    """Answer parts -> Responses events, each with a sequence_number from 0: response.created and
    response.in_progress, then each output item (reasoning, message, function_call) added, its
    parts and deltas, done; then exactly one terminal event (completed, incomplete or failed)."""

    def __init__(self, wanted: Request) -> None:
        super().__init__()
        self._wanted = wanted
        self._options: ResponsesOptions = wanted.options
        self._id = "resp_" + new_id()
        self._created_at = int(time.time())
        self._sequence = itertools.count(2)  # 0 and 1 are the opening's, whenever it is written
        self._output: list[dict] = []     # the items done
        self._open: str | None = None     # "reasoning" or "message": the item open now
        self._item_id = ""
        self._text: list[str] = []        # what the open item holds
        self._annotations: list[dict] = []
        self._finish = STOP
        self._usage: Usage | None = None
        self._chat_id: str | None = None
        self._failed = False

    def kept(self, chat_id: str) -> None:
        super().kept(chat_id)
        self._chat_id = chat_id

    def opening(self) -> bytes:
        response = to_response(self._wanted, self._id, self._created_at, "in_progress", [], None, None, None)
        return self._event("response.created", 0, response=response) + \
            self._event("response.in_progress", 1, response=response)

    def feed(self, parts: list[Part]) -> bytes:
        out = []
        for kind, value in parts:
            if kind == TEXT and value:
                out += self._into("message")
                self._text.append(value)
                out.append(self._event("response.output_text.delta", item_id=self._item_id, output_index=self._index,
                                       content_index=0, delta=value, logprobs=[]))
            elif kind == REASONING and value:
                out += self._into("reasoning")
                self._text.append(value)
                out.append(self._event("response.reasoning_summary_text.delta", item_id=self._item_id,
                                       output_index=self._index, summary_index=0, delta=value))
            elif kind == CITATION and self._open == "message":
                out += self._annotate(value)
            elif kind == CALLS:
                out += self._close()
                out += [event for call in value for event in self._call_events(call)]
            elif kind == FINISH:
                out += self._close()
                self._finish = value
            elif kind == USAGE:
                self._usage = value
            elif kind == CHAT:
                self.kept(value)
        return b"".join(out)

    def error(self, error: ProxyError) -> bytes:
        """The open item ends incomplete, then the response fails (its terminal event)."""
        self._failed = True
        out = self._close("incomplete")
        return b"".join(out) + self._event("response.failed", response=self._response("failed", error=response_error(error)))

    def end(self) -> bytes:
        if self._failed:  # response.failed was the terminal event
            return b""
        out = self._close()
        status = response_status(self._finish)
        self.result = self._response(status)
        return b"".join(out) + self._event(f"response.{status}", response=self.result)

    @property
    def _index(self) -> int:
        return len(self._output)  # the open item's output_index

    def _response(self, status: str, error: dict | None = None) -> dict:
        usage = self._usage if status in ("completed", "incomplete") else None
        return to_response(self._wanted, self._id, self._created_at, status, list(self._output), usage, error,
                           self._chat_id)

    def _event(self, kind: str, number: int | None = None, **fields) -> bytes:
        number = next(self._sequence) if number is None else number
        return sse_event({"type": kind, "sequence_number": number, **fields}, kind)

    def _into(self, kind: str) -> list[bytes]:
        """Open an item of this kind unless it is open: its added event and its first part."""
        if self._open == kind:
            return []
        out = self._close()
        self._open, self._text, self._annotations = kind, [], []
        if kind == "reasoning":
            self._item_id = "rs_" + new_id()
            return out + [self._added(to_reasoning_item(self._item_id, "")),
                          self._event("response.reasoning_summary_part.added", item_id=self._item_id,
                                      output_index=self._index, summary_index=0, part={"type": "summary_text", "text": ""})]
        self._item_id = "msg_" + new_id()
        return out + [self._added(to_message_item(self._item_id, "", [], "in_progress")),
                      self._event("response.content_part.added", item_id=self._item_id, output_index=self._index,
                                  content_index=0, part={"type": "output_text", "text": "", "annotations": []})]

    def _annotate(self, citation: Citation) -> list[bytes]:
        text = "".join(self._text)
        start = self._annotations[-1]["end_index"] if self._annotations else 0
        annotation = to_annotation(text, citation, start)
        if annotation is None:
            return []
        self._annotations.append(annotation)
        return [self._event("response.output_text.annotation.added", item_id=self._item_id, output_index=self._index,
                            content_index=0, annotation_index=len(self._annotations) - 1, annotation=annotation)]

    def _close(self, status: str = "completed") -> list[bytes]:
        """End the open item: its text done, its part done, the item done with all it holds."""
        if self._open is None:
            return []
        text, item_id, index = "".join(self._text), self._item_id, self._index
        if self._open == "reasoning":
            part = {"type": "summary_text", "text": text}
            item = to_reasoning_item(item_id, text)
            out = [self._event("response.reasoning_summary_text.done", item_id=item_id, output_index=index,
                               summary_index=0, text=text),
                   self._event("response.reasoning_summary_part.done", item_id=item_id, output_index=index,
                               summary_index=0, part=part)]
        else:
            item = to_message_item(item_id, text, self._annotations, status)
            out = [self._event("response.output_text.done", item_id=item_id, output_index=index, content_index=0,
                               text=text, logprobs=[]),
                   self._event("response.content_part.done", item_id=item_id, output_index=index, content_index=0,
                               part=item["content"][0])]
        self._open = None
        return out + [self._done(item)]

    def _call_events(self, call: Call) -> list[bytes]:
        item = to_call_item(call, self._options)
        return [self._added(to_call_item(call, self._options, "in_progress")),
                self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=self._index,
                            delta=call.arguments),
                self._event("response.function_call_arguments.done", item_id=item["id"], output_index=self._index,
                            name=call.name, arguments=call.arguments),
                self._done(item)]

    def _added(self, item: dict) -> bytes:
        return self._event("response.output_item.added", output_index=self._index, item=item)

    def _done(self, item: dict) -> bytes:
        event = self._event("response.output_item.done", output_index=self._index, item=item)
        self._output.append(item)
        return event


def to_responses_body(answer: Answer, wanted: Request) -> dict:
    return to_response(wanted, "resp_" + new_id(), int(time.time()), response_status(answer.finish),
                       to_output(answer, wanted.options), answer.usage, chat_id=answer.chat_id)


class StoredResponse(NamedTuple):
    owner: str              # a hash of the key that asked for it: nobody else may read or continue it
    response: dict          # what GET answers
    turns: tuple[Turn, ...]  # its input and its output: what a response that continues it goes on from
    expires: float          # loop time


class ResponseStore:
    """The most recent responses (RESPONSES_STORE of them, each for RESPONSES_TTL seconds), in
    memory: lost on restart. Each holds its conversation's text (files are not kept)."""

    def __init__(self, size: int, ttl: float) -> None:
        self._responses = BoundedMap(size)
        self._ttl = ttl

    def get(self, response_id: str, owner: str) -> StoredResponse | None:
        stored = self._responses.get(response_id)
        if stored is None or stored.owner != owner or stored.expires < asyncio.get_running_loop().time():
            return None
        return stored

    def put(self, owner: str, response: dict, turns: tuple[Turn, ...]) -> None:
        expires = asyncio.get_running_loop().time() + self._ttl
        self._responses[response["id"]] = StoredResponse(owner, response, turns, expires)

    def delete(self, response_id: str, owner: str) -> bool:
        return self.get(response_id, owner) is not None and self._responses.pop(response_id, None) is not None


def response_turns(response: dict, options: ResponsesOptions) -> list[Turn]:
    """A response's output items as the turns of the conversation that continues it."""
    turns = []
    for item in response["output"]:
        if item["type"] == "message":
            turns.append(Turn("assistant", "".join(part["text"] for part in item["content"]), "output"))
        elif item["type"] == "function_call":
            call = Call(item["call_id"], item["name"], item["arguments"])
            if turns and turns[-1].role == "assistant":
                turns[-1] = turns[-1]._replace(calls=turns[-1].calls + (call,))
            else:
                turns.append(Turn("assistant", "", "output", calls=(call,)))
    return turns


def response_not_found(response_id: str, param: str | None = None) -> ProxyError:
    if param:
        return ProxyError(400, f"Previous response with id '{loggable(response_id, 64)}' not found.",
                          code="previous_response_not_found", param=param)
    return ProxyError(404, f"No response with id '{loggable(response_id, 64)}' is stored here (they are kept "
                      "for RESPONSES_TTL seconds, in memory)", code="not_found")


class OpenAIResponses(ClientAPI):
    def parse(self, body: dict, limits: Limits) -> Request:
        return parse_responses(body, limits)

    def prepare(self, wanted: Request, request: web.Request) -> Request:
        """A request that continues a stored response goes on from its input and output
        (`instructions` are not carried over)."""
        options: ResponsesOptions = wanted.options
        if options.previous_response_id is None:
            return wanted
        stored = request.app[RESPONSES].get(options.previous_response_id, request[CALLER])
        if stored is None:
            raise response_not_found(options.previous_response_id, "previous_response_id")
        head, rest = wanted.turns[:options.instructions], wanted.turns[options.instructions:]
        return dataclasses.replace(wanted, turns=(*head, *stored.turns, *rest))

    def stream(self, wanted: Request, input_tokens: int) -> AnswerStream:
        return ResponsesStream(wanted)

    def to_body(self, answer: Answer, wanted: Request) -> dict:
        return to_responses_body(answer, wanted)

    def remember(self, request: web.Request, wanted: Request, result: dict) -> None:
        options: ResponsesOptions = wanted.options
        if options.store:
            history = tuple(turn._replace(attachments=()) for turn in wanted.turns[options.instructions:])
            request.app[RESPONSES].put(request[CALLER], result, history + tuple(response_turns(result, options)))

    def error_body(self, error: ProxyError) -> tuple[int, dict]:
        return error.status, openai_error(error)


OPENAI_RESPONSES = OpenAIResponses()


# ---------------------------------------------------------------------------------------------
# §18 Client API: Anthropic Messages (POST /v1/messages, for Claude Code and the anthropic SDKs)
# ---------------------------------------------------------------------------------------------


class MessagesOptions(NamedTuple):
    thinking: bool  # thinking blocks go out: the client enabled thinking and did not ask to omit it


BILLING_HEADER = "x-anthropic-billing-header:"  # Claude Code's metadata in `system`, not instructions
ANTHROPIC_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}


def parse_messages(body: dict, limits: Limits) -> Request:
    """Validate an Anthropic Messages request. Lenient as Claude Code needs: unknown fields, tool
    keys and content blocks are accepted (it sends new ones every month), thinking blocks and
    signatures in the history are dropped unread. Raises a 400 ProxyError naming the field."""
    typed_field(body, "max_tokens", int)  # required by Anthropic, and meaningless for Kimi
    messages = count_turns(body.get("messages"), "messages", limits)
    references = tool_references(messages)
    tools, search = to_messages_tools(body, references)
    turns = (*to_system_turns(body.get("system"), "system"), *to_messages_turns(messages, limits))
    conversation = conversation_field(body)
    check_last_turn(turns, conversation, "messages")
    reasoning, effort, shown = to_messages_thinking(body)
    stop = typed_field(body, "stop_sequences", list) or []
    if not all(isinstance(sequence, str) for sequence in stop):
        raise bad_request("'stop_sequences' must be an array of strings", "stop_sequences")
    return Request(model=model_name(body.get("model")), turns=turns, stream=bool(typed_field(body, "stream", bool)),
                   tools=tools, json_format=to_messages_format(body), reasoning=reasoning, reasoning_effort=effort,
                   search=search, conversation=conversation, stop=tuple(filter(None, stop)),
                   options=MessagesOptions(thinking=shown))


def to_messages_thinking(body: dict) -> tuple[bool, str | None, bool]:
    """(thinking asked for, its effort, thinking shown) from `thinking` and `output_config.effort`:
    enabled and adaptive ask Kimi to think, disabled asks it not to; `display: "omitted"` hides
    what it thinks. Unknown types and displays are accepted and mean nothing."""
    thinking = typed_field(body, "thinking", dict) or {}
    kind = thinking.get("type")
    config = typed_field(body, "output_config", dict) or {}
    effort = ANTHROPIC_EFFORTS.get(config.get("effort")) if isinstance(config.get("effort"), str) else None
    if kind == "disabled":
        return False, "none", False
    if kind not in ("enabled", "adaptive"):
        return False, effort, False
    budget = thinking.get("budget_tokens")
    if effort is None and isinstance(budget, int) and not isinstance(budget, bool):
        effort = "low" if budget <= 4096 else "medium" if budget <= 16384 else "high"
    return True, effort, thinking.get("display") != "omitted"


def to_messages_format(body: dict) -> JsonFormat | None:
    """`output_config.format` (and the older `output_format`): a JSON schema the answer must fit."""
    config = typed_field(body, "output_config", dict) or {}
    spec = config.get("format") if config.get("format") is not None else body.get("output_format")
    if spec is None:
        return None
    where = "output_config.format" if config.get("format") is not None else "output_format"
    if not isinstance(spec, dict) or spec.get("type") != "json_schema" or not isinstance(spec.get("schema"), dict):
        raise bad_request(f"'{where}' must be {{\"type\": \"json_schema\", \"schema\": {{...}}}}", where)
    return JsonFormat(spec["schema"])


def tool_references(messages: list) -> set[str]:
    """The tools that tool search has named in the history (`tool_reference` blocks): deferred
    tools are described to Kimi only once named."""
    found = set()
    for message in messages:
        for block in blocks_of(message):
            for inner in blocks_of(block) if block.get("type") == "tool_result" else ():
                if inner.get("type") == "tool_reference" and isinstance(inner.get("tool_name"), str):
                    found.add(inner["tool_name"])
    return found


def blocks_of(holder: object) -> list[dict]:
    """The content blocks of a message or a tool result (a string content is one text block)."""
    content = holder.get("content") if isinstance(holder, dict) else None
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [block for block in content if isinstance(block, dict)] if isinstance(content, list) else []


def to_messages_tools(body: dict, references: set[str]) -> tuple[ToolUse | None, bool]:
    """(the client's tools, whether a web-search server tool turns Kimi's search on). Other
    server tools are left out (with a log line); a deferred tool waits for a reference."""
    entries = typed_field(body, "tools", list) or []
    functions, search = [], False
    for index, entry in enumerate(entries):
        where = f"tools[{index}]"
        if not isinstance(entry, dict):
            raise bad_request(f"'{where}' must be an object", where)
        kind = entry.get("type")
        if kind not in (None, "custom"):  # Anthropic's own tools: web_search_20250305, bash_20250124, ...
            searches = isinstance(kind, str) and kind.startswith("web_search")
            search = search or searches
            if not searches:
                log.info("leaving out the server tool %s: Kimi's web chat cannot run it", loggable(str(kind), 64))
            continue
        if entry.get("defer_loading") is True and entry.get("name") not in references:
            continue
        functions.append((where, to_function(entry.get("name"), entry.get("description"), entry.get("input_schema"),
                                             where)))
    choice = typed_field(body, "tool_choice", dict) or {"type": "auto"}
    kind = choice.get("type")
    if kind not in ("auto", "any", "tool", "none") or (kind == "tool" and not isinstance(choice.get("name"), str)):
        raise bad_request("'tool_choice' must be {\"type\": \"auto\"}, {\"type\": \"any\"}, {\"type\": \"none\"} or "
                          "{\"type\": \"tool\", \"name\": ...}", "tool_choice")
    required = None if kind == "none" else kind in ("any", "tool")
    parallel = choice.get("disable_parallel_tool_use") is not True
    return to_tool_use(functions, required, choice.get("name") if kind == "tool" else None, parallel,
                       "tool_choice"), search


def to_system_turns(system: object, where: str) -> tuple[Turn, ...]:
    """`system` (a string or text blocks) as one system turn; Claude Code's billing line is left out."""
    if system is None:
        return ()
    if isinstance(system, str):
        texts = [system]
    elif isinstance(system, list):
        texts = [block.get("text") for block in system if isinstance(block, dict) and block.get("type") == "text"]
        if not all(isinstance(text, str) for text in texts):
            raise bad_request(f"'{where}' text blocks must hold a string 'text'", where)
    else:
        raise bad_request(f"'{where}' must be a string or an array of text blocks", where)
    texts = [text for text in texts if text and not text.startswith(BILLING_HEADER)]
    return (Turn("system", "\n".join(texts), where),) if texts else ()


def to_messages_turns(messages: list, limits: Limits) -> list[Turn]:
    turns: list[Turn] = []
    for index, message in enumerate(messages):
        turns += to_message_turns(message, index, index == len(messages) - 1, limits.max_file_bytes)
    return turns


def to_message_turns(message: object, index: int, is_last: bool, max_bytes: int) -> list[Turn]:
    """One message as turns: a user message's tool results come first, one turn each, then its
    text (with its files, read in the last message only)."""
    where = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant", "system"):
        raise bad_request(f"'{where}.role' must be user, assistant or system", f"{where}.role")
    role, content = message["role"], message.get("content")
    if not isinstance(content, (str, list)):
        raise bad_request(f"'{where}.content' must be a string or an array of content blocks", f"{where}.content")
    if role == "system":
        return list(to_system_turns(content, f"{where}.content"))
    texts, calls, results, attachments, has_attachment = [], [], [], [], False
    for block_index, block in enumerate(blocks_of(message)):
        block_where = f"{where}.content[{block_index}]"
        kind = block.get("type")
        if kind == "tool_use" and role == "assistant":
            calls.append(to_history_use(block, block_where))
        elif kind == "tool_result" and role == "user":
            result, found = to_tool_result_turn(block, block_where, is_last, max_bytes)
            results.append(result)
            attachments += found
        elif kind in ("image", "document"):
            has_attachment = True
            read = to_messages_attachment(block, block_where, is_last, max_bytes)
            texts += [read] if isinstance(read, str) else []
            attachments += [read] if isinstance(read, Attachment) else []
        else:
            texts += filter(None, [to_block_text(block, block_where)])
    turns = results
    if texts or calls or role == "assistant" or not results:
        turns.append(Turn(role, "\n".join(texts), where, calls=tuple(calls)))
    turns[-1] = turns[-1]._replace(attachments=tuple(attachments), has_attachment=has_attachment or bool(attachments))
    return turns


def to_block_text(block: dict, where: str) -> str | None:
    """What a block that is neither a file nor a call says, as text. Thinking and the blocks of
    Anthropic's own server tools say nothing; unknown blocks are accepted and left out."""
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        if not isinstance(text, str):
            raise bad_request(f"'{where}.text' must be a string", where)
        return text
    if kind == "search_result":
        inner = "\n".join(filter(None, (to_block_text(b, where) for b in blocks_of(block))))
        return "\n".join(filter(None, [block.get("title") if isinstance(block.get("title"), str) else None, inner]))
    if kind == "tool_reference" and isinstance(block.get("tool_name"), str):
        return f"The tool {block['tool_name']} is now available."
    return None


def to_history_use(block: dict, where: str) -> Call:
    """A tool_use block of the history: the call, under the id its result names."""
    call_id, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
    if not isinstance(call_id, str) or not isinstance(name, str):
        raise bad_request(f"'{where}' must have a string 'id' and 'name'", where)
    return Call(call_id, name, orjson.dumps(arguments).decode())


def to_tool_result_turn(block: dict, where: str, is_last: bool, max_bytes: int) -> tuple[Turn, list[Attachment]]:
    """A tool_result block as a tool turn (its images become files of the last message)."""
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str):
        raise bad_request(f"'{where}.tool_use_id' must be a string", f"{where}.tool_use_id")
    texts, attachments = [], []
    for inner_index, inner in enumerate(blocks_of(block)):
        inner_where = f"{where}.content[{inner_index}]"
        if inner.get("type") in ("image", "document"):
            read = to_messages_attachment(inner, inner_where, is_last, max_bytes)
            texts += [read] if isinstance(read, str) else []
            attachments += [read] if isinstance(read, Attachment) else []
        else:
            texts += filter(None, [to_block_text(inner, inner_where)])
    return Turn("tool", "\n".join(texts), where, call_id=call_id, error=block.get("is_error") is True), attachments


def to_messages_attachment(block: dict, where: str, is_last: bool, max_bytes: int) -> Attachment | str | None:
    """An image or document block: a file for Kimi (in the last message; earlier ones Kimi has
    seen or does not need), or, for a plain-text document, its text."""
    source = block.get("source")
    kind = "image" if block.get("type") == "image" else "file"
    source_type = source.get("type") if isinstance(source, dict) else None
    title = block.get("title") if isinstance(block.get("title"), str) else None
    if source_type == "text":
        text = source.get("data")
        return "\n".join(filter(None, [title, text if isinstance(text, str) else None]))
    if source_type == "content":
        return "\n".join(filter(None, [title, *(to_block_text(b, where) for b in blocks_of(source))]))
    if not is_last:
        return None
    if source_type == "base64":
        return to_base64_attachment(kind, source.get("data"), source.get("media_type"), title, where, max_bytes)
    if source_type == "url":
        return to_attachment(kind, source.get("url"), title, where, max_bytes)
    if source_type == "file":
        raise file_id_refused(where)
    raise bad_request(f"'{where}.source' must be base64, url, text or content", f"{where}.source")


def thinking_signature(thinking: str) -> str:
    """Kimi signs no thinking: a non-empty, plainly made-up value in its place (a history that holds
    it cannot move to Anthropic's own API with its thinking blocks)."""
    return "kimi-proxy." + hashlib.sha256(thinking.encode()).hexdigest()[:32]


STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "calls": "tool_use", "stop_sequence": "stop_sequence"}


def to_messages_usage(usage: Usage) -> dict:
    return {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


class MessagesStream(AnswerStream):
    """Answer parts -> Anthropic's events: message_start, then content blocks one at a time with
    increasing indices (thinking, text, tool_use), then message_delta and message_stop; an error
    ends the stream with an error event and nothing after it."""

    KEEPALIVE = sse_event({"type": "ping"}, "ping")

    def __init__(self, wanted: Request, input_tokens: int) -> None:
        super().__init__()
        self._options: MessagesOptions = wanted.options
        self._message = {"id": "msg_" + new_id(), "type": "message", "role": "assistant", "model": wanted.model}
        self._open: str | None = None    # the kind of the block open now
        self._index = -1                 # the index of the last block started
        self._thinking: list[str] = []   # what the open thinking block holds, for its signature
        self._finish = STOP
        self._usage = Usage(input_tokens, 0)
        self._failed = False

    def kept(self, chat_id: str) -> None:
        super().kept(chat_id)
        self._message["conversation_id"] = chat_id

    def opening(self) -> bytes:
        message = {**self._message, "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": to_messages_usage(self._usage)}
        return sse_event({"type": "message_start", "message": message}, "message_start")

    def feed(self, parts: list[Part]) -> bytes:
        out = []
        for kind, value in parts:
            if kind == TEXT and value:
                out += self._into("text", {"type": "text", "text": ""})
                out.append(self._delta({"type": "text_delta", "text": value}))
            elif kind == REASONING and value and self._options.thinking:
                out += self._into("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                self._thinking.append(value)
                out.append(self._delta({"type": "thinking_delta", "thinking": value}))
            elif kind == CALLS:
                for call in value:
                    out += self._into("tool_use", {"type": "tool_use", "id": "toolu_" + call.id, "name": call.name,
                                                   "input": {}})
                    out.append(self._delta({"type": "input_json_delta", "partial_json": call.arguments}))
                    out += self._close()
            elif kind == FINISH:
                out += self._close()
                self._finish = value
            elif kind == USAGE:
                self._usage = value
            elif kind == CHAT:
                self.kept(value)
        return b"".join(out)

    def error(self, error: ProxyError) -> bytes:
        self._failed = True
        return sse_event(anthropic_error(error)[1], "error")

    def end(self) -> bytes:
        if self._failed:
            return b""
        delta = {"type": "message_delta", "delta": {"stop_reason": STOP_REASONS[self._finish.reason],
                                                    "stop_sequence": self._finish.stop_sequence},
                 "usage": to_messages_usage(self._usage)}
        if "conversation_id" in self._message:
            delta["conversation_id"] = self._message["conversation_id"]
        return b"".join([*self._close(), sse_event(delta, "message_delta"),
                         sse_event({"type": "message_stop"}, "message_stop")])

    def _into(self, kind: str, block: dict) -> list[bytes]:
        """Start a block of this kind unless one is open (a tool_use block is never continued)."""
        if self._open == kind and kind != "tool_use":
            return []
        out = self._close()
        self._open, self._index = kind, self._index + 1
        return out + [sse_event({"type": "content_block_start", "index": self._index, "content_block": block},
                                "content_block_start")]

    def _delta(self, delta: dict) -> bytes:
        return sse_event({"type": "content_block_delta", "index": self._index, "delta": delta}, "content_block_delta")

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        out = []
        if self._open == "thinking":
            out.append(self._delta({"type": "signature_delta", "signature": thinking_signature("".join(self._thinking))}))
            self._thinking = []
        self._open = None
        return out + [sse_event({"type": "content_block_stop", "index": self._index}, "content_block_stop")]


def to_messages_body(answer: Answer, wanted: Request) -> dict:
    options: MessagesOptions = wanted.options
    content: list[dict] = []
    if answer.reasoning and options.thinking:
        content.append({"type": "thinking", "thinking": answer.reasoning,
                        "signature": thinking_signature(answer.reasoning)})
    if answer.text:
        content.append({"type": "text", "text": answer.text})
    content += [{"type": "tool_use", "id": "toolu_" + call.id, "name": call.name,
                 "input": orjson.Fragment(call.arguments.encode())} for call in answer.calls]
    body = {"id": "msg_" + new_id(), "type": "message", "role": "assistant", "model": wanted.model, "content": content,
            "stop_reason": STOP_REASONS[answer.finish.reason], "stop_sequence": answer.finish.stop_sequence,
            "usage": to_messages_usage(answer.usage)}
    if answer.chat_id:
        body["conversation_id"] = answer.chat_id
    return body


# Anthropic's error types by HTTP status (any other 4xx is invalid_request_error, 5xx api_error);
# Kimi being overloaded (our 503) is Anthropic's 529, which Claude Code waits out and retries.
ANTHROPIC_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                         413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error"}


def anthropic_error(error: ProxyError) -> tuple[int, dict]:
    status = 529 if error.status == 503 else error.status
    kind = ANTHROPIC_ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    return status, {"type": "error", "error": {"type": kind, "message": error.message}}


class AnthropicMessages(ClientAPI):
    def parse(self, body: dict, limits: Limits) -> Request:
        return parse_messages(body, limits)

    def prepare(self, wanted: Request, request: web.Request) -> Request:
        """A Claude model name (Claude Code asks for its haiku, sonnet and opus tiers by name)
        means CLAUDE_MODEL; Kimi's own names mean what they say."""
        if wanted.model.lower().startswith("claude"):
            return dataclasses.replace(wanted, kimi_model=request.app[CONFIG].claude_model)
        return wanted

    def stream(self, wanted: Request, input_tokens: int) -> AnswerStream:
        return MessagesStream(wanted, input_tokens)

    def to_body(self, answer: Answer, wanted: Request) -> dict:
        return to_messages_body(answer, wanted)

    def error_body(self, error: ProxyError) -> tuple[int, dict]:
        return anthropic_error(error)


ANTHROPIC_MESSAGES = AnthropicMessages()


# ---------------------------------------------------------------------------------------------
# §19 HTTP: requests in flight, credentials, bodies, the answer handler, small endpoints, errors, logs
# ---------------------------------------------------------------------------------------------


class OpenRequests:
    """The requests in flight: all of them counted against MAX_OPEN_REQUESTS; those being
    answered counted for /healthz, awaited at shutdown, and ended (with an error the client can
    read) once the shutdown grace is over."""

    def __init__(self) -> None:
        self._deadlines: set[asyncio.Timeout] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.handling = 0  # requests of any kind being handled now (MAX_OPEN_REQUESTS counts these)

    @property
    def count(self) -> int:
        return len(self._deadlines)

    def track(self) -> "Tracked":
        """Answer one request under a deadline that shutdown can bring forward."""
        return Tracked(self)

    def _enter(self, deadline: asyncio.Timeout) -> None:
        self._deadlines.add(deadline)
        self._idle.clear()

    def _leave(self, deadline: asyncio.Timeout) -> None:
        self._deadlines.discard(deadline)
        if not self._deadlines:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def end_all_now(self) -> None:
        now = asyncio.get_running_loop().time()
        for deadline in self._deadlines:
            deadline.reschedule(now)


class Tracked:
    """One answer under a deadline that shutdown can bring forward: reaching it ends the answer
    with a 503 the client can read. (A class, not a generator: it lives as long as the answer.)"""

    def __init__(self, requests: OpenRequests) -> None:
        self._requests = requests
        self._deadline = asyncio.timeout(None)

    async def __aenter__(self) -> None:
        await self._deadline.__aenter__()
        self._requests._enter(self._deadline)

    async def __aexit__(self, kind, error, trace) -> None:
        self._requests._leave(self._deadline)
        try:
            await self._deadline.__aexit__(kind, error, trace)
        except TimeoutError:
            raise ProxyError(503, "kimi_proxy is shutting down; ask again", code="shutting_down") from None




def bearer_value(request: web.Request) -> str:
    """The key a client sends: `Authorization: Bearer`, or Anthropic's `x-api-key`."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get(X_API_KEY, "").strip()


def is_api_key(value: str, keys: tuple[str, ...]) -> bool:
    """Compared in constant time, against every key, so timing tells nothing about the keys."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(value.encode("utf-8", "surrogateescape"), key.encode())
    return matched


def invalid_api_key() -> ProxyError:
    return ProxyError(401, "Invalid API key: send one of this server's API keys as 'Authorization: Bearer <key>'",
                      code="invalid_api_key")


def request_credentials(request: web.Request) -> list[str]:
    """The Kimi tokens a request may use: the server's pool for an API key, else (passthrough) the
    client's own comma-separated tokens."""
    config = request.app[CONFIG]
    value = bearer_value(request)
    request[CALLER] = token_key(value)
    if config.kimi_tokens:
        if value and is_api_key(value, config.api_keys):
            return list(config.kimi_tokens)
        if not (config.allow_passthrough and value):
            raise invalid_api_key()
    credentials = split_list(value)
    if not credentials:
        raise ProxyError(401, "Missing API key: send your Kimi token as 'Authorization: Bearer <token>'",
                         code="invalid_api_key")
    if len(credentials) > MAX_TOKENS_PER_REQUEST:
        raise bad_request(f"The API key holds {len(credentials)} tokens; at most {MAX_TOKENS_PER_REQUEST} are accepted")
    if not all(TOKEN_TEXT.fullmatch(credential) for credential in credentials):
        # refused before the token is stored or sent anywhere
        raise ProxyError(401, "The API key holds characters a Kimi token cannot contain", code="invalid_api_key")
    health = request.app[TOKEN_HEALTH]  # its copy of each token, kept while the answer streams (not the request's)
    return [health.state(credential).token for credential in credentials]


TOKEN_TEXT = re.compile(r"[\x21-\x7e]{1,8192}")  # visible ASCII: what JWTs and API keys are made of


def require_api_key(request: web.Request) -> None:
    """With a pool, the endpoints that reveal token state answer only to API keys."""
    config = request.app[CONFIG]
    if config.kimi_tokens and not is_api_key(bearer_value(request), config.api_keys):
        raise invalid_api_key()


async def read_json_object(request: web.Request) -> dict:
    """The request body as a JSON object, whatever its Content-Type says (curl -d sends a form type).
    The raw bytes are gone once it is parsed."""
    try:
        body = orjson.loads(await read_body(request))
    except orjson.JSONDecodeError:
        raise bad_request("The request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object")
    return body


async def read_body(request: web.Request) -> bytearray:
    """The body, read here rather than by aiohttp's request.read(), which keeps its copy for the
    request's whole life: capped at MAX_BODY_MB, and within BODY_READ_TIMEOUT, so that a body
    that never comes cannot hold its connection."""
    config = request.app[CONFIG]
    limit = int(config.max_body_mb * 2**20)
    if (request.content_length or 0) > limit:
        raise body_too_large(config.max_body_mb)
    body, size = bytearray(request.content_length or 0), 0  # with a declared length: filled, never grown
    try:
        async with asyncio.timeout(config.body_read_timeout):
            async for chunk in request.content.iter_any():
                if size + len(chunk) > limit:
                    raise body_too_large(config.max_body_mb)
                body[size:size + len(chunk)] = chunk
                size += len(chunk)
    except TimeoutError:
        raise ProxyError(408, f"The request body did not arrive within {config.body_read_timeout:g} s "
                         "(BODY_READ_TIMEOUT)", code="request_timeout") from None
    del body[size:]  # a client may send less than it declared
    return body


def body_too_large(max_body_mb: float) -> ProxyError:
    return ProxyError(413, f"The request body is larger than the {max_body_mb:g} MiB limit (MAX_BODY_MB)",
                      code="request_too_large")



async def answer(request: web.Request, api: ClientAPI) -> web.StreamResponse:
    """Every client API's answer: credentials, body, parse, plan, a Kimi session, the answer's
    parts, written as the API's stream or folded into its body. The session closes (its chats
    go) however the request ends."""
    request[CLIENT_API] = api
    credentials = request_credentials(request)
    app = request.app
    wanted = api.prepare(api.parse(await read_json_object(request), app[LIMITS]), request)
    request[MODEL] = wanted.model
    question = plan(wanted, app[KIMI])
    session = KimiSession(app, credentials)
    try:
        parts = answer_parts(session, wanted, question)
        if wanted.stream:
            renderer = api.stream(wanted, prompt_tokens(question))
            response = await stream_answer(request, renderer, parts, keep_alive=not wanted.must_call)
            if renderer.result is not None:
                api.remember(request, wanted, renderer.result)
            return response
        async with app[OPEN_REQUESTS].track(), aclosing(parts):
            folded = await fold_answer(parts)
    except ProxyError:
        session.close(seen=False)  # an error answer names no chat, so no client can go on with it
        raise
    finally:
        session.close()
    body = api.to_body(folded, wanted)
    api.remember(request, wanted, body)
    return json_response(body, headers={X_CONVERSATION_ID: folded.chat_id} if folded.chat_id else None)


async def stream_answer(request: web.Request, renderer: AnswerStream, batches: AsyncIterator[list[Part]],
                        keep_alive: bool) -> web.StreamResponse:
    stream = SSEStream(request, renderer, request.app[KEEPALIVE_CLOCK] if keep_alive else None)
    writes = 0
    try:
        try:
            async with request.app[OPEN_REQUESTS].track(), aclosing(batches), stream:
                async for parts in batches:
                    data = renderer.feed(parts)
                    if data:  # what one read from Kimi brought goes out in one write
                        writes += 1
                        await stream.send(data)
        except ProxyError as error:
            if not stream.started:
                raise
            log.warning("answer failed mid-stream: %s", error.message)
            await stream.send(renderer.error(error))
        except ConnectionError:
            raise
        except Exception:  # a bug: once the stream has begun, it still ends the way clients expect
            if not stream.started:
                raise
            log.exception("unexpected error mid-stream in %s", loggable(request.path))
            await stream.send(renderer.error(internal_error()))
        ending = renderer.end()
        if ending or not stream.started:
            await stream.send(ending)
        await stream.response.write_eof()
    except ConnectionError:
        request[CLIENT_GONE] = True
    finally:
        request[CHUNKS_SENT] = writes
    return stream.response


CLIENT_APIS = {"/v1/chat/completions": CHAT_COMPLETIONS, "/chat/completions": CHAT_COMPLETIONS,
               "/v1/responses": OPENAI_RESPONSES, "/v1/messages": ANTHROPIC_MESSAGES}


async def get_response(request: web.Request) -> web.Response:
    """A stored response, to the key that asked for it."""
    request[CLIENT_API] = OPENAI_RESPONSES
    request_credentials(request)
    response_id = request.match_info["response_id"]
    stored = request.app[RESPONSES].get(response_id, request[CALLER])
    if stored is None:
        raise response_not_found(response_id)
    return json_response(stored.response)


async def delete_response(request: web.Request) -> web.Response:
    request[CLIENT_API] = OPENAI_RESPONSES
    request_credentials(request)
    response_id = request.match_info["response_id"]
    if not request.app[RESPONSES].delete(response_id, request[CALLER]):
        raise response_not_found(response_id)
    return json_response({"id": response_id, "object": "response.deleted", "deleted": True})


async def count_tokens(request: web.Request) -> web.Response:
    """Anthropic's token count: the usage estimate of the prompt the request would fold, without
    asking Kimi."""
    request[CLIENT_API] = ANTHROPIC_MESSAGES
    request_credentials(request)
    app = request.app
    wanted = ANTHROPIC_MESSAGES.prepare(ANTHROPIC_MESSAGES.parse(await read_json_object(request), app[LIMITS]), request)
    request[MODEL] = wanted.model
    return json_response({"input_tokens": prompt_tokens(plan(wanted, app[KIMI]))})


async def model_ids(request: web.Request) -> list[str]:
    """The models this server offers; Kimi is asked with the caller's first token, if any.
    With a pool, only its clients see them."""
    if request.app[CONFIG].kimi_tokens:
        credentials = request_credentials(request)
    else:  # a token that cannot be one is not sent to Kimi: the catalog is then asked for anonymously
        credentials = [value for value in split_list(bearer_value(request)) if TOKEN_TEXT.fullmatch(value)]
    return await request.app[KIMI].model_ids(credentials[0] if credentials else None)


async def list_models(request: web.Request) -> web.Response:
    """One list both the openai and the anthropic SDK read (the paths are the same for both)."""
    ids = await model_ids(request)
    return json_response({"object": "list", "data": [to_model_card(name) for name in ids], "has_more": False,
                          "first_id": ids[0] if ids else None, "last_id": ids[-1] if ids else None})


async def get_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model_id"]
    if model_id not in await model_ids(request):
        raise ProxyError(404, f"The model '{model_id}' does not exist", code="model_not_found", param="model")
    return json_response(to_model_card(model_id))


MODELS_CREATED = 1710000000  # when the original Kimi web API models appeared (2024-03)
MODELS_CREATED_AT = "2024-03-09T16:00:00Z"


def to_model_card(model_id: str) -> dict:
    """A model as OpenAI's list has it, with the fields of Anthropic's beside them."""
    return {"id": model_id, "object": "model", "created": MODELS_CREATED, "owned_by": "moonshot-kimi-web",
            "type": "model", "display_name": model_id, "created_at": MODELS_CREATED_AT}


async def check_token(request: web.Request) -> web.Response:
    require_api_key(request)  # else, with a pool, an open oracle for anyone's tokens
    body = await read_json_object(request)
    token = body.get("token")
    if not isinstance(token, str) or not TOKEN_TEXT.fullmatch(token.strip()):
        raise bad_request("'token' must be a Kimi refresh token (visible ASCII characters)", "token")
    kimi = request.app[KIMI]
    checked = {"live": await kimi.check_token(token.strip())}
    quota = await kimi.quota(token.strip()) if checked["live"] else None
    return json_response({**checked, "quota": quota} if quota else checked)


async def healthz(request: web.Request) -> web.Response:
    require_api_key(request)
    app = request.app
    tokens = app[TOKEN_HEALTH].report()
    pool = list(dict.fromkeys(app[CONFIG].kimi_tokens))
    quotas = dict(zip(map(fingerprint, pool), await asyncio.gather(*map(app[KIMI].quota, pool))))  # (for a minute)
    for entry in tokens:
        if quotas.get(entry["id"]):
            entry["quota"] = quotas[entry["id"]]
    usable = any(token["state"] == "alive" for token in tokens[:len(app[CONFIG].kimi_tokens)])
    return json_response({"status": "ok" if usable or not app[CONFIG].kimi_tokens else "degraded",
                          "uptime_s": round(time.monotonic() - app[STARTED_AT], 1),
                          "in_flight": app[OPEN_REQUESTS].count, "tokens": tokens})


async def ping(request: web.Request) -> web.Response:
    return web.Response(text="pong")


INDEX_PAGE = """<!doctype html><meta charset="utf-8"><title>kimi_proxy</title>
<h1>kimi_proxy</h1>
<p>An OpenAI-compatible API in front of Kimi's web chat. Point an OpenAI client at
<code>/v1</code> on this host and use your Kimi <code>refresh_token</code> as the API key.</p>
<ul><li><code>POST /v1/chat/completions</code></li><li><code>GET /v1/models</code></li>
<li><code>POST /token/check</code></li><li><code>GET /ping</code></li></ul>
"""


async def index(request: web.Request) -> web.Response:
    return web.Response(text=INDEX_PAGE, content_type="text/html")


def preflight(request: web.Request) -> web.Response:
    requested = request.headers.get("Access-Control-Request-Headers", "")
    allowed = {"authorization", "content-type"} | {h.strip().lower() for h in requested.split(",") if h.strip()}
    return web.Response(status=204, headers={
        hdrs.ACCESS_CONTROL_ALLOW_METHODS: "GET, POST, DELETE, OPTIONS",
        hdrs.ACCESS_CONTROL_ALLOW_HEADERS: ", ".join(sorted(allowed)),
        hdrs.ACCESS_CONTROL_MAX_AGE: "86400",
    })



def json_response(body: object, status: int = 200, headers: dict | None = None) -> web.Response:
    """Every JSON answer: completions, lists, errors (a newline ends it, for curl in a terminal)."""
    return web.Response(status=status, body=orjson.dumps(body) + b"\n", content_type="application/json",
                        headers=headers)


def error_response(request: web.Request, error: ProxyError) -> web.Response:
    """A failure before any answer, in the envelope of the client API the request was for
    (OpenAI's where it was for none)."""
    status, body = request.get(CLIENT_API, CHAT_COMPLETIONS).error_body(error)
    headers = {hdrs.RETRY_AFTER: str(error.retry_after)} if error.retry_after is not None else None
    return json_response(body, status, headers)


HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}


def from_http_exception(request: web.Request, error: web.HTTPException) -> web.Response:
    if error.status == 413:
        return error_response(request, body_too_large(request.app[CONFIG].max_body_mb))
    if error.status == 404:
        message = f"No such endpoint: {loggable(request.method)} {loggable(request.path)}"
    elif error.status == 405:
        message = f"Method {loggable(request.method)} is not allowed on {loggable(request.path)}"
    else:
        message = error.reason
    response = error_response(request, ProxyError(error.status, message, code=HTTP_ERROR_CODES.get(error.status)))
    if "Allow" in error.headers:
        response.headers[hdrs.ALLOW] = error.headers[hdrs.ALLOW]
    return response


@web.middleware
async def errors_and_logging(request: web.Request, handler) -> web.StreamResponse:
    """Every failure becomes the OpenAI error envelope; every request gets one log line."""
    request[REQUEST_ID] = request_id_of(request)
    REQUEST_ID_VAR.set(request[REQUEST_ID])  # (each request runs in its own task, with its own context)
    if request.method == "OPTIONS":
        return preflight(request)  # browsers send no Authorization on a CORS preflight, for any path
    started = time.perf_counter()
    status = 500
    open_requests = request.app[OPEN_REQUESTS]
    open_requests.handling += 1
    try:
        try:
            if open_requests.handling > request.app[CONFIG].max_open_requests:
                raise ProxyError(503, "kimi_proxy is handling as many requests as it may (MAX_OPEN_REQUESTS); "
                                 "ask again shortly", code="server_is_overloaded", retry_after=1)
            response = await handler(request)
        except ProxyError as error:
            response = error_response(request, error)
        except web.HTTPException as error:
            response = from_http_exception(request, error)
        except Exception:
            log.exception("unexpected error in %s %s", loggable(request.method), loggable(request.path))
            response = error_response(request, internal_error())
        status = 499 if request.get(CLIENT_GONE) else response.status
        return response
    except asyncio.CancelledError:
        status = 499  # the client went away
        raise
    finally:
        open_requests.handling -= 1
        log.info("%s %s model=%s status=%d duration_ms=%.1f chunks=%d request_id=%s", loggable(request.method),
                 loggable(request.path), loggable(request.get(MODEL, "-")), status,
                 (time.perf_counter() - started) * 1000, request.get(CHUNKS_SENT, 0), request[REQUEST_ID])


REQUEST_ID_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def request_id_of(request: web.Request) -> str:
    """The caller's X-Request-ID (from nginx: `proxy_set_header X-Request-ID $request_id`) when it
    is short and safe to log, else a new one."""
    given = request.headers.get(X_REQUEST_ID, "")
    return given if SAFE_REQUEST_ID.fullmatch(given) else secrets.token_hex(8)


class RequestIdOnRecords(logging.Filter):
    """On the log handler: every record says which request it belongs to (`-` outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID_VAR.get()
        return True


class ServerLogGuard(logging.Filter):
    """On aiohttp's and asyncio's own loggers: no client bytes in a log line (aiohttp puts a
    malformed request's header line, token and all, into its exception message), and one message
    at most once a second (a flood of bad connections must not fill the disk)."""

    def __init__(self) -> None:
        super().__init__()
        self._last_seen: dict[tuple[str, object], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        key = (record.name, record.msg)
        if now - self._last_seen.get(key, -1.0) < 1.0:
            return False
        self._last_seen[key] = now
        if record.exc_info and record.exc_info[1] is not None:
            error, frames = record.exc_info[1], traceback.extract_tb(record.exc_info[2])
            where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
            record.msg = f"{record.getMessage()}: {type(error).__name__}{where} (details withheld: they hold client data)"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


GUARDED_LOGGERS = ("aiohttp.server", "aiohttp.web", "aiohttp.internal", "asyncio")


def guard_server_logs() -> None:
    for name in GUARDED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, ServerLogGuard) for existing in logger.filters):
            logger.addFilter(ServerLogGuard())


async def add_common_headers(request: web.Request, response: web.StreamResponse) -> None:
    """CORS and a request id on every response, streams and errors included."""
    response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = "*"
    response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = "X-Request-ID, Request-Id, Retry-After, X-Conversation-Id"
    response.headers[X_REQUEST_ID] = response.headers[REQUEST_ID_HEADER] = request.get(REQUEST_ID) or request_id_of(request)


# ---------------------------------------------------------------------------------------------
# §20 App factory: the one session to Kimi, routes, shutdown
# ---------------------------------------------------------------------------------------------


CLEANUP_GRACE = 10.0  # seconds the shutdown waits for pending chat deletions
END_GRACE = 5.0       # seconds the answers ended at shutdown get to send their error and close


async def finish_open_requests(app: web.Application) -> None:
    """On SIGTERM/SIGINT aiohttp has stopped accepting connections: let open answers finish
    within the grace, then end the rest with an error event (their chats are deleted as usual)."""
    open_requests = app[OPEN_REQUESTS]
    if not await open_requests.wait_idle(app[CONFIG].shutdown_grace):
        log.warning("ending %d open answers at shutdown", open_requests.count)
        open_requests.end_all_now()
        await open_requests.wait_idle(END_GRACE)


async def kimi_client(app: web.Application):
    """The one HTTP session to Kimi (and one, fenced off, for the file URLs clients name), and
    the chat deletions still in flight when the app stops."""
    config = app[CONFIG]
    # No pool limit: answers are bounded by MAX_STREAMS_PER_TOKEN already, and with aiohttp's
    # default of 100 the 101st open answer would wait for a connection until the connect timeout.
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.upstream_connect_timeout,
                                    sock_read=config.upstream_read_timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session, \
            FileFetcher.session(config) as downloads:
        app[JANITOR] = Janitor()
        app[KIMI] = DIALECTS[config.kimi_protocol](session, config, FileFetcher(downloads, config), app[TOKEN_STORE],
                                                   app[JANITOR])
        app[CHAT_OWNERS] = BoundedMap()
        app[TOKEN_TURN] = itertools.count()
        yield
        await app[JANITOR].drain(CLEANUP_GRACE)
        app[KIMI].close()


async def keepalive_clock(app: web.Application):
    """The keep-alive clock of every stream, for the app's life."""
    clock = app[KEEPALIVE_CLOCK] = KeepAliveClock(app[CONFIG].keepalive_interval)
    ticking = asyncio.ensure_future(clock.run())
    yield
    ticking.cancel()
    await asyncio.gather(ticking, return_exceptions=True)


def create_app(config: Config) -> web.Application:
    guard_server_logs()
    app = web.Application(client_max_size=int(config.max_body_mb * 1024 * 1024), middlewares=[errors_and_logging])
    app[CONFIG] = config
    app[TOKEN_STORE] = TokenStore(config.kimi_token_store)  # read now: a bad store stops the start
    app[TOKEN_HEALTH] = TokenHealth(config.kimi_tokens, config.max_streams_per_token, config.queue_timeout)
    app[OPEN_REQUESTS] = OpenRequests()
    app[STARTED_AT] = time.monotonic()
    app[LIMITS] = Limits(config.max_messages, int(config.max_file_mb * 2**20))
    app[RESPONSES] = ResponseStore(config.responses_store, config.responses_ttl)
    app.cleanup_ctx.append(kimi_client)
    app.cleanup_ctx.append(keepalive_clock)
    app.on_shutdown.append(finish_open_requests)
    app.on_response_prepare.append(add_common_headers)
    for path, api in CLIENT_APIS.items():
        app.router.add_post(path, functools.partial(answer, api=api))
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_get("/v1/responses/{response_id}", get_response)
    app.router.add_delete("/v1/responses/{response_id}", delete_response)
    for prefix in ("/v1", ""):
        app.router.add_get(prefix + "/models", list_models)
        app.router.add_get(prefix + "/models/{model_id:.+}", get_model)
    app.router.add_post("/token/check", check_token)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/ping", ping)
    app.router.add_get("/", index)
    return app


def runner_options(config: Config) -> dict:
    # Handlers are cancelled when their client disconnects, so Kimi stops generating at once;
    # the request log line replaces aiohttp's access log (which would print query strings).
    # (the shutdown grace itself is kept by finish_open_requests)
    return {"access_log": None, "handler_cancellation": True, "shutdown_timeout": END_GRACE}


# ---------------------------------------------------------------------------------------------
# §21 main
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kimi_proxy.py", description="OpenAI-compatible API for Kimi's web chat")
    parser.add_argument("--host", help="address to listen on (env HOST, default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port to listen on (env PORT, default 8000)")
    args = parser.parse_args(argv)
    try:
        config = Config.from_env()
        config = dataclasses.replace(config, host=args.host or config.host,
                                     port=config.port if args.port is None else args.port)
        app = create_app(config)
    except ConfigError as error:
        sys.exit(f"kimi_proxy: {error}")
    logging.basicConfig(level=config.log_level,
                        format="%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdOnRecords())
    log.info("kimi_proxy on http://%s:%d, Kimi at %s (%s dialect)", config.host, config.port,
             config.kimi_base_url, config.kimi_protocol)
    try:
        web.run_app(app, host=config.host, port=config.port, print=None, **runner_options(config))
    except OSError as error:  # the address is taken or not ours: say so in one line
        sys.exit(f"kimi_proxy: cannot listen on {config.host}:{config.port}: {error.strerror or error}")


if __name__ == "__main__":
    main()
