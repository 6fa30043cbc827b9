"""Tests for kimi_proxy: the real server in front of a fake Kimi, talked to over HTTP.

The fake Kimi follows ../shared/KIMI_LEGACY_PROTOCOL.md (section 10) and is strict: it rejects
requests that real Kimi would reject, and records what it saw so the tests can check it.
Scripted scenarios are picked by a `scenario:NAME` marker in the user's message.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import email.utils
import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import openai
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import orjson
import pytest
from aiohttp import web

import kimi_proxy as kp

# ---------------------------------------------------------------------------------------------
# Fake Kimis: the legacy REST + SSE dialect and the Connect-RPC dialect
# ---------------------------------------------------------------------------------------------

ANSWER = ["长城是", "中国古代修建的", "大型军事防御工程。"]
THINKING = ["比较小数，先看整数部分；", "再看十分位。"]
SOURCES = [("杭州天气预报", "https://weather.example.cn/hangzhou"), ("杭州今日实况", "https://news.example.com/hz")]
OVERLOADED = "Kimi 现在有点累了，晚一点再来问问我吧！"


def xid() -> str:
    return "".join(secrets.choice("0123456789abcdefghijklmnopqrstuv") for _ in range(20))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(claims: dict) -> str:
    header = b64url(b'{"alg":"HS512","typ":"JWT"}')
    return f"{header}.{b64url(orjson.dumps(claims))}.{b64url(secrets.token_bytes(32))}"


@dataclass
class Chat:
    owner: str
    kimiplus_id: str = "kimi"
    question: str = ""                              # the first prompt, which continuations go on with
    segment_ids: list = field(default_factory=list)  # legacy `req` ids a continuation may name
    last_message: str | None = None                 # connect: the assistant message a next turn follows
    scenario: str = ""                              # the scenario its first prompt named
    streaming: bool = False
    deleted: bool = False


class FakeKimiBase:
    """What both fakes share: accounts and tokens, chats, fault injection and the records tests read."""

    PROTOCOL = ""
    ISSUER = "user-center"  # who issues its refresh tokens

    def __init__(self) -> None:
        self.access_ttl = 3600.0
        self.users: dict[str, str] = {}                 # every refresh token issued -> user id
        self.spent: set[str] = set()                    # refresh tokens rotated away (connect)
        self.banned: set[str] = set()
        self.access: dict[str, tuple[str, float]] = {}  # access token -> (user id, expiry)
        self.chats: dict[str, Chat] = {}
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.refreshes: Counter = Counter()             # user id (or unknown token) -> refresh calls
        self.completions: list[dict] = []               # {"chat", "user", "prompt", "search", "thinking", "body", "headers"}
        self.calls: list[tuple[str, str]] = []
        self.faults: list[dict] = []
        self.rate_limited: set[str] = set()             # user ids answered with 429
        self.closed_streams: list[str] = []             # chats whose stream the client closed early
        self.open_streams = 0
        self.max_open_streams = 0
        self.open_by_user: Counter = Counter()
        self.max_open_by_user: Counter = Counter()
        self.refused: Counter = Counter()               # user id -> requests answered 429
        self.hold_deletes: asyncio.Event | None = None
        self.proxy_secrets: list[str] = []              # API keys and pool tokens the proxies were given
        self.signed: dict[str, dict] = {}               # object name -> what was pre-signed, by whom
        self.uploads: dict[str, bytes] = {}             # object name -> the bytes PUT to storage
        self.files: dict[str, dict] = {}                # file id -> the registered file (and its owner)
        self.parse_calls = 0
        self.presign_uploads = True                     # the REST upload flow (pre-sign, PUT, register)
        self.web_page: str | None = None                # "redirect" or "html": every call gets that instead
        self.replies: list[str] = []                    # what the next turns of a `scenario:reply` chat answer
        self.reply_piece = 4                            # characters per streamed piece of a reply
        self.reply_pause = 0.0                          # seconds between the pieces
        self.linger = 0.0                               # seconds Kimi goes on answering after the client left
        self.url = ""

    # -- test controls ---------------------------------------------------------------------------

    def add_user(self) -> str:
        return self._refresh_token_for(xid())

    def _refresh_token_for(self, user_id: str) -> str:
        now = int(time.time())
        token = make_jwt({"iss": self.ISSUER, "typ": "refresh", "app_id": "kimi", "sub": user_id, "jti": xid(),
                          "iat": now, "exp": now + 90 * 86400, "device_id": "7651000000000000001",
                          "ssid": "1731090000000000001"})
        self.users[token] = user_id
        return token

    def issue_access_token(self, user_id: str, ttl: float) -> str:
        now = time.time()
        # exp in whole seconds, rounded up: truncated, a 1 s token could claim to expire at once
        token = make_jwt({"iss": self.ISSUER, "typ": "access", "app_id": "kimi", "sub": user_id, "iat": int(now),
                          "exp": math.ceil(now + ttl),
                          "jti": xid(), "device_id": "7651000000000000001", "ssid": "1731090000000000001"})
        self.access[token] = (user_id, now + ttl)
        return token

    def fail(self, method: str, path_pattern: str, status: int, times: int = 1, body: object = None,
             headers: dict | None = None, html: bool = False, after: int = 0) -> None:
        """The next `times` matching calls (after the next `after`) get this answer: Kimi's JSON, or
        a web page (a firewall)."""
        self.faults.append({"method": method, "path": re.compile(path_pattern), "status": status, "times": times,
                            "body": body or {"error_type": "server.internal", "message": "服务内部错误"},
                            "headers": headers or {}, "html": html, "after": after})

    def reply_script(self, piece) -> list:
        """The next scripted reply as pieces made by `piece`, paced (with none left: empty)."""
        text = self.replies.pop(0) if self.replies else ""
        pause = [self.reply_pause] if self.reply_pause else []
        return [item for start in range(0, len(text), self.reply_piece)
                for item in (*pause, piece(text[start:start + self.reply_piece]))]

    def scenario_in(self, chat: Chat, prompt: str) -> str:
        """A prompt's scenario; in a `reply` chat, the proxy's own follow-up turns get replies too."""
        scenario = scenario_of(prompt)
        chat.scenario = chat.scenario or scenario
        return "reply" if scenario == "plain" and chat.scenario == "reply" else scenario

    def revoke_access_tokens(self) -> None:
        self.access.clear()

    def user_of(self, refresh_token: str) -> str:
        return self.users[refresh_token]

    @property
    def live_chats(self) -> list[str]:
        return [chat_id for chat_id, chat in self.chats.items() if not chat.deleted]

    async def wait_deleted(self, count: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.deleted) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert len(self.deleted) >= count, f"{len(self.deleted)} of {count} chats deleted"

    # -- shared plumbing ---------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record_and_inject_faults], client_max_size=200 * 2**20)
        app.router.add_get("/api/auth/token/refresh", self.refresh)
        app.router.add_post("/api/pre-sign-url", self.pre_sign)
        app.router.add_put("/fake-oss/{object_name:.+}", self.storage_put)
        app.router.add_post("/api/file", self.register_file)
        app.router.add_post("/api/file/parse_process", self.parse_process)
        self.add_routes(app)
        return app

    # -- uploads (REST in both dialects): pre-sign, PUT to storage, register, parse --------------------

    async def pre_sign(self, request: web.Request) -> web.Response:
        if not self.presign_uploads:
            return web.Response(status=404, text="404 page not found")
        user_id = self._authenticated_user(request)
        if user_id is None:
            return self.auth_error()
        body = await self._json_body(request)
        if body is None or body.get("action") not in ("file", "image") or not isinstance(body.get("name"), str) \
                or not body["name"] or "/" in body["name"]:
            return web.json_response({"error_type": "file.invalid_params", "message": "参数错误"}, status=400)
        object_name = f"{user_id}/2024-11-02/{xid()}/{body['name']}"
        self.signed[object_name] = {"user": user_id, "file_id": xid(), "size": body.get("size"), **body}
        return web.json_response({"url": f"{self.url}/fake-oss/{object_name}?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                                         f"&X-Amz-Signature={secrets.token_hex(16)}",
                                  "object_name": object_name, "file_id": self.signed[object_name]["file_id"]})

    async def storage_put(self, request: web.Request) -> web.Response:
        """Like S3 with a pre-signed URL: the signature is the only credential, the length is required."""
        signed = self.signed.get(request.match_info["object_name"])
        if signed is None or "X-Amz-Signature" not in request.query:
            return web.Response(status=403, text="SignatureDoesNotMatch")
        if "Authorization" in request.headers:
            return web.Response(status=400, text="Only one auth mechanism allowed")
        if request.content_length is None:
            return web.Response(status=411, text="MissingContentLength")
        data = await request.read()
        if signed["size"] is not None and signed["size"] != len(data):
            return web.Response(status=400, text="size differs from the pre-signed size")
        self.uploads[request.match_info["object_name"]] = data
        return web.Response()

    async def register_file(self, request: web.Request) -> web.Response:
        user_id = self._authenticated_user(request)
        if user_id is None:
            return self.auth_error()
        body = await self._json_body(request) or {}
        signed = next((s for name, s in self.signed.items() if name == body.get("object_name")
                       or (body.get("type") == "image" and s["file_id"] == body.get("file_id"))), None)
        object_name = next((name for name, s in self.signed.items() if s is signed), None)
        if signed is None or signed["user"] != user_id or object_name not in self.uploads \
                or body.get("type") != signed["action"] or not self._registration_ok(body, user_id):
            return web.json_response({"error_type": "file.invalid_params", "message": "参数错误"}, status=400)
        file_id = signed["file_id"] if body["type"] == "image" else xid()
        self.files[file_id] = {"id": file_id, "name": signed["name"], "type": body["type"], "owner": user_id,
                               "size": len(self.uploads[object_name]), "object_name": object_name,
                               "status": "initialized"}
        return web.json_response({k: v for k, v in self.files[file_id].items() if k != "owner"})

    def _registration_ok(self, body: dict, user_id: str) -> bool:
        return True

    async def parse_process(self, request: web.Request) -> web.StreamResponse:
        user_id = self._authenticated_user(request)
        if user_id is None:
            return self.auth_error()
        self.parse_calls += 1
        body = await self._json_body(request) or {}
        ids = body.get("ids")
        if not isinstance(ids, list) or not all(self.files.get(i, {}).get("owner") == user_id for i in ids):
            return web.json_response({"error_type": "file.not_found", "message": "文件不存在"}, status=404)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        for file_id in ids:
            file = self.files[file_id]
            events = [{"event": "resp", "id": file_id, "file_info": {"id": file_id, "status": "parsing"}}]
            if "slow_parse" in file["name"]:
                await asyncio.sleep(0.1)
            else:
                file["status"] = "failed" if "parse_fail" in file["name"] else "parsed"
                events.append({"event": "resp", "id": file_id, "file_info": {"id": file_id, "status": file["status"]}})
            for event in events:
                await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
        await response.write_eof()
        return response

    def _attached_files_problem(self, ids: list, user_id: str) -> str | None:
        for file_id in ids:
            file = self.files.get(file_id) if isinstance(file_id, str) else None
            if file is None or file["owner"] != user_id:
                return "unknown file"
            if file["type"] == "file" and file["status"] != "parsed":
                return "the file is not parsed yet"
        return None

    def add_routes(self, app: web.Application) -> None:
        raise NotImplementedError

    @web.middleware
    async def _record_and_inject_faults(self, request: web.Request, handler):
        self.calls.append((request.method, request.path))
        if self.web_page == "redirect":  # what kimi.moonshot.cn does for visitors outside mainland China
            raise web.HTTPFound(self.url + "/ping-redirected")
        if self.web_page == "html":
            return web.Response(text="<!doctype html><title>Kimi</title>", content_type="text/html")
        for fault in self.faults:
            if fault["times"] > 0 and fault["method"] == request.method and fault["path"].fullmatch(request.path):
                if fault["after"]:
                    fault["after"] -= 1
                    continue
                fault["times"] -= 1
                if fault["html"]:
                    return web.Response(text="<html><body>Access denied</body></html>", content_type="text/html",
                                        status=fault["status"])
                return web.json_response(fault["body"], status=fault["status"], headers=fault["headers"])
        return await handler(request)

    def _bearer(self, request: web.Request) -> str:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return token if scheme == "Bearer" else ""

    async def _json_body(self, request: web.Request) -> dict | None:
        if request.content_type != "application/json":
            return None
        try:
            body = await request.json()
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def _authenticated_user(self, request: web.Request) -> str | None:
        grant = self.access.get(self._bearer(request))
        if grant is None or grant[1] < time.time():
            return None
        return grant[0]

    def _record_completion(self, request, chat_id, user_id, body, prompt, search, thinking, files) -> None:
        self.completions.append({"chat": chat_id, "user": user_id, "prompt": prompt, "search": search,
                                 "thinking": thinking, "files": files, "body": body, "headers": dict(request.headers)})

    def _open_stream(self, user_id: str) -> None:
        self.open_streams += 1
        self.max_open_streams = max(self.max_open_streams, self.open_streams)
        self.open_by_user[user_id] += 1
        self.max_open_by_user[user_id] = max(self.max_open_by_user[user_id], self.open_by_user[user_id])

    def _close_stream(self, user_id: str, chat: Chat, left: bool) -> None:
        """An answer ended. One the client left early, Kimi may go on writing for `linger`
        seconds, refusing a new turn in that chat meanwhile."""
        self.open_streams -= 1
        self.open_by_user[user_id] -= 1
        if left and self.linger:
            asyncio.get_running_loop().call_later(self.linger, setattr, chat, "streaming", False)
        else:
            chat.streaming = False

    async def _write(self, response: web.StreamResponse, data: bytes, split: bool) -> None:
        if split:  # 5-byte writes cut lines, frames and multi-byte characters apart
            for start in range(0, len(data), 5):
                await response.write(data[start:start + 5])
                await asyncio.sleep(0.001)
        else:
            await response.write(data)

    async def refresh(self, request: web.Request) -> web.Response:
        """The REST refresh both dialects use. The Connect-era server rotates refresh tokens and
        rejects a spent one; the legacy one keeps the old token valid."""
        token = self._bearer(request)
        user_id = self.users.get(token)
        self.refreshes[user_id or token] += 1
        if token in self.banned:  # HTTP 400 for banned accounts (2024-04); the body is a guess
            return kimi_error(400, "auth.token.invalid", "账号已被封禁")
        if user_id is None or token in self.spent:
            return self.auth_error()
        rotated = self._refresh_token_for(user_id)
        if self.PROTOCOL == "connect":
            self.spent.add(token)
        return web.json_response({"access_token": self.issue_access_token(user_id, self.access_ttl),
                                  "refresh_token": rotated})

    def auth_error(self) -> web.Response:
        raise NotImplementedError


def scenario_of(prompt: str) -> str:
    found = re.search(r"scenario:(\w+)", prompt)
    return found[1] if found else "plain"


# The scenarios both fakes play, in neutral steps that each renders in its own dialect (one table,
# so that the dialects are tested alike): "ANSWER" the whole answer, "FIRST" and "REST" its first
# piece and the others, "PACED" the answer a piece every 20 ms, ("TEXT", s) one more piece,
# "DONE" the finish, "ERROR" Kimi aborting; numbers are pauses, "DROP" cuts the connection.
# Every script opens with the dialect's head (chat, messages, search results, thinking).
SCENARIOS = {
    "error": ["FIRST", "ERROR"],
    "error_first": ["ERROR"],
    "drop": ["FIRST", 0.05, "DROP"],
    "drop_first": ["DROP"],
    "slow": [0.7, "ANSWER", "DONE"],
    "stall": [5, "ANSWER", "DONE"],
    "stall_mid": ["FIRST", 5, "REST", "DONE"],
    "endless": [step for i in range(400) for step in (0.05, ("TEXT", f"{i} "))] + ["DONE"],
    "pace": ["PACED", "DONE"],
    "no_all_done": ["ANSWER"],
}
PLAIN_SCRIPT = ["ANSWER", "DONE"]


def render_script(steps: list, head: list, answer: list, first: int, done: list, error: list, text) -> list:
    """A scenario's steps in one dialect: `answer[:first]` is its first piece, `text` makes a piece."""
    script = list(head)
    for step in steps:
        if step == "ANSWER":
            script += answer
        elif step in ("FIRST", "REST"):
            script += answer[:first] if step == "FIRST" else answer[first:]
        elif step == "PACED":
            script += [item for piece in answer for item in (0.02, piece)]
        elif step in ("DONE", "ERROR"):
            script += done if step == "DONE" else error
        elif isinstance(step, tuple):
            script.append(text(step[1]))
        else:
            script.append(step)
    return script


BULK_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'


def bulk_pieces(scenario: str) -> list | None:
    """`chunks_N`: N answer pieces as fast as possible; `trickle_N`: N pieces a second apart;
    `call_N`: N pieces, then a tool call in 8-character pieces. Numbers stand for pauses,
    strings for pieces (the benchmark's loads)."""
    kind, _, count = scenario.partition("_")
    if kind not in ("chunks", "trickle", "call") or not count.isdigit():
        return None
    pause = [1.0] if kind == "trickle" else []
    call = [BULK_CALL[start:start + 8] for start in range(0, len(BULK_CALL), 8)] if kind == "call" else []
    return [item for i in range(int(count)) for item in (*pause, f"片段{i} ")] + call


K1_AGENT_ID = "crm40ee9e5jvhsn7ptcg"  # the Kimi+ id of the K1 reasoning model (KIMI_LEGACY_PROTOCOL.md)


class FakeLegacyKimi(FakeKimiBase):
    """A strict stand-in for kimi.moonshot.cn (KIMI_LEGACY_PROTOCOL.md section 10)."""

    PROTOCOL = "legacy"
    START_PATH = "/api/chat"                        # the first authenticated call of an answer
    ANSWER_PATH = r"/api/chat/\w+/completion/stream"  # the call that streams it

    def __init__(self) -> None:
        super().__init__()
        self.research: dict[str, dict] = {}

    def _refresh_token_for(self, user_id: str) -> str:
        self.research.setdefault(user_id, {"remain": 3, "total": 3, "used": 0})
        return super()._refresh_token_for(user_id)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/api/user", self.user)
        app.router.add_post("/api/chat", self.create_chat)
        app.router.add_delete("/api/chat/{chat_id}", self.delete_chat)
        app.router.add_post("/api/chat/{chat_id}/completion/stream", self.completion)
        app.router.add_get("/api/chat/research/usage", self.research_usage)

    def auth_error(self) -> web.Response:
        return kimi_error(401, "auth.token.invalid", "您的授权已过期，请重新登录")

    def _registration_ok(self, body: dict, user_id: str) -> bool:
        if body.get("type") == "image":
            return isinstance(body.get("file_id"), str) and isinstance(body.get("name"), str)
        chat = self.chats.get(body.get("chat_id"))  # documents are registered into the chat they belong to
        return chat is not None and chat.owner == user_id and body.get("file_id") == ""

    async def user(self, request: web.Request) -> web.Response:
        user_id = self._authenticated_user(request)
        if user_id is None:
            return self.auth_error()
        return web.json_response({"id": user_id, "name": "用户1234", "status": "normal"})

    async def create_chat(self, request: web.Request) -> web.Response:
        user_id = self._authenticated_user(request)
        if user_id is None:
            return self.auth_error()
        body = await self._json_body(request)
        if body is None or not isinstance(body.get("name"), str) or not isinstance(body.get("kimiplus_id"), str) \
                or not (body["kimiplus_id"] == "kimi" or re.fullmatch(r"[0-9a-z]{20}", body["kimiplus_id"])):
            return kimi_error(400, "chat.invalid_params", "参数错误")
        chat_id = xid()
        self.chats[chat_id] = Chat(owner=user_id, kimiplus_id=body["kimiplus_id"])
        self.created.append(chat_id)
        return web.json_response({"id": chat_id, "name": body["name"], "created_at": "2024-11-02T08:15:31+08:00"})

    async def delete_chat(self, request: web.Request) -> web.Response:
        user_id = self._authenticated_user(request)
        if user_id is None:
            return self.auth_error()
        chat = self.chats.get(request.match_info["chat_id"])
        if chat is None or chat.owner != user_id or chat.deleted:
            return kimi_error(404, "chat.not_found", "会话不存在")
        if self.hold_deletes is not None:
            await self.hold_deletes.wait()
        chat.deleted = True
        self.deleted.append(request.match_info["chat_id"])
        return web.json_response({})

    async def research_usage(self, request: web.Request) -> web.Response:
        user_id = self._authenticated_user(request)
        if user_id is None:
            return self.auth_error()
        return web.json_response(self.research[user_id])

    async def completion(self, request: web.Request) -> web.StreamResponse:
        user_id = self._authenticated_user(request)
        if user_id is None:
            return self.auth_error()
        chat_id = request.match_info["chat_id"]
        chat = self.chats.get(chat_id)
        if chat is None or chat.deleted:
            return kimi_error(404, "chat.not_found", "会话不存在")
        if chat.owner != user_id:
            return kimi_error(403, "chat.forbidden", "此会话已被禁用")
        body = await self._json_body(request)
        problem = self._completion_problem(body, chat)
        if problem:
            return kimi_error(400, "chat.invalid_params", problem)
        if user_id in self.rate_limited:
            self.refused[user_id] += 1
            return kimi_error(429, "chat.rate_limit", "请求过于频繁", headers={"Retry-After": "7"})
        if chat.streaming:
            return kimi_error(400, "chat.user_stream_pushing", "已有对话流正在输出")
        continuing = body.get("action") == "continue"
        if not continuing:
            chat.question = body["messages"][0]["content"]
            self._record_completion(request, chat_id, user_id, body, chat.question.removesuffix("\n"),
                                    body["use_search"], chat.kimiplus_id == K1_AGENT_ID, body["refs"])
        else:
            self._record_completion(request, chat_id, user_id, body, None, False, False, [])
        segment_id = xid()
        chat.segment_ids.append(segment_id)
        chat.streaming = True
        self._open_stream(user_id)
        left = False
        try:
            return await self._stream(request, self.scenario_in(chat, chat.question), body, chat, segment_id, continuing)
        except (ConnectionError, asyncio.CancelledError):
            left = True
            self.closed_streams.append(chat_id)
            raise
        finally:
            self._close_stream(user_id, chat, left)

    def _completion_problem(self, body: dict | None, chat: Chat) -> str | None:
        if body is None:
            return "body must be a JSON object"
        messages = body.get("messages")
        if not isinstance(messages, list) or len(messages) != 1 or not isinstance(messages[0], dict) \
                or messages[0].get("role") != "user" or not isinstance(messages[0].get("content"), str) \
                or not messages[0]["content"]:
            return "messages must be one user message with string content"
        if body.get("kimiplus_id") != chat.kimiplus_id:
            return "kimiplus_id does not match the chat"
        if body.get("action") == "continue":
            return None if body.get("segment_id") in chat.segment_ids else "unknown segment_id"
        for flag in ("use_search", "use_research", "use_math"):
            if not isinstance(body.get(flag), bool):
                return f"{flag} must be a boolean"
        refs, refs_file = body.get("refs"), body.get("refs_file")
        if not isinstance(refs, list) or not isinstance(refs_file, list) \
                or [entry.get("id") if isinstance(entry, dict) else None for entry in refs_file] != refs:
            return "refs must be a list of file ids, described in refs_file"
        return self._attached_files_problem(refs, chat.owner)

    def _events(self, scenario: str, body: dict, chat: Chat, segment_id: str, continuing: bool) -> list:
        """The scripted stream: dicts are events, numbers are pauses, "DROP" cuts the connection."""
        head = [{"content": body["messages"][0]["content"], "event": "req", "group_id": xid(), "id": segment_id,
                 "refs": []},
                {"event": "resp", "group_id": xid(), "id": xid()},
                {"event": "debug", "message": {"need2search": bool(body.get("use_search")), "search_target": ""}},
                {"event": "zone_set", "zone": {"x": 1}}]
        if body.get("use_search"):
            head += [{"event": "search_plus", "msg": {"type": "start"}},
                     {"event": "search_plus", "msg": {"type": "start_res"}}]
            head += [{"event": "search_plus", "msg": {"successNum": n, "title": title, "type": "get_res", "url": url}}
                     for n, (title, url) in enumerate(SOURCES, 1)]
        if chat.kimiplus_id == K1_AGENT_ID:
            head += [{"event": "k1", "text": text} for text in THINKING]
        answer = [{"event": "cmpl", "idx_s": 0, "idx_z": 0, "text": text, "view": "cmpl"} for text in ANSWER]
        done = [{"event": "rename", "text": "长城简介"}, {"event": "all_done"}]
        error = {"error": {"error_type": "openai.completion.stream", "message": OVERLOADED,
                           "detail": "upstream aborted"}, "event": "error"}
        return {
            "length": lambda: head + [{"event": "cmpl", "text": "第二段" if continuing else "第一段"}]
            + ([] if continuing else [{"event": "length"}]) + done,
            "length_forever": lambda: head + [{"event": "cmpl", "text": "段"}, {"event": "length"}] + done,
            "length_no_all_done": lambda: head + [{"event": "cmpl", "text": "x"}]
            + ([{"event": "all_done"}] if continuing else [{"event": "length"}]),
            "reply": lambda: head + self.reply_script(lambda piece: {"event": "cmpl", "text": piece}) + done,
        }.get(scenario, lambda: render_script(SCENARIOS.get(scenario, PLAIN_SCRIPT), head + [{"event": "done"}], answer,
                                              1, done, [error], lambda piece: {"event": "cmpl", "text": piece}))()

    def _bulk_events(self, pieces: list) -> list:
        return [p if isinstance(p, float) else {"event": "cmpl", "text": p} for p in pieces] + [{"event": "all_done"}]

    async def _stream(self, request, scenario, body, chat, segment_id, continuing) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        pieces = bulk_pieces(scenario)
        script = self._bulk_events(pieces) if pieces else self._events(scenario, body, chat, segment_id, continuing)
        for item in script:
            if item == "DROP":
                request.transport.abort()
                return response
            if isinstance(item, (int, float)):
                await asyncio.sleep(item)
                continue
            await self._write(response, b"data: " + orjson.dumps(item) + b"\n\n", scenario == "split")
        await response.write_eof()
        return response


def kimi_error(status: int, error_type: str, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error_type": error_type, "message": message}, status=status, headers=headers)


FakeKimi = FakeLegacyKimi

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "kimi-connect-2026")


def fixture_bytes(name: str) -> bytes:
    with open(os.path.join(FIXTURES, name), "rb") as file:
        return file.read()


CATALOG = orjson.loads(fixture_bytes("GetAvailableModels.response.json"))  # the real 2026-09 catalog
SUBSCRIPTION_STATS = orjson.loads(fixture_bytes("GetSubscriptionStats.response.json"))  # a real 2026-09 answer
TOO_LONG_EVENT = orjson.loads(fixture_bytes("block_exception_token_too_long.event.json"))  # a full chat (2026-08)
UNAUTHENTICATED = orjson.loads(fixture_bytes("unauthenticated_401.body.json"))  # Kimi's 401 (2026-10)
CATALOG_ENTRIES = {entry["id"]: entry for entry in CATALOG["availableModels"]}
CAPTURE = fixture_bytes("chat_k26_thinking.bin")  # a real answer stream, replayed byte for byte
CAPTURE_CHAT = "19fdf14e-bd52-88b5-8000-092152992fca"
CAPTURE_ASSISTANT = "19fdf190-9d52-8775-8000-0a21a81a2788"
# what the capture says, decoded by hand from its 69 frames
CAPTURE_ANSWER = '```json\n{"id":"probe_net","calls":[{"tool":"list","path":"C:/temp"}]}\n```'
CAPTURE_THINKING = ("The user wants me to reply with ONLY the specified JSON inside a ```json code block, "
                    "and nothing else at all. I should comply exactly as requested.")
CITE = "\ue3a0cite\ue3a3web_search:1#0\ue3a3web_search:1#1\ue3a8"
UUID_KINDS = {"chat": "09", "message": "0a", "file": "0000"}
OVERLOADED_FOR_FREE = "Too many people are chatting with Kimi right now. Subscribe to enter a priority queue!"


def kimi_uuid(kind: str, sequence=itertools.count(0x774)) -> str:
    """Kimi's 2026 ids: the time in ms, a sequence, and a kind marker (chat, message, file)."""
    stamp = f"{(int(time.time() * 1000) << 4) | 2:012x}"[-12:]
    prefix = UUID_KINDS[kind]
    return (f"{stamp[:8]}-{stamp[8:]}-8{next(sequence) % 0x1000:03x}-8000-"
            f"{prefix}{secrets.token_hex(6)[:12 - len(prefix)]}")


def connect_frame(message: dict, flags: int = 0) -> bytes:
    payload = orjson.dumps(message)
    return bytes((flags,)) + len(payload).to_bytes(4, "big") + payload


def connect_end(error: dict | None = None) -> bytes:
    return connect_frame({"error": error} if error else {}, flags=0x02)


def pick(body: dict, snake: str, camel: str):
    """Protobuf JSON accepts both spellings of a field name."""
    return body[snake] if snake in body else body.get(camel)


def connect_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status)


class FakeConnectKimi(FakeKimiBase):
    """A strict stand-in for www.kimi.com's Connect-RPC API as it is in 2026 (KIMI_CONNECT_2026.md,
    over KIMI_CONNECT_PROTOCOL.md section 11): UUID ids, the RefreshToken RPC with rotation, the
    real model catalog, /apiv2-files/ uploads, stages around think blocks."""

    PROTOCOL = "connect"
    ISSUER = "account"  # the Local Storage tokens; the kimi-auth cookie's issuer (user-center) is refused since 2026-07
    CHAT = "/apiv2/kimi.gateway.chat.v1.ChatService/Chat"
    REFRESH_RPC = "/api/account.gateway.v1.AuthService/RefreshToken"
    START_PATH = CHAT
    ANSWER_PATH = CHAT

    def __init__(self) -> None:
        super().__init__()
        self.access_ttl = 900.0               # 2026 access tokens live 15 minutes
        self.catalog: dict | None = CATALOG   # None: GetAvailableModels fails
        self.catalog_calls: list[str] = []    # the user each catalog call came from ("" when anonymous)
        self.unauthenticated_streams = 0      # how many next Chat streams fail in-stream with `unauthenticated`
        self.rpc_refresh = True               # False: the RefreshToken RPC does not exist (404)
        self.rest_refresh = True              # False: GET /api/auth/token/refresh does not exist (404)
        self.rpc_refreshes = 0
        self.new_uploads = True               # False: /apiv2-files/file/upload does not exist (404)
        self.presign_uploads = False          # the pre-2026 upload flow, not seen in 2026 captures
        self.streams = 0
        self.cancels: list[tuple[str, str]] = []  # (chat, message) of each CancelChat
        self.model_option = True              # False: this host refuses options.model (www.kimi.com, 2026-08)
        self.numeric_statuses = False         # parse progress as numbers (3: success), as some clients see it
        self.quota_calls = 0

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(self.CHAT, self.chat)
        app.router.add_post(self.REFRESH_RPC, self.refresh_rpc)
        app.router.add_post("/apiv2/kimi.gateway.config.v1.ConfigService/GetAvailableModels", self.models)
        app.router.add_post("/apiv2/kimi.gateway.order.v1.SubscriptionService/GetSubscription", self.subscription)
        app.router.add_post("/apiv2/kimi.chat.v1.ChatService/DeleteChat", self.delete_chat)
        app.router.add_post("/apiv2/kimi.gateway.chat.v1.ChatService/CancelChat", self.cancel_chat)
        app.router.add_post("/apiv2/kimi.gateway.membership.v2.MembershipService/GetSubscriptionStats", self.stats)
        app.router.add_post("/apiv2-files/file/upload", self.upload)
        app.router.add_post("/apiv2-files/kimi.gateway.file.v1.FileService/GetFileParseProgress", self.parse_progress)

    def auth_error(self) -> web.Response:
        return web.json_response(UNAUTHENTICATED, status=401)

    UNARY = re.compile(r"/apiv2/(?!kimi\.gateway\.chat\.v1\.ChatService/Chat$).*|/apiv2-files/.+Service/.*")

    @web.middleware
    async def _record_and_inject_faults(self, request: web.Request, handler):
        """Unary calls without a JSON body type get 415 and an empty body, before the token is looked at."""
        if self.UNARY.fullmatch(request.path) and request.content_type != "application/json":
            self.calls.append((request.method, request.path))
            return web.Response(status=415)
        return await super()._record_and_inject_faults(request, handler)

    def new_chat_id(self) -> str:
        return kimi_uuid("chat")

    def new_file_id(self) -> str:
        return kimi_uuid("file")

    # -- tokens ----------------------------------------------------------------------------------

    async def refresh(self, request: web.Request) -> web.Response:
        if not self.rest_refresh:
            return web.Response(status=404, text="404 page not found")
        return await super().refresh(request)

    async def refresh_rpc(self, request: web.Request) -> web.Response:
        """Plain JSON (no Connect envelope, no Authorization); both tokens rotate, and the spent
        refresh token is refused from then on."""
        if not self.rpc_refresh:
            return web.Response(status=404, text="404 page not found")
        self.rpc_refreshes += 1
        body = await self._json_body(request)
        token = pick(body, "refresh_token", "refreshToken") if body else None
        if request.headers.get("Connect-Protocol-Version") != "1" or not isinstance(token, str):
            return connect_error(400, "invalid_argument", "refresh_token is required")
        user_id = self.users.get(token)
        self.refreshes[user_id or token] += 1
        if user_id is None or token in self.spent or token in self.banned:
            return connect_error(401, "unauthenticated", "invalid claims")
        self.spent.add(token)
        return web.json_response({"accessToken": self.issue_access_token(user_id, self.access_ttl),
                                  "refreshToken": self._refresh_token_for(user_id)})

    # -- unary RPCs ------------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        self.catalog_calls.append(self._authenticated_user(request) or "")
        if self.catalog is None or await self._json_body(request) is None:
            return connect_error(503, "unavailable", "")
        return web.json_response(self.catalog)

    async def subscription(self, request: web.Request) -> web.Response:
        user_id = self._authenticated_user(request)
        if user_id is None:
            return self.auth_error()
        return web.json_response({"subscription": {"userId": user_id, "userName": "kimi_user", "email": ""}})

    async def cancel_chat(self, request: web.Request) -> web.Response:
        """Stops the answer being written (an answer already done is left as it is)."""
        user_id = self._authenticated_user(request)
        if user_id is None:
            return self.auth_error()
        body = await self._json_body(request) or {}
        chat_id, message_id = pick(body, "chat_id", "chatId"), pick(body, "message_id", "messageId")
        chat = self.chats.get(chat_id)
        if chat is None or chat.owner != user_id or chat.deleted:
            return connect_error(404, "not_found", "chat not found")
        if message_id != chat.last_message:
            return connect_error(400, "invalid_argument", "not the answer being written")
        self.cancels.append((chat_id, message_id))
        chat.streaming = False
        return web.json_response({})

    async def stats(self, request: web.Request) -> web.Response:
        user_id = self._authenticated_user(request)
        if user_id is None:
            return self.auth_error()
        self.quota_calls += 1
        if (await self._json_body(request) or {}).get("domain") != "DOMAIN_KIMI":
            return connect_error(400, "invalid_argument", "unsupported domain")
        return web.json_response(SUBSCRIPTION_STATS)

    async def delete_chat(self, request: web.Request) -> web.Response:
        user_id = self._authenticated_user(request)
        if user_id is None:
            return self.auth_error()
        body = await self._json_body(request)
        chat_id = pick(body, "chat_id", "chatId") if body else None
        chat = self.chats.get(chat_id)
        if chat is None or chat.owner != user_id or chat.deleted:
            return connect_error(404, "not_found", "chat not found")
        if self.hold_deletes is not None:
            await self.hold_deletes.wait()
        chat.deleted = True
        self.deleted.append(chat_id)
        return web.json_response({})

    # -- files -----------------------------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.Response:
        """One multipart part named `file`, with a file name and a type (read by aiohttp's own parser)."""
        if not self.new_uploads:
            return web.Response(status=404, text="404 page not found")
        user_id = self._authenticated_user(request)
        if user_id is None:
            return self.auth_error()
        if request.content_type != "multipart/form-data" or request.content_length is None:
            return connect_error(400, "invalid_argument", "multipart body with a length expected")
        reader = await request.multipart()
        part = await reader.next()
        if part is None or part.name != "file" or not part.filename or "Content-Type" not in part.headers:
            return connect_error(400, "invalid_argument", "a file part is required")
        data, name, mime = await part.read(), part.filename, part.headers["Content-Type"]
        if await reader.next() is not None or not data:
            return connect_error(400, "invalid_argument", "exactly one non-empty file part")
        file_id = self.new_file_id()
        self.uploads[file_id] = data
        self.files[file_id] = {"id": file_id, "name": name, "owner": user_id, "size": len(data), "object_name": file_id,
                               "type": "image" if mime.startswith("image/") else "file", "status": "PROCESSING",
                               "mime": mime}
        return web.json_response({"file": {"id": file_id, "meta": {
            "name": name, "contentType": mime, "sizeBytes": str(len(data)), "checksum": hashlib.sha256(data).hexdigest(),
            "type": "FILE_TYPE_IMAGE" if mime.startswith("image/") else "FILE_TYPE_DOCUMENT"}, "blob": {}}})

    async def parse_progress(self, request: web.Request) -> web.Response:
        """PROCESSING on the first poll, then SUCCESS (FAILED for parse_fail, never done for slow_parse)."""
        user_id = self._authenticated_user(request)
        if user_id is None:
            return self.auth_error()
        self.parse_calls += 1
        body = await self._json_body(request)
        ids = pick(body, "file_ids", "fileIds") if body else None
        if request.headers.get("Connect-Protocol-Version") != "1" or not isinstance(ids, list) \
                or not all(self.files.get(i, {}).get("owner") == user_id for i in ids):
            return connect_error(404, "not_found", "file not found")
        progresses = []
        for file_id in ids:
            file = self.files[file_id]
            if "slow_parse" not in file["name"]:
                if file["status"] in ("PROCESSING", "initialized"):
                    file["status"] = "polled"
                elif file["status"] == "polled":
                    file["status"] = "parsed" if "parse_fail" not in file["name"] else "failed"
            status = ({"parsed": 3, "failed": 4} if self.numeric_statuses else
                      {"parsed": "PROCESS_STATUS_SUCCESS", "failed": "PROCESS_STATUS_FAILED"}).get(file["status"])
            progresses.append({"fileId": file_id, "status": status or ("PROCESS_STATUS_PROCESSING", 2)[self.numeric_statuses]})
        return web.json_response({"progresses": progresses})

    def _attached_files_problem(self, ids: list, user_id: str) -> str | None:
        for file_id in ids:
            file = self.files.get(file_id) if isinstance(file_id, str) else None
            if file is None or file["owner"] != user_id:
                return "unknown file"
            if file["status"] != "parsed" and (file["type"] == "file" or "mime" in file):
                return "the file is not processed yet"
        return None

    # -- chat ------------------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        user_id = self._authenticated_user(request)
        if user_id is None:
            return self.auth_error()
        if request.content_type != "application/connect+json":
            return connect_error(415, "invalid_argument", "bad content type")
        raw = await request.read()
        problem, body = self._chat_problem(raw, user_id)
        if user_id in self.rate_limited:
            self.refused[user_id] += 1
            return web.json_response({"code": "resource_exhausted", "message": ""}, status=429,
                                     headers={"Retry-After": "7"})
        response = web.StreamResponse(headers={"Content-Type": "application/connect+json"})
        await response.prepare(request)
        if problem:
            await response.write(connect_end({"code": problem[0], "message": problem[1]}))
            return response
        message = body["message"]
        prompt = message["blocks"][0]["text"]["content"]
        if self.unauthenticated_streams:  # refused before any chat exists
            self.unauthenticated_streams -= 1
            await response.write(connect_end({"code": "unauthenticated", "message": "token is expired"}))
            return response
        chat_id = pick(body, "chat_id", "chatId")
        if chat_id in self.chats and self.chats[chat_id].streaming:  # a guess at the code real Kimi uses
            await response.write(connect_end({"code": "failed_precondition", "message": "the chat is still answering"}))
            return response
        scenario = self.scenario_in(self.chats.get(chat_id) or Chat(owner=user_id), prompt)
        new_chat = chat_id is None and scenario != "overloaded_first"  # overload refusals come before a chat exists
        if scenario.startswith("capture") and chat_id is None:
            chat_id = CAPTURE_CHAT  # the captured answer names its chat; this user owns it now
        elif new_chat:
            chat_id = self.new_chat_id()
        if new_chat:
            self.chats[chat_id] = Chat(owner=user_id, question=prompt, scenario=scenario)
            self.created.append(chat_id)
        chat = self.chats.get(chat_id) or Chat(owner=user_id)
        search = any(tool.get("type") == "TOOL_TYPE_SEARCH" for tool in body.get("tools") or ())
        thinking = body["options"]["thinking"]
        files = [block["file"]["id"] for block in message["blocks"][1:]]
        self._record_completion(request, chat_id, user_id, body, prompt, search, thinking, files)
        self._open_stream(user_id)
        chat.streaming = True
        left = False
        try:
            if scenario.startswith("capture"):
                chat.last_message = CAPTURE_ASSISTANT
                await self._replay_capture(response, scenario)
            else:
                await self._stream(response, scenario, chat_id, chat, prompt, search, thinking, request,
                                   new_chat, pick(message, "parent_id", "parentId") or chat_id)
        except (ConnectionError, asyncio.CancelledError):
            left = True
            self.closed_streams.append(chat_id)
            raise
        finally:
            self._close_stream(user_id, chat, left)
        return response

    def _chat_problem(self, raw: bytes, user_id: str) -> tuple[tuple[str, str] | None, dict | None]:
        """What real Kimi would refuse: an unframed body, a malformed message, a model that is not
        in the catalog or options it does not offer, an unknown chat."""
        if len(raw) < 5 or raw[0] != 0 or int.from_bytes(raw[1:5], "big") != len(raw) - 5:
            return ("invalid_argument", "request must be one Connect envelope"), None
        try:
            body = orjson.loads(raw[5:])
        except orjson.JSONDecodeError:
            return ("invalid_argument", "malformed JSON"), None
        if not isinstance(body, dict):
            return ("invalid_argument", "malformed request"), None
        problem = self._model_problem(body) or self._message_problem(body, user_id)
        return (("invalid_argument", problem) if problem else self._chat_id_problem(body, user_id)), body

    def _model_problem(self, body: dict) -> str | None:
        options = body.get("options")
        if not isinstance(options, dict) or not isinstance(options.get("thinking"), bool):
            return "options.thinking is required"
        if "model" in options and not self.model_option:
            return f"unknown model {options['model']}"  # a guess at the words real Kimi uses
        # without options.model, the scenario's entry (as the web app on www.kimi.com asked in 2026-08)
        entry = CATALOG_ENTRIES.get(options["model"]) if "model" in options else \
            next((e for e in CATALOG["availableModels"] if e["scenario"] == body.get("scenario")), None)
        if entry is None:
            return "unknown model"  # a guess at what real Kimi does with a key or a made-up id
        message = body.get("message")
        if body.get("scenario") != entry["scenario"] or not isinstance(message, dict) \
                or message.get("scenario", entry["scenario"]) != entry["scenario"]:
            return "the scenario does not match the model"
        effort = pick(options, "reasoning_effort", "reasoningEffort")
        offered = [option["effort"] for option in entry["reasoningEffortOptions"]]
        if effort is not None and (effort not in offered or options["thinking"] != (effort != "REASONING_EFFORT_NONE")):
            return "this model does not offer that reasoning effort"
        kimiplus_id = pick(body, "kimiplus_id", "kimiplusId")
        if entry.get("kimiPlusId") and (kimiplus_id != entry["kimiPlusId"]
                                        or pick(body, "agent_mode", "agentMode") != entry["agentMode"]):
            return "this model needs its kimiplus_id and agent_mode"
        if not isinstance(body.get("tools", []), list):
            return "bad tools"
        return None

    def _message_problem(self, body: dict, user_id: str) -> str | None:
        message = body["message"]
        if message.get("role") != "user":
            return "a user message is required"
        blocks = message.get("blocks")
        if not isinstance(blocks, list) or not blocks or not all(isinstance(b, dict) for b in blocks):
            return "blocks are required"
        text = blocks[0].get("text")
        if not isinstance(text, dict) or not isinstance(text.get("content"), str) or not text["content"]:
            return "the first block is the text"
        files = [block.get("file") for block in blocks[1:]]
        if not all(isinstance(f, dict) and f.get("status") == "PROCESS_STATUS_SUCCESS" for f in files) \
                or self._attached_files_problem([f["id"] for f in files], user_id):
            return "unknown or unprocessed file block"
        return None

    def _chat_id_problem(self, body: dict, user_id: str) -> tuple[str, str] | None:
        chat_id, parent_id = pick(body, "chat_id", "chatId"), pick(body["message"], "parent_id", "parentId")
        if chat_id == "" or parent_id == "" or (parent_id is not None and chat_id is None):
            return "invalid_argument", "empty chat_id or parent_id"
        if chat_id is not None:
            chat = self.chats.get(chat_id)
            if chat is None or chat.deleted or chat.owner != user_id:
                return "not_found", "chat not found"
            if parent_id is not None and parent_id != chat.last_message:
                return "invalid_argument", "parent_id is not the last message"
        return None

    async def _replay_capture(self, response: web.StreamResponse, scenario: str) -> None:
        """The real stream, unchanged: whole, in random pieces, or a byte at a time."""
        if scenario == "capture":
            await response.write(CAPTURE)
        else:
            sizes = random.Random(len(self.completions))
            start = 0
            while start < len(CAPTURE):
                end = start + (1 if scenario == "capture_bytes" else sizes.randint(1, 300))
                await response.write(CAPTURE[start:end])
                if sizes.random() < 0.2:
                    await asyncio.sleep(0)
                start = end
        await response.write_eof()

    def _frames(self, scenario: str, chat_id: str, chat: Chat, prompt: str, search: bool, thinking: bool,
                new_chat: bool, parent_id: str) -> list:
        """The scripted stream, in the 2026 shape: bytes are envelopes, numbers are pauses, "DROP"
        cuts the connection (a script without an end-stream envelope just stops)."""
        offset = iter(range(1, 10_000))
        user_id, assistant_id = kimi_uuid("message"), kimi_uuid("message")
        chat.last_message = assistant_id
        self.streams += 1

        def event(**fields) -> bytes:
            return connect_frame({**fields, "eventOffset": next(offset)})

        def text(content: str, block: str = "4", op: str = "append") -> bytes:
            mask = "block.text.content" if op == "append" else "block.text"
            return event(op=op, mask=mask, block={"id": block, "parentId": "", "text": {"content": content}})

        def stage(status: str) -> list[bytes]:
            named = {"name": "STAGE_NAME_THINKING", "status": status}
            return [event(op="set", mask="block.multiStage", block={"id": "1", "parentId": "", "messageId": assistant_id,
                                                                     "multiStage": {"stages": [named]}}),
                    event(op="set", mask="block.stage", block={"id": "2", "parentId": "1", "messageId": assistant_id,
                                                               "stage": named})]

        head = [connect_frame({"heartbeat": {}})]
        if new_chat:
            head += [event(op="set", chat={"id": chat_id, "name": "未命名会话"})]
        head += [event(op="set", mask="chat.lastRequest", chat={"id": chat_id, "lastRequest": {"options": {"thinking": thinking}}})]
        if new_chat:
            head += [event(op="set", message={"id": chat_id, "role": "system", "status": "MESSAGE_STATUS_COMPLETED"})]
        assistant = {"id": assistant_id, "parentId": user_id, "role": "assistant", "status": "MESSAGE_STATUS_GENERATING"}
        if self.streams % 2 == 0:
            del assistant["role"]  # protobuf JSON may drop an enum left at its default
        head += [event(op="set", mask="message", message={"id": user_id, "parentId": parent_id, "role": "user",
                       "status": "MESSAGE_STATUS_COMPLETED", "blocks": [{"messageId": "", "text": {"content": prompt}}]}),
                 event(op="set", mask="message", message=assistant)]
        if thinking:
            head += stage("STAGE_STATUS_START") + [
                event(op="set", mask="block.think", block={"id": "3", "parentId": "2", "think": {"content": THINKING[0]}}),
                event(op="append", mask="block.think.content", block={"id": "3", "parentId": "2", "think": {"content": THINKING[1]}}),
            ] + stage("STAGE_STATUS_END")
        answer = [text("", op="set")] + [text(piece) for piece in ANSWER]
        if search:
            results = [{"searchResult": {"id": f"r{n}", "base": {"title": title, "url": url, "siteName": "示例"},
                                         "refIndex": f"web_search:1#{n}"}} for n, (title, url) in enumerate(SOURCES)]
            head += [event(op="set", block={"id": "5", "parentId": "", "tool": {
                         "toolCallId": "web_search_0", "name": "web_search", "status": "STATUS_PENDING"}}),
                     event(op="append", mask="block.tool.args", block={"id": "5", "tool": {"args": "{\"queries\":[\"x\"]}"}}),
                     event(op="set", mask="block.tool.contents,block.tool.status",
                           block={"id": "5", "tool": {"status": "STATUS_DONE", "contents": results}}),
                     event(op="set", mask="message.refs.searchChunks", message={"id": assistant_id, "refs": {"searchChunks": results}})]
            # the citation marker arrives split across two deltas
            answer = [text("", op="set"), text(ANSWER[0] + CITE[:9]), text(CITE[9:] + ANSWER[1]), text(ANSWER[2])]
        ref = f"<REF>cite✦tools://web_search:1#0:~:text={ANSWER[0]}...✦tools://web_search:1#1:~:text=x</REF>"
        tail = [event(op="set", mask="chat.name", chat={"id": chat_id, "name": "长城简介"}),
                event(op="set", notification={"type": "TYPE_MODEL_DEGRADE", "message": "High demand.", "paywall": {}}),
                event(op="set", mask="message.status", message={"id": assistant_id, "status": "MESSAGE_STATUS_COMPLETED"}),
                event(done={}), connect_end()]
        overloaded = {"code": "internal", "message": OVERLOADED}
        return {
            "done_then_error": lambda: head + answer + [event(done={}), event(error={"code": "internal", "message": OVERLOADED}), connect_end()],
            "overloaded_first": lambda: [connect_frame({"heartbeat": {}}), connect_end({"code": "resource_exhausted", "details": [
                {"debug": {"reason": "REASON_SERVER_OVERLOADED_FOR_FREE_USER",
                           "localizedMessage": {"locale": "en-US", "message": OVERLOADED_FOR_FREE}}}]})],
            "paywall": lambda: head + [connect_end({"code": "resource_exhausted", "details": [{"debug": {"paywall": {}}}]})],
            "unavailable": lambda: head + [connect_end({"code": "unavailable"})],
            "denied": lambda: head + [connect_end({"code": "permission_denied", "message": "agent mode needs a plan"})],
            "invalid": lambda: head + [connect_end({"code": "invalid_argument"})],
            "empty": lambda: head + tail,
            "staged": lambda: head + stage("STAGE_STATUS_START") + [
                event(op="set", mask="block.think", block={"id": "3", "parentId": "2", "think": {"content": THINKING[0]}})]
                + stage("STAGE_STATUS_END") + [text(ANSWER[0], "4", "set"),
                event(op="set", mask="block.think", block={"id": "6", "parentId": "2", "think": {"content": THINKING[1]}}),
                text(ANSWER[1], "4")] + tail,
            "two_blocks": lambda: head + [text("第一块", "4", "set"), text("第二块", "7", "set")] + tail,
            "too_long": lambda: head + [event(**TOO_LONG_EVENT), connect_end()],
            "too_long_later": lambda: head + [text(ANSWER[0], op="set"), event(**TOO_LONG_EVENT)],
            "ref_citations": lambda: head + [text(ANSWER[0], op="set"), text(ref[:13]), text(ref[13:40]), text(ref[40:]),
                                             text(ANSWER[1])] + tail,
            "reply": lambda: head + [text("", op="set")] + self.reply_script(text) + tail,
        }.get(scenario, lambda: render_script(SCENARIOS.get(scenario, PLAIN_SCRIPT), head, answer, 2, tail,
                                              [connect_end(overloaded)], text))()

    def _bulk_frames(self, chat_id: str, pieces: list) -> list:
        return [connect_frame({"op": "set", "chat": {"id": chat_id, "name": "未命名会话"}})] + \
            [p if isinstance(p, float) else connect_frame({"op": "append", "mask": "block.text.content",
                                                            "block": {"id": "4", "text": {"content": p}}})
             for p in pieces] + [connect_frame({"done": {}}), connect_end()]

    async def _stream(self, response, scenario, chat_id, chat, prompt, search, thinking, request,
                      new_chat, parent_id) -> None:
        pieces = bulk_pieces(scenario)
        script = self._bulk_frames(chat_id, pieces) if pieces else self._frames(scenario, chat_id, chat, prompt,
                                                                                search, thinking, new_chat, parent_id)
        for item in script:
            if item == "DROP":
                request.transport.abort()
                return
            if isinstance(item, (int, float)):
                await asyncio.sleep(item)
                continue
            if item[0] == 0 and not pieces:  # Kimi's heartbeats come between the events
                await response.write(connect_frame({"heartbeat": {}}))
            await self._write(response, item, scenario == "split")
        await response.write_eof()


FAKES = {"legacy": FakeLegacyKimi, "connect": FakeConnectKimi}


async def start_server(config: kp.Config) -> web.AppRunner:
    """The proxy, started as main() starts it, in this test's loop."""
    runner = web.AppRunner(kp.create_app(config), **kp.runner_options(config))
    await runner.setup()
    await web.TCPSite(runner, config.host, config.port).start()
    return runner


async def start_app(app: web.Application, **options) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handler_cancellation=True, **options)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


BOTH_DIALECTS = pytest.mark.dialects(*FAKES)


def pytest_generate_tests(metafunc):
    """Tests that talk to a fake Kimi run against the default (connect) dialect; those that
    exercise what the dialects do differently are marked to run against both."""
    if "dialect" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("dialects")
        metafunc.parametrize("dialect", marker.args if marker else ["connect"])


@pytest.fixture
async def kimi(dialect):
    fake = FAKES[dialect]()
    runner, fake.url = await start_app(fake.app())
    yield fake
    await runner.cleanup()


@pytest.fixture(autouse=True)
def no_retry_backoff(monkeypatch):
    """Calls to Kimi are retried at once in tests (the backoff is a courtesy to the real Kimi)."""
    monkeypatch.setattr(kp, "RETRY_BACKOFF", (0.0, 0.0))


CLIENT_LOGGERS = ("anthropic", "openai", "httpx", "httpcore", "agents")


@pytest.fixture(autouse=True)
def logs_hold_no_secrets(request, caplog):
    """Every test that talks to a fake Kimi runs with DEBUG logging, and afterwards its logs must
    hold no token, key or message content."""
    if "kimi" not in request.fixturenames:
        yield
        return
    fake = request.getfixturevalue("kimi")
    caplog.set_level(logging.DEBUG)
    yield
    # (caplog.text would hold only this teardown's records: read every phase of the test)
    # every logger's records, aiohttp's and asyncio's too, with any traceback they carry; only the
    # client SDKs' own debug lines (which show what the test sent) are not the proxy's
    formatter = logging.Formatter()
    logged = "\n".join(formatter.format(record) for when in ("setup", "call", "teardown")
                        for record in caplog.get_records(when) if not record.name.startswith(CLIENT_LOGGERS))
    secrets_seen = [secret for secret in (*fake.users, *fake.access, *fake.proxy_secrets)
                    if len(secret) >= 8 and secret in logged]
    assert not secrets_seen, "a token or key reached the log"
    # (a short ASCII prompt, such as a fuzzer's "000000", could match log text by chance)
    prompts = {c["prompt"] for c in fake.completions
               if c["prompt"] and (len(c["prompt"]) >= 16 or (len(c["prompt"]) >= 6 and not c["prompt"].isascii()))}
    assert not [prompt for prompt in prompts if prompt in logged], "message content reached the log"


@pytest.fixture
async def start_proxy(kimi):
    """Start the real proxy (as main() would) against the fake, with settings as env variables."""
    runners = []

    async def start(**settings: str) -> str:
        env = {"KIMI_BASE_URL": kimi.url, "KIMI_PROTOCOL": kimi.PROTOCOL, "HOST": "127.0.0.1", "PORT": "0", **settings}
        kimi.proxy_secrets += kp.split_list(settings.get("API_KEYS", "")) + kp.split_list(settings.get("KIMI_TOKENS", ""))
        runner = await start_server(kp.Config.from_env(env))
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def proxy(start_proxy):
    return await start_proxy()


@pytest.fixture
def token(kimi):
    return kimi.add_user()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session


@pytest.fixture
async def sdk(proxy, token):
    client = openai.AsyncOpenAI(base_url=proxy + "/v1", api_key=token, max_retries=0)
    yield client
    await client.close()


LIMITS = kp.Limits(1000, 100 * 2**20)


def chat_request(body: dict) -> kp.Request:
    return kp.parse_chat(body, LIMITS)


def to_question(body: dict, dialect=kp.LegacyKimi) -> kp.Question:
    """A Chat Completions body planned for a dialect, as the server does (legacy: 20-character chat
    ids and links in the web app's markup)."""
    return kp.plan(chat_request(body), dialect)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def post_chat(http, proxy, token, **body):
    body.setdefault("model", "kimi")
    body.setdefault("messages", user("用一句话介绍长城"))
    return await http.post(proxy + "/v1/chat/completions", json=body, headers=auth(token))


def sse_payloads(raw: bytes) -> list:
    """The data payloads of an SSE body, checking the framing rules OpenAI clients rely on."""
    assert b"\r" not in raw
    assert raw.endswith(b"\n\n")
    payloads = []
    for block in raw.decode().split("\n\n")[:-1]:
        assert "\n" not in block, block
        if block.startswith(":"):
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        payloads.append(data if data == "[DONE]" else json.loads(data))
    assert payloads[-1] == "[DONE]"
    return payloads[:-1]


def content_of(chunks: list[dict], field: str = "content") -> str:
    return "".join(c["choices"][0]["delta"].get(field) or "" for c in chunks if c.get("choices"))


async def stream_chunks(http, proxy, token, **body) -> tuple[aiohttp.ClientResponse, bytes, list]:
    response = await post_chat(http, proxy, token, stream=True, **body)
    raw = await response.read()
    return response, raw, sse_payloads(raw) if response.status == 200 else []


def assert_envelope(body: dict, status_code: str | None = None, param: str | None = None) -> dict:
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if status_code is not None:
        assert error["code"] == status_code
    if param is not None:
        assert error["param"] == param
    return error


# ---------------------------------------------------------------------------------------------
# Pure translation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, expected", [
    ("kimi", {"agent_id": None, "search": False, "research": False, "reasoning": False, "math": False, "silent": False}),
    ("kimi-search", {"search": True, "research": False}),
    ("kimi-research", {"search": True, "research": True}),
    ("kimi-k1", {"reasoning": True, "agent_id": None}),
    ("kimi-thinking", {"reasoning": True}),
    ("kimi-math", {"math": True, "search": False}),
    ("kimi-search-silent", {"search": True, "silent": True}),
    ("KIMI-K1-SEARCH", {"search": True, "reasoning": True}),
    ("gpt-4o-mini", {"agent_id": None, "search": False}),
    ("search0000000000000a", {"agent_id": "search0000000000000a", "search": False}),  # a Kimi+ agent id
])
def test_model_flags(model, expected):
    flags = kp.model_flags(model, kp.LegacyKimi)
    assert {key: flags[key] for key in expected} == expected


@pytest.mark.parametrize("model, kimiplus_id", [
    ("kimi", "kimi"), ("kimi-k1-search", K1_AGENT_ID), ("kimi-thinking", K1_AGENT_ID),
    ("crm40ee9e5jvhsn7pt00", "crm40ee9e5jvhsn7pt00"),
])
def test_legacy_kimiplus_id(model, kimiplus_id):
    assert kp.to_kimiplus_id(to_question({"model": model, "messages": user("hi")})) == kimiplus_id


def test_use_search_adds_search_and_keeps_other_flags():
    question = to_question({"model": "kimi-k1-silent", "use_search": True, "messages": user("hi")})
    assert (question.search, question.reasoning, question.silent) == (True, True, True)


@pytest.mark.parametrize("messages, prompt", [
    (user("你好"), "你好\n"),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}], "hi\nthere\n"),
    (user("hi\nthere"), "hi\nthere\n"),
    ([{"role": "system", "content": "你是一个翻译助手"}, {"role": "user", "content": "把 hello 翻译成中文"},
      {"role": "assistant", "content": "你好", "reasoning_content": "想一想"},
      {"role": "user", "content": "再翻译 https://example.com/a 这个页面的标题"}],
     'system:你是一个翻译助手\nuser:把 hello 翻译成中文\nassistant:你好\nsystem:关注用户最新的消息\n'
     'user:再翻译 <url id="" type="url" status="" title="" wc="">https://example.com/a</url> 这个页面的标题\n'),
    ([{"role": "developer", "content": "be brief"}, {"role": "user", "content": "see http://a.example/x."}],
     'system:be brief\nsystem:关注用户最新的消息\nuser:see <url id="" type="url" status="" title="" wc="">'
     'http://a.example/x</url>.\n'),
    ([{"role": "user", "content": "weather?"}, {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]},
      {"role": "tool", "tool_call_id": "c", "content": "18C"}],
     "user:weather?\ntool:18C\nsystem:关注用户最新的消息\n"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "text", "text": "a"}]},
      {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
     "user:a\nassistant:b\nsystem:关注用户最新的消息\nuser:c\n"),
    ([{"role": "system", "content": "http://not.wrapped"}, {"role": "user", "content": "x"}],
     "system:http://not.wrapped\nsystem:关注用户最新的消息\nuser:x\n"),
])
def test_folding_history_into_one_kimi_message(messages, prompt):
    body = {"model": "kimi", "messages": messages}
    untouched = copy.deepcopy(body)
    assert to_question(body).prompt + "\n" == prompt
    assert to_question(body, kp.ConnectKimi).prompt == re.sub(r'<url id="" type="url" status="" title="" wc="">(.*?)</url>', r"\1", prompt[:-1])
    assert body == untouched  # the caller's data is never mutated


def test_continuing_a_chat_sends_only_the_newest_user_message():
    question = to_question({"conversation_id": "cr7p4ik2lq1s5t0u9v3g",
                       "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "第二个问题"}]})
    assert (question.prompt, question.chat_id, question.keep) == ("第二个问题", "cr7p4ik2lq1s5t0u9v3g", True)


@pytest.mark.parametrize("body, param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": [], "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": ["text"]}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "   "}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, "messages[0].content[0]"),
    *[({"messages": [{"role": "user", "content": [{"type": "text", "text": "read this"}, part]}]}, "messages[0].content[1]")
      for part in ({"type": "image_url", "image_url": {"url": "ftp://files.example.com/a.png"}},
                   {"type": "image_url", "image_url": "file:///etc/passwd"},
                   {"type": "image_url", "image_url": {"detail": "high"}},
                   {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not-base64@@"}},
                   {"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}},
                   {"type": "file", "file": {"file_id": "file-abc123"}},
                   {"type": "file", "file_url": {"url": "gopher://x"}},
                   {"type": "file", "file": "nothing"})],
    ({"messages": user("hi"), "model": 5}, "model"),
    ({"messages": user("hi"), "stream": "yes"}, "stream"),
    ({"messages": user("hi"), "n": 2}, "n"),
    ({"messages": user("hi"), "tool_choice": "required"}, "tool_choice"),
    ({"messages": user("hi"), "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"messages": user("hi"), "temperature": "hot"}, "temperature"),
    ({"messages": user("hi"), "max_tokens": 1.5}, "max_tokens"),
    ({"messages": user("hi"), "stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"messages": user("hi"), "conversation_id": "abc"}, "conversation_id"),
    ({"messages": user("hi"), "conversation_id": 12}, "conversation_id"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "conversation_id": "cr7p4ik2lq1s5t0u9v3g"}, "messages"),
])
def test_bad_requests_name_the_field(body, param):
    with pytest.raises(kp.ProxyError) as caught:
        to_question(body)
    assert (caught.value.status, caught.value.param) == (400, param)


def test_lenient_fields_are_accepted():
    body = {"messages": user("hi"), "model": None, "n": 1, "stream": None, "stream_options": None, "temperature": 0.2,
            "top_p": 1, "max_tokens": 5, "tool_choice": "auto", "tools": [{}], "top_k": 40, "conversation_id": None,
            "stream_options_extra": {}}
    wanted = chat_request(body)
    assert (wanted.model, wanted.stream, wanted.tools, to_question(body).keep) == ("kimi", False, None, False)
    assert chat_request({"messages": user("hi"), "stream_options": {"include_usage": True}}).options.include_usage is False


def test_chat_bodies_become_neutral_requests():
    wanted = chat_request({"model": "kimi-x", "stream": True, "stream_options": {"include_usage": True},
                           "reasoning_effort": "low", "use_search": True, "conversation_id": "new",
                           "tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False,
                           "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "q"},
                                        {"role": "assistant", "content": None, "tool_calls": [
                                            {"id": "c1", "type": "function",
                                             "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                                        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "18C"}]},
                                        {"role": "user", "content": [{"type": "text", "text": "and"},
                                                                     {"type": "image_url", "image_url": "https://a.example/i.png"}]}]})
    assert (wanted.model, wanted.stream, wanted.reasoning_effort, wanted.search, wanted.conversation) == \
        ("kimi-x", True, "low", True, "new")
    assert wanted.options == kp.ChatOptions(include_usage=True, deprecated=False)
    assert (list(wanted.tools.functions), wanted.tools.required, wanted.tools.only, wanted.tools.parallel) == \
        (["get_weather"], True, None, False)
    system, question, called, result, last = wanted.turns
    assert (system.role, system.text, system.where) == ("system", "be brief", "messages[0]")
    assert called.calls == (kp.Call("c1", "get_weather", '{"city":"Paris"}'),)
    assert (result.role, result.text, result.call_id) == ("tool", "18C", "c1")
    assert (last.text, last.has_attachment, [a.url for a in last.attachments]) == ("and", True, ["https://a.example/i.png"])


@pytest.mark.parametrize("kimi_class, kept, wrapped", [
    (kp.LegacyKimi, "cr7p4ik2lq1s5t0u9v3g", '<url id="" type="url" status="" title="" wc="">https://a.example</url>'),
    (kp.ConnectKimi, "19fdf14e-bd52-88b5-8000-092152992fca", "https://a.example"),
])
def test_a_request_is_planned_in_the_dialects_terms(kimi_class, kept, wrapped):
    body = {"model": "kimi-search", "messages": [{"role": "user", "content": "see https://a.example"}]}
    question = to_question(body, kimi_class)
    assert (question.prompt, question.search, question.chat_id, question.keep) == (f"see {wrapped}", True, None, False)
    continued = to_question({**body, "conversation_id": kept}, kimi_class)
    assert (continued.chat_id, continued.keep) == (kept, True)
    other = "19fdf14e-bd52-88b5-8000-092152992fca" if kimi_class is kp.LegacyKimi else "cr7p4ik2lq1s5t0u9v3g"
    with pytest.raises(kp.ProxyError) as caught:
        to_question({**body, "conversation_id": other}, kimi_class)
    assert (caught.value.status, caught.value.param) == (400, "conversation_id")
    assert kimi_class.chat_id_shape in caught.value.message


def fixed_ids(monkeypatch) -> None:
    monkeypatch.setattr(kp, "new_completion_id", lambda: "chatcmpl-1")
    monkeypatch.setattr(kp.time, "time", lambda: 1700000000.5)


HEAD = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"kimi","system_fingerprint":null'


def choice(delta: bytes, finish: bytes = b"null", tail: bytes = b',"usage":null}\n\n') -> bytes:
    return HEAD + b',"choices":[{"index":0,"delta":' + delta + b',"logprobs":null,"finish_reason":' + finish + b"}]" + tail


def test_sse_output_byte_for_byte(monkeypatch):
    fixed_ids(monkeypatch)
    stream = kp.ChatStream(chat_request({"model": "kimi", "stream": True, "stream_options": {"include_usage": True},
                                         "messages": user("q")}))
    out = b"".join([stream.opening(), stream.feed([kp.Part(kp.REASONING, "想"), kp.Part(kp.TEXT, '你好 "x"\n')]),
                    stream.feed([kp.Part(kp.FINISH, kp.STOP), kp.Part(kp.USAGE, kp.Usage(1, 3))]),
                    stream.error(kp.upstream_error("Kimi stopped")), stream.end()])
    assert out == (choice(b'{"role":"assistant","content":""}') + choice('{"reasoning_content":"想"}'.encode())
                   + choice('{"content":"你好 \\"x\\"\\n"}'.encode()) + choice(b"{}", b'"stop"')
                   + HEAD + b',"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":3,"total_tokens":4}}\n\n'
                   + b'data: {"error":{"message":"Kimi stopped","type":"server_error","param":null,'
                     b'"code":"upstream_error"}}\n\n'
                   + b"data: [DONE]\n\n")


def test_sse_output_without_usage_and_with_a_kept_chat(monkeypatch):
    fixed_ids(monkeypatch)
    stream = kp.ChatStream(chat_request({"model": "kimi", "stream": True, "messages": user("q")}))
    out = stream.feed([kp.Part(kp.CHAT, "19fdf14e-bd52-88b5-8000-092152992fca"), kp.Part(kp.TEXT, "a"),
                       kp.Part(kp.FINISH, kp.LENGTH_FINISH), kp.Part(kp.USAGE, kp.Usage(0, 0))])
    assert stream.headers == {"X-Conversation-Id": "19fdf14e-bd52-88b5-8000-092152992fca"}
    head = HEAD + b',"conversation_id":"19fdf14e-bd52-88b5-8000-092152992fca"'
    assert out == b"".join(head + b',"choices":[{"index":0,"delta":' + delta + b',"logprobs":null,"finish_reason":'
                           + finish + b"}]}\n\n" for delta, finish in (
                               (b'{"role":"assistant","content":""}', b"null"), (b'{"content":"a"}', b"null"),
                               (b"{}", b'"length"')))


@pytest.mark.parametrize("events, parts", [
    ([kp.Event(kp.CHAT, "c1"), kp.Event(kp.REASONING, "想"), kp.Event(kp.TEXT, "答"), kp.DONE_EVENT],
     [kp.Part(kp.CHAT, "c1"), kp.Part(kp.REASONING, "想"), kp.Part(kp.TEXT, "答"), kp.Part(kp.FINISH, kp.STOP),
      kp.Part(kp.USAGE, kp.Usage(1, 2, 1))]),
    ([kp.Event(kp.SOURCE, "T", "https://u", 1), kp.Event(kp.TEXT, "a"), kp.LENGTH_EVENT, kp.DONE_EVENT,
      kp.Event(kp.TEXT, "x")],
     [kp.Part(kp.TEXT, "【检索 1】 [T](https://u)\n"), kp.Part(kp.CITATION, kp.Citation(1, "T", "https://u")),
      kp.Part(kp.TEXT, "\na"), kp.Part(kp.FINISH, kp.LENGTH_FINISH), kp.Part(kp.USAGE, kp.Usage(1, 8))]),
])
def test_events_become_answer_parts(events, parts):
    question = to_question({"model": "kimi", "messages": user("q"), "conversation_id": "new"})
    translator = kp.AnswerTranslator(question)
    assert translator.parts_of(events) == parts
    assert translator.finished == any(event.kind == kp.DONE for event in events[:4])


async def test_answer_parts_fold_into_one_completion(monkeypatch):
    fixed_ids(monkeypatch)
    wanted = chat_request({"model": "kimi-thinking", "messages": user("q")})

    async def batches():
        yield [kp.Part(kp.CHAT, "c1"), kp.Part(kp.REASONING, "想"), kp.Part(kp.TEXT, "你")]
        yield [kp.Part(kp.TEXT, "好"), kp.Part(kp.CITATION, kp.Citation(1, "T", "https://u")),
               kp.Part(kp.FINISH, kp.STOP), kp.Part(kp.USAGE, kp.Usage(1, 0))]

    answer = await kp.fold_answer(batches())
    assert answer == kp.Answer(text="你好", reasoning="想", citations=(kp.Citation(1, "T", "https://u"),),
                               finish=kp.STOP, usage=kp.Usage(1, 0), chat_id="c1")
    assert kp.to_chat_body(answer, wanted) == {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "kimi-thinking",
        "system_fingerprint": None, "conversation_id": "c1",
        "usage": {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1},
        "choices": [{"index": 0, "logprobs": None, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "你好", "refusal": None, "reasoning_content": "想"}}]}
    calls = (kp.Call("abc", "f", '{"x":1}'),)
    called = kp.to_chat_body(kp.Answer(calls=calls, finish=kp.CALLS_FINISH), wanted)
    assert called["choices"][0]["finish_reason"] == "tool_calls"
    assert called["choices"][0]["message"]["content"] is None
    assert called["choices"][0]["message"]["tool_calls"] == [
        {"id": "call_abc", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}}]


@pytest.mark.parametrize("chunks", [
    [b'data: {"event":"cmpl","text":"\xe9\x95\xbf\xe5\x9f\x8e"}\n\n'],
    [b'data: {"event":"cmpl","text":"\xe9', b'\x95\xbf\xe5', b'\x9f\x8e"}\n', b'\n'],
    [b'da', b'ta:{"event":"cmpl","text":"\xe9\x95\xbf\xe5\x9f\x8e"}\r\n\r\n'],
    [b': comment\n\nevent: message\nid: 1\ndata: {"event":"cmpl",\ndata: "text":"\xe9\x95\xbf\xe5\x9f\x8e"}\n\n'],
])
def test_sse_decoder_survives_any_split(chunks):
    decoder = kp.SSEDecoder()
    payloads = [payload for chunk in chunks for payload in decoder.feed(chunk)]
    assert [orjson.loads(p) for p in payloads] == [{"event": "cmpl", "text": "长城"}]


@pytest.mark.parametrize("payload, event", [
    (b'{"event":"cmpl","text":"a"}', kp.Event(kp.TEXT, "a")),
    (b'{"event":"cmpl","text":""}', None),
    (b'{"event":"k1","text":"t"}', kp.Event(kp.REASONING, "t")),
    (b'{"event":"search_plus","msg":{"type":"get_res","title":"T","url":"https://u"}}', kp.Event(kp.SOURCE, "T", "https://u", 1)),
    (b'{"event":"search_plus","msg":{"type":"get_res","url":"https://u"}}', kp.Event(kp.SOURCE, "https://u", "https://u", 1)),
    (b'{"event":"search_plus","msg":{"type":"start"}}', None),
    (b'{"event":"zone_set"}', None),
    (b'not json', None),
    (b'[1,2]', None),
])
def test_legacy_payloads(payload, event):
    assert kp.from_legacy_payload(payload, kp.SegmentState()) == event


def test_a_legacy_error_payload_is_raised_with_kimis_message():
    with pytest.raises(kp.ProxyError) as caught:
        kp.from_legacy_payload(b'{"event":"error","error":{"message":"too long"}}', kp.SegmentState())
    assert (caught.value.status, caught.value.code) == (502, "upstream_error") and "too long" in caught.value.message


def test_refresh_time_uses_jwt_exp():
    now = 1_000_000.0
    short = make_jwt({"exp": int(now) + 10})
    long = make_jwt({"exp": int(now) + 86400})
    assert kp.renewal_time(short, now, 0) == pytest.approx(8.0)
    assert kp.renewal_time(make_jwt({"exp": int(now) + 900}), now, 0) == pytest.approx(900 - 180)
    assert kp.renewal_time(long, now, 0) == pytest.approx(86400 - 240)
    assert kp.renewal_time("opaque-token", now, 0) == kp.ACCESS_TOKEN_DEFAULT_LIFETIME


def test_kimi_request_bodies_take_only_their_own_size():
    # a thousand open answers each hold their request body; orjson's own bytes would take 4 KB each
    value = {"messages": [{"role": "user", "content": "hi\n"}], "use_search": True}
    tracemalloc.start()
    try:
        bodies = [kp.json_body(value) for _ in range(200)]
        traced, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert bodies[0] == orjson.dumps(value) and type(bodies[0]) is bytes
    assert traced < 200 * 256


@pytest.mark.parametrize("env, variable", [
    ({"PORT": "abc"}, "PORT"), ({"PORT": "70000"}, "PORT"), ({"UPSTREAM_READ_TIMEOUT": "0"}, "UPSTREAM_READ_TIMEOUT"),
    ({"MAX_BODY_MB": "lots"}, "MAX_BODY_MB"), ({"KIMI_PROTOCOL": "grpc"}, "KIMI_PROTOCOL"),
    ({"KIMI_BASE_URL": "kimi.moonshot.cn"}, "KIMI_BASE_URL"), ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
    ({"KEEPALIVE_INTERVAL": "-1"}, "KEEPALIVE_INTERVAL"), ({"UPSTREAM_CONNECT_TIMEOUT": "nan"}, "UPSTREAM_CONNECT_TIMEOUT"),
])
def test_invalid_settings_name_the_variable(env, variable):
    with pytest.raises(kp.ConfigError, match=variable):
        kp.Config.from_env(env)


def test_default_settings():
    config = kp.Config.from_env({})
    assert (config.host, config.port, config.kimi_base_url, config.kimi_protocol) == \
        ("0.0.0.0", 8000, "https://www.kimi.com", "connect")
    legacy = kp.Config.from_env({"KIMI_PROTOCOL": "legacy"})
    assert (legacy.kimi_base_url, legacy.kimi_protocol) == ("https://kimi.moonshot.cn", "legacy")
    assert kp.Config.from_env({"KIMI_PROTOCOL": "legacy", "KIMI_BASE_URL": "http://x:1/"}).kimi_base_url == "http://x:1"
    assert (config.upstream_read_timeout, config.max_body_mb, config.keepalive_interval, config.log_level) == \
        (120, 20, 15, "INFO")
    assert config.body_read_timeout == 30


# ---------------------------------------------------------------------------------------------
# Chat through the proxy: non-streaming
# ---------------------------------------------------------------------------------------------


@BOTH_DIALECTS
async def test_sdk_chat_completion(sdk, kimi, token):
    reply = await sdk.chat.completions.create(model="kimi", messages=user("用一句话介绍长城"))
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert abs(reply.created - time.time()) < 300 and reply.model == "kimi"
    choice = reply.choices[0]
    assert (choice.index, choice.message.role, choice.finish_reason) == (0, "assistant", "stop")
    assert choice.message.content == "".join(ANSWER)
    usage = reply.usage
    assert usage.prompt_tokens == kp.estimate_tokens(len("用一句话介绍长城".encode()))
    assert usage.completion_tokens == kp.estimate_tokens(len("".join(ANSWER).encode()))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # what Kimi saw: one chat, created and then deleted, asked the question as this user
    await kimi.wait_deleted(1)
    assert kimi.created == kimi.deleted and kimi.live_chats == []
    [completion] = kimi.completions
    assert (completion["user"], completion["prompt"]) == (kimi.user_of(token), "用一句话介绍长城")
    assert completion["headers"]["X-Traffic-Id"] == kimi.user_of(token)
    assert kimi.refreshes[kimi.user_of(token)] == 1


@pytest.mark.dialects("legacy")
async def test_legacy_request_shape(sdk, kimi):
    await sdk.chat.completions.create(model="kimi", messages=user("用一句话介绍长城"))
    [completion] = kimi.completions
    assert completion["body"] == {"kimiplus_id": "kimi", "messages": [{"role": "user", "content": "用一句话介绍长城\n"}],
                                  "refs": [], "refs_file": [], "use_math": False, "use_research": False,
                                  "use_search": False, "extend": {"sidebar": True}}
    assert completion["headers"]["Referer"] == f"{kimi.url}/chat/{completion['chat']}"


@pytest.mark.dialects("connect")
async def test_connect_request_shape(sdk, kimi):
    await sdk.chat.completions.create(model="kimi", messages=user("用一句话介绍长城"))
    await sdk.chat.completions.create(model="kimi-k2.6-thinking-search", messages=user("q"))
    plain, rich = kimi.completions
    assert plain["body"] == {"scenario": "SCENARIO_CHAT", "tools": [],
                             "options": {"thinking": False, "model": "k2d6-chat", "reasoning_effort": "REASONING_EFFORT_NONE"},
                             "message": {"role": "user", "scenario": "SCENARIO_CHAT",
                                         "blocks": [{"message_id": "", "text": {"content": "用一句话介绍长城"}}]}}
    headers = plain["headers"]
    assert headers["Content-Type"] == "application/connect+json" and headers["Connect-Protocol-Version"] == "1"
    assert headers["X-Msh-Device-Id"] == "7651000000000000001" and headers["X-Msh-Platform"] == "web"
    assert headers["X-Msh-Version"] and headers["X-Language"] == "en-US" and headers["R-Timezone"]
    assert "Chrome/14" in headers["User-Agent"]
    assert rich["body"]["tools"] == [{"type": "TOOL_TYPE_SEARCH", "search": {}}]
    assert rich["body"]["options"] == {"thinking": True, "model": "k2d6-chat", "reasoning_effort": "REASONING_EFFORT_LOW"}
    # the same keys and spelling as the web app's own request (a real capture)
    web_app = orjson.loads(fixture_bytes("Chat.request.web.json"))
    assert set(plain["body"]["options"]) <= set(web_app["options"]) and set(plain["body"]) <= set(web_app)
    assert set(plain["body"]["message"]) <= set(web_app["message"])


async def test_raw_completion_shape(http, proxy, token):
    response = await post_chat(http, proxy, token, model="anything-goes", max_tokens=5, temperature=0.2,
                               top_k=40, metadata={"a": "b"}, chat_template_kwargs={"x": 1})
    assert response.status == 200 and response.content_type == "application/json"
    body = await response.json()
    assert body["model"] == "anything-goes" and body["object"] == "chat.completion"
    assert body["choices"][0]["logprobs"] is None and body["choices"][0]["message"]["refusal"] is None
    assert "conversation_id" not in body and "X-Conversation-Id" not in response.headers
    assert response.headers["X-Request-ID"]


async def test_body_without_content_type_is_read_as_json(http, proxy, token):
    body = orjson.dumps({"model": "kimi", "messages": user("hi")})
    response = await http.post(proxy + "/v1/chat/completions", data=body,
                               headers={**auth(token), "Content-Type": "application/x-www-form-urlencoded"})
    assert response.status == 200
    assert (await response.json())["object"] == "chat.completion"


async def test_chat_path_without_v1(http, proxy, token):
    response = await http.post(proxy + "/chat/completions", json={"messages": user("hi")}, headers=auth(token))
    assert response.status == 200


@BOTH_DIALECTS
async def test_search_adds_citations_unless_silent(sdk, kimi):
    reply = await sdk.chat.completions.create(model="kimi-search", messages=user("今天杭州天气怎么样"))
    citations = "".join(f"【检索 {n}】 [{title}]({url})\n" for n, (title, url) in enumerate(SOURCES, 1))
    # the Connect dialect's answer carries citation markers, which become references to the lines
    references = "[^1][^2]" if kimi.PROTOCOL == "connect" else ""
    assert reply.choices[0].message.content == citations + "\n" + ANSWER[0] + references + "".join(ANSWER[1:])
    silent = await sdk.chat.completions.create(model="kimi-search-silent", messages=user("今天杭州天气怎么样"))
    assert silent.choices[0].message.content == "".join(ANSWER)
    assert [c["search"] for c in kimi.completions] == [True, True]


@BOTH_DIALECTS
async def test_use_search_field_turns_search_on(sdk, kimi):
    await sdk.chat.completions.create(model="kimi", messages=user("q"), extra_body={"use_search": True})
    assert kimi.completions[0]["search"] is True


@BOTH_DIALECTS
async def test_k1_thinking_becomes_reasoning_content(sdk, kimi, http, proxy, token):
    reply = await sdk.chat.completions.create(model="kimi-k1", messages=user("9.11和9.9哪个大"))
    message = reply.choices[0].message
    assert message.model_extra["reasoning_content"] == "".join(THINKING)
    assert message.content == "".join(ANSWER)
    assert kimi.completions[0]["thinking"] is True
    _, _, chunks = await stream_chunks(http, proxy, token, model="kimi-k1")
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert not any(d.get("content") and d.get("reasoning_content") for d in deltas)
    kinds = [("reasoning" if d.get("reasoning_content") else "content") for d in deltas if d.get("reasoning_content") or d.get("content")]
    assert kinds == ["reasoning"] * len(THINKING) + ["content"] * len(ANSWER)


@pytest.mark.dialects("legacy")
async def test_math_and_agent_models(sdk, kimi):
    await sdk.chat.completions.create(model="kimi-math", messages=user("1+1"))
    await sdk.chat.completions.create(model="search0000000000000a", messages=user("hi"))
    math, agent = kimi.completions
    assert math["body"]["use_math"] is True
    assert agent["body"]["kimiplus_id"] == "search0000000000000a" and agent["body"]["use_search"] is False
    assert kimi.chats[agent["chat"]].kimiplus_id == "search0000000000000a"


@pytest.mark.dialects("legacy")
async def test_research_checks_the_quota(sdk, kimi, token):
    await sdk.chat.completions.create(model="kimi-research", messages=user("深入研究"))
    assert kimi.completions[0]["body"]["use_research"] is True and kimi.completions[0]["body"]["use_search"] is True
    assert ("GET", "/api/chat/research/usage") in kimi.calls
    kimi.research[kimi.user_of(token)] = {"remain": 0, "total": 3, "used": 3}
    with pytest.raises(openai.RateLimitError) as caught:
        await sdk.chat.completions.create(model="kimi-research", messages=user("深入研究"))
    assert caught.value.body["code"] == "insufficient_quota"
    assert len(kimi.created) == 1  # no chat was opened for the refused request


@BOTH_DIALECTS
async def test_multi_turn_history_is_folded_for_kimi(sdk, kimi):
    messages = [{"role": "system", "content": "你是一个翻译助手"}, {"role": "user", "content": "把 hello 翻译成中文"},
                {"role": "assistant", "content": "你好"}, {"role": "user", "content": "再翻译 https://example.com/a"}]
    await sdk.chat.completions.create(model="kimi", messages=messages)
    # links are marked up the way the legacy web app did; the Connect dialect sends them as they are
    link = ('<url id="" type="url" status="" title="" wc="">https://example.com/a</url>'
            if kimi.PROTOCOL == "legacy" else "https://example.com/a")
    assert kimi.completions[0]["prompt"] == (
        f'system:你是一个翻译助手\nuser:把 hello 翻译成中文\nassistant:你好\nsystem:关注用户最新的消息\nuser:再翻译 {link}')


@BOTH_DIALECTS
async def test_array_content_reaches_kimi_like_the_string(sdk, kimi):
    await sdk.chat.completions.create(model="kimi", messages=[{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}])
    await sdk.chat.completions.create(model="kimi", messages=user("hi\nthere"))
    assert kimi.completions[0]["body"] == kimi.completions[1]["body"]


# ---------------------------------------------------------------------------------------------
# Chat through the proxy: streaming
# ---------------------------------------------------------------------------------------------


@BOTH_DIALECTS
async def test_stream_framing_and_chunks(http, proxy, token, kimi):
    response, raw, chunks = await stream_chunks(http, proxy, token)
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-cache" and response.headers["X-Accel-Buffering"] == "no"
    assert "Content-Length" not in response.headers
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert len({c["created"] for c in chunks}) == 1 and isinstance(chunks[0]["created"], int)
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "kimi" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert sum("role" in c["choices"][0]["delta"] for c in chunks) == 1
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert content_of(chunks) == "".join(ANSWER)
    assert not any("usage" in c for c in chunks)
    await kimi.wait_deleted(1)


async def test_stream_with_accept_json_is_still_sse(http, proxy, token):
    response = await http.post(proxy + "/v1/chat/completions", json={"stream": True, "messages": user("hi")},
                               headers={**auth(token), "Accept": "application/json"})
    assert response.headers["Content-Type"].startswith("text/event-stream")
    sse_payloads(await response.read())


async def test_stream_usage_chunk(http, proxy, token):
    _, _, chunks = await stream_chunks(http, proxy, token, stream_options={"include_usage": True})
    *answer, last = chunks
    assert last["choices"] == [] and last["usage"]["total_tokens"] == \
        last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"] > 0
    assert all(c["usage"] is None for c in answer)


async def test_sdk_stream_helper_accumulates(sdk):
    async with sdk.chat.completions.stream(model="kimi-k1", messages=user("hi")) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.role == "assistant"
    assert final.choices[0].message.content == "".join(ANSWER)


async def test_sdk_streaming_iterates(sdk):
    stream = await sdk.chat.completions.create(model="kimi-search", messages=user("hi"), stream=True)
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert text.endswith(ANSWER[-1]) and text.startswith("【检索 1】")


@BOTH_DIALECTS
async def test_split_lines_and_characters_come_out_whole(http, proxy, token, sdk):
    _, _, chunks = await stream_chunks(http, proxy, token, messages=user("scenario:split"))
    assert content_of(chunks) == "".join(ANSWER)
    reply = await sdk.chat.completions.create(model="kimi", messages=user("scenario:split"))
    assert reply.choices[0].message.content == "".join(ANSWER)


async def test_keepalive_while_kimi_is_silent(start_proxy, http, token, kimi):
    proxy = await start_proxy(KEEPALIVE_INTERVAL="0.2")
    response = await post_chat(http, proxy, token, stream=True, messages=user("scenario:slow"))
    assert response.status == 200
    raw = await response.read()
    assert raw.startswith(b": keep-alive\n\n")
    assert content_of(sse_payloads(raw)) == "".join(ANSWER)


@pytest.mark.dialects("legacy")
async def test_length_is_continued_in_both_modes(http, proxy, token, kimi, sdk):
    _, _, chunks = await stream_chunks(http, proxy, token, messages=user("scenario:length"))
    assert content_of(chunks) == "第一段第二段" and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    reply = await sdk.chat.completions.create(model="kimi", messages=user("scenario:length"))
    assert reply.choices[0].message.content == "第一段第二段"
    first, continuation = kimi.completions[:2]
    assert continuation["chat"] == first["chat"]
    assert continuation["body"] == {"segment_id": continuation["body"]["segment_id"], "action": "continue",
                                    "messages": [{"role": "user", "content": " "}], "kimiplus_id": "kimi",
                                    "extend": {"sidebar": True}}
    assert len(kimi.created) == 2
    await kimi.wait_deleted(2)


@pytest.mark.dialects("legacy")
async def test_length_is_continued_at_most_three_times(sdk, kimi):
    reply = await sdk.chat.completions.create(model="kimi", messages=user("scenario:length_forever"))
    assert reply.choices[0].message.content == "段" * 4 and reply.choices[0].finish_reason == "length"
    assert len(kimi.completions) == 4


@pytest.mark.dialects("legacy")
async def test_length_without_all_done_still_continues(sdk, kimi):
    reply = await sdk.chat.completions.create(model="kimi", messages=user("scenario:length_no_all_done"))
    assert reply.choices[0].message.content == "xx" and reply.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------------------------
# Errors: real statuses before the stream starts, one error event after
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"model": "kimi"}', 400, "messages"),
    (b'{"messages": []}', 400, "messages"),
    (b'{"messages": [{"role": "user", "content": [{"type": "video"}]}]}', 400, "messages[0].content[0].type"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 3}', 400, "n"),
])
async def test_client_mistakes_are_400_envelopes(http, proxy, token, kimi, body, status, param):
    response = await http.post(proxy + "/v1/chat/completions", data=body, headers=auth(token))
    assert response.status == status and response.content_type == "application/json"
    assert_envelope(await response.json(), param=param)
    assert kimi.calls == []  # nothing reached Kimi


async def test_sdk_sees_typed_errors(sdk, proxy, kimi):
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(model="kimi", messages=user("hi"), n=2)
    assert caught.value.body["param"] == "n"
    wrong_key = openai.AsyncOpenAI(base_url=proxy + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        await wrong_key.chat.completions.create(model="kimi", messages=user("hi"))
    assert caught.value.body["code"] == "invalid_api_key" and caught.value.request_id
    await wrong_key.close()


@BOTH_DIALECTS
async def test_missing_and_rejected_tokens_are_401(http, proxy, kimi):
    response = await http.post(proxy + "/v1/chat/completions", json={"messages": user("hi")})
    assert response.status == 401
    assert_envelope(await response.json(), "invalid_api_key")
    response = await post_chat(http, proxy, "not-a-kimi-token")
    assert response.status == 401
    assert_envelope(await response.json(), "invalid_api_key")
    kimi.banned.add(banned := kimi.add_user())
    response = await post_chat(http, proxy, banned, stream=True)
    assert response.status == 401
    assert kimi.created == []


async def test_unknown_path_wrong_method_and_big_body(http, start_proxy, token):
    proxy = await start_proxy(MAX_BODY_MB="0.01")
    response = await http.post(proxy + "/v1/nope")
    assert response.status == 404
    assert_envelope(await response.json())
    response = await http.get(proxy + "/v1/chat/completions")
    assert response.status == 405 and "POST" in response.headers["Allow"]
    assert_envelope(await response.json(), "method_not_allowed")
    response = await post_chat(http, proxy, token, messages=user("x" * 20_000))
    assert response.status == 413
    assert_envelope(await response.json(), "request_too_large")


@BOTH_DIALECTS
@pytest.mark.parametrize("stream", [False, True])
async def test_kimi_error_before_any_text_is_502(http, proxy, token, kimi, stream):
    response = await post_chat(http, proxy, token, stream=stream, messages=user("scenario:error_first"))
    assert response.status == 502 and response.content_type == "application/json"
    assert "Kimi 现在有点累了" in assert_envelope(await response.json())["message"]
    await kimi.wait_deleted(1)


@BOTH_DIALECTS
async def test_kimi_error_mid_answer(http, proxy, token, kimi, sdk):
    response = await post_chat(http, proxy, token, stream=True, messages=user("scenario:error"))
    raw = await response.read()
    assert response.status == 200
    *chunks, error = sse_payloads(raw)  # the last payload before [DONE] is the error event
    assert content_of(chunks) == ANSWER[0]
    assert "Kimi 现在有点累了" in assert_envelope(error)["message"]
    stream = await sdk.chat.completions.create(model="kimi", messages=user("scenario:error"), stream=True)
    with pytest.raises(openai.APIError) as caught:
        async for _ in stream:
            pass
    assert not isinstance(caught.value, openai.APIStatusError) and "Kimi 现在有点累了" in caught.value.message
    with pytest.raises(openai.InternalServerError) as caught:  # non-streaming: 502 with Kimi's message
        await sdk.chat.completions.create(model="kimi", messages=user("scenario:error"))
    assert caught.value.status_code == 502 and "Kimi 现在有点累了" in caught.value.message
    await kimi.wait_deleted(3)


@BOTH_DIALECTS
@pytest.mark.parametrize("scenario", ["drop", "no_all_done"])
async def test_stream_cut_after_text_ends_with_error_event(http, proxy, token, kimi, scenario):
    response = await post_chat(http, proxy, token, stream=True, messages=user(f"scenario:{scenario}"))
    assert response.status == 200
    *chunks, error = sse_payloads(await response.read())
    assert content_of(chunks).startswith(ANSWER[0])
    assert_envelope(error, "upstream_error")
    await kimi.wait_deleted(1)


@BOTH_DIALECTS
async def test_stream_cut_before_text_is_502(http, proxy, token, kimi):
    response = await post_chat(http, proxy, token, stream=True, messages=user("scenario:drop_first"))
    assert response.status == 502
    assert_envelope(await response.json(), "upstream_error")
    await kimi.wait_deleted(1)


@BOTH_DIALECTS
async def test_read_timeouts(http, start_proxy, token, kimi):
    proxy = await start_proxy(UPSTREAM_READ_TIMEOUT="0.3")
    response = await post_chat(http, proxy, token, stream=True, messages=user("scenario:stall"))
    assert response.status == 504
    assert_envelope(await response.json(), "upstream_timeout")
    response = await post_chat(http, proxy, token, stream=True, messages=user("scenario:stall_mid"))
    assert response.status == 200
    *chunks, error = sse_payloads(await response.read())
    assert content_of(chunks) == ANSWER[0]
    assert_envelope(error, "upstream_timeout")
    response = await post_chat(http, proxy, token, messages=user("scenario:stall_mid"))
    assert response.status == 504
    await kimi.wait_deleted(3)


async def test_kimi_5xx_is_retried_then_502(http, proxy, token, kimi):
    kimi.fail("POST", kimi.START_PATH, 503, times=1)
    response = await post_chat(http, proxy, token)
    assert response.status == 200
    assert kimi.calls.count(("POST", kimi.START_PATH)) == 2
    kimi.fail("POST", kimi.ANSWER_PATH, 500, times=3)
    response = await post_chat(http, proxy, token, stream=True)
    assert response.status == 502
    assert_envelope(await response.json(), "upstream_error")
    assert len(kimi.completions) == 1  # the three failed tries never reached the stream
    await kimi.wait_deleted(len(kimi.created))
    assert kimi.live_chats == []


@pytest.mark.dialects("legacy")
async def test_kimi_4xx_is_502_with_its_message(http, proxy, token, kimi):
    kimi.fail("POST", r"/api/chat/\w+/completion/stream", 400, body={"error_type": "chat.forbidden", "message": "此会话已被禁用"})
    response = await post_chat(http, proxy, token)
    assert response.status == 502
    assert "此会话已被禁用" in assert_envelope(await response.json())["message"]
    await kimi.wait_deleted(1)


async def test_unreachable_kimi_is_502(http, start_proxy, kimi, token):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    proxy = await start_proxy(KIMI_BASE_URL=f"http://127.0.0.1:{closed_port}")
    response = await post_chat(http, proxy, token, stream=True)
    assert response.status == 502
    assert_envelope(await response.json(), "upstream_error")


@BOTH_DIALECTS
async def test_rate_limit_is_429_with_retry_after(http, proxy, kimi, token):
    kimi.rate_limited.add(kimi.user_of(token))
    response = await post_chat(http, proxy, token, stream=True)
    assert response.status == 429 and response.headers["Retry-After"] == "7"
    assert_envelope(await response.json(), "rate_limit_exceeded")
    await kimi.wait_deleted(len(kimi.created))
    assert kimi.live_chats == []


# ---------------------------------------------------------------------------------------------
# Tokens: rotation, caching, refresh
# ---------------------------------------------------------------------------------------------


@BOTH_DIALECTS
async def test_a_rejected_token_hands_over_to_the_next(http, proxy, kimi):
    good = kimi.add_user()
    kimi.banned.add(bad := kimi.add_user())
    for _ in range(4):  # whichever token the turn starts with, the answer comes from the good one
        response = await post_chat(http, proxy, f"{bad},{good}", stream=True)
        assert response.status == 200
        assert content_of(sse_payloads(await response.read())) == "".join(ANSWER)
    assert {c["user"] for c in kimi.completions} == {kimi.user_of(good)}
    assert 1 <= kimi.refreshes[kimi.user_of(bad)] <= 4 and kimi.refreshes[kimi.user_of(good)] == 1
    response = await post_chat(http, proxy, f"{bad},not-a-token")
    assert response.status == 401


@BOTH_DIALECTS
async def test_a_rate_limited_token_hands_over_to_the_next(http, proxy, kimi):
    good, limited = kimi.add_user(), kimi.add_user()
    kimi.rate_limited.add(kimi.user_of(limited))
    for _ in range(2):
        response = await post_chat(http, proxy, f"{limited},{good}")
        assert response.status == 200
    assert {c["user"] for c in kimi.completions} == {kimi.user_of(good)}
    await kimi.wait_deleted(len(kimi.created))  # the limited attempt's chat is deleted too
    assert kimi.live_chats == []


async def test_tokens_are_spread_over_requests(http, proxy, kimi):
    tokens = [kimi.add_user() for _ in range(3)]
    for _ in range(6):
        assert (await post_chat(http, proxy, " , ".join(tokens))).status == 200
    assert Counter(c["user"] for c in kimi.completions) == {kimi.user_of(t): 2 for t in tokens}


@BOTH_DIALECTS
async def test_access_token_is_cached_and_refreshed_once_when_cold(http, proxy, kimi, token):
    replies = await asyncio.gather(*(post_chat(http, proxy, token) for _ in range(10)))
    assert [r.status for r in replies] == [200] * 10
    assert kimi.refreshes[kimi.user_of(token)] == 1  # single flight for the cold token
    assert (await post_chat(http, proxy, token)).status == 200
    assert kimi.refreshes[kimi.user_of(token)] == 1


@BOTH_DIALECTS
async def test_access_token_is_renewed_before_it_expires(http, proxy, kimi, token):
    kimi.access_ttl = 1
    assert (await post_chat(http, proxy, token)).status == 200
    await asyncio.sleep(1.05)
    assert (await post_chat(http, proxy, token)).status == 200
    assert kimi.refreshes[kimi.user_of(token)] == 2
    if kimi.PROTOCOL == "connect":  # by the RefreshToken RPC, which rotates the refresh token
        assert kimi.rpc_refreshes == 2 and ("GET", "/api/auth/token/refresh") not in kimi.calls
        assert token in kimi.spent  # only the newest refresh token works now


@BOTH_DIALECTS
async def test_an_access_token_kimi_rejects_is_refreshed_and_the_call_retried(http, proxy, kimi, token):
    assert (await post_chat(http, proxy, token)).status == 200
    kimi.revoke_access_tokens()
    assert (await post_chat(http, proxy, token, stream=True)).status == 200
    assert kimi.refreshes[kimi.user_of(token)] == 2
    assert kimi.calls.count(("POST", kimi.START_PATH)) == 3  # the rejected call was made once more


@BOTH_DIALECTS
async def test_token_check(http, proxy, kimi, token):
    async def check(body):
        response = await http.post(proxy + "/token/check", json=body)
        return response.status, await response.json()

    status, body = await check({"token": token})
    assert status == 200 and list(body)[0] == "live" and body["live"] is True
    assert ("quota" in body) == (kimi.PROTOCOL == "connect")  # (the legacy site tells no quota)
    assert await check({"token": "expired"}) == (200, {"live": False})
    status, body = await check({"tok": token})
    assert status == 400 and assert_envelope(body, param="token")


# ---------------------------------------------------------------------------------------------
# Kept conversations
# ---------------------------------------------------------------------------------------------


@BOTH_DIALECTS
async def test_kept_conversation_round_trip(http, proxy, kimi):
    first, second = kimi.add_user(), kimi.add_user()
    response, _, chunks = await stream_chunks(http, proxy, f"{first},{second}", conversation_id="new")
    conversation_id = response.headers["X-Conversation-Id"]
    assert {c["conversation_id"] for c in chunks} == {conversation_id}
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}" if kimi.PROTOCOL == "connect"
                        else r"[0-9a-v]{20}", conversation_id)
    owner = kimi.chats[conversation_id].owner
    for tokens in (f"{first},{second}", f"{second},{first}"):  # the creating token is used either way
        response = await post_chat(http, proxy, tokens, conversation_id=conversation_id,
                                   messages=[{"role": "user", "content": "第一个问题"}, {"role": "assistant", "content": "好"},
                                             {"role": "user", "content": "第二个问题"}])
        body = await response.json()
        assert body["conversation_id"] == response.headers["X-Conversation-Id"] == conversation_id
    assert len(kimi.created) == 1
    follow_ups = kimi.completions[1:]
    assert [c["chat"] for c in follow_ups] == [conversation_id] * 2
    assert {c["user"] for c in follow_ups} == {owner}
    assert [c["prompt"] for c in follow_ups] == ["第二个问题"] * 2
    await asyncio.sleep(0.2)
    assert kimi.deleted == []  # the user's conversation stays


async def test_unknown_conversation_uses_the_first_token(http, proxy, kimi):
    first, second = kimi.add_user(), kimi.add_user()
    response = await post_chat(http, proxy, second, conversation_id="new")
    conversation_id = response.headers["X-Conversation-Id"]
    # another client's chat id does not borrow its creator's token: the caller's first token is used
    response = await post_chat(http, proxy, first, conversation_id=conversation_id)
    assert response.status == {"legacy": 502, "connect": 404}[kimi.PROTOCOL]  # Kimi: not this account's chat
    assert kimi.completions[-1]["user"] == kimi.user_of(second) and len(kimi.completions) == 1


@BOTH_DIALECTS
async def test_kept_chat_of_a_failed_attempt_is_deleted(http, proxy, kimi, token):
    response = await post_chat(http, proxy, token, conversation_id="new", messages=user("scenario:error_first"))
    assert response.status == 502
    await kimi.wait_deleted(1)


# ---------------------------------------------------------------------------------------------
# Models, CORS and the small endpoints
# ---------------------------------------------------------------------------------------------


@BOTH_DIALECTS
async def test_models(sdk, http, proxy):
    models = [m async for m in sdk.models.list()]
    ids = [m.id for m in models]
    assert {"kimi", "kimi-search", "kimi-research", "kimi-k1", "kimi-math", "kimi-silent", "kimi-search-silent"} <= set(ids)
    assert all(m.object == "model" and isinstance(m.created, int) and m.owned_by for m in models)
    for model_id in ids:
        assert (await sdk.models.retrieve(model_id)).id == model_id
        reply = await sdk.chat.completions.create(model=model_id, messages=user("ping"))
        assert reply.model == model_id
    with pytest.raises(openai.NotFoundError) as caught:
        await sdk.models.retrieve("no-such-model")
    assert caught.value.body["code"] == "model_not_found"
    listing = await (await http.get(proxy + "/models")).json()
    assert listing["object"] == "list" and [m["id"] for m in listing["data"]] == ids
    response = await http.get(proxy + "/v1/models/org%2Fname")
    assert response.status == 404
    assert_envelope(await response.json(), "model_not_found")
    assert (await http.get(proxy + "/models/kimi")).status == 200


async def test_cors(http, proxy, token):
    response = await http.options(proxy + "/v1/chat/completions", headers={
        "Origin": "http://localhost:3210", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os,x-stainless-retry-count"})
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == "*" and "POST" in response.headers["Access-Control-Allow-Methods"]
    allowed = {h.strip() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "x-stainless-os", "x-stainless-retry-count"} <= allowed
    origin = {"Origin": "http://localhost:3210"}
    for response in [await http.post(proxy + "/v1/chat/completions", json={"messages": user("hi")}, headers={**origin, **auth(token)}),
                     await http.post(proxy + "/v1/chat/completions", json={"messages": user("hi"), "stream": True},
                                     headers={**origin, **auth(token)}),
                     await http.post(proxy + "/v1/chat/completions", json={"messages": user("hi")}, headers=origin),
                     await http.get(proxy + "/v1/models", headers=origin), await http.get(proxy + "/nope", headers=origin)]:
        await response.read()
        assert response.headers.getall("Access-Control-Allow-Origin") == ["*"]
        assert "X-Request-ID" in response.headers["Access-Control-Expose-Headers"]
        assert "Retry-After" in response.headers["Access-Control-Expose-Headers"]


async def test_ping_and_index(http, proxy):
    response = await http.get(proxy + "/ping")
    assert (response.status, await response.text()) == (200, "pong")
    response = await http.get(proxy + "/")
    assert response.status == 200 and "/v1/chat/completions" in await response.text()


# ---------------------------------------------------------------------------------------------
# Lifetimes: no chat left behind, however the request ends
# ---------------------------------------------------------------------------------------------


@BOTH_DIALECTS
async def test_client_disconnect_closes_kimi_stream_and_deletes_chat(http, proxy, token, kimi):
    response = await post_chat(http, proxy, token, stream=True, messages=user("scenario:endless"))
    async for line in response.content:
        if b'"content":"0 "' in line:
            break
    response.close()
    gone = time.monotonic()
    await kimi.wait_deleted(1, timeout=2)
    assert kimi.closed_streams == kimi.created and time.monotonic() - gone < 2
    assert len(kimi.completions) == 1


API_BODIES = {  # one streamed question in each client API's shape
    "/v1/chat/completions": lambda text: {"model": "kimi", "stream": True, "messages": user(text)},
    "/v1/responses": lambda text: {"model": "kimi", "stream": True, "input": text},
    "/v1/messages": lambda text: {"model": "kimi", "stream": True, "max_tokens": 64, "messages": user(text)},
}


@pytest.mark.parametrize("path", API_BODIES)
async def test_every_client_api_deletes_the_chat_when_its_client_leaves(http, proxy, token, kimi, path):
    response = await http.post(proxy + path, json=API_BODIES[path]("scenario:endless"), headers=auth(token))
    async for line in response.content:
        if b'0 ' in line:
            break
    response.close()
    await kimi.wait_deleted(1, timeout=2)
    assert kimi.closed_streams == kimi.created


async def test_deletion_does_not_delay_the_answer(http, proxy, token, kimi):
    kimi.hold_deletes = asyncio.Event()
    response = await post_chat(http, proxy, token)
    assert (await response.json())["choices"][0]["message"]["content"] == "".join(ANSWER)
    assert kimi.deleted == []  # the answer arrived while Kimi was still deleting
    kimi.hold_deletes.set()
    await kimi.wait_deleted(1)


async def test_chats_are_deleted_during_shutdown(kimi, token, http):
    settings = {"KIMI_BASE_URL": kimi.url, "KIMI_PROTOCOL": kimi.PROTOCOL, "HOST": "127.0.0.1", "PORT": "0",
                "SHUTDOWN_GRACE": "0.3"}
    runner = await start_server(kp.Config.from_env(settings))
    proxy = "http://%s:%d" % runner.addresses[0][:2]
    kimi.hold_deletes = asyncio.Event()
    assert (await post_chat(http, proxy, token)).status == 200
    streaming = await post_chat(http, proxy, token, stream=True, messages=user("scenario:endless"))
    first_line = await streaming.content.readline()
    asyncio.get_running_loop().call_later(0.5, kimi.hold_deletes.set)
    started = time.monotonic()
    await runner.cleanup()  # what SIGTERM/SIGINT do in run_app: the open answer is cut after the grace
    assert time.monotonic() - started < 5
    assert sorted(kimi.deleted) == sorted(kimi.created) and len(kimi.created) == 2
    assert kimi.closed_streams == [kimi.created[1]]
    if kimi.PROTOCOL == "connect":  # the answer cut at shutdown was stopped, before its chat went
        assert [chat for chat, _ in kimi.cancels] == [kimi.created[1]]
        assert kimi_order(kimi, "CancelChat", "DeleteChat")[-2:] == ["CancelChat", "DeleteChat"]
    *chunks, error = sse_payloads(first_line + await streaming.read())  # the client can tell it was cut
    assert chunks and assert_envelope(error, "shutting_down")


async def test_hundred_concurrent_streams(http, proxy, kimi):
    tokens = [kimi.add_user() for _ in range(4)]

    async def one(index: int) -> str:
        response = await post_chat(http, proxy, ",".join(tokens), stream=True, messages=user(f"scenario:pace #{index}"))
        assert response.status == 200
        return content_of(sse_payloads(await response.read()))

    answers = await asyncio.gather(*(one(i) for i in range(100)))
    assert answers == ["".join(ANSWER)] * 100
    assert kimi.max_open_streams > 1
    await kimi.wait_deleted(100)
    assert sorted(kimi.deleted) == sorted(kimi.created) and kimi.live_chats == []
    assert sum(kimi.refreshes[kimi.user_of(t)] for t in tokens) == 4


async def test_more_open_answers_than_a_connection_pool_holds(start_proxy, http, kimi, token):
    """Each open answer holds one connection to Kimi: the 101st must not wait for a free one."""
    proxy = await start_proxy(UPSTREAM_CONNECT_TIMEOUT="0.5", MAX_STREAMS_PER_TOKEN="200")

    async def one() -> str:
        response = await post_chat(http, proxy, token, stream=True, messages=user("scenario:trickle_2"))
        return content_of(sse_payloads(await response.read()))

    assert await asyncio.gather(*(one() for _ in range(150))) == ["片段0 片段1 "] * 150
    assert kimi.max_open_streams == 150
    await kimi.wait_deleted(150)


# ---------------------------------------------------------------------------------------------
# Logs never hold secrets or message contents
# ---------------------------------------------------------------------------------------------


@BOTH_DIALECTS
async def test_logs_hold_no_tokens_or_contents(http, start_proxy, kimi, caplog):
    caplog.set_level(logging.DEBUG)
    proxy = await start_proxy(LOG_LEVEL="DEBUG", UPSTREAM_READ_TIMEOUT="0.3")
    good = kimi.add_user()
    kimi.banned.add(bad := kimi.add_user())
    secret_text = "my-secret-question-text"
    for scenario in ("plain", "error", "error_first", "drop", "stall", "length", "split"):
        await (await post_chat(http, proxy, f"{bad},{good}", stream=True,
                               messages=user(f"{secret_text} scenario:{scenario}"))).read()
    await (await post_chat(http, proxy, good, messages=user(secret_text))).read()
    kimi.revoke_access_tokens()
    await (await post_chat(http, proxy, good, messages=user(secret_text))).read()
    await (await post_chat(http, proxy, "sk-not-a-token-at-all")).read()
    await (await http.post(proxy + "/token/check", json={"token": good})).read()
    await kimi.wait_deleted(len(kimi.created))
    logged = caplog.text
    assert "status=200" in logged and "model=kimi" in logged  # the request lines are there
    secrets_seen = [good, bad, "sk-not-a-token-at-all", secret_text, *kimi.access, *kimi.users]
    assert not [s for s in secrets_seen if s in logged]
    for token in (good, bad):  # nor any recognisable piece of a token
        assert token.split(".")[1][:24] not in logged and token.split(".")[2][:16] not in logged


# ---------------------------------------------------------------------------------------------
# Running it as a user would: python kimi_proxy.py
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def wait_until_serving(http, proxy: str) -> None:
    for _ in range(200):
        try:
            response = await http.get(proxy + "/ping")
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.05)
        else:
            assert await response.text() == "pong"
            return
    raise AssertionError("the server did not start")


async def test_main_serves_with_flags_over_env(kimi, token, http):
    port = free_port()
    env = {**os.environ, "KIMI_BASE_URL": kimi.url, "KIMI_PROTOCOL": kimi.PROTOCOL, "PORT": "1", "HOST": "192.0.2.1"}
    server = await asyncio.create_subprocess_exec(sys.executable, "kimi_proxy.py", "--host", "127.0.0.1",
                                                  "--port", str(port), env=env, stderr=subprocess.PIPE)
    try:
        await wait_until_serving(http, f"http://127.0.0.1:{port}")
        response = await http.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers={
            **auth(token), "X-Request-ID": "nginx-7f3a9c"}, json={"stream": True, "messages": user("hi")})
        assert content_of(sse_payloads(await response.read())) == "".join(ANSWER)
        assert response.headers["X-Request-ID"] == "nginx-7f3a9c"
        await kimi.wait_deleted(1)
        kimi.faults.append({"method": "POST", "path": re.compile(".*"), "status": 500, "times": 3, "html": False,
                            "body": {"code": "internal"}, "headers": {}})
        await post_chat(http, f"http://127.0.0.1:{port}", token)  # logs a warning inside the request
    finally:
        server.terminate()
        _, stderr = await server.communicate()
    assert server.returncode == 0
    logged = stderr.decode()
    assert "status=200" in logged and token not in logged
    assert [line for line in logged.splitlines() if "status=200" in line and "[nginx-7f3a9c]" in line
            and "request_id=nginx-7f3a9c" in line]
    warning = next(line for line in logged.splitlines() if "WARNING" in line and "HTTP 500" in line)
    assert re.search(r"\[[0-9a-f]{16}\]", warning)  # that request's own id, made up for it
    assert kimi.deleted == kimi.created


@pytest.mark.parametrize("given, kept", [("abc-123", True), ("a" * 64, True), ("a" * 65, False), ("a b", False),
                                         ("x\tforged", False), ("é", False), ("", False)])
async def test_request_ids_from_nginx_are_kept_when_safe(http, proxy, given, kept):
    response = await http.get(proxy + "/ping", headers={"X-Request-ID": given} if given else {})
    returned = response.headers["X-Request-ID"]
    assert (returned == given) is kept and re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", returned)


@pytest.mark.dialects("connect")
async def test_two_instances_share_one_token_store(kimi, http, tmp_path):
    """Behind nginx, one token's requests may reach either instance: whichever renews, the other
    picks up the rotated token from the shared store, and two renewals never spend the same one."""
    kimi.access_ttl = 1  # every request or two renews
    token = kimi.add_user()
    store = tmp_path / "tokens.json"
    servers, urls = [], []
    for _ in range(2):
        port = free_port()
        env = {**os.environ, "KIMI_BASE_URL": kimi.url, "KIMI_PROTOCOL": "connect", "HOST": "127.0.0.1",
               "PORT": str(port), "KIMI_TOKEN_STORE": str(store), "LOG_LEVEL": "WARNING"}
        servers.append(await asyncio.create_subprocess_exec(sys.executable, "kimi_proxy.py", env=env,
                                                            stderr=subprocess.DEVNULL))
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for url in urls:
            await wait_until_serving(http, url)
        statuses = []
        for turn in range(4):
            await asyncio.sleep(0.9 if turn else 0)
            if turn % 2:  # both at once: their renewals race for the same refresh token
                replies = await asyncio.gather(*(post_chat(http, url, token) for url in urls))
            else:
                replies = [await post_chat(http, urls[turn // 2 % 2], token)]
            statuses += [reply.status for reply in replies]
    finally:
        for server in servers:
            server.terminate()
            await server.wait()
    assert statuses == [200] * 6
    assert kimi.refreshes[kimi.user_of(token)] >= 4 and token in kimi.spent
    saved = orjson.loads(store.read_bytes())["tokens"][hashlib.sha256(token.encode()).hexdigest()]
    assert saved not in kimi.spent and kimi.user_of(saved) == kimi.user_of(token)  # the newest one


def test_a_port_in_use_stops_startup_with_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "kimi_proxy.py", "--host", "127.0.0.1", "--port", str(port)],
                                env={**os.environ, "LOG_LEVEL": "ERROR"}, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and f"127.0.0.1:{port}" in result.stderr


def test_bad_setting_stops_startup_with_one_line():
    result = subprocess.run([sys.executable, "kimi_proxy.py"], env={**os.environ, "UPSTREAM_READ_TIMEOUT": "soon"},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "UPSTREAM_READ_TIMEOUT" in result.stderr


# ---------------------------------------------------------------------------------------------
# The Connect dialect: framing, events, citations, errors, catalog, credentials
# ---------------------------------------------------------------------------------------------


def test_frames_survive_any_split():
    frames = connect_frame({"a": "长城"}) + connect_frame({"b": 1}) + connect_end()
    for size in (1, 2, 3, 5, 7, len(frames)):
        decoder = kp.FrameDecoder()
        got = [frame for start in range(0, len(frames), size) for frame in decoder.feed(frames[start:start + size])]
        assert [(flags, orjson.loads(payload)) for flags, payload in got] == [(0, {"a": "长城"}), (0, {"b": 1}), (2, {})]
    chat = {"a": 1, "message": {"blocks": [{"text": {"content": 'hi "长城"\n\t' * 40000}}]}}
    envelope = kp.to_envelope(copy.deepcopy(chat))
    framed = b"".join(envelope.parts)
    assert framed == connect_frame(chat) and envelope.size == len(framed) and len(envelope.parts) > 3
    with pytest.raises(kp.ProxyError):
        kp.FrameDecoder().feed(b"\x00\xff\xff\xff\xff")


def test_a_large_text_is_written_into_its_json_in_slices():
    text = 'a "quote", a \\ backslash, \x01\x1f\x7f controls, 长城 and 🧱\n' * 20000  # > 3 slices
    parts = kp.json_with_text({"messages": [{"content": kp.PROMPT_MARK + "\n"}], "n": 1}, text)
    assert len(parts) > 4 and orjson.loads(b"".join(parts)) == {"messages": [{"content": text + "\n"}], "n": 1}


def frames_to_events(*messages, silent=False) -> tuple[list, kp.ConnectState]:
    state = kp.ConnectState(silent=silent)
    frames = [m if isinstance(m, tuple) else (0, orjson.dumps(m)) for m in messages]
    events = [event for flags, payload in frames for event in kp.from_connect_frame(flags, payload, state)]
    return events, state


@pytest.mark.parametrize("messages, expected", [
    ([{"heartbeat": {}}, {"op": "set", "mask": "chat.lastRequest", "chat": {"lastRequest": {}}}], []),
    ([{"op": "set", "chat": {"id": "c1", "name": "x"}}, {"op": "set", "mask": "chat.name", "chat": {"name": "y"}}],
     [kp.Event(kp.CHAT, "c1")]),
    ([{"op": "set", "mask": "block.think", "block": {"id": "0", "think": {"content": "t"}}}], [kp.Event(kp.REASONING, "t")]),
    ([{"op": "set", "mask": "block.text", "block": {"id": "0", "text": {"content": ""}}},
      {"op": "append", "mask": "block.text.content", "block": {"id": "0", "text": {"content": "a"}}}],
     [kp.Event(kp.TEXT, "a")]),
    ([{"block": {"id": "0", "text": {"content": "t", "flags": "thinking"}}},
      {"block": {"id": "1", "text": {"content": "a", "flags": "answer"}}}],
     [kp.Event(kp.REASONING, "t"), kp.Event(kp.TEXT, "a")]),
    # the kind of block decides, never the stage around it (as in the real capture)
    ([{"block": {"id": "1", "multiStage": {"stages": [{"name": "STAGE_NAME_THINKING", "status": "STAGE_STATUS_START"}]}}},
      {"block": {"id": "2", "parentId": "1", "stage": {"name": "STAGE_NAME_THINKING", "status": "STAGE_STATUS_START"}}},
      {"block": {"id": "3", "parentId": "2", "think": {"content": "t"}}},
      {"block": {"id": "4", "parentId": "", "text": {"content": "a"}}},
      {"block": {"id": "1", "multiStage": {"stages": [{"name": "STAGE_NAME_THINKING", "status": "STAGE_STATUS_END"}]}}},
      {"block": {"id": "4", "parentId": "", "text": {"content": "b"}}},
      {"op": "set", "notification": {"type": "TYPE_MODEL_DEGRADE", "message": "Switched to K2.6 Instant"}}],
     [kp.Event(kp.REASONING, "t"), kp.Event(kp.TEXT, "a"), kp.Event(kp.TEXT, "b")]),
    ([{"block": {"id": "1", "text": {"content": "a"}}}, {"block": {"id": "2", "text": {"content": "b"}}}],
     [kp.Event(kp.TEXT, "a"), kp.Event(kp.TEXT, "\nb")]),
    ([{"block": {"tool": {"contents": [{"searchResult": {"base": {"title": "T", "url": "https://u"}, "refIndex": "w:1#0"}}]}}},
      {"message": {"refs": {"searchChunks": [{"searchResult": {"base": {"title": "T", "url": "https://u"}, "refIndex": "w:1#0"}}]}}}],
     [kp.Event(kp.SOURCE, "T", "https://u", 1)]),
    ([(1, b"\x1f\x8b compressed")], []),
])
def test_connect_frames_to_events(messages, expected):
    assert frames_to_events(*messages)[0] == expected


def test_connect_stream_state():
    _, state = frames_to_events({"op": "set", "mask": "message", "message": {"id": "m2", "role": "assistant"}},
                                {"done": {}})
    assert (state.message_id, state.done, state.ended) == ("m2", True, False)
    with pytest.raises(kp.ProxyError, match="without any text"):
        kp.from_connect_ending(state)  # done, but nothing was said
    _, state = frames_to_events({"block": {"id": "1", "text": {"content": "a"}}}, (2, b"{}"))
    assert kp.from_connect_ending(state) == [kp.DONE_EVENT]
    _, state = frames_to_events({"block": {"id": "1", "text": {"content": "a"}}})
    with pytest.raises(kp.ProxyError, match="broke off"):
        kp.from_connect_ending(state)  # neither done nor an end-stream envelope


@pytest.mark.parametrize("error, status, code, says", [
    ({"code": "resource_exhausted", "details": [{"debug": {"reason": "REASON_SERVER_OVERLOADED_FOR_FREE_USER"}}]},
     503, "server_is_overloaded", "REASON_SERVER_OVERLOADED_FOR_FREE_USER"),
    ({"code": "resource_exhausted", "debug": {"reason": "REASON_SERVER_OVERLOADED_FOR_FREE_USER",
                                              "localizedMessage": {"message": "Too many people"}}},
     503, "server_is_overloaded", "Too many people"),
    ({"code": "resource_exhausted", "message": "slow down"}, 429, "rate_limit_exceeded", "slow down"),
    ({"code": "resource_exhausted", "details": [{"debug": {"paywall": {}, "localizedMessage": {"message": "升级"}}}]},
     429, "insufficient_quota", "paid Kimi plan"),
    ({"code": "unavailable"}, 503, "server_is_overloaded", "unavailable"),
    ({"code": "deadline_exceeded", "message": "slow"}, 503, "server_is_overloaded", "slow"),
    ({"code": "invalid_argument"}, 502, "upstream_error", "invalid_argument"),
    ({"code": "permission_denied"}, 403, "permission_denied", "permission_denied"),
    ({"code": "not_found"}, 404, "conversation_not_found", "conversation"),
    ({"code": "internal", "message": "boom"}, 502, "upstream_error", "boom"),
    ({"code": "unauthenticated"}, 401, "invalid_api_key", "token"),
])
def test_connect_error_mapping(error, status, code, says):
    mapped = kp.from_connect_error(error)
    assert (mapped.status, mapped.code) == (status, code) and says in mapped.message


SEARCH_SOURCES = {"web_search:1#0": 1, "web_search:1#3": 2, "web_search:1#5": 3}


@pytest.mark.parametrize("text, expected", [
    ("no markers 🙂", "no markers 🙂"),
    ("a\ue3a0cite\ue3a3web_search:1#0\ue3a3web_search:1#3\ue3a8b", "a[^1][^2]b"),
    ("a\ue3a0cite\ue3a3web_search:1#9\ue3a8b", "ab"),                       # a source we never saw
    ("\ue3a0article🛠web_search:1#5🛠web_search:1#0🎨x", "x"),                 # the opening article block
    ("a\ue3a0cite🛠web_search:1#5:~:text=长城🛠b", "a[^3]b"),
    ("a\ue3a0cite🛠web_search:1#0:~:text=quote\ue3a8b", "a[^1]b"),
    ("a🛠web_search:1#5🛠b", "a[^3]b"),
    ("fix it 🛠 with tools 🛠 today", "fix it 🛠 with tools 🛠 today"),       # not references
])
def test_citation_markers_become_references_however_split(text, expected):
    for size in range(1, len(text) + 1):
        rewriter = kp.CitationRewriter()
        out = "".join(rewriter.feed(text[i:i + size], SEARCH_SOURCES, False) for i in range(0, len(text), size))
        assert out + rewriter.flush() == expected, size


def test_citation_markers_vanish_when_silent():
    rewriter = kp.CitationRewriter()
    assert rewriter.feed("a\ue3a0cite\ue3a3web_search:1#0\ue3a8b", SEARCH_SOURCES, True) == "ab"


def test_catalog_ids_and_resolution():
    catalog = kp.Catalog.from_rpc(CATALOG)
    assert catalog.model_ids() == ["kimi-k2.6", "kimi-k2.6-thinking", "kimi-k2.8", "kimi-k3", "kimi-k3-swarm",
                                   *kp.LEGACY_NAMES]
    assert kp.Catalog.from_rpc(kp.FALLBACK_CATALOG).model_ids() == catalog.model_ids()

    def resolved(model: str, **body) -> dict:
        return kp.to_connect_chat(to_question({"model": model, "messages": user("q"), **body}), catalog, None)

    assert resolved("kimi")["options"] == {"thinking": False, "model": "k2d6-chat", "reasoning_effort": "REASONING_EFFORT_NONE"}
    assert resolved("kimi")["tools"] == []
    for thinking in ("kimi-k1", "kimi-thinking", "kimi-k2.6-thinking", "kimi-k2.6-thinking-search-silent"):
        assert resolved(thinking)["options"] == {"thinking": True, "model": "k2d6-chat",
                                                 "reasoning_effort": "REASONING_EFFORT_LOW"}, thinking
    for search in ("kimi-search", "kimi-research", "kimi-k2.6-search", "kimi-search-silent", "kimi-k3-search"):
        assert resolved(search)["tools"] == [{"type": "TOOL_TYPE_SEARCH", "search": {}}], search
    for name, kimi_id in (("kimi-k2.8", "k28-agent-preview"), ("kimi-k3", "k3-agent"), ("kimi-k3-swarm", "k3-agent-swarm"),
                          ("k3-agent", "k3-agent"), ("k3", "k3-agent"), ("KIMI-K3-THINKING", "k3-agent")):
        request = resolved(name)
        entry = CATALOG_ENTRIES[kimi_id]
        assert request["options"] == {"thinking": True, "model": kimi_id, "reasoning_effort": "REASONING_EFFORT_HIGH"}
        assert (request["scenario"], request["message"]["scenario"], request["kimiplus_id"], request["agent_mode"]) == \
            (entry["scenario"], entry["scenario"], entry["kimiPlusId"], entry["agentMode"]), name
    assert resolved("gpt-4o-mini") == resolved("kimi-math") == resolved("kimi")
    assert resolved("crm40ee9e5jvhsn7pt00")["kimiplus_id"] == "crm40ee9e5jvhsn7pt00"
    assert kp.Catalog.from_rpc({"availableModels": []}) is None
    assert kp.Catalog.from_rpc({"availableModels": [{"scenario": "SCENARIO_K2D5", "thinking": True}]}) is None


@pytest.mark.parametrize("model, effort, sent", [
    ("kimi-k2.6", "none", "REASONING_EFFORT_NONE"),
    ("kimi-k2.6", "minimal", "REASONING_EFFORT_LOW"),     # the only thinking effort K2.6 offers
    ("kimi-k2.6", "high", "REASONING_EFFORT_LOW"),
    ("kimi-k3", "none", "REASONING_EFFORT_HIGH"),         # K3 always thinks: its default, never NONE
    ("kimi-k3", "minimal", "REASONING_EFFORT_LOW"),
    ("kimi-k3", "low", "REASONING_EFFORT_LOW"),
    ("kimi-k3", "medium", "REASONING_EFFORT_HIGH"),       # between LOW and HIGH: ties go up
    ("kimi-k3", "high", "REASONING_EFFORT_HIGH"),         # MAX costs extra credits: never chosen for a client
])
def test_reasoning_effort_maps_to_one_the_model_offers(model, effort, sent):
    question = to_question({"model": model, "messages": user("q"), "reasoning_effort": effort})
    options = kp.to_connect_chat(question, kp.Catalog.from_rpc(CATALOG), None)["options"]
    assert options["reasoning_effort"] == sent and options["thinking"] == (sent != "REASONING_EFFORT_NONE")
    offered = [option["effort"] for option in CATALOG_ENTRIES[options["model"]]["reasoningEffortOptions"]]
    assert sent in offered


@pytest.mark.parametrize("entry, expected", [
    ({"id": "k2d6-chat"}, "kimi-k2.6"), ({"id": "k28-agent-preview"}, "kimi-k2.8"), ({"id": "k3-agent"}, "kimi-k3"),
    ({"id": "k3-agent-swarm"}, "kimi-k3-swarm"), ({"id": "k25-chat"}, "kimi-k2.5"), ({"id": "Moonshot_V9"}, "kimi-moonshot-v9"),
])
def test_readable_model_ids_come_from_kimi_ids(entry, expected):
    assert kp.to_model_name(entry["id"]) == expected


@pytest.mark.dialects("connect")
async def test_connect_models_come_from_the_live_catalog(sdk, kimi, http, proxy, token):
    ids = [m.id async for m in sdk.models.list()]
    assert {"kimi-k2.6-thinking", "kimi-k3", "kimi-k3-swarm", "kimi-search"} <= set(ids)
    assert kimi.catalog_calls == [kimi.user_of(token)]  # asked with the caller's authorization
    for model in ("kimi-k2.6", "kimi-k2.8", "kimi-k3", "kimi-k3-swarm"):
        reply = await sdk.chat.completions.create(model=model, messages=user("plan a trip"))
        assert reply.choices[0].message.content == "".join(ANSWER)
    assert [c["body"]["options"]["model"] for c in kimi.completions] == list(CATALOG_ENTRIES)
    assert [c["thinking"] for c in kimi.completions] == [False, True, True, True]
    assert len(kimi.catalog_calls) == 1  # cached for five minutes
    anonymous = await http.get(proxy + "/v1/models")
    assert anonymous.status == 200 and len(kimi.catalog_calls) == 1


@pytest.mark.dialects("connect")
async def test_connect_falls_back_to_a_built_in_catalog(sdk, kimi):
    kimi.catalog = None
    ids = [m.id async for m in sdk.models.list()]
    assert {"kimi-k2.6", "kimi-k2.6-thinking", "kimi-k3", "kimi"} <= set(ids)
    reply = await sdk.chat.completions.create(model="kimi-k2.6-thinking", messages=user("q"))
    assert reply.choices[0].message.model_extra["reasoning_content"] == "".join(THINKING)


@pytest.mark.dialects("connect")
@pytest.mark.parametrize("scenario, status, code, says", [
    ("overloaded_first", 503, "server_is_overloaded", OVERLOADED_FOR_FREE),
    ("paywall", 429, "insufficient_quota", "paid Kimi plan"),
    ("unavailable", 503, "server_is_overloaded", "unavailable"),
    ("denied", 403, "permission_denied", "agent mode needs a plan"),
    ("invalid", 502, "upstream_error", "invalid_argument"),
    ("empty", 502, "upstream_error", "without any text"),
])
async def test_connect_failures_before_any_text_get_real_statuses(start_proxy, http, token, kimi, scenario, status,
                                                                  code, says):
    proxy = await start_proxy(KEEPALIVE_INTERVAL="2")  # Kimi's heartbeats come first: they must not start the stream
    response = await post_chat(http, proxy, token, stream=True, messages=user(f"scenario:{scenario}"))
    assert response.status == status
    assert says in assert_envelope(await response.json(), code)["message"]
    if scenario == "overloaded_first":
        assert response.headers["Retry-After"] == str(kp.OVERLOAD_RETRY_AFTER)
    await kimi.wait_deleted(len(kimi.created))
    assert kimi.live_chats == []


@pytest.mark.dialects("connect")
async def test_connect_error_after_done_is_still_reported(http, proxy, token, kimi):
    response = await post_chat(http, proxy, token, stream=True, messages=user("scenario:done_then_error"))
    *chunks, error = sse_payloads(await response.read())
    assert content_of(chunks) == "".join(ANSWER)
    assert OVERLOADED in assert_envelope(error)["message"]


@pytest.mark.dialects("connect")
async def test_connect_thinking_flags_stages_and_blocks(sdk):
    staged = await sdk.chat.completions.create(model="kimi", messages=user("scenario:staged"))
    assert staged.choices[0].message.model_extra["reasoning_content"] == "".join(THINKING)
    assert staged.choices[0].message.content == ANSWER[0] + ANSWER[1]
    blocks = await sdk.chat.completions.create(model="kimi", messages=user("scenario:two_blocks"))
    assert blocks.choices[0].message.content == "第一块\n第二块"


@pytest.mark.dialects("connect")
async def test_connect_in_stream_unauthenticated_renews_once(sdk, kimi, token):
    kimi.unauthenticated_streams = 1
    reply = await sdk.chat.completions.create(model="kimi", messages=user("q"))
    assert reply.choices[0].message.content == "".join(ANSWER)
    assert kimi.refreshes[kimi.user_of(token)] == 2
    kimi.unauthenticated_streams = 2
    with pytest.raises(openai.AuthenticationError):
        await sdk.chat.completions.create(model="kimi", messages=user("q"))


@pytest.mark.dialects("connect")
async def test_connect_accepts_an_access_token(http, proxy, kimi):
    user_id = xid()
    access = kimi.issue_access_token(user_id, ttl=3600)
    response = await post_chat(http, proxy, access, stream=True)
    assert content_of(sse_payloads(await response.read())) == "".join(ANSWER)
    assert kimi.refreshes == Counter() and kimi.completions[0]["user"] == user_id
    assert (await (await http.post(proxy + "/token/check", json={"token": access})).json())["live"] is True
    kimi.revoke_access_tokens()  # Kimi no longer takes it, and an access token cannot be renewed
    response = await post_chat(http, proxy, access)
    assert response.status == 401
    assert "refresh_token" in assert_envelope(await response.json(), "invalid_api_key")["message"]
    expired = kimi.issue_access_token(user_id, ttl=-10)
    calls = len(kimi.calls)
    response = await post_chat(http, proxy, expired)
    assert response.status == 401 and "15 minutes" in (await response.json())["error"]["message"]
    assert kimi.calls[calls:] == []  # refused without asking Kimi


@pytest.mark.dialects("connect")
async def test_connect_kept_chat_continues_after_its_last_message(http, start_proxy, kimi, token):
    proxy = await start_proxy()
    response = await post_chat(http, proxy, token, conversation_id="new")
    chat_id = response.headers["X-Conversation-Id"]
    parent = kimi.chats[chat_id].last_message
    await post_chat(http, proxy, token, conversation_id=chat_id, messages=user("第二个问题"))
    assert kimi.completions[1]["body"]["chat_id"] == chat_id
    assert kimi.completions[1]["body"]["message"]["parent_id"] == parent
    other_proxy = await start_proxy()  # knows nothing of the chat: no parent_id
    # (the refresh token is spent: the first proxy holds the rotated one, so send an access token)
    access = kimi.issue_access_token(kimi.user_of(token), 3600)
    response = await post_chat(http, other_proxy, access, conversation_id=chat_id, messages=user("第三个问题"))
    assert response.status == 200 and "parent_id" not in kimi.completions[2]["body"]["message"]
    assert kimi.deleted == []


async def refresh_by_rpc(http, kimi, token: str) -> aiohttp.ClientResponse:
    return await http.post(kimi.url + kimi.REFRESH_RPC, json={"refresh_token": token},
                           headers={"Connect-Protocol-Version": "1"})


@pytest.mark.dialects("connect")
async def test_fake_connect_kimi_is_strict(http, kimi, token):
    """The fake refuses what real Kimi refuses, so the proxy's passing tests mean something."""
    refreshed = await (await refresh_by_rpc(http, kimi, token)).json()
    assert set(refreshed) == {"accessToken", "refreshToken"}
    headers = {**auth(refreshed["accessToken"]), "Content-Type": "application/connect+json"}
    good = {"scenario": "SCENARIO_CHAT", "options": {"thinking": False, "model": "k2d6-chat"},
            "message": {"role": "user", "blocks": [{"text": {"content": "hi"}}]}}
    k3 = {**good, "scenario": "SCENARIO_OK_COMPUTER", "options": {"thinking": True, "model": "k3-agent"},
          "kimiplus_id": "ok-computer", "agent_mode": "TYPE_NORMAL"}
    for body in (orjson.dumps(good),  # not framed
                 connect_frame({**good, "chat_id": ""}),
                 connect_frame({**good, "scenario": "SCENARIO_NOPE"}),
                 connect_frame({**good, "options": {"thinking": False, "model": "k3"}}),  # a key, not an id
                 connect_frame({**good, "options": {"model": "k2d6-chat"}}),
                 connect_frame({**good, "options": {"thinking": True, "model": "k2d6-chat",
                                                    "reasoning_effort": "REASONING_EFFORT_HIGH"}}),
                 connect_frame({**k3, "kimiplus_id": None}),
                 connect_frame({**good, "message": {"role": "user", "blocks": []}}),
                 connect_frame({**good, "message": {"role": "user", "blocks": [{"file": {"id": "x"}}, {"text": {"content": "hi"}}]}})):
        response = await http.post(kimi.url + kimi.CHAT, data=body, headers=headers)
        frames = kp.FrameDecoder().feed(await response.read())
        assert len(frames) == 1 and frames[0][0] == 2
        assert orjson.loads(frames[0][1])["error"]["code"] == "invalid_argument", body
    response = await http.post(kimi.url + kimi.CHAT, headers=headers,
                               data=connect_frame({**good, "chat_id": "19fdf14e-bd52-88b5-8000-092152992fca"}))
    assert orjson.loads(kp.FrameDecoder().feed(await response.read())[0][1])["error"]["code"] == "not_found"
    # unary calls: a JSON body type is required (415, before the token is looked at); quota only for the Kimi domain
    for path in ("/apiv2/kimi.chat.v1.ChatService/DeleteChat", "/apiv2/kimi.gateway.chat.v1.ChatService/CancelChat"):
        response = await http.post(kimi.url + path, data=b'{"chat_id": "x"}', headers=auth(refreshed["accessToken"]))
        assert response.status == 415 and await response.read() == b""
    stats = kimi.url + "/apiv2/kimi.gateway.membership.v2.MembershipService/GetSubscriptionStats"
    response = await http.post(stats, json={"domain": "DOMAIN_NEXUS"}, headers=auth(refreshed["accessToken"]))
    assert (await response.json())["code"] == "invalid_argument"
    again = await refresh_by_rpc(http, kimi, token)
    assert again.status == 401 and (await again.json())["code"] == "unauthenticated"  # Kimi rotates refresh tokens
    assert kimi.created == []


# ---------------------------------------------------------------------------------------------
# Kimi as it is in 2026: real captures, UUID ids, token renewal and its store, uploads
# ---------------------------------------------------------------------------------------------


def capture_frames() -> list[tuple[int, bytes]]:
    return kp.FrameDecoder().feed(CAPTURE)


def test_the_capture_is_what_its_readme_says():
    frames = capture_frames()
    assert len(CAPTURE) == 9747 and len(frames) == 69 and frames[-1] == (2, b"{}")
    assert [flags for flags, _ in frames[:-1]] == [0] * 68


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 4096, len(CAPTURE)])
def test_the_capture_decodes_to_its_answer_and_thinking_however_split(size):
    decoder, state, events = kp.FrameDecoder(), kp.ConnectState(), []
    for start in range(0, len(CAPTURE), size):
        for flags, payload in decoder.feed(CAPTURE[start:start + size]):
            events += kp.from_connect_frame(flags, payload, state)
    events += kp.from_connect_ending(state)
    assert "".join(e.text for e in events if e.kind == kp.TEXT) == CAPTURE_ANSWER
    assert "".join(e.text for e in events if e.kind == kp.REASONING) == CAPTURE_THINKING
    assert [e for e in events if e.kind == kp.CHAT] == [kp.Event(kp.CHAT, CAPTURE_CHAT)]  # from chat.lastRequest
    assert state.message_id == CAPTURE_ASSISTANT and state.user_message_id == "19fdf190-9d52-8774-8000-0a21cfb84051"
    assert events[-1] == kp.DONE_EVENT


def prelude_events(drop_role: bool) -> tuple[list, kp.ConnectState]:
    with open(os.path.join(FIXTURES, "chat_new_prelude.events.jsonl"), "rb") as file:
        messages = [orjson.loads(line) for line in file if line.strip()]
    if drop_role:
        for message in messages:
            if message.get("message", {}).get("role") == "assistant":
                del message["message"]["role"]
    return frames_to_events(*messages)


@pytest.mark.parametrize("drop_role", [False, True])
def test_a_new_chat_prelude_names_the_chat_and_the_answer(drop_role):
    events, state = prelude_events(drop_role)
    assert events == [kp.Event(kp.CHAT, "19b79776-8e42-8075-8000-091037ea12d9")]
    assert state.user_message_id == "19b79776-9262-8db7-8000-0a101182304b"
    assert state.message_id == "19b79776-9262-8db7-8000-0a1082ef3e40"  # never the system message (the chat's id)


def test_an_answer_without_roles_is_found_by_its_final_status_or_its_blocks():
    _, state = frames_to_events({"op": "set", "message": {"id": "u1", "role": "user"}},
                                {"op": "set", "mask": "message.status", "message": {"id": "a1", "status": "MESSAGE_STATUS_COMPLETED"}})
    assert state.message_id == "a1"
    _, state = frames_to_events({"op": "set", "message": {"id": "u1", "role": 2}},
                                {"block": {"id": "1", "messageId": "a2", "multiStage": {"stages": []}}})
    assert (state.user_message_id, state.message_id) == ("u1", "a2")


@pytest.mark.dialects("connect")
@pytest.mark.parametrize("scenario", ["capture", "capture_random", "capture_bytes"])
@pytest.mark.parametrize("model", ["kimi-k2.6-thinking", "kimi-k2.6"])
async def test_a_real_kimi_answer_replayed_byte_for_byte(http, proxy, token, kimi, scenario, model):
    prompt = f"scenario:{scenario} reply with json"
    response, raw, chunks = await stream_chunks(http, proxy, token, model=model, messages=user(prompt))
    assert response.status == 200
    assert content_of(chunks) == CAPTURE_ANSWER
    assert content_of(chunks, "reasoning_content") == CAPTURE_THINKING  # what Kimi sent, asked for or not
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    reply = await (await post_chat(http, proxy, token, model=model, messages=user(prompt))).json()
    assert reply["choices"][0]["message"]["content"] == CAPTURE_ANSWER
    assert reply["choices"][0]["message"]["reasoning_content"] == CAPTURE_THINKING
    assert [c["thinking"] for c in kimi.completions] == [model.endswith("-thinking")] * 2
    await kimi.wait_deleted(2)
    assert kimi.deleted == [CAPTURE_CHAT] * 2  # the chat the capture names, deleted after each answer


@pytest.mark.dialects("connect")
async def test_a_kept_uuid_conversation_continues(http, proxy, kimi, token):
    response = await post_chat(http, proxy, token, conversation_id="new")
    chat_id = response.headers["X-Conversation-Id"]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-8[0-9a-f]{3}-8000-09[0-9a-f]{10}", chat_id)
    for turn in range(3):  # every other answer comes without a role: the parent is found all the same
        parent = kimi.chats[chat_id].last_message
        response = await post_chat(http, proxy, token, conversation_id=chat_id, messages=user(f"问题 {turn}"))
        assert response.status == 200 and (await response.json())["conversation_id"] == chat_id
        assert kimi.completions[-1]["body"]["message"]["parent_id"] == parent
    assert kimi.created == [chat_id] and kimi.deleted == []
    response = await post_chat(http, proxy, token, conversation_id="cr7p4ik2lq1s5t0u9v3g")  # a legacy id
    assert response.status == 400 and "UUID" in assert_envelope(await response.json(), param="conversation_id")["message"]


@pytest.mark.dialects("legacy")
async def test_legacy_ids_are_still_twenty_characters(http, proxy, token):
    response = await post_chat(http, proxy, token, conversation_id="19fdf14e-bd52-88b5-8000-092152992fca")
    error = assert_envelope(await response.json(), param="conversation_id")
    assert response.status == 400 and "20 characters" in error["message"]


def test_auth_url_follows_the_site():
    for base, auth_url in (("https://www.kimi.com", "https://auth.kimi.com"), ("https://www.kimi.ai", "https://auth.kimi.ai"),
                           ("http://127.0.0.1:9", "http://127.0.0.1:9")):
        assert kp.Config.from_env({"KIMI_BASE_URL": base}).kimi_auth_url == auth_url
    assert kp.Config.from_env({"KIMI_AUTH_URL": "https://auth.example/"}).kimi_auth_url == "https://auth.example"
    with pytest.raises(kp.ConfigError, match="KIMI_AUTH_URL"):
        kp.Config.from_env({"KIMI_AUTH_URL": "auth.kimi.com"})


@pytest.mark.dialects("connect")
@pytest.mark.parametrize("missing", ["404", "unimplemented"])
async def test_renewal_falls_back_to_the_rest_endpoint_once(http, proxy, kimi, token, caplog, missing):
    if missing == "404":
        kimi.rpc_refresh = False
    else:
        kimi.fail("POST", kimi.REFRESH_RPC, 501, times=100, body={"code": "unimplemented", "message": ""})
    second = kimi.add_user()
    for credential in (token, second, token):
        assert (await post_chat(http, proxy, credential)).status == 200
        await kimi.wait_deleted(len(kimi.created))
        kimi.revoke_access_tokens()  # each request renews
    rpc_calls = [call for call in kimi.calls if call[1] == kimi.REFRESH_RPC]
    assert len(rpc_calls) == (1 if missing == "404" else 3)  # 501 is retried like any 5xx, then remembered
    assert kimi.calls.count(("GET", "/api/auth/token/refresh")) == 3
    fallbacks = [r for r in caplog.records if r.name == "kimi_proxy" and "no RefreshToken RPC" in r.getMessage()]
    assert len(fallbacks) == 1


@pytest.mark.dialects("connect")
async def test_rotated_tokens_survive_a_restart_with_a_token_store(start_proxy, http, kimi, token, tmp_path):
    store = tmp_path / "tokens.json"
    proxy = await start_proxy(KIMI_TOKEN_STORE=str(store))
    assert (await post_chat(http, proxy, token)).status == 200
    assert token in kimi.spent and store.stat().st_mode & 0o777 == 0o600
    saved = orjson.loads(store.read_bytes())["tokens"]
    assert list(saved) == [hashlib.sha256(token.encode()).hexdigest()] and token not in store.read_text()
    await kimi.wait_deleted(1)
    restarted = await start_proxy(KIMI_TOKEN_STORE=str(store))  # a new process: nothing in memory
    assert (await post_chat(http, restarted, token)).status == 200  # the original token, as the client kept it
    assert orjson.loads(store.read_bytes())["tokens"] != saved  # rotated again, and kept
    forgetful = await start_proxy()  # no store: the spent token is all it has
    response = await post_chat(http, forgetful, token)
    assert response.status == 401
    assert sorted(os.listdir(tmp_path)) == ["tokens.json", "tokens.json.lock"]  # no temporary files left behind


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"tokens": {"a": 3}}', None])
def test_a_bad_token_store_stops_the_start_naming_the_file(tmp_path, content):
    store = tmp_path / "store.json"
    if content is None:
        store.mkdir()  # a folder where the file should be
    else:
        store.write_bytes(content)
    result = subprocess.run([sys.executable, "kimi_proxy.py", "--port", "0"], capture_output=True, text=True,
                            env={**os.environ, "KIMI_TOKEN_STORE": str(store)}, timeout=30)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"KIMI_TOKEN_STORE {store}" in result.stderr and result.stderr.strip().count("\n") == 0


def test_a_token_store_in_a_missing_folder_is_refused():
    with pytest.raises(kp.ConfigError, match="KIMI_TOKEN_STORE"):
        kp.TokenStore("/nonexistent-folder/tokens.json")


@pytest.mark.dialects("connect")
async def test_files_go_through_apiv2_files_and_wait_until_processed(sdk, kimi):
    reply = await sdk.chat.completions.create(model="kimi", messages=with_files(
        {"type": "image_url", "image_url": {"url": data_uri("image/png", PNG)}},
        {"type": "file", "file": {"file_data": data_uri("application/pdf", PDF), "filename": "报告 \"Q3\".pdf"}}))
    assert reply.choices[0].message.content == "".join(ANSWER)
    [completion] = kimi.completions
    assert_uploaded(kimi, completion, {"image.png": PNG, "报告 %22Q3%22.pdf": PDF})
    blocks = completion["body"]["message"]["blocks"]
    assert "text" in blocks[0] and [b["file"]["status"] for b in blocks[1:]] == ["PROCESS_STATUS_SUCCESS"] * 2
    assert {kimi.files[i]["mime"] for i in completion["files"]} == {"image/png", "application/pdf"}
    assert kimi.parse_calls >= 2 and ("POST", "/api/pre-sign-url") not in kimi.calls


@pytest.mark.dialects("connect")
async def test_uploads_fall_back_to_pre_signing_once(sdk, kimi, caplog):
    kimi.new_uploads, kimi.presign_uploads = False, True
    for _ in range(2):
        reply = await sdk.chat.completions.create(model="kimi", messages=with_files(
            {"type": "file", "file": {"file_data": data_uri("application/pdf", PDF), "filename": "a.pdf"}}))
        assert reply.choices[0].message.content == "".join(ANSWER)
    assert kimi.calls.count(("POST", "/apiv2-files/file/upload")) == 1  # remembered
    assert kimi.calls.count(("POST", "/api/pre-sign-url")) == 2
    assert len([r for r in caplog.records if r.name == "kimi_proxy" and "pre-sign" in r.getMessage()]) == 1


@pytest.mark.dialects("legacy")
@pytest.mark.parametrize("answer", ["redirect", "html"])
async def test_a_redirect_or_a_web_page_from_kimi_is_a_502_that_says_so(http, proxy, token, kimi, answer):
    kimi.web_page = answer
    calls = len(kimi.calls)
    response = await post_chat(http, proxy, token)
    error = assert_envelope(await response.json(), "upstream_error")
    assert response.status == 502
    assert ("redirected" if answer == "redirect" else "web page") in error["message"]
    assert len(kimi.calls) - calls == 1  # the redirect was not followed


# ---------------------------------------------------------------------------------------------
# Kimi late 2026: answers stopped when abandoned, full chats, quota, the tokens users have
# ---------------------------------------------------------------------------------------------


def kimi_order(kimi, *paths: str) -> list[str]:
    """Which of these calls the fake saw, in order (by the last part of the path)."""
    return [path.rsplit("/", 1)[1] for method, path in kimi.calls if path.rsplit("/", 1)[1] in paths]


async def assert_cancelled_once_before(kimi, chat_id: str, then: str) -> None:
    """Exactly one CancelChat for this chat's answer, with the answer's own message id, before `then`."""
    await kimi.wait_deleted(len(kimi.created))
    assert [chat for chat, _ in kimi.cancels] == [chat_id]  # (the fake takes only the answer's own message id)
    order = kimi_order(kimi, "CancelChat", then)
    assert order.index("CancelChat") < order.index(then)


async def test_a_client_that_leaves_mid_answer_has_kimi_stop_it(http, proxy, token, kimi):
    kimi.linger = 5.0  # Kimi goes on writing what nobody reads, unless told to stop
    response = await post_chat(http, proxy, token, stream=True, messages=user("scenario:endless"))
    async for line in response.content:
        if b'"content":"0 "' in line:
            break
    response.close()
    await kimi.wait_deleted(1)
    await assert_cancelled_once_before(kimi, kimi.created[0], "DeleteChat")
    assert not kimi.chats[kimi.created[0]].streaming


async def test_an_answer_cut_after_its_only_call_is_stopped(http, proxy, token, kimi):
    kimi.reply_pause, kimi.linger = 0.01, 5.0
    _, answer = await ask_with_tools(http, proxy, token, [block() + "\n" + "后面还有很多字。" * 20], kimi,
                                     parallel_tool_calls=False)
    assert answer["choices"][0]["finish_reason"] == "tool_calls"
    await assert_cancelled_once_before(kimi, kimi.completions[0]["chat"], "DeleteChat")


async def test_a_repair_turn_after_an_abandoned_answer_waits_for_the_cancel(http, proxy, token, kimi):
    """A stop sequence ends the first answer early; its call is bad; Kimi, still writing the first
    answer, would refuse the repair turn if it were not stopped first."""
    kimi.reply_pause, kimi.linger = 0.01, 5.0
    kimi.replies = [block(city=1) + " 停。后面还有很多字。" * 10, block()]
    response = await post_messages(http, proxy, token, messages=user(ASK), tools=[CLAUDE_TOOL], stop_sequences=["停。"])
    message = await response.json()
    assert response.status == 200 and message["stop_reason"] == "tool_use", message
    chat_id = kimi.completions[0]["chat"]
    assert [c["chat"] for c in kimi.completions] == [chat_id, chat_id]
    await assert_cancelled_once_before(kimi, chat_id, "DeleteChat")
    assert kimi_order(kimi, "Chat", "CancelChat") == ["Chat", "CancelChat", "Chat"]  # stopped before the repair


async def test_a_kept_chats_next_turn_after_a_disconnect_waits_for_the_cancel(http, proxy, token, kimi):
    kimi.linger = 5.0
    response = await post_chat(http, proxy, token, stream=True, messages=user("scenario:endless"),
                               conversation_id="new")
    chat_id = response.headers["X-Conversation-Id"]
    async for line in response.content:
        if b'"content":"0 "' in line:
            break
    response.close()
    for _ in range(100):
        if kimi.cancels:
            break
        await asyncio.sleep(0.01)
    second = await post_chat(http, proxy, token, messages=user("还在吗？"), conversation_id=chat_id)
    assert second.status == 200, await second.text()
    assert [chat for chat, _ in kimi.cancels] == [chat_id]  # (the fake takes only the answer's own message id)
    assert kimi_order(kimi, "Chat", "CancelChat") == ["Chat", "CancelChat", "Chat"]
    assert kimi.live_chats == [chat_id]  # kept: the client has its id


async def test_a_finished_answer_is_not_cancelled(http, proxy, token, kimi):
    await (await post_chat(http, proxy, token)).read()
    _, answer = await ask_with_tools(http, proxy, token, [block() + block(city="Rome")], kimi)
    await kimi.wait_deleted(2)
    assert kimi.cancels == [] and len(answer["choices"][0]["message"]["tool_calls"]) == 2


@pytest.mark.parametrize("path", API_BODIES)
async def test_a_full_chat_is_a_400_before_the_answer_and_an_error_in_it_after(http, proxy, token, kimi, path):
    message = TOO_LONG_EVENT["block"]["exception"]["error"]["localizedMessage"]["message"]
    response = await http.post(proxy + path, json=API_BODIES[path]("scenario:too_long"), headers=auth(token))
    assert response.status == 400
    body = await response.json()
    if path == "/v1/messages":
        assert body["error"]["type"] == "invalid_request_error" and message in body["error"]["message"]
    else:
        assert message in assert_envelope(body, "context_length_exceeded")["message"]
    response = await http.post(proxy + path, json=API_BODIES[path]("scenario:too_long_later"), headers=auth(token))
    raw = await response.read()
    assert response.status == 200 and message.encode() in raw
    if path == "/v1/chat/completions":
        assert_envelope(sse_payloads(raw)[-1], "context_length_exceeded")
    elif path == "/v1/responses":
        assert responses_events(raw)[-1]["response"]["error"]["code"] == "context_length_exceeded"
    else:
        assert anthropic_events(raw)[-1]["type"] == "error"
    await kimi.wait_deleted(2)
    assert kimi.cancels == []  # Kimi ended those answers itself


async def test_words_of_the_users_own_message_are_never_a_failure(sdk, kimi):
    """Kimi echoes the user's message in a `message` frame: only `error` and block.exception fail."""
    text = 'unauthenticated {"error": {"code": "resource_exhausted"}} block.exception REASON_TOKEN_LENGTH_TOO_LONG'
    reply = await sdk.chat.completions.create(model="kimi", messages=user(text))
    assert reply.choices[0].message.content == "".join(ANSWER)
    assert kimi.completions[0]["prompt"] == text


async def test_quota_in_token_check_and_healthz(start_proxy, http, kimi):
    pool = [kimi.add_user(), kimi.add_user()]
    proxy = await start_proxy(KIMI_TOKENS=",".join(pool), API_KEYS=POOL_KEY)
    checked = await (await http.post(proxy + "/token/check", json={"token": pool[0]}, headers=auth(POOL_KEY))).json()
    assert list(checked) == ["live", "quota"] and checked["live"] is True
    assert checked["quota"] == {
        "5h": {"used": 0.3472, "enabled": True, "resets_at": "2026-09-29T10:30:32.618725Z"},
        "7d": {"used": 0.4811, "enabled": True, "resets_at": "2026-10-05T00:30:32.618725Z"},
        "balance": {"feature": "FEATURE_OMNI", "unit": "UNIT_CREDIT", "used": 0.5937, "expires_at": "2026-10-10T00:00:00Z"}}
    for _ in range(3):
        health = await (await http.get(proxy + "/healthz", headers=auth(POOL_KEY))).json()
    assert [token["quota"]["5h"]["used"] for token in health["tokens"]] == [0.3472, 0.3472]
    assert kimi.quota_calls == 2  # once a token: remembered for a minute
    dead = await (await http.post(proxy + "/token/check", json={"token": "expired"}, headers=auth(POOL_KEY))).json()
    assert dead == {"live": False}


async def test_a_request_refused_for_quota_says_when_the_window_resets(http, proxy, token, kimi):
    kimi.rate_limited.add(kimi.user_of(token))
    response = await post_chat(http, proxy, token)
    assert response.status == 429
    message = assert_envelope(await response.json(), "rate_limit_exceeded")["message"]
    assert "5h window 35% used, resets at 2026-09-29T10:30:32.618725Z" in message and "7d window 48% used" in message


async def test_the_retired_kimi_auth_cookie_is_refused_with_what_to_send_instead(http, proxy, kimi):
    now = int(time.time())
    cookie = make_jwt({"iss": "user-center", "typ": "access", "sub": xid(), "iat": now, "exp": now + 30 * 86400})
    response = await post_chat(http, proxy, cookie)
    assert response.status == 401
    message = assert_envelope(await response.json(), "invalid_api_key")["message"]
    assert "kimi-auth" in message and "Local Storage" in message and "refresh_token" in message
    assert kimi.calls == []  # known without asking Kimi


async def test_kimis_401_body_of_2026_rejects_the_token(http, proxy, kimi):
    access = kimi.issue_access_token(xid(), ttl=3600)
    kimi.revoke_access_tokens()  # Kimi answers with the real 401 body (REASON_INVALID_AUTH_TOKEN)
    response = await post_chat(http, proxy, access)
    assert response.status == 401 and assert_envelope(await response.json(), "invalid_api_key")


async def test_ref_citations_become_references(sdk, kimi):
    reply = await sdk.chat.completions.create(model="kimi-search", messages=user("scenario:ref_citations"))
    lines = "".join(f"【检索 {n}】 [{title}]({url})\n" for n, (title, url) in enumerate(SOURCES, 1))
    assert reply.choices[0].message.content == lines + "\n" + ANSWER[0] + "[^1][^2]" + ANSWER[1]
    silent = await sdk.chat.completions.create(model="kimi-search-silent", messages=user("scenario:ref_citations"))
    assert silent.choices[0].message.content == ANSWER[0] + ANSWER[1]


@pytest.mark.parametrize("text, expected", [
    ("a<REF>cite✦tools://web_search:1#1:~:text=x</REF>b", "a[^2]b"),
    ("a <REF>not a citation</REF> b", "a <REF>not a citation</REF> b"),
    ("x < y and <RE", "x < y and <RE"),
])
def test_ref_markers_however_split(text, expected):
    for size in range(1, len(text) + 1):
        rewriter = kp.CitationRewriter()
        out = "".join(rewriter.feed(text[i:i + size], {"web_search:1#0": 1, "web_search:1#1": 2}, False)
                      for i in range(0, len(text), size)) + rewriter.flush()
        assert out == expected, size


async def test_a_host_that_refuses_options_model_is_asked_by_scenario(sdk, kimi, caplog):
    kimi.model_option = False
    for _ in range(2):
        reply = await sdk.chat.completions.create(model="kimi", messages=user("hi"))
        assert reply.choices[0].message.content == "".join(ANSWER)
    assert kimi_order(kimi, "Chat") == ["Chat"] * 3  # refused once, then asked by scenario, twice
    assert ["model" in c["body"]["options"] for c in kimi.completions] == [False, False]
    assert [r.message for r in caplog.records if "refuses options.model" in r.message] == \
        [f"Kimi refuses options.model k2d6-chat at {kimi.url}: asking for it by its scenario only"]
    await kimi.wait_deleted(len(kimi.created))
    assert kimi.live_chats == []


async def test_numeric_file_statuses_read_like_their_names(sdk, kimi):
    kimi.numeric_statuses = True
    await sdk.chat.completions.create(model="kimi", messages=with_files(
        {"type": "file", "file": {"file_data": data_uri("application/pdf", PDF), "filename": "a.pdf"}}))
    (seen,) = kimi.completions
    assert [kimi.files[f]["name"] for f in seen["files"]] == ["a.pdf"]


def test_chat_stop_sequences():
    assert chat_request({"messages": user("q"), "stop": "END"}).stop == ("END",)
    assert chat_request({"messages": user("q"), "stop": ["a", "b"]}).stop == ("a", "b")
    with pytest.raises(kp.ProxyError) as caught:
        chat_request({"messages": user("q"), "stop": ["a"] * 5})
    assert caught.value.param == "stop"


# ---------------------------------------------------------------------------------------------
# Running it for real: a server-side pool, token health, limits, shutdown
# ---------------------------------------------------------------------------------------------


POOL_KEY = "sk-pool-key-for-tests"


def test_a_pool_without_api_keys_is_refused():
    with pytest.raises(kp.ConfigError, match="API_KEYS") as caught:
        kp.Config.from_env({"KIMI_TOKENS": "t1,t2"})
    assert "open relay" in str(caught.value)
    config = kp.Config.from_env({"KIMI_TOKENS": "secret-token-1, secret-token-2", "API_KEYS": "secret-key"})
    assert config.kimi_tokens == ("secret-token-1", "secret-token-2") and config.api_keys == ("secret-key",)
    assert "secret" not in repr(config)  # a config printed by mistake shows no secret
    result = subprocess.run([sys.executable, "kimi_proxy.py"], env={**os.environ, "KIMI_TOKENS": "t1"},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "open relay" in result.stderr and result.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("env, variable", [
    ({"ALLOW_PASSTHROUGH": "maybe"}, "ALLOW_PASSTHROUGH"), ({"MAX_STREAMS_PER_TOKEN": "2.5"}, "MAX_STREAMS_PER_TOKEN"),
    ({"QUEUE_TIMEOUT": "-1"}, "QUEUE_TIMEOUT"), ({"MAX_MESSAGES": "0"}, "MAX_MESSAGES"),
])
def test_invalid_pool_settings_name_the_variable(env, variable):
    with pytest.raises(kp.ConfigError, match=variable):
        kp.Config.from_env(env)


async def test_pool_answers_only_to_its_keys(start_proxy, http, kimi):
    pool = [kimi.add_user(), kimi.add_user()]
    proxy = await start_proxy(KIMI_TOKENS=",".join(pool), API_KEYS="key-one,key-two")
    for headers in ({}, auth("wrong-key"), auth(pool[0]), {"Authorization": "key-one"}):
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/token/check"),
                             ("GET", "/healthz")):
            response = await http.request(method, proxy + path, json={"messages": user("hi"), "token": pool[0]},
                                          headers=headers)
            assert response.status == 401, (headers, path)
            assert_envelope(await response.json(), "invalid_api_key")
    assert kimi.calls == []  # nothing reached Kimi: no token tried, no chat created
    for key in ("key-one", "key-two"):
        response = await post_chat(http, proxy, key)
        assert response.status == 200
    assert {c["user"] for c in kimi.completions} == {kimi.user_of(t) for t in pool}
    assert (await http.get(proxy + "/v1/models", headers=auth("key-two"))).status == 200


async def test_pool_with_passthrough_allowed(start_proxy, http, kimi):
    pool_token, own_token = kimi.add_user(), kimi.add_user()
    proxy = await start_proxy(KIMI_TOKENS=pool_token, API_KEYS="the-key", ALLOW_PASSTHROUGH="1")
    assert (await post_chat(http, proxy, "the-key")).status == 200
    assert (await post_chat(http, proxy, own_token)).status == 200
    assert [c["user"] for c in kimi.completions] == [kimi.user_of(pool_token), kimi.user_of(own_token)]
    assert (await http.post(proxy + "/v1/chat/completions", json={"messages": user("hi")})).status == 401


async def test_a_dead_token_in_the_pool_is_tried_once(start_proxy, http, kimi):
    good = kimi.add_user()
    kimi.banned.add(dead := kimi.add_user())
    proxy = await start_proxy(KIMI_TOKENS=f"{dead},{good}", API_KEYS=POOL_KEY)
    replies = [await post_chat(http, proxy, POOL_KEY, stream=bool(i % 2)) for i in range(10)]
    assert [r.status for r in replies] == [200] * 10
    assert kimi.refreshes[kimi.user_of(dead)] == 1
    health = await (await http.get(proxy + "/healthz", headers=auth(POOL_KEY))).json()
    assert [t["state"] for t in health["tokens"]] == ["dead", "alive"] and health["status"] == "ok"
    assert health["tokens"][0]["id"] == kp.fingerprint(dead) and dead not in json.dumps(health)


async def test_a_rate_limited_token_cools_down(start_proxy, http, kimi):
    good, limited = kimi.add_user(), kimi.add_user()
    kimi.rate_limited.add(kimi.user_of(limited))
    proxy = await start_proxy(KIMI_TOKENS=f"{limited},{good}", API_KEYS=POOL_KEY)
    for _ in range(6):
        assert (await post_chat(http, proxy, POOL_KEY)).status == 200
    assert kimi.refused[kimi.user_of(limited)] == 1  # asked once, then left to rest
    health = await (await http.get(proxy + "/healthz", headers=auth(POOL_KEY))).json()
    assert health["tokens"][0]["state"] == "cooling" and 0 < health["tokens"][0]["cooling_s"] <= 7


async def test_when_every_token_rests_the_answer_is_429_at_once(http, proxy, kimi, token):
    kimi.rate_limited.add(kimi.user_of(token))
    first = await post_chat(http, proxy, token)
    assert first.status == 429 and first.headers["Retry-After"] == "7"
    await kimi.wait_deleted(len(kimi.created))
    calls = len(kimi.calls)
    second = await post_chat(http, proxy, token, stream=True)
    assert second.status == 429 and 1 <= int(second.headers["Retry-After"]) <= 7
    assert len(kimi.calls) == calls  # Kimi was not asked again while the token rests
    kimi.banned.add(token)
    response = await post_chat(http, proxy, "not-a-token")
    assert response.status == 401
    response = await post_chat(http, proxy, "not-a-token")  # known dead: refused without asking Kimi
    assert response.status == 401 and kimi.refreshes["not-a-token"] == 1


async def test_a_5xx_rests_the_token_briefly(http, proxy, kimi, token):
    kimi.fail("POST", kimi.START_PATH, 503, times=3)
    assert (await post_chat(http, proxy, token)).status == 502
    response = await post_chat(http, proxy, token)
    assert response.status == 429 and int(response.headers["Retry-After"]) <= kp.OUTAGE_COOL_DOWN


@pytest.mark.dialects("legacy")
async def test_exhausted_research_quota_cools_nothing(http, proxy, kimi, token):
    kimi.research[kimi.user_of(token)] = {"remain": 0, "total": 3, "used": 3}
    assert (await post_chat(http, proxy, token, model="kimi-research")).status == 429
    assert (await post_chat(http, proxy, token, model="kimi")).status == 200


async def test_streams_per_token_are_capped(start_proxy, http, kimi):
    pool = [kimi.add_user(), kimi.add_user()]
    proxy = await start_proxy(KIMI_TOKENS=",".join(pool), API_KEYS=POOL_KEY, MAX_STREAMS_PER_TOKEN="4")

    async def one(index: int) -> int:
        response = await post_chat(http, proxy, POOL_KEY, stream=True, messages=user(f"scenario:pace {index}"))
        content_of(sse_payloads(await response.read()))
        return response.status

    assert await asyncio.gather(*(one(i) for i in range(50))) == [200] * 50
    assert max(kimi.max_open_by_user.values()) <= 4 and kimi.max_open_streams == 8
    await kimi.wait_deleted(50)


async def test_a_full_token_queue_times_out_with_429(start_proxy, http, kimi, token):
    proxy = await start_proxy(MAX_STREAMS_PER_TOKEN="1", QUEUE_TIMEOUT="0.2")
    replies = await asyncio.gather(*(post_chat(http, proxy, token, messages=user("scenario:slow")) for _ in range(3)))
    statuses = sorted(r.status for r in replies)
    assert statuses[0] == 200 and statuses[-1] == 429
    busy = next(r for r in replies if r.status == 429)
    assert busy.headers["Retry-After"] == "1" and "busy" in (await busy.json())["error"]["message"]


async def test_healthz_counts_open_answers(http, proxy, token, kimi):
    streaming = await post_chat(http, proxy, token, stream=True, messages=user("scenario:endless"))
    await streaming.content.readline()
    health = await (await http.get(proxy + "/healthz")).json()
    assert health["status"] == "ok" and health["in_flight"] == 1 and health["uptime_s"] >= 0
    assert health["tokens"] == [{"id": kp.fingerprint(token), "state": "alive", "in_flight": 1, "cooling_s": 0}]
    streaming.close()
    await kimi.wait_deleted(1)


async def test_body_far_over_the_limit_gets_413(start_proxy, http, token, kimi):
    proxy = await start_proxy(MAX_BODY_MB="1", MAX_MESSAGES="3")
    huge = b'{"messages": [{"role": "user", "content": "' + b"x" * (40 * 1024 * 1024) + b'"}]}'
    response = await http.post(proxy + "/v1/chat/completions", data=io.BytesIO(huge), headers=auth(token))
    assert response.status == 413
    assert_envelope(await response.json(), "request_too_large")
    response = await post_chat(http, proxy, token, messages=user("a") * 4)
    assert response.status == 400
    assert "MAX_MESSAGES" in assert_envelope(await response.json(), param="messages")["message"]
    assert kimi.calls == []


async def test_sigterm_ends_open_streams_and_deletes_their_chats(kimi, http):
    tokens = [kimi.add_user() for _ in range(5)]
    port = free_port()
    env = {**os.environ, "KIMI_BASE_URL": kimi.url, "KIMI_PROTOCOL": kimi.PROTOCOL, "SHUTDOWN_GRACE": "0.5"}
    server = await asyncio.create_subprocess_exec(sys.executable, "kimi_proxy.py", "--host", "127.0.0.1",
                                                  "--port", str(port), env=env, stderr=subprocess.PIPE)
    proxy = f"http://127.0.0.1:{port}"
    try:
        await wait_until_serving(http, proxy)
        streams = [await post_chat(http, proxy, ",".join(tokens), stream=True, messages=user(f"scenario:endless {i}"))
                   for i in range(20)]
        first_lines = [await stream.content.readline() for stream in streams]
        assert kimi.open_streams == 20
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        bodies = await asyncio.gather(*(stream.read() for stream in streams))
        _, stderr = await server.communicate()
        assert server.returncode == 0 and time.monotonic() - started < 0.5 + 5
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()
    for first_line, body in zip(first_lines, bodies, strict=True):
        *chunks, error = sse_payloads(first_line + body)
        assert chunks and assert_envelope(error, "shutting_down")
    assert len(kimi.created) == 20 and sorted(kimi.deleted) == sorted(kimi.created)
    assert not any(token in stderr.decode() for token in tokens)


# ---------------------------------------------------------------------------------------------
# Anything a client can send: a success or a 4xx OpenAI error, never a 5xx, nothing left open
# ---------------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**15) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8)
CONTENT_PARTS = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["text", "input_text", "refusal", "image_url", "file", "audio"]) | JSON_VALUES,
    "text": st.text(max_size=30) | JSON_VALUES, "refusal": st.text(max_size=10), "image_url": JSON_VALUES})
MESSAGES = st.lists(st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "robot"]) | JSON_VALUES,
    "content": st.text(max_size=40) | st.lists(CONTENT_PARTS, max_size=3) | JSON_VALUES,
    "tool_calls": JSON_VALUES, "reasoning_content": JSON_VALUES, "name": JSON_VALUES}), max_size=4) | JSON_VALUES
CHAT_BODIES = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["kimi", "kimi-search-silent", "kimi-k1", "kimi-k2.6-thinking", "kimi-research",
                              "gpt-4o", "search0000000000000a"]) | JSON_VALUES,
    "messages": MESSAGES, "stream": st.booleans() | JSON_VALUES,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | JSON_VALUES}) | JSON_VALUES,
    "n": st.integers(-1, 3) | JSON_VALUES, "use_search": st.booleans() | JSON_VALUES,
    "conversation_id": st.sampled_from(["abc", "cr7p4ik2lq1s5t0u9v3g"]) | JSON_VALUES,
    "temperature": JSON_VALUES, "max_tokens": JSON_VALUES,
    "tool_choice": st.sampled_from(["auto", "required", "none", {"type": "function", "function": {"name": "f"}}])
    | JSON_VALUES,
    "tools": st.just([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]) | JSON_VALUES,
    "functions": JSON_VALUES, "function_call": JSON_VALUES, "parallel_tool_calls": JSON_VALUES,
    "response_format": st.sampled_from([{"type": "json_object"}, {"type": "json_schema", "json_schema": {}}])
    | JSON_VALUES})
ENDPOINTS = [("POST", "/v1/chat/completions"), ("POST", "/chat/completions"), ("GET", "/v1/models"),
             ("GET", "/v1/models/kimi"), ("POST", "/token/check"), ("GET", "/healthz"), ("GET", "/ping"),
             ("GET", "/"), ("PUT", "/v1/chat/completions"), ("POST", "/v1/embeddings")]
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "60")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


async def assert_client_safe(http, proxy, kimi, method: str, path: str, data: bytes, headers: dict) -> None:
    response = await http.request(method, proxy + path, data=data, headers=headers)
    raw = await response.read()
    # (a required tool call the fake Kimi never makes is Kimi failing, not the client)
    assert response.status < 500 or b'"code":"invalid_kimi_answer"' in raw, raw[:300]
    if response.status >= 400:
        assert_envelope(orjson.loads(raw))
    kimi.kept = getattr(kimi, "kept", set()) | set(response.headers.getall("X-Conversation-Id", []))
    # nothing is left open upstream: every chat that was not handed over as kept gets deleted
    await kimi.wait_deleted(len([chat for chat in kimi.created if chat not in kimi.kept]))
    assert kimi.open_streams == 0 or await asyncio.sleep(0.2) or kimi.open_streams == 0


@FUZZ
@given(body=CHAT_BODIES, path=st.sampled_from(["/v1/chat/completions", "/chat/completions"]))
async def test_any_chat_request_is_answered_or_refused_cleanly(http, proxy, token, kimi, body, path):
    await assert_client_safe(http, proxy, kimi, "POST", path, orjson.dumps(body), auth(token))


# hosts that fail before any lookup (so the fuzzer never makes the proxy ask DNS) or private literals
HOSTS = st.sampled_from(["[::1", "[zz::1]", "a..b", "xn--", "a" * 64 + ".cn", "127.0.0.1", "[::ffff:127.0.0.1]",
                         "[::127.0.0.1]", "10.0.0.1", "[64:ff9b:1::a00:1]", "", "exa mple.cn"]) \
    | st.text(max_size=12).map(lambda text: text + "..x")
FILE_URLS = st.builds("{}://{}{}/{}".format, st.sampled_from(["http", "https", "HTTP", "ftp", "file", ""]), HOSTS,
                      st.sampled_from(["", ":0", ":80", ":99999", ":-1", ":x", ":"]), st.text(max_size=8))
MEDIA_TYPES = st.sampled_from(["image/png", "application/pdf", "", "a/b c", "x"]) | st.text(max_size=12)
ATTACHMENTS = st.one_of(
    st.builds(lambda url: {"type": "image_url", "image_url": {"url": url}}, FILE_URLS),
    st.builds(lambda url: {"type": "file", "file_url": {"url": url}}, FILE_URLS),
    st.builds(lambda mime, data: {"type": "file", "file": {"file_data": f"data:{mime};base64,{data}"}},
              MEDIA_TYPES, st.sampled_from(["aGk=", "", "!!", "aGk", "aG k="])))


@FUZZ
@given(parts=st.lists(ATTACHMENTS, min_size=1, max_size=2), stream=st.booleans())
async def test_any_attachment_is_answered_or_refused_cleanly(http, proxy, token, kimi, parts, stream):
    body = {"model": "kimi", "stream": stream, "messages": with_files(*parts)}
    await assert_client_safe(http, proxy, kimi, "POST", "/v1/chat/completions", orjson.dumps(body), auth(token))


@FUZZ
@given(value=st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b),
       endpoint=st.sampled_from(ENDPOINTS))
async def test_any_authorization_bytes_are_answered_cleanly(proxy, kimi, value, endpoint):
    method, path = endpoint
    answer = await raw_request(proxy, f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n".encode()
                               + b"Authorization: Bearer " + value + b"\r\nConnection: close\r\n\r\n{}")
    assert status_of(answer) < 500, answer[:300]


@FUZZ
@given(data=st.binary(max_size=200) | JSON_VALUES.map(orjson.dumps), endpoint=st.sampled_from(ENDPOINTS),
       bearer=st.sampled_from(["", "Bearer ", "Bearer a,,b", "Basic x"])
       | st.text(st.characters(min_codepoint=0x20, exclude_categories=["Cc", "Cs"]), max_size=20).map("Bearer ".__add__))
async def test_any_bytes_at_any_endpoint_are_answered_cleanly(http, proxy, kimi, data, endpoint, bearer):
    headers = {"Authorization": bearer} if bearer else {}
    await assert_client_safe(http, proxy, kimi, *endpoint, data, headers)


# ---------------------------------------------------------------------------------------------
# Documents and images
# ---------------------------------------------------------------------------------------------

PDF = b"%PDF-1.4\n" + bytes(range(256)) * 800 + b"\n%%EOF\n"   # about 200 KB
PNG = b"\x89PNG\r\n\x1a\n" + secrets.token_bytes(4096)


def data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def with_files(*parts: dict, text: str = "总结这个文件") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}]


class FileServer:
    """The web servers clients point file URLs at, recording what was fetched."""

    def __init__(self) -> None:
        self.fetched: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/redirect", self.redirect)
        app.router.add_get("/slow_redirect", self.slow_redirect)
        app.router.add_get("/stream/{name}", self.stream)
        app.router.add_get("/{name}", self.file)
        return app

    async def file(self, request: web.Request) -> web.Response:
        self.fetched.append(request.path)
        name = request.match_info["name"]
        body = PNG if name.endswith(".png") else PDF
        return web.Response(body=body, content_type="image/png" if name.endswith(".png") else "application/pdf")

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """No Content-Length: the length is only known at the end (and may be over any limit)."""
        self.fetched.append(request.path)
        response = web.StreamResponse(headers={"Content-Type": "application/pdf"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(PDF), 50_000):
            await response.write(PDF[start:start + 50_000])
        await response.write_eof()
        return response

    async def redirect(self, request: web.Request) -> web.Response:
        self.fetched.append(request.path)
        raise web.HTTPFound(request.query["to"])

    async def slow_redirect(self, request: web.Request) -> web.Response:
        await asyncio.sleep(0.4)  # long enough for a keep-alive to start the client's stream
        return web.Response(status=302, headers={"Location": request.query["to"]})


@pytest.fixture
async def files():
    server = FileServer()
    runner, server.url = await start_app(server.app())
    yield server
    await runner.cleanup()


def assert_uploaded(kimi, completion: dict, expected: dict[str, bytes]) -> None:
    """Kimi got exactly these files (name -> bytes), attached to this completion."""
    attached = {kimi.files[file_id]["name"]: kimi.uploads[kimi.files[file_id]["object_name"]]
                for file_id in completion["files"]}
    assert attached == expected


@BOTH_DIALECTS
async def test_documents_and_images_as_data_uris(sdk, kimi):
    reply = await sdk.chat.completions.create(model="kimi", messages=with_files(
        {"type": "image_url", "image_url": {"url": data_uri("image/png", PNG), "detail": "high"}},
        {"type": "file", "file": {"file_data": data_uri("application/pdf", PDF), "filename": "report.pdf"}}))
    assert reply.choices[0].message.content == "".join(ANSWER)
    [completion] = kimi.completions
    assert_uploaded(kimi, completion, {"image.png": PNG, "report.pdf": PDF})
    assert {kimi.files[i]["type"] for i in completion["files"]} == {"image", "file"}
    assert completion["prompt"] == "总结这个文件"
    await kimi.wait_deleted(1)


@BOTH_DIALECTS
async def test_documents_and_images_by_url(start_proxy, http, kimi, token, files):
    proxy = await start_proxy(ALLOW_PRIVATE_FILE_URLS="1")
    response, _, chunks = await stream_chunks(http, proxy, token, messages=with_files(
        {"type": "image_url", "image_url": files.url + "/photo.png"},
        {"type": "file", "file_url": {"url": files.url + "/annual%20report.pdf"}},
        {"type": "file", "file_url": {"url": files.url + "/stream/chunked.pdf"}}))
    assert response.status == 200 and content_of(chunks) == "".join(ANSWER)
    assert_uploaded(kimi, kimi.completions[0], {"photo.png": PNG, "annual report.pdf": PDF, "chunked.pdf": PDF})
    assert sorted(files.fetched) == ["/annual report.pdf", "/photo.png", "/stream/chunked.pdf"]
    await kimi.wait_deleted(1)


async def test_attachments_of_earlier_messages_are_not_sent(sdk, kimi):
    await sdk.chat.completions.create(model="kimi", messages=[
        *with_files({"type": "image_url", "image_url": {"url": data_uri("image/png", PNG)}}, text="这是什么"),
        {"role": "assistant", "content": "一张图片"}, {"role": "user", "content": "谢谢"}])
    assert kimi.completions[0]["files"] == [] and kimi.uploads == {}
    assert "关注用户最新的消息" in kimi.completions[0]["prompt"]


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:{port}/doc.pdf", "http://localhost:{port}/doc.pdf", "http://10.1.2.3/doc.pdf",
    "http://192.168.0.10/doc.pdf", "http://169.254.169.254/latest/meta-data/", "http://[::1]:{port}/doc.pdf",
    "http://[::ffff:127.0.0.1]:{port}/doc.pdf", "http://0.0.0.0:{port}/doc.pdf", "http://224.0.0.1/doc.pdf",
])
async def test_private_file_urls_are_refused(http, proxy, token, kimi, files, url):
    url = url.format(port=files.url.rsplit(":", 1)[1])
    response = await post_chat(http, proxy, token, messages=with_files({"type": "file", "file_url": {"url": url}}))
    assert response.status == 400
    error = assert_envelope(await response.json(), param="messages[0].content[1]")
    assert "private or local network" in error["message"] and "127.0.0.1" not in error["message"]
    assert files.fetched == [] and kimi.uploads == {}
    await kimi.wait_deleted(len(kimi.created))
    assert kimi.live_chats == []


@pytest.mark.dialects("legacy")
async def test_a_redirect_to_a_private_address_is_refused(http, proxy, token, kimi, monkeypatch):
    public_looking = FileServer()  # stands for a public server: only 127.0.0.2 counts as public here
    runner = web.AppRunner(public_looking.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.2", 0).start()
    port = runner.addresses[0][1]
    real_check = kp.is_public_address
    monkeypatch.setattr(kp, "is_public_address", lambda address: address == "127.0.0.2" or real_check(address))
    try:
        target = f"http://127.0.0.1:{port}/doc.pdf"
        for hop in (f"http://127.0.0.2:{port}/doc.pdf",):  # the public-looking server itself is fetched
            response = await post_chat(http, proxy, token, messages=with_files({"type": "file", "file_url": {"url": hop}}))
            assert response.status == 200
        response = await post_chat(http, proxy, token, messages=with_files(
            {"type": "file", "file_url": {"url": f"http://127.0.0.2:{port}/redirect?to={target}"}}))
        assert response.status == 400
        assert "private or local network" in (await response.json())["error"]["message"]
        assert public_looking.fetched == ["/doc.pdf", "/redirect"]  # the private target was never asked
    finally:
        await runner.cleanup()
    await kimi.wait_deleted(len(kimi.created))


async def test_file_size_caps(start_proxy, http, token, kimi, files):
    proxy = await start_proxy(ALLOW_PRIVATE_FILE_URLS="1", MAX_FILE_MB="0.1")  # 100 KiB, PDF is ~200 KB
    for part in ({"type": "file", "file_url": {"url": files.url + "/big.pdf"}},          # refused by its header
                 {"type": "file", "file_url": {"url": files.url + "/stream/big.pdf"}},   # no header: cut off
                 {"type": "file", "file": {"file_data": data_uri("application/pdf", PDF), "filename": "a.pdf"}}):
        response = await post_chat(http, proxy, token, stream=True, messages=with_files(part))
        assert response.status == 413
        error = assert_envelope(await response.json(), "file_too_large", "messages[0].content[1]")
        assert "MAX_FILE_MB" in error["message"]
    assert kimi.uploads == {}
    await kimi.wait_deleted(len(kimi.created))
    assert kimi.live_chats == []


@BOTH_DIALECTS
async def test_parse_failure_and_slow_parse(start_proxy, http, token, kimi):
    proxy = await start_proxy(FILE_PARSE_TIMEOUT="0.8")
    failing = {"type": "file", "file": {"file_data": data_uri("application/pdf", PDF), "filename": "parse_fail.pdf"}}
    response = await post_chat(http, proxy, token, messages=with_files(failing))
    assert response.status == 422
    assert "parse_fail" not in (error := assert_envelope(await response.json(), "file_unreadable"))["message"] \
        and error["param"] == "messages[0].content[1]"
    calls = kimi.parse_calls
    slow = {"type": "file", "file": {"file_data": data_uri("application/pdf", PDF), "filename": "slow_parse.pdf"}}
    response = await post_chat(http, proxy, token, stream=True, messages=with_files(slow))
    assert response.status == 504
    assert "FILE_PARSE_TIMEOUT" in assert_envelope(await response.json(), "file_timeout")["message"]
    assert 2 <= kimi.parse_calls - calls <= 5  # it asked again, backing off, not in a tight loop
    assert kimi.completions == []
    await kimi.wait_deleted(len(kimi.created))
    assert kimi.live_chats == []


# ---------------------------------------------------------------------------------------------
# Hardening: what an attacker found (each test failed before its fix)
# ---------------------------------------------------------------------------------------------


async def raw_request(url: str, data: bytes, wait: float = 5.0) -> bytes:
    """Bytes as no HTTP client would send them, and whatever comes back."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(wait):
            return await reader.read(65536)
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


async def test_a_long_model_name_is_refused(http, proxy, token, kimi):
    response = await post_chat(http, proxy, token, model="m" * 257)
    assert response.status == 400 and assert_envelope(await response.json(), param="model")
    assert (await post_chat(http, proxy, token, model="m" * 256)).status == 200
    assert len(kimi.completions) == 1


async def test_a_bug_mid_stream_still_ends_the_stream(http, proxy, token, kimi, monkeypatch):
    real = kp.AnswerTranslator.parts_of

    def fails_after_the_first_text(self, events):
        parts = real(self, events)
        if any(kind == kp.TEXT for kind, _ in parts):
            self.parts_of = lambda events: 1 / 0
        return parts

    monkeypatch.setattr(kp.AnswerTranslator, "parts_of", fails_after_the_first_text)
    response = await post_chat(http, proxy, token, stream=True, messages=user("scenario:pace"))
    raw = await response.read()
    assert response.status == 200 and b"HTTP/1.1" not in raw
    *chunks, error = sse_payloads(raw)  # ends with an error event and [DONE]
    assert assert_envelope(error, "internal_error") and content_of(chunks)
    await kimi.wait_deleted(len(kimi.created))
    assert kimi.live_chats == []


@pytest.mark.dialects("legacy")
async def test_a_redirect_to_a_broken_url_after_the_stream_began(start_proxy, http, token, kimi, files):
    proxy = await start_proxy(ALLOW_PRIVATE_FILE_URLS="1", KEEPALIVE_INTERVAL="0.1")
    part = {"type": "file", "file_url": {"url": files.url + "/slow_redirect?to=http://[::1"}}
    response = await post_chat(http, proxy, token, stream=True, messages=with_files(part))
    *_, error = sse_payloads(await response.read())
    assert response.status == 200 and "redirects to a URL that is not one" in assert_envelope(error)["message"]
    await kimi.wait_deleted(len(kimi.created))
    assert kimi.live_chats == []


@pytest.mark.parametrize("header", [
    b"Authorization : Bearer SECRET-TOKEN-ONE", b"Authorization: Bearer SECRET\x01TOKEN-TWO",
    b"Authorization: Bearer a\r\n SECRET-TOKEN-THREE", b"Authorization: Bearer SECRET-TOKEN-FOUR" + b"x" * 9000])
async def test_malformed_headers_never_reach_a_log(proxy, caplog, header):
    caplog.set_level(logging.DEBUG)
    answer = await raw_request(proxy, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n")
    assert status_of(answer) == 400
    await asyncio.sleep(0.05)
    assert "SECRET" not in caplog.text


def test_server_logs_say_a_repeated_error_once_a_second():
    guard, records = kp.ServerLogGuard(), []
    for _ in range(1000):
        record = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "socket.accept() out of system resource",
                                   (), None)
        if guard.filter(record):
            records.append(record)
    assert len(records) == 1


@pytest.mark.parametrize("url", [
    "http://example.com:99999/a.pdf", "http://[::1/a.pdf", "http://[zz::1]/a.pdf", "http:///a.pdf",
    "http://" + "a" * 64 + ".example.com/a.pdf", "http://xn--/a.pdf", "http://a..b/a.pdf", "http://exa mple.com/a.pdf",
    "http://example.com:0/a.pdf", "ftp://example.com/a.pdf"])
async def test_bad_file_urls_are_400s(http, proxy, token, kimi, url):
    response = await post_chat(http, proxy, token, messages=with_files({"type": "file", "file_url": {"url": url}}))
    assert response.status == 400
    assert_envelope(await response.json(), param="messages[0].content[1]")


@pytest.mark.parametrize("mime", ["image/png\r\nX-Injected: 1", "text/plain\x00", "no-slash", "a/b c"])
async def test_data_uris_with_a_broken_media_type_are_400s(http, proxy, token, kimi, mime):
    uri = f"data:{mime};base64,{base64.b64encode(PNG).decode()}"
    response = await post_chat(http, proxy, token, messages=with_files({"type": "image_url", "image_url": {"url": uri}}))
    assert response.status == 400
    assert_envelope(await response.json(), param="messages[0].content[1]")


@pytest.mark.parametrize("token_text", ["abc\r\ndef", "abc\x00", "a b", "é", ""])
async def test_token_check_refuses_what_no_token_holds(http, proxy, kimi, token_text):
    response = await http.post(proxy + "/token/check", json={"token": token_text})
    assert response.status == 400 and assert_envelope(await response.json(), param="token")
    assert kimi.calls == []


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models", "/healthz", "/token/check"])
async def test_a_bearer_that_is_not_utf8_is_a_401_everywhere(start_proxy, kimi, path):
    proxy = await start_proxy(KIMI_TOKENS=kimi.add_user(), API_KEYS=POOL_KEY, ALLOW_PASSTHROUGH="1")
    method = b"GET" if path in ("/v1/models", "/healthz") else b"POST"
    answer = await raw_request(proxy, method + b" " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                               b"Authorization: Bearer \xff\xfe-token\r\nConnection: close\r\n\r\n{}")
    assert status_of(answer) == 401
    assert kimi.calls == []


async def test_healthz_survives_any_token(start_proxy, http, kimi):
    proxy = await start_proxy()
    for value in (b"\xff\xfe", b"caf\xc3\xa9", b"a,b\x80"):
        answer = await raw_request(proxy, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                                   b"Authorization: Bearer " + value + b"\r\nConnection: close\r\n\r\n{}")
        assert status_of(answer) == 401
    response = await http.get(proxy + "/healthz")
    assert response.status == 200 and (await response.json())["tokens"] == []


async def test_a_body_that_never_comes_is_a_408(start_proxy, kimi, token):
    proxy = await start_proxy(BODY_READ_TIMEOUT="0.3")
    started = time.monotonic()
    answer = await raw_request(proxy, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                               b"Authorization: Bearer " + token.encode() + b"\r\n\r\n{\"mod")
    assert status_of(answer) == 408 and b"BODY_READ_TIMEOUT" in answer
    assert time.monotonic() - started < 3 and kimi.calls == []


async def test_requests_beyond_max_open_requests_get_503(start_proxy, http, kimi, token):
    proxy = await start_proxy(MAX_OPEN_REQUESTS="2", BODY_READ_TIMEOUT="5")
    host, port = proxy.removeprefix("http://").split(":")
    held = [await asyncio.open_connection(host, int(port)) for _ in range(2)]
    for _, writer in held:  # two requests whose bodies never come
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                     b"Authorization: Bearer " + token.encode() + b"\r\n\r\n")
        await writer.drain()
    await asyncio.sleep(0.2)
    response = await http.get(proxy + "/ping")
    assert response.status == 503 and response.headers["Retry-After"] == "1"
    assert assert_envelope(await response.json(), "server_is_overloaded")
    for _, writer in held:
        writer.close()
    await asyncio.sleep(0.2)
    assert (await http.get(proxy + "/ping")).status == 200


@BOTH_DIALECTS
@pytest.mark.parametrize("answer", ["waf_403", "html_200", "json_list_200"])
async def test_only_a_definite_rejection_kills_a_token(start_proxy, http, kimi, answer, monkeypatch):
    monkeypatch.setattr(kp, "OUTAGE_COOL_DOWN", 1.0)  # long enough to see it resting, even on a busy machine
    token = kimi.add_user()
    proxy = await start_proxy(KIMI_TOKENS=token, API_KEYS=POOL_KEY)
    refresh = kimi.REFRESH_RPC if kimi.PROTOCOL == "connect" else "/api/auth/token/refresh"
    method = "POST" if kimi.PROTOCOL == "connect" else "GET"
    status, kind = {"waf_403": (403, "html"), "html_200": (200, "html"), "json_list_200": (200, "list")}[answer]
    kimi.fail(method, refresh, status, times=1, body=[1, 2] if kind == "list" else None, html=kind == "html")
    response = await post_chat(http, proxy, POOL_KEY)
    assert response.status == 502
    health = await (await http.get(proxy + "/healthz", headers=auth(POOL_KEY))).json()
    assert health["tokens"][0]["state"] == "cooling"  # resting briefly, not dead
    await asyncio.sleep(kp.OUTAGE_COOL_DOWN)
    assert (await post_chat(http, proxy, POOL_KEY)).status == 200


async def test_a_dead_token_is_tried_again_after_a_while(start_proxy, http, kimi, monkeypatch):
    monkeypatch.setattr(kp, "DEAD_TOKEN_RETRY", 0.3)
    kimi.banned.add(token := kimi.add_user())
    proxy = await start_proxy(KIMI_TOKENS=token, API_KEYS=POOL_KEY)
    assert (await post_chat(http, proxy, POOL_KEY)).status == 401
    kimi.banned.clear()  # Kimi took the account back
    assert (await post_chat(http, proxy, POOL_KEY)).status == 401  # still dead: not asked again yet
    await asyncio.sleep(0.35)
    assert (await post_chat(http, proxy, POOL_KEY)).status == 200


async def test_log_lines_cannot_be_forged(http, proxy, token, kimi, caplog):
    caplog.set_level(logging.INFO)
    await post_chat(http, proxy, token, model="kimi\nERROR forged line")
    await http.get(proxy + "/v1/nothing%0aERROR%20forged%20path")
    lines = [r.getMessage() for r in caplog.records if r.name == "kimi_proxy"]
    assert lines and not [line for line in lines if "\n" in line]
    assert any("kimi\\nERROR forged line" in line for line in lines)


async def test_a_big_data_uri_goes_through_whole(start_proxy, http, kimi, token):
    image = secrets.token_bytes(3 * 2**20)
    proxy = await start_proxy(MAX_BODY_MB="5")
    body = orjson.dumps({"model": "kimi", "messages": with_files({"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.encodebytes(image).decode()}})})  # line-wrapped base64
    response = await http.post(proxy + "/v1/chat/completions", data=io.BytesIO(body), headers=auth(token))
    assert response.status == 200
    assert_uploaded(kimi, kimi.completions[0], {"image.png": image})
    response = await http.post(proxy + "/v1/chat/completions", data=io.BytesIO(body + b" " * 2 * 2**20),
                               headers=auth(token))
    assert response.status == 413 and "MAX_BODY_MB" in assert_envelope(await response.json())["message"]


async def test_one_request_carries_and_tries_a_bounded_number_of_tokens(http, proxy, kimi):
    response = await post_chat(http, proxy, ",".join(kimi.add_user() for _ in range(33)))
    assert response.status == 400 and kimi.calls == []
    dead = [kimi.add_user() for _ in range(20)]
    kimi.banned.update(dead)
    response = await post_chat(http, proxy, ",".join(dead))
    assert response.status == 401
    assert sum(kimi.refreshes.values()) == kp.MAX_TRIES_PER_REQUEST


@pytest.mark.parametrize("value, seconds", [("²", None), ("9" * 400, None), ("7", 7), ("-1", None),
                                            ("Thu, 01 Jan 1970 00:00:00 GMT", 0)])
def test_retry_after_is_a_number_or_a_date(value, seconds):
    assert kp.retry_after_seconds(value) == seconds
    future = email.utils.format_datetime(datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=90),
                                         usegmt=True)
    assert 85 <= kp.retry_after_seconds(future) <= 91


@BOTH_DIALECTS
@pytest.mark.parametrize("retry_after", ["²", "9" * 400])
async def test_odd_retry_after_from_kimi_is_still_a_429(http, proxy, kimi, token, retry_after):
    kimi.fail("POST", kimi.START_PATH, 429, times=1, body={"code": "resource_exhausted", "error_type": "chat.limit",
                                                          "message": "slow down"}, headers={"Retry-After": retry_after})
    response = await post_chat(http, proxy, token)
    assert response.status == 429 and assert_envelope(await response.json())


@pytest.mark.dialects("legacy")
async def test_a_chat_id_that_is_not_one_is_a_502(http, proxy, kimi, token):
    kimi.fail("POST", "/api/chat", 200, times=1, body={"id": "abc\r\nX-Injected: 1", "name": "x"})
    response = await post_chat(http, proxy, token, stream=True)
    assert response.status == 502 and "chat id" in assert_envelope(await response.json())["message"]


@pytest.mark.parametrize("error", [{"code": "internal", "details": 5}, {"code": 7, "details": ["x", None]},
                                   {"code": "resource_exhausted", "debug": 3, "details": [{"debug": []}]}])
def test_connect_errors_of_any_shape_map_cleanly(error):
    assert kp.from_connect_error(error).status in (429, 502)


@pytest.mark.dialects("connect")
@pytest.mark.parametrize("catalog", [{"availableModels": {"id": "k3"}}, {"availableModels": [1, "x", None]}, []])
async def test_a_catalog_of_the_wrong_shape_means_the_built_in_one(sdk, kimi, catalog):
    kimi.catalog = catalog
    ids = [m.id async for m in sdk.models.list()]
    assert ids == kp.Catalog.from_rpc(kp.FALLBACK_CATALOG).model_ids()


@pytest.mark.parametrize("address, public", [
    ("::127.0.0.1", False), ("::ffff:0:127.0.0.1", False), ("::ffff:0:10.0.0.1", False), ("64:ff9b:1::10.0.0.1", False),
    ("64:ff9b:1::7f00:1", False), ("64:ff9b::8.8.8.8", True), ("::8.8.8.8", True), ("2001:4860:4860::8888", True),
    ("8.8.8.8", True), ("::1", False), ("::", False)])
def test_ipv6_forms_that_embed_ipv4_are_classified_by_it(address, public):
    assert kp.is_public_address(address) is public


async def test_a_token_resting_after_a_kimi_failure_says_so(http, proxy, kimi, token):
    kimi.fail("POST", kimi.START_PATH, 503, times=3)
    assert (await post_chat(http, proxy, token)).status == 502
    response = await post_chat(http, proxy, token)
    message = assert_envelope(await response.json())["message"]
    assert response.status == 429 and "after a Kimi failure" in message and "rate limit" not in message


# ---------------------------------------------------------------------------------------------
# Tools and structured outputs (emulated by prompting: Kimi's web chat has no functions)
# ---------------------------------------------------------------------------------------------


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]},
                                                    "days": {"type": "integer"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = "scenario:reply 巴黎天气怎么样？"


def block(name: str = "get_weather", fenced: bool = False, **arguments) -> str:
    call = json.dumps({"name": name, "arguments": {"city": "Paris", **arguments}}, ensure_ascii=False)
    return f"```tool_call\n{call}\n```" if fenced else f"<tool_call>\n{call}\n</tool_call>"


async def ask_with_tools(http, proxy, token, replies: list[str], kimi, **body) -> tuple[aiohttp.ClientResponse, dict | list]:
    """Ask with the weather tool (unless `tools` is given) while the fake Kimi answers `replies`,
    one per turn; the parsed JSON answer, or the chunks of a stream."""
    kimi.replies = list(replies)
    body.setdefault("tools", [WEATHER])
    body.setdefault("messages", user(ASK))
    if body.pop("stream", False):
        response, _, chunks = await stream_chunks(http, proxy, token, **body)
        return response, chunks
    response = await post_chat(http, proxy, token, **body)
    return response, await response.json()


def streamed_calls(chunks: list[dict]) -> list[dict]:
    """Tool calls put together from stream fragments the way the openai SDK and LangChain do,
    checking the rules they rely on: an index and a function on every fragment, and the id,
    type and name in the first fragment of each call only."""
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for fragment in (chunk.get("choices") or [{}])[0].get("delta", {}).get("tool_calls") or ():
            assert isinstance(fragment["index"], int) and isinstance(fragment["function"], dict)
            call = calls.setdefault(fragment["index"], {"id": None, "name": None, "arguments": ""})
            for key, value in (("id", fragment.get("id")), ("name", fragment["function"].get("name"))):
                if value is not None:
                    assert call[key] is None, f"{key} sent twice"
                    call[key] = value
            call["arguments"] += fragment["function"].get("arguments") or ""
    assert sorted(calls) == list(range(len(calls)))
    return [calls[index] for index in sorted(calls)]


def finish_of(chunks: list[dict]) -> str:
    return next(c["choices"][0]["finish_reason"] for c in chunks if c.get("choices") and c["choices"][0]["finish_reason"])


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 1000])
@pytest.mark.parametrize("text, prose, blocks", [
    ('I will look.\n\n<tool_call>\n{"name": "f"}\n</tool_call>\nThat is all.', "I will look.", ['\n{"name": "f"}\n']),
    ('<tool_call>{"a": 1}</tool_call>  <tool_call>{"b": 2}</tool_call>', "", ['{"a": 1}', '{"b": 2}']),
    ('Sure:\n```tool_call\n{"name": "f"}\n```\n', "Sure:", ['\n{"name": "f"}\n']),
    ("if a < b and c <= d, then ``` is a fence and <tool is no call", "if a < b and c <= d, then ``` is a fence and "
     "<tool is no call", []),
    ('I will look.\n```xml\n<tool_call>{"name": "f"}</tool_call>\n```', "I will look.", ['{"name": "f"}']),
    ('Code:\n```py\nx = 1\n```\n<tool_call>{}</tool_call>', "Code:\n```py\nx = 1\n```", ["{}"]),
    ("```python\nprint(1 < 2)\n```\ndone", "```python\nprint(1 < 2)\n```\ndone", []),
])
def test_call_scanner_keeps_every_block_out_of_the_prose_at_every_chunk_edge(text, prose, blocks, size):
    for start in range(size if size < 1000 else len(text)):  # every offset of the chunk grid
        scanner = kp.CallScanner()
        pieces = [text[:start]] + [text[i:i + size] for i in range(start, len(text), size)]
        out = ""
        for piece in pieces:
            released = scanner.feed(piece)
            assert "<tool_c" not in released and "```tool" not in released
            out += released
        out += scanner.finish()
        assert (out, scanner.blocks) == (prose, blocks)


def test_call_scanner_holds_back_only_what_could_start_a_block():
    scanner = kp.CallScanner()
    assert scanner.feed("x < y, so <to") == "x < y, so"
    assert scanner.feed("ast> is fine") == " <toast> is fine"
    assert scanner.feed(" and ``") == " and"
    assert scanner.feed("`python\n") == ""  # a fence's first line: it may wrap a block
    assert scanner.feed("print()") == " ```python\nprint()"


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_call_scanner_reads_every_block_and_the_prose_between_them(size):
    text = ('I will check the weather:\n<tool_call>{"a": 1}</tool_call>\nAnd now the time:\n```tool_call\n{"b": 2}\n```\n'
            '```json\n<tool_call>{"code": "x = \'</tool_call>\' + ```"}</tool_call>\n```\nDone.')
    scanner = kp.CallScanner()
    out = "".join(scanner.feed(text[i:i + size]) for i in range(0, len(text), size)) + scanner.finish()
    assert out == "I will check the weather:"
    assert scanner.segments == [("block", '{"a": 1}'), ("prose", "And now the time:"), ("block", '\n{"b": 2}\n'),
                                ("block", '{"code": "x = \'</tool_call>\' + ```"}'), ("prose", "Done.")]
    assert not scanner.unclosed
    unclosed = kp.CallScanner()
    unclosed.feed('<tool_call>{"name": "f", "argu')
    unclosed.finish()
    assert unclosed.unclosed and not unclosed.blocks


@pytest.mark.parametrize("value, schema, problem", [
    ({"city": "Paris"}, WEATHER["function"]["parameters"], None),
    ({"city": "Paris", "unit": "C", "days": 2.0, "extra": [1]}, WEATHER["function"]["parameters"], None),
    ({}, WEATHER["function"]["parameters"], "city: missing (required)"),
    ({"city": 5}, WEATHER["function"]["parameters"], "city: expected string"),
    ({"city": "Paris", "unit": "K"}, WEATHER["function"]["parameters"], 'unit: expected one of ["C", "F"]'),
    ({"city": "Paris", "days": True}, WEATHER["function"]["parameters"], "days: expected integer"),
    ({"city": "Paris", "days": 1.5}, WEATHER["function"]["parameters"], "days: expected integer"),
    ([1], {"type": "object"}, "the value: expected object"),
    ({"n": None}, {"properties": {"n": {"type": ["number", "null"]}}}, None),
    ({"n": "1"}, {"properties": {"n": {"type": ["number", "null"]}}}, "n: expected number or null"),
    ("anything", None, None),
])
def test_arguments_are_checked_against_the_subset_of_json_schema_we_promise(value, schema, problem):
    assert kp.schema_problem(value, schema) == problem


@pytest.mark.parametrize("text, expected", [
    ('{"a": 1}', '{"a": 1}'),
    ('Here it is:\n```json\n{"a": 1}\n```\nEnjoy.', '{"a": 1}'),
    ('The answer is {"a": {"b": [1, 2]}} as asked.', '{"a": {"b": [1, 2]}}'),
    ("[1, 2]", None),           # json_object wants an object
    ('{"a": 1', None),
    ("no JSON here", None),
])
def test_json_is_found_in_an_answer_and_must_parse(text, expected):
    assert kp.to_json_answer(text, kp.JsonFormat(None))[0] == expected


@pytest.mark.parametrize("extra, param", [
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
    ({"functions": [{"name": "f"}], "function_call": {"name": "g"}}, "function_call"),
    ({"functions": [{"name": "f"}], "function_call": "required"}, "function_call"),
    ({"tools": [WEATHER], "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}}, "response_format.json_schema"),
])
def test_bad_tools_and_formats_name_the_field(extra, param):
    with pytest.raises(kp.ProxyError) as caught:
        to_question({"messages": user("hi"), **extra})
    assert (caught.value.status, caught.value.param) == (400, param)


def test_what_kimi_is_asked_with_tools_and_without():
    plain = {"messages": user("hi"), "tools": [WEATHER], "tool_choice": "none"}
    assert (to_question(plain).prompt, chat_request(plain).tools) == ("hi", None)
    asked_body = {"messages": user("hi"), "tools": [WEATHER, {"type": "web_search"}], "tool_choice": "required",
                  "parallel_tool_calls": False}
    asked = to_question(asked_body)
    assert asked.prompt.startswith("system:You can call these functions")
    assert json.dumps(WEATHER["function"], separators=(",", ":")) in asked.prompt
    assert "<tool_call>" in asked.prompt and "must call at least one" in asked.prompt and "at most one" in asked.prompt
    assert asked.prompt.endswith("\nuser:hi") and list(chat_request(asked_body).tools.functions) == ["get_weather"]
    named = chat_request({"messages": user("hi"), "functions": [WEATHER["function"]], "function_call": {"name": "get_weather"}})
    assert (named.tools.only, named.options.deprecated, named.tools.parallel) == ("get_weather", True, False)
    json_asked = to_question({"messages": user("hi"), "response_format": {"type": "json_schema", "json_schema": {
        "name": "w", "schema": {"type": "object", "required": ["t"]}}}})
    assert "JSON only" in json_asked.prompt and '{"type":"object","required":["t"]}' in json_asked.prompt


def test_arguments_may_come_as_a_json_string_and_thinking_is_never_read_for_calls():
    wanted = chat_request({"messages": user("hi"), "tools": [WEATHER]})
    reading = kp.AnswerReading(wanted, live=True)
    thinking, prose = kp.Part(kp.REASONING, block()), kp.Part(kp.TEXT, "好。")
    assert reading.take([thinking, prose]) == [thinking, prose]
    reading.take([kp.Part(kp.TEXT, '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call>'),
                  kp.Part(kp.FINISH, kp.STOP), kp.Part(kp.USAGE, kp.Usage(1, 1))])
    reading.end(kp.AnswerTranslator(to_question({"messages": user("hi")})))
    *_, (_, calls), (_, finish) = kp.judge(wanted, reading)
    assert (calls[0].arguments, finish) == ('{"city": "Rome"}', kp.CALLS_FINISH)  # the JSON Kimi wrote, as it wrote it


HISTORY = [{"role": "user", "content": "巴黎天气？"},
           {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
               "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"}]


def test_calls_and_their_results_are_folded_into_the_prompt_in_the_same_format():
    prompt = to_question({"messages": HISTORY, "tools": [WEATHER]}).prompt
    assert prompt.endswith('user:巴黎天气？\nassistant:<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n'
                           '</tool_call>\ntool:<tool_result name="get_weather">\n18C, sunny\n'
                           '</tool_result>\nsystem:关注用户最新的消息')
    deprecated = [{"role": "user", "content": "q"}, {"role": "assistant", "content": None,
                                                      "function_call": {"name": "f", "arguments": "{}"}},
                  {"role": "function", "name": "f", "content": [{"type": "text", "text": "42"}]}]
    assert to_question({"messages": deprecated}).prompt.endswith(
        'assistant:<tool_call>\n{"name":"f","arguments":{}}\n</tool_call>\n'
        'tool:<tool_result name="f">\n42\n</tool_result>\nsystem:关注用户最新的消息')
    # the hint comes after all the results of the last calls, not between them
    two = HISTORY[:1] + [{"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "18C"}, {"role": "tool", "tool_call_id": "b", "content": "9:00"}]
    assert to_question({"messages": two}).prompt.endswith(
        'tool:<tool_result name="get_weather">\n18C\n</tool_result>\ntool:<tool_result name="get_time">\n9:00\n'
        '</tool_result>\nsystem:关注用户最新的消息')
    kept = to_question({"messages": HISTORY + [{"role": "tool", "tool_call_id": "x", "content": "more"}],
                           "conversation_id": "cr7p4ik2lq1s5t0u9v3g"})
    assert kept.prompt == 'tool:<tool_result name="get_weather">\n18C, sunny\n</tool_result>\ntool:more'


@BOTH_DIALECTS
async def test_a_tool_call_comes_back_as_openai_tool_calls(http, proxy, token, kimi):
    response, answer = await ask_with_tools(http, proxy, token, ["我查一下。\n" + block(unit="C")], kimi)
    assert response.status == 200
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "我查一下。"
    (call,) = choice["message"]["tool_calls"]
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", call["id"]) and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "C"}
    (seen,) = kimi.completions
    assert '"name":"get_weather"' in seen["prompt"] and seen["prompt"].endswith("user:" + ASK)
    await kimi.wait_deleted(1)
    assert kimi.live_chats == []


async def test_a_call_alone_has_null_content_and_parallel_calls_are_numbered(http, proxy, token, kimi):
    reply = block() + "\n" + block("get_time", fenced=True)
    _, answer = await ask_with_tools(http, proxy, token, [reply], kimi, tools=[WEATHER, TIME])
    message = answer["choices"][0]["message"]
    assert message["content"] is None
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "get_time"]
    assert len({c["id"] for c in message["tool_calls"]}) == 2
    _, answer = await ask_with_tools(http, proxy, token, [reply], kimi, tools=[WEATHER, TIME], parallel_tool_calls=False)
    assert [c["function"]["name"] for c in answer["choices"][0]["message"]["tool_calls"]] == ["get_weather"]


@pytest.mark.parametrize("piece", [1, 3, 7])
async def test_streamed_calls_never_leak_into_content_at_any_chunk_size(http, proxy, token, kimi, piece):
    kimi.reply_piece = piece
    prose = "好的 a < b，我查两个城市。"
    reply = f"{prose}\n{block()}\n{block(city='Rome')}"
    response, chunks = await ask_with_tools(http, proxy, token, [reply], kimi, stream=True)
    assert response.status == 200
    assert content_of(chunks) == prose
    calls = streamed_calls(chunks)
    assert [json.loads(c["arguments"]) for c in calls] == [{"city": "Paris"}, {"city": "Rome"}]
    assert all(c["id"].startswith("call_") and c["name"] == "get_weather" for c in calls)
    assert finish_of(chunks) == "tool_calls"
    await kimi.wait_deleted(1)


async def test_text_that_only_looks_like_a_call_streams_as_it_is(http, proxy, token, kimi):
    kimi.reply_piece = 1
    reply = "若 a < b 且 <tool 不是调用，```代码``` 也照常。"
    _, chunks = await ask_with_tools(http, proxy, token, [reply], kimi, stream=True)
    assert content_of(chunks) == reply and finish_of(chunks) == "stop"
    assert not streamed_calls(chunks)


async def test_with_tool_choice_none_nothing_is_described_or_parsed(http, proxy, token, kimi):
    _, answer = await ask_with_tools(http, proxy, token, [block()], kimi, tool_choice="none")
    assert answer["choices"][0]["message"]["content"] == block()
    assert answer["choices"][0]["finish_reason"] == "stop" and "tool_calls" not in answer["choices"][0]["message"]
    assert kimi.completions[0]["prompt"] == ASK


@BOTH_DIALECTS
@pytest.mark.parametrize("bad, problem", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"</tool_call>', "does not parse"),
    (block("get_wether"), "'get_wether' is not a function"),
    ('<tool_call>{"name": "get_weather", "arguments": {"unit": "C"}}</tool_call>', "city: missing (required)"),
    (block(city=75), "city: expected string"),
    (block(unit="K"), "unit: expected one of"),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}', "not closed"),
])
async def test_a_bad_call_gets_one_repair_turn_in_the_same_chat(http, proxy, token, kimi, bad, problem):
    response, answer = await ask_with_tools(http, proxy, token, ["先说明。" + bad, block(city="Rome")], kimi,
                                            model="kimi-search-silent")
    assert response.status == 200, answer
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "先说明。"
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Rome"}
    first, repair = kimi.completions
    assert repair["chat"] == first["chat"] and problem in repair["prompt"] and "<tool_call>" in repair["prompt"]
    assert (first["search"], repair["search"]) == (True, False)  # the repair is about form: no new search
    await kimi.wait_deleted(1)
    assert kimi.live_chats == []


@pytest.mark.parametrize("stream", [False, True])
async def test_a_call_still_bad_after_the_repair_is_returned_as_the_text_kimi_wrote(http, proxy, token, kimi, stream):
    bad = "我来查。\n" + block(city=1)
    response, answer = await ask_with_tools(http, proxy, token, [bad, block(city=2)], kimi, stream=stream)
    assert response.status == 200
    if stream:
        assert (content_of(answer), finish_of(answer), streamed_calls(answer)) == (bad, "stop", [])
        assert content_of(answer[:2]) == "我来查。"  # the prose went out before the call was read
    else:
        assert answer["choices"][0]["message"]["content"] == bad
        assert answer["choices"][0]["finish_reason"] == "stop"
    assert len(kimi.completions) == 2
    await kimi.wait_deleted(1)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_required_call_is_asked_for_again_and_then_refused_with_502(http, proxy, token, kimi, stream):
    response, answer = await ask_with_tools(http, proxy, token, ["巴黎今天晴。", block()], kimi, stream=stream,
                                            tool_choice="required")
    calls = streamed_calls(answer) if stream else answer["choices"][0]["message"]["tool_calls"]
    assert response.status == 200 and len(calls) == 1
    assert "You must call a function now" in kimi.completions[1]["prompt"]
    kimi.completions.clear()
    kimi.replies = ["晴。", "还是晴。"]
    response = await post_chat(http, proxy, token, stream=stream, messages=user(ASK), tools=[WEATHER],
                               tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert response.status == 502  # a stream too: nothing went out before the verdict
    assert_envelope(await response.json(), "invalid_kimi_answer")
    assert len(kimi.completions) == 2
    await kimi.wait_deleted(2)
    assert kimi.live_chats == []


@pytest.mark.parametrize("stream", [False, True])
async def test_a_kept_chat_goes_when_the_answer_is_an_error(http, proxy, token, kimi, stream):
    """The client never learns the id of a chat whose request failed, so it cannot be kept."""
    response, _ = await ask_with_tools(http, proxy, token, ["不调用。", "还是不调用。"], kimi, stream=stream,
                                       tool_choice="required", conversation_id="new")
    assert response.status == 502 and "X-Conversation-Id" not in response.headers
    await kimi.wait_deleted(1)
    assert kimi.live_chats == []


async def test_a_named_function_must_be_the_one_called(http, proxy, token, kimi):
    named = {"type": "function", "function": {"name": "get_time"}}
    _, answer = await ask_with_tools(http, proxy, token, [block(), block("get_time")], kimi, tools=[WEATHER, TIME],
                                     tool_choice=named)
    assert answer["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_time"
    assert "You called get_weather; you must call the function get_time" in kimi.completions[1]["prompt"]
    await kimi.wait_deleted(1)
    assert kimi.live_chats == []


async def test_with_one_call_wanted_text_after_it_is_not_read(http, proxy, token, kimi):
    kimi.reply_pause = 0.02
    tail = "然后我会继续写很多很多字。" * 20
    response, answer = await ask_with_tools(http, proxy, token, [block() + "\n" + tail], kimi, parallel_tool_calls=False)
    assert answer["choices"][0]["finish_reason"] == "tool_calls"
    usage = answer["usage"]  # estimated from what was read
    assert usage["completion_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    await kimi.wait_deleted(1)
    assert kimi.closed_streams == [kimi.completions[0]["chat"]]  # the proxy hung up instead of reading on
    await kimi.wait_deleted(1)


@BOTH_DIALECTS
async def test_the_repair_turn_waits_until_the_first_answer_has_ended(http, proxy, token, kimi):
    """Kimi refuses a turn in a chat whose answer still streams: the first answer is read to its
    end, so that its whole text is at hand if the repair fails too."""
    kimi.reply_pause = 0.02
    tail = "后面还有很多字。" * 20
    _, answer = await ask_with_tools(http, proxy, token, [block(city=1) + "\n" + tail, block()], kimi)
    assert answer["choices"][0]["finish_reason"] == "tool_calls", answer
    assert len(kimi.completions) == 2 and kimi.closed_streams == []
    assert answer["choices"][0]["message"]["content"] is None  # the repair's calls; no splice of the two answers


@BOTH_DIALECTS
async def test_when_kimi_refuses_the_repair_turn_the_first_answer_stands(http, proxy, token, kimi):
    kimi.reply_pause = 0.02
    first = "我来查。\n" + block(city=1) + "\n" + "后面还有很多字。" * 20
    kimi.fail("POST", kimi.ANSWER_PATH, 429, after=1, body={"code": "resource_exhausted", "error_type": "chat.limit",
                                                           "message": "busy"})
    _, answer = await ask_with_tools(http, proxy, token, [first, block()], kimi)
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["choices"][0]["message"]["content"] == first  # the whole of it, as Kimi wrote it
    asked = [path for method, path in kimi.calls if method == "POST" and re.fullmatch(kimi.ANSWER_PATH, path)]
    assert (len(asked), len(kimi.completions)) == (2, 1)  # the repair turn was asked for, and refused
    await kimi.wait_deleted(1)


@BOTH_DIALECTS
async def test_an_agent_round_trip_with_a_kept_conversation(http, proxy, token, kimi):
    _, answer = await ask_with_tools(http, proxy, token, [block()], kimi, conversation_id="new")
    chat_id = answer["conversation_id"]
    call = answer["choices"][0]["message"]["tool_calls"][0]
    history = [{"role": "user", "content": ASK}, answer["choices"][0]["message"],
               {"role": "tool", "tool_call_id": call["id"], "content": "18C, sunny"}]
    _, final = await ask_with_tools(http, proxy, token, ["巴黎 18 度，晴。"], kimi, messages=history, conversation_id=chat_id)
    assert final["choices"][0]["message"]["content"] == "巴黎 18 度，晴。"
    assert final["choices"][0]["finish_reason"] == "stop"
    second = kimi.completions[1]
    assert second["chat"] == chat_id
    assert second["prompt"].endswith('\ntool:<tool_result name="get_weather">\n18C, sunny\n</tool_result>')
    assert "关注用户最新的消息" not in second["prompt"]  # (a kept chat gets only the new turn)
    assert ASK not in second["prompt"]  # the kept chat already holds the question
    assert kimi.live_chats == [chat_id]


async def test_an_agent_round_trip_folded_into_one_message(http, proxy, token, kimi):
    _, answer = await ask_with_tools(http, proxy, token, [block()], kimi)
    history = [{"role": "user", "content": ASK}, answer["choices"][0]["message"],
               {"role": "tool", "tool_call_id": answer["choices"][0]["message"]["tool_calls"][0]["id"], "content": "18C"}]
    _, final = await ask_with_tools(http, proxy, token, ["18 度。"], kimi, messages=history)
    assert final["choices"][0]["message"]["content"] == "18 度。"
    prompt = kimi.completions[1]["prompt"]
    assert f"user:{ASK}\nassistant:<tool_call>" in prompt and '<tool_result name="get_weather">\n18C\n' in prompt
    await kimi.wait_deleted(2)


@pytest.mark.parametrize("stream", [False, True])
async def test_deprecated_functions_get_a_function_call(http, proxy, token, kimi, stream):
    _, answer = await ask_with_tools(http, proxy, token, [block() + block()], kimi, stream=stream, tools=None,
                                     functions=[WEATHER["function"]])
    if stream:
        deltas = [c["choices"][0]["delta"].get("function_call") for c in answer if c.get("choices")]
        deltas = [d for d in deltas if d]
        assert deltas[0]["name"] == "get_weather" and "name" not in deltas[1]
        assert json.loads("".join(d["arguments"] for d in deltas)) == {"city": "Paris"}
        assert finish_of(answer) == "function_call"
    else:
        message = answer["choices"][0]["message"]
        assert message["function_call"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
        assert message["content"] is None and answer["choices"][0]["finish_reason"] == "function_call"


SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "weather", "strict": True, "schema": {
    "type": "object", "properties": {"city": {"type": "string"}, "temp": {"type": "integer"}}, "required": ["city", "temp"]}}}


@pytest.mark.parametrize("stream", [False, True])
async def test_json_object_answers_are_bare_json(http, proxy, token, kimi, stream):
    reply = '好的，结果如下：\n```json\n{"city": "巴黎", "temp": 18}\n```\n希望有用。'
    response, answer = await ask_with_tools(http, proxy, token, [reply], kimi, stream=stream, tools=None,
                                            response_format={"type": "json_object"})
    content = content_of(answer) if stream else answer["choices"][0]["message"]["content"]
    assert json.loads(content) == {"city": "巴黎", "temp": 18}
    if stream:
        assert len([c for c in answer if c.get("choices") and c["choices"][0]["delta"].get("content")]) == 1
    assert "JSON only" in kimi.completions[0]["prompt"]
    await kimi.wait_deleted(1)
    assert kimi.live_chats == []


async def test_a_streamed_json_schema_answer_goes_out_once_repaired(http, proxy, token, kimi):
    response, chunks = await ask_with_tools(http, proxy, token, ['{"city": "巴黎", "temp": "18"}', '{"city": "巴黎", "temp": 18}'],
                                            kimi, stream=True, tools=None, response_format=SCHEMA_FORMAT)
    assert response.status == 200
    assert content_of(chunks) == '{"city": "巴黎", "temp": 18}' and finish_of(chunks) == "stop"
    assert "temp: expected integer" in kimi.completions[1]["prompt"]
    await kimi.wait_deleted(1)
    assert kimi.live_chats == []


@BOTH_DIALECTS
async def test_json_schema_answers_are_repaired_once_then_refused(http, proxy, token, kimi):
    _, answer = await ask_with_tools(http, proxy, token, ['{"city": "巴黎"}', '{"city": "巴黎", "temp": 18}'], kimi,
                                     tools=None, response_format=SCHEMA_FORMAT)
    assert json.loads(answer["choices"][0]["message"]["content"]) == {"city": "巴黎", "temp": 18}
    assert "temp: missing (required)" in kimi.completions[1]["prompt"]
    assert kimi.completions[1]["chat"] == kimi.completions[0]["chat"]
    response, error = await ask_with_tools(http, proxy, token, ["不知道", '{"city": 1, "temp": 18}'], kimi, tools=None,
                                           response_format=SCHEMA_FORMAT)
    assert response.status == 502 and "city: expected string" in assert_envelope(error, "invalid_kimi_answer")["message"]
    await kimi.wait_deleted(2)
    assert kimi.live_chats == []


async def test_the_openai_sdk_accumulates_streamed_calls_and_parses_structured_output(sdk, kimi):
    import pydantic

    kimi.replies, kimi.reply_piece = ["查询中" + block() + block(city="Rome")], 2
    async with sdk.chat.completions.stream(model="kimi", messages=user(ASK), tools=[WEATHER]) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert [json.loads(c.function.arguments)["city"] for c in calls] == ["Paris", "Rome"]
    assert final.choices[0].finish_reason == "tool_calls" and all(c.id.startswith("call_") for c in calls)

    class Weather(pydantic.BaseModel):
        city: str
        temp: int

    kimi.replies = ['```json\n{"city": "巴黎", "temp": 18}\n```']
    parsed = await sdk.chat.completions.parse(model="kimi", messages=user(ASK), response_format=Weather)
    assert parsed.choices[0].message.parsed == Weather(city="巴黎", temp=18)
    await kimi.wait_deleted(2)


async def test_langchain_bind_tools_invoke_and_stream(proxy, token, kimi):
    import httpx
    import langchain_openai
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city now."""
        return "18C"

    async with httpx.AsyncClient() as connections:  # (closed here: LangChain leaves its own open)
        model = langchain_openai.ChatOpenAI(base_url=proxy + "/v1", api_key=token, model="kimi", max_retries=0,
                                            http_async_client=connections)
        bound = model.bind_tools([get_weather])
        kimi.replies = ["我查一下。" + block(), block(city="Rome")]
        message = await bound.ainvoke(ASK)
        assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather", {"city": "Paris"})]
        kimi.reply_piece = 3
        gathered = None
        async for chunk in bound.astream(ASK):
            gathered = chunk if gathered is None else gathered + chunk
    assert [(c["name"], c["args"]) for c in gathered.tool_calls] == [("get_weather", {"city": "Rome"})]
    assert gathered.content == "" and message.content == "我查一下。"
    await kimi.wait_deleted(2)


# -- what an agent needs of the emulation (each of these lost work before) --------------------


def fenced_block(name: str, arguments: dict) -> str:
    return f"```tool_call\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n```"


@BOTH_DIALECTS
@pytest.mark.parametrize("fence", [False, True])
@pytest.mark.parametrize("piece", [1, 3, 7])
async def test_calls_after_prose_are_all_kept_with_the_prose_between(http, proxy, token, kimi, piece, fence):
    kimi.reply_piece, kimi.reply_pause = piece, 0.001
    weather = fenced_block("get_weather", {"city": "Paris"}) if fence else block()
    time_call = fenced_block("get_time", {}) if fence else '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    reply = f"I'll check the weather: {weather} And now the time: {time_call}"
    response, chunks = await ask_with_tools(http, proxy, token, [reply], kimi, stream=True, tools=[WEATHER, TIME])
    assert response.status == 200
    assert content_of(chunks) == "I'll check the weather:\n\nAnd now the time:"
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed_calls(chunks)] == \
        [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert finish_of(chunks) == "tool_calls" and len(kimi.completions) == 1
    await kimi.wait_deleted(1)


async def test_calls_and_prose_keep_their_order_in_anthropics_blocks(http, proxy, token, kimi):
    kimi.replies = [f"先查天气：{block()}再查时间：" + '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>']
    response = await post_messages(http, proxy, token, stream=True, messages=user(ASK),
                                   tools=[CLAUDE_TOOL, {"name": "get_time", "input_schema": {"type": "object"}}])
    blocks = anthropic_blocks(anthropic_events(await response.read()))
    assert [(b["type"], b.get("text") or b.get("name")) for b in blocks] == [
        ("text", "先查天气："), ("tool_use", "get_weather"), ("text", "\n\n再查时间："), ("tool_use", "get_time")]


@BOTH_DIALECTS
@pytest.mark.parametrize("stream", [False, True])
async def test_a_fallback_is_the_whole_of_what_kimi_wrote(http, proxy, token, kimi, stream):
    """A call still bad after the repair: the client gets Kimi's first answer whole, read to its
    end however Kimi paces it, and the repair turn began only after that."""
    kimi.reply_pause, kimi.reply_piece = 0.005, 5
    first = "我来查。\n" + block(city=1) + "\n查完再说，这是后面的很多字。" * 3
    response, answer = await ask_with_tools(http, proxy, token, [first, block(city=2)], kimi, stream=stream)
    assert response.status == 200
    content = content_of(answer) if stream else answer["choices"][0]["message"]["content"]
    assert content == first and len(kimi.completions) == 2 and kimi.closed_streams == []
    await kimi.wait_deleted(1)


@pytest.mark.parametrize("arguments, problem", [
    ('"parameters": {"city": "Rome"}', None),                        # the instructions' own word for the schema
    ('"arguments": "{\\"city\\": \\"Rome\\""', "do not parse"),      # a JSON string that is no JSON: never {}
    ('"arguments": {"city": "Rome", "days": "two"}', "days: expected integer"),
])
async def test_arguments_under_parameters_are_read_and_unreadable_ones_repaired(http, proxy, token, kimi, arguments,
                                                                                problem):
    reply = f'<tool_call>{{"name": "get_weather", {arguments}}}</tool_call>'
    _, answer = await ask_with_tools(http, proxy, token, [reply, block(city="Rome")], kimi)
    (call,) = answer["choices"][0]["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "Rome"}
    assert len(kimi.completions) == (1 if problem is None else 2)
    if problem:
        assert problem in kimi.completions[1]["prompt"]
    await kimi.wait_deleted(1)


@BOTH_DIALECTS
async def test_a_repair_names_the_bad_call_of_several_and_asks_for_all_of_them(http, proxy, token, kimi):
    calls = [block(city="Paris"), block(city=2), block(city="Rome")]
    _, answer = await ask_with_tools(http, proxy, token, ["".join(calls), block(city="Paris") + block(city="Oslo") +
                                                          block(city="Rome")], kimi)
    assert [json.loads(c["function"]["arguments"])["city"] for c in answer["choices"][0]["message"]["tool_calls"]] == \
        ["Paris", "Oslo", "Rome"]
    repair = kimi.completions[1]["prompt"]
    assert "Call 2 of your 3 calls is not usable: the arguments of get_weather: city: expected string" in repair
    assert "Write all 3 calls again" in repair
    await kimi.wait_deleted(1)


CODE = 'def f(x):\n\tif x < "</tool_call>":\n\t\treturn "```"\n'


@BOTH_DIALECTS
@pytest.mark.parametrize("reply", [
    # raw newlines and tabs inside the string (its quotes escaped), and the closing mark and a fence in the code
    '<tool_call>{"name": "write", "arguments": {"path": "a.py", "code": "' + CODE.replace('"', '\\"') + '"}}</tool_call>',
    # the same inside a JSON fence inside the tags
    '<tool_call>\n```json\n{"name": "write", "arguments": {"path": "a.py", "code": ' + json.dumps(CODE) + '}}\n```\n</tool_call>',
    # a fenced block whose closing fence appears in an argument
    '```tool_call\n{"name": "write", "arguments": {"path": "a.py", "code": ' + json.dumps(CODE) + '}}\n```',
])
@pytest.mark.parametrize("piece", [1, 5])
async def test_code_in_the_arguments_is_read_the_way_a_lenient_reader_would(http, proxy, token, kimi, reply, piece):
    write = {"type": "function", "function": {"name": "write", "parameters": {
        "type": "object", "properties": {"path": {"type": "string"}, "code": {"type": "string"}},
        "required": ["path", "code"], "additionalProperties": False}}}
    kimi.reply_piece = piece
    response, chunks = await ask_with_tools(http, proxy, token, ["好的。" + reply], kimi, tools=[write], stream=True)
    (call,) = streamed_calls(chunks)
    assert json.loads(call["arguments"]) == {"path": "a.py", "code": CODE}
    assert content_of(chunks) == "好的。" and len(kimi.completions) == 1  # nothing to repair
    await kimi.wait_deleted(1)


@pytest.mark.parametrize("first, repair, expected, stream", [
    # nothing of the first answer went out: the repair's own answer, in prose
    ('<tool_call>{"name": "get_weather"</tool_call>', "不用查了，巴黎今天晴。", "不用查了，巴黎今天晴。", False),
    # the first answer's prose went out already: its calls are still bad, so the first answer as written
    ("让我查一下。" + block(city=1), "抱歉，修好了：", "让我查一下。" + block(city=1), True),
    # a repair with calls: the first answer's prose and the repair's calls, never the repair's prose glued on
    ("让我查一下。" + block(city=1), "抱歉，修好了：" + block(city="Rome"), "让我查一下。", True),
])
async def test_after_a_repair_the_client_gets_one_coherent_answer(http, proxy, token, kimi, first, repair, expected,
                                                                  stream):
    _, answer = await ask_with_tools(http, proxy, token, [first, repair], kimi, stream=stream)
    content = content_of(answer) if stream else answer["choices"][0]["message"]["content"]
    assert content == expected
    calls = streamed_calls(answer) if stream else answer["choices"][0]["message"].get("tool_calls") or []
    assert len(calls) == (1 if "Rome" in repair else 0)
    await kimi.wait_deleted(1)


BIG = "123456789012345678901234567890"


async def test_integers_past_64_bits_reach_the_client_exactly(http, proxy, token, kimi):
    ids = {"type": "function", "function": {"name": "fetch", "parameters": {
        "type": "object", "properties": {"id": {"type": "integer"}, "ratio": {"type": "number"}}, "required": ["id"]}}}
    reply = f'<tool_call>{{"name": "fetch", "arguments": {{"id": {BIG}, "ratio": 1.10}}}}</tool_call>'
    _, answer = await ask_with_tools(http, proxy, token, [reply], kimi, tools=[ids])
    assert answer["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == f'{{"id": {BIG}, "ratio": 1.10}}'
    kimi.replies = [reply]
    response = await post_messages(http, proxy, token, messages=user(ASK),
                                   tools=[{"name": "fetch", "input_schema": ids["function"]["parameters"]}])
    raw = await response.read()
    assert f'"input":{{"id": {BIG}, "ratio": 1.10}}'.encode() in raw
    assert json.loads(raw)["content"][0]["input"]["id"] == int(BIG)


async def test_a_named_choice_keeps_its_call_when_kimi_adds_another(http, proxy, token, kimi):
    named = {"type": "function", "function": {"name": "get_time"}}
    reply = block() + '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    response, answer = await ask_with_tools(http, proxy, token, [reply], kimi, tools=[WEATHER, TIME], tool_choice=named)
    assert response.status == 200 and len(kimi.completions) == 1
    assert [c["function"]["name"] for c in answer["choices"][0]["message"]["tool_calls"]] == ["get_time"]


async def test_allowed_tools_limits_the_functions_kimi_sees(http, proxy, token, kimi):
    choice = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "get_time"}}]}}
    response, answer = await ask_with_tools(http, proxy, token, ['<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'],
                                            kimi, tools=[WEATHER, TIME], tool_choice=choice)
    assert response.status == 200 and answer["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_time"
    prompt = kimi.completions[0]["prompt"]
    assert '"name":"get_time"' in prompt and '"name":"get_weather"' not in prompt and "must call at least one" in prompt


@BOTH_DIALECTS
async def test_the_sdks_parse_on_nested_pydantic_models_is_repaired_and_accepted(sdk, kimi):
    import enum
    import pydantic

    class Unit(str, enum.Enum):
        celsius = "C"
        fahrenheit = "F"

    class Reading(pydantic.BaseModel):
        hour: int
        temp: float

    class Place(pydantic.BaseModel):
        city: str
        country: str | None = None

    class Forecast(pydantic.BaseModel):
        place: Place
        unit: Unit
        readings: list[Reading]
        note: str | None

    good = {"place": {"city": "巴黎", "country": None}, "unit": "C", "readings": [{"hour": 9, "temp": 18.5}], "note": None}
    bad = {**good, "unit": "K", "readings": [{"hour": "nine", "temp": 18.5}]}
    kimi.replies = [json.dumps(bad, ensure_ascii=False), "```json\n" + json.dumps(good, ensure_ascii=False) + "\n```"]
    parsed = await sdk.chat.completions.parse(model="kimi", messages=user(ASK), response_format=Forecast)
    assert parsed.choices[0].message.parsed == Forecast(**good)
    assert "unit: expected one of" in kimi.completions[1]["prompt"]
    # the same models as a strict function tool: $defs, $ref, anyOf, enum, additionalProperties false
    tool = openai.pydantic_function_tool(Forecast, name="forecast")
    kimi.replies = [f'<tool_call>{{"name": "forecast", "arguments": {json.dumps(bad)}}}</tool_call>',
                    f'<tool_call>{{"name": "forecast", "arguments": {json.dumps(good)}}}</tool_call>']
    completion = await sdk.chat.completions.parse(model="kimi", messages=user(ASK), tools=[tool])
    call = completion.choices[0].message.tool_calls[0]
    assert call.function.parsed_arguments == Forecast(**good)
    assert "readings[0].hour: expected integer" in kimi.completions[3]["prompt"] or \
        "unit: expected one of" in kimi.completions[3]["prompt"]
    await kimi.wait_deleted(2)


# The JSON Schema subset, case by case in the manner of the JSON Schema test suite: (schema, value, holds)
SCHEMA_CASES = [
    # type
    ({"type": "integer"}, 1, True), ({"type": "integer"}, 1.0, True), ({"type": "integer"}, 1.5, False),
    ({"type": "integer"}, True, False), ({"type": "number"}, 1, True), ({"type": "number"}, "1", False),
    ({"type": "string"}, "", True), ({"type": "string"}, None, False), ({"type": "null"}, None, True),
    ({"type": "null"}, 0, False), ({"type": "boolean"}, False, True), ({"type": "boolean"}, 0, False),
    ({"type": "array"}, [], True), ({"type": "array"}, {}, False), ({"type": "object"}, {}, True),
    ({"type": "object"}, [], False), ({"type": ["string", "null"]}, None, True), ({"type": ["string", "null"]}, 1, False),
    # properties, required, additionalProperties
    ({"properties": {"a": {"type": "string"}}}, {"a": "x", "b": 1}, True),
    ({"properties": {"a": {"type": "string"}}}, {"a": 1}, False),
    ({"properties": {"a": {"type": "string"}}}, "not an object", True),
    ({"required": ["a"]}, {"a": None}, True), ({"required": ["a"]}, {"b": 1}, False), ({"required": ["a"]}, [], True),
    ({"properties": {"a": {}}, "additionalProperties": False}, {"a": 1}, True),
    ({"properties": {"a": {}}, "additionalProperties": False}, {"a": 1, "b": 2}, False),
    ({"additionalProperties": {"type": "integer"}}, {"a": 1}, True),
    ({"additionalProperties": {"type": "integer"}}, {"a": "1"}, False),
    # items, prefixItems, sizes
    ({"items": {"type": "integer"}}, [1, 2], True), ({"items": {"type": "integer"}}, [1, "2"], False),
    ({"prefixItems": [{"type": "string"}], "items": {"type": "integer"}}, ["a", 1], True),
    ({"prefixItems": [{"type": "string"}], "items": {"type": "integer"}}, [1, 1], False),
    ({"minItems": 1}, [], False), ({"maxItems": 1}, [1, 2], False), ({"maxItems": 1}, "xy", True),
    ({"minProperties": 1}, {}, False), ({"maxProperties": 1}, {"a": 1}, True),
    # enum, const
    ({"enum": ["a", 1]}, "a", True), ({"enum": ["a", 1]}, 1.0, True), ({"enum": [1]}, True, False),
    ({"enum": [{"a": [1]}]}, {"a": [1]}, True), ({"enum": [False]}, 0, False),
    ({"const": 2}, 2, True), ({"const": 2}, "2", False), ({"const": None}, None, True), ({"const": [1]}, [1, 2], False),
    # anyOf, oneOf, allOf
    ({"anyOf": [{"type": "string"}, {"type": "null"}]}, None, True),
    ({"anyOf": [{"type": "string"}, {"type": "null"}]}, 1, False),
    ({"oneOf": [{"type": "integer"}, {"minimum": 2}]}, 1, True),
    ({"oneOf": [{"type": "integer"}, {"minimum": 2}]}, 3, False),
    ({"oneOf": [{"type": "integer"}, {"minimum": 2}]}, 1.5, False),
    ({"allOf": [{"type": "string"}, {"maxLength": 2}]}, "ab", True),
    ({"allOf": [{"type": "string"}, {"maxLength": 2}]}, "abc", False),
    # $ref
    ({"$defs": {"p": {"type": "integer"}}, "properties": {"a": {"$ref": "#/$defs/p"}}}, {"a": 1}, True),
    ({"$defs": {"p": {"type": "integer"}}, "properties": {"a": {"$ref": "#/$defs/p"}}}, {"a": "1"}, False),
    ({"definitions": {"p": {"enum": ["x"]}}, "items": {"$ref": "#/definitions/p"}}, ["x", "y"], False),
    ({"$defs": {"node": {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}}}},
      "$ref": "#/$defs/node"}, {"next": {"next": {"next": None}}}, True),
    ({"$defs": {"node": {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}}}},
      "$ref": "#/$defs/node"}, {"next": {"next": {"next": 5}}}, False),
    ({"$ref": "#/$defs/a~1b", "$defs": {"a/b": {"type": "string"}}}, 1, False),
    # strings
    ({"minLength": 2}, "a", False), ({"minLength": 2}, "長城", True), ({"maxLength": 2}, "abc", False),
    ({"pattern": "^a+$"}, "aaa", True), ({"pattern": "^a+$"}, "ab", False), ({"pattern": "b"}, "abc", True),
    ({"pattern": "^a+$"}, 12, True),
    # numbers
    ({"minimum": 1}, 1, True), ({"minimum": 1}, 0.5, False), ({"maximum": 1}, 2, False),
    ({"exclusiveMinimum": 1}, 1, False), ({"exclusiveMinimum": 1}, 1.01, True), ({"exclusiveMaximum": 3}, 3, False),
    ({"multipleOf": 2}, 4, True), ({"multipleOf": 2}, 5, False), ({"multipleOf": 0.5}, 1.5, True),
    ({"minimum": 1}, "0", True),
    # booleans as schemas, unknown keywords
    ({"properties": {"a": False}}, {"a": 1}, False), ({"properties": {"a": True}}, {"a": 1}, True),
    ({"format": "email", "title": "x", "description": "y", "default": 1}, "not an email", True),
]


@pytest.mark.parametrize("schema, value, holds", SCHEMA_CASES)
def test_the_schema_subset_against_the_test_suites_kind_of_cases(schema, value, holds):
    import jsonschema

    assert (kp.schema_problem(value, schema) is None) == holds
    assert jsonschema.Draft202012Validator(schema).is_valid(value) == holds  # the table itself is right


def test_schema_problems_name_the_path():
    schema = {"type": "object", "required": ["location"], "$defs": {"loc": {
        "type": "object", "properties": {"city": {"type": "string"}, "tags": {"type": "array", "items": {"enum": ["a"]}}},
        "required": ["city"], "additionalProperties": False}}, "properties": {"location": {"$ref": "#/$defs/loc"}}}
    assert kp.schema_problem({"location": {"city": 1}}, schema) == "location.city: expected string"
    assert kp.schema_problem({"location": {}}, schema) == "location.city: missing (required)"
    assert kp.schema_problem({"location": {"city": "P", "tags": ["a", "b"]}}, schema) == \
        'location.tags[1]: expected one of ["a"]'
    assert kp.schema_problem({"location": {"city": "P", "x": 1}}, schema) == "location.x: not allowed (no such property)"
    assert kp.schema_problem({}, schema) == "location: missing (required)"


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats(allow_nan=False,
                                                                                               allow_infinity=False)
                           | st.text(max_size=5), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(["a", "b", "c"]), inner, max_size=3), max_leaves=8)
SCHEMAS = st.recursive(
    st.sampled_from([{}, {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": ["string", "null"]},
                     {"enum": ["a", 1, None]}, {"const": "a"}, {"minimum": 0}, {"maxLength": 2}, {"pattern": "^a"}]),
    lambda inner: st.builds(lambda props, required, extra: {"type": "object", "properties": props,
                                                            "required": required, "additionalProperties": extra},
                            st.dictionaries(st.sampled_from(["a", "b", "c"]), inner, max_size=3),
                            st.lists(st.sampled_from(["a", "b"]), max_size=2, unique=True), st.booleans())
    | st.builds(lambda items: {"type": "array", "items": items}, inner)
    | st.builds(lambda choices: {"anyOf": choices}, st.lists(inner, min_size=1, max_size=3))
    | st.builds(lambda choices: {"oneOf": choices}, st.lists(inner, min_size=1, max_size=2))
    | st.just({"$ref": "#/$defs/x"}),
    max_leaves=6)


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), deadline=None)
@given(schema=SCHEMAS, defined=SCHEMAS, arguments=st.dictionaries(st.sampled_from(["a", "b", "c"]), JSON_VALUES, max_size=3))
def test_a_call_the_proxy_returns_always_validates_against_its_schema(schema, defined, arguments):
    """Checked by an independent validator: whatever the proxy lets through as a call holds, and
    what it refuses does not."""
    import jsonschema

    defined = {} if "#/$defs/x" in json.dumps(defined) else defined  # (no definition that names itself)
    parameters = {"type": "object", "$defs": {"x": defined}, "properties": {"a": schema, "b": {"$ref": "#/$defs/x"}},
                  "additionalProperties": schema}
    tools = kp.ToolUse({"f": kp.Function("f", "", parameters)}, False, None, True)
    call, problem = kp.to_tool_call(json.dumps({"name": "f", "arguments": arguments}), tools)
    valid = jsonschema.Draft202012Validator(parameters).is_valid(arguments)
    assert (call is not None) == valid, problem
    if call is not None:
        assert jsonschema.Draft202012Validator(parameters).is_valid(json.loads(call.arguments))


# ---------------------------------------------------------------------------------------------
# Anthropic Messages (/v1/messages): the anthropic SDK, raw events, Claude Code
# ---------------------------------------------------------------------------------------------


@pytest.fixture
async def claude(proxy, token):
    import anthropic

    client = anthropic.AsyncAnthropic(base_url=proxy, api_key=token, max_retries=0)
    yield client
    await client.close()


def named_events(raw: bytes) -> list[dict]:
    """The events of a stream whose every event has an `event:` line naming it as its JSON `type`
    does (comments skipped), as the Anthropic and Responses streams are written."""
    assert b"\r" not in raw and raw.endswith(b"\n\n")
    events = []
    for block in raw.decode().split("\n\n")[:-1]:
        if block.startswith(":"):
            continue
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), block
        event = json.loads(data[len("data: "):])
        assert event["type"] == name[len("event: "):]
        events.append(event)
    return events


def anthropic_events(raw: bytes) -> list[dict]:
    """The events of an Anthropic stream, checking what its SDKs and Claude Code rely on: an
    `event:` line naming every event as its JSON `type` does, message_start first, one content
    block open at a time with indices 0, 1, 2..., each started and stopped once, a tool's input
    only in input_json_delta pieces that join into one JSON object, message_stop last (or an error
    and nothing after it)."""
    events = named_events(raw)
    kinds = [event["type"] for event in events if event["type"] != "ping"]
    assert kinds[0] == "message_start" and events[0]["type"] == "message_start"
    start = events[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and isinstance(start["usage"]["input_tokens"], int)
    assert re.fullmatch(r"msg_[A-Za-z0-9]{24}", start["id"])
    if kinds[-1] == "error":
        assert "message_stop" not in kinds and "message_delta" not in kinds
        return events
    assert kinds[-2:] == ["message_delta", "message_stop"]
    open_index, next_index, inputs = None, 0, {}
    for event in events:
        if event["type"] == "content_block_start":
            assert open_index is None and event["index"] == next_index
            open_index, next_index = event["index"], next_index + 1
            block = event["content_block"]
            if block["type"] == "tool_use":
                assert block["input"] == {} and re.fullmatch(r"toolu_[A-Za-z0-9]{24}", block["id"])
                inputs[open_index] = ""
            if block["type"] == "text":
                assert block["text"] == ""
        elif event["type"] == "content_block_delta":
            assert event["index"] == open_index
            if event["delta"]["type"] == "input_json_delta":
                inputs[open_index] += event["delta"]["partial_json"]
        elif event["type"] == "content_block_stop":
            assert event["index"] == open_index
            open_index = None
    assert open_index is None
    assert all(isinstance(json.loads(joined), dict) for joined in inputs.values())
    return events


def anthropic_blocks(events: list[dict]) -> list[dict]:
    """The content blocks a stream's events put together, as the SDK's accumulator does."""
    blocks: list[dict] = []
    for event in events:
        if event["type"] == "content_block_start":
            blocks.append({**event["content_block"], **({"input": ""} if event["content_block"]["type"] == "tool_use" else {})})
        elif event["type"] == "content_block_delta":
            delta, block = event["delta"], blocks[event["index"]]
            field = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "input"}.get(delta["type"])
            if field:
                block[field] += delta["text" if field == "text" else "thinking" if field == "thinking" else "partial_json"]
            elif delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
    for block in blocks:
        if block["type"] == "tool_use":
            block["input"] = json.loads(block["input"])
    return blocks


async def post_messages(http, proxy, token, *, auth_header: str = "x-api-key", **body) -> aiohttp.ClientResponse:
    body.setdefault("model", "claude-sonnet-4-5")
    body.setdefault("max_tokens", 1024)
    body.setdefault("messages", user("用一句话介绍长城"))
    headers = {"x-api-key": token} if auth_header == "x-api-key" else auth(token)
    return await http.post(proxy + "/v1/messages?beta=true", json=body,
                           headers={**headers, "anthropic-version": "2023-06-01"})


CLAUDE_TOOL = {"name": "get_weather", "description": "The weather in a city now",
               "input_schema": WEATHER["function"]["parameters"], "cache_control": {"type": "ephemeral"}}


@BOTH_DIALECTS
async def test_anthropic_sdk_messages_create(claude, kimi, token):
    message = await claude.messages.create(model="claude-sonnet-4-5", max_tokens=1024, system="你是导游",
                                           messages=user("用一句话介绍长城"))
    assert re.fullmatch(r"msg_[A-Za-z0-9]{24}", message.id) and message.type == "message" and message.role == "assistant"
    assert message.model == "claude-sonnet-4-5" and message.stop_reason == "end_turn" and message.stop_sequence is None
    assert [(block.type, block.text) for block in message.content] == [("text", "".join(ANSWER))]
    assert message.usage.output_tokens == kp.estimate_tokens(len("".join(ANSWER).encode()))
    (seen,) = kimi.completions
    assert seen["prompt"] == "system:你是导游\nsystem:关注用户最新的消息\nuser:用一句话介绍长城"
    assert message.usage.input_tokens == kp.estimate_tokens(len(seen["prompt"].encode()))
    await kimi.wait_deleted(1)
    assert kimi.live_chats == []


async def test_claude_model_names_mean_the_claude_model_setting(start_proxy, http, kimi, token):
    proxy = await start_proxy(CLAUDE_MODEL="kimi-k3")
    for model in ("claude-haiku-4-5-20251001", "claude-opus-4-1", "kimi-k2.6"):
        response = await post_messages(http, proxy, token, model=model)
        assert response.status == 200 and (await response.json())["model"] == model
    assert [c["body"]["options"]["model"] for c in kimi.completions] == ["k3-agent", "k3-agent", "k2d6-chat"]


async def test_anthropic_stream_with_a_tool_call_through_the_sdk(claude, kimi, http, proxy, token):
    kimi.replies, kimi.reply_piece = ["我查一下。\n" + block(unit="C")], 3
    async with claude.messages.stream(model="claude-sonnet-4-5", max_tokens=1024, tools=[CLAUDE_TOOL],
                                      messages=user(ASK)) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    text, use = final.content
    assert (text.type, text.text) == ("text", "我查一下。")
    assert (use.type, use.name, use.input) == ("tool_use", "get_weather", {"city": "Paris", "unit": "C"})
    assert re.fullmatch(r"toolu_[A-Za-z0-9]{24}", use.id)
    kimi.replies = ["我查一下。\n" + block(unit="C")]
    response = await post_messages(http, proxy, token, stream=True, tools=[CLAUDE_TOOL], messages=user(ASK))
    assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    events = anthropic_events(await response.read())
    assert [(b["type"], b.get("text") or b.get("input")) for b in anthropic_blocks(events)] == \
        [("text", "我查一下。"), ("tool_use", {"city": "Paris", "unit": "C"})]
    assert events[-2]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[-2]["usage"]["output_tokens"] > 0
    await kimi.wait_deleted(2)
    assert kimi.live_chats == []


async def test_a_tool_result_round_trip(claude, kimi):
    history = [{"role": "user", "content": ASK},
               {"role": "assistant", "content": [
                   {"type": "thinking", "thinking": "想想", "signature": "sig-from-anyone"},
                   {"type": "text", "text": "我查一下。"},
                   {"type": "tool_use", "id": "toolu_01abc", "name": "get_weather", "input": {"city": "Paris"}}]},
               {"role": "user", "content": [
                   {"type": "tool_result", "tool_use_id": "toolu_01abc", "content": [{"type": "text", "text": "18C"}],
                    "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "那罗马呢？"}]}]
    kimi.replies = ["巴黎 18 度。"]
    message = await claude.messages.create(model="claude-sonnet-4-5", max_tokens=1024, tools=[CLAUDE_TOOL],
                                           messages=history)
    assert message.content[0].text == "巴黎 18 度。" and message.stop_reason == "end_turn"
    prompt = kimi.completions[0]["prompt"]
    assert (f'user:{ASK}\nassistant:我查一下。\n<tool_call>\n{{"name":"get_weather","arguments":{{"city":"Paris"}}}}\n'
            '</tool_call>\ntool:<tool_result name="get_weather">\n18C\n</tool_result>\nsystem:关注用户最新的消息\n'
            'user:那罗马呢？') in prompt
    assert "想想" not in prompt and "sig-from-anyone" not in prompt
    failed = history[:2] + [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01abc",
                                                         "content": "<tool_use_error>no</tool_use_error>",
                                                         "is_error": True}]}]
    kimi.replies = ["好的。"]
    await claude.messages.create(model="claude-sonnet-4-5", max_tokens=1024, tools=[CLAUDE_TOOL], messages=failed)
    assert kimi.completions[1]["prompt"].endswith(
        'tool:<tool_result name="get_weather" error="true">\n<tool_use_error>no</tool_use_error>\n</tool_result>\n'
        'system:关注用户最新的消息')
    await kimi.wait_deleted(2)


@BOTH_DIALECTS
async def test_anthropic_thinking_blocks(claude, kimi, http, proxy, token):
    message = await claude.messages.create(model="kimi-k1", max_tokens=4096, messages=user("9.11和9.9哪个大"),
                                           thinking={"type": "enabled", "budget_tokens": 2048})
    thinking, text = message.content
    assert (thinking.type, thinking.thinking, text.text) == ("thinking", "".join(THINKING), "".join(ANSWER))
    assert thinking.signature.startswith("kimi-proxy.")
    response = await post_messages(http, proxy, token, model="kimi-k1", stream=True, thinking={"type": "adaptive"})
    blocks = anthropic_blocks(anthropic_events(await response.read()))
    assert [b["type"] for b in blocks] == ["thinking", "text"] and blocks[0]["signature"] == thinking.signature
    for hidden in ({"type": "adaptive", "display": "omitted"}, {"type": "disabled"}, None):
        extra = {"thinking": hidden} if hidden else {}
        response = await post_messages(http, proxy, token, model="kimi-k1", stream=True, **extra)
        assert [b["type"] for b in anthropic_blocks(anthropic_events(await response.read()))] == ["text"]
    await kimi.wait_deleted(5)


async def test_anthropic_thinking_maps_to_kimis_reasoning(http, proxy, token, kimi):
    for thinking, effort in (({"type": "enabled", "budget_tokens": 20000}, "REASONING_EFFORT_LOW"),
                             ({"type": "adaptive", "display": "summarized"}, "REASONING_EFFORT_LOW"),
                             ({"type": "disabled"}, "REASONING_EFFORT_NONE"), (None, "REASONING_EFFORT_NONE")):
        extra = {"thinking": thinking} if thinking else {}
        assert (await post_messages(http, proxy, token, model="kimi-k2.6", **extra)).status == 200
        assert kimi.completions[-1]["body"]["options"]["reasoning_effort"] == effort
    response = await post_messages(http, proxy, token, model="kimi-k3", thinking={"type": "enabled", "budget_tokens": 2048},
                                   output_config={"effort": "max"})
    assert response.status == 200 and kimi.completions[-1]["body"]["options"]["reasoning_effort"] == "REASONING_EFFORT_HIGH"


async def test_what_claude_code_sends_is_accepted(http, proxy, token, kimi):
    """The fields of Claude Code 2.1's first request (CLIENT_APIS.md §3.2), new and old."""
    body = {
        "model": "claude-opus-4-1", "max_tokens": 128000, "stream": True,
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.337"},
                   {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
                                                  {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]},
                     {"role": "system", "content": "environment: linux"},
                     {"role": "user", "content": "scenario:plain 你好"}],
        "tools": [CLAUDE_TOOL, {**TIME["function"], "input_schema": {"type": "object"}, "defer_loading": True},
                  {"name": "DeferredToolPlaceholder", "input_schema": {"type": "object"}, "defer_loading": True},
                  {"type": "web_search_20250305", "name": "web_search", "max_uses": 8},
                  {"type": "bash_20250124", "name": "bash"}, {"type": "mcp_toolset", "mcp_server_name": "x"}],
        "metadata": {"user_id": '{"device_id":"d","session_id":"s"}'},
        "thinking": {"type": "adaptive", "display": "omitted", "updates": True},
        "context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]},
        "output_config": {"effort": "high"}, "speed": "fast", "service_tier": "auto", "diagnostics": {},
        "container": None, "inference_geo": "us", "cache_control": {"type": "ephemeral"}, "temperature": 1,
    }
    response = await http.post(proxy + "/v1/messages?beta=true", json=body, headers={
        "Authorization": f"Bearer {token}", "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27",
        "x-app": "cli", "X-Claude-Code-Session-Id": "s1"})
    assert response.status == 200, await response.text()
    assert response.headers["request-id"] == response.headers["X-Request-ID"]
    anthropic_events(await response.read())
    (seen,) = kimi.completions
    assert seen["prompt"].startswith("system:You can call these functions") and "x-anthropic-billing-header" not in seen["prompt"]
    assert '"name":"get_weather"' in seen["prompt"]
    assert "get_time" not in seen["prompt"] and "DeferredToolPlaceholder" not in seen["prompt"]  # deferred, never named
    assert "system:You are Claude Code.\nuser:<system-reminder>ctx</system-reminder>\nhi\nsystem:environment: linux" in seen["prompt"]
    assert seen["search"] is True
    # once tool search names a deferred tool, it is described
    body["stream"] = False
    body["messages"] += [{"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "ToolSearch",
                                                            "input": {"query": "time"}}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                       "content": [{"type": "tool_reference", "tool_name": "get_time"}]}]}]
    response = await http.post(proxy + "/v1/messages", json=body, headers={"x-api-key": token})
    assert response.status == 200
    prompt = kimi.completions[1]["prompt"]
    assert '"name":"get_time"' in prompt and "The tool get_time is now available." in prompt
    assert "DeferredToolPlaceholder" not in prompt
    await kimi.wait_deleted(2)


async def test_anthropic_images_documents_and_text_documents(claude, kimi):
    pdf = base64.b64encode(PDF).decode()
    content = [{"type": "text", "text": "读一下"},
               {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(PNG).decode()}},
               {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": pdf},
                "title": "report.pdf"},
               {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "纯文本内容"},
                "title": "notes"}]
    await claude.messages.create(model="claude-sonnet-4-5", max_tokens=1024, messages=[{"role": "user", "content": content}])
    (seen,) = kimi.completions
    assert seen["prompt"] == "读一下\nnotes\n纯文本内容"
    assert sorted(kimi.files[f]["name"] for f in seen["files"]) == ["image.png", "report.pdf"]
    assert sorted(bytes(kimi.uploads[kimi.files[f]["object_name"]]) for f in seen["files"]) == sorted([PNG, PDF])
    await kimi.wait_deleted(1)


async def test_anthropic_stop_sequences_and_json_answers(claude, kimi):
    message = await claude.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=user("用一句话介绍长城"),
                                           stop_sequences=["修建"])
    assert message.content[0].text == "长城是中国古代" and message.stop_reason == "stop_sequence"
    assert message.stop_sequence == "修建"
    kimi.replies = ['```json\n{"title": "长城"}\n```']
    titled = await claude.messages.create(model="claude-haiku-4-5", max_tokens=64, messages=user(ASK),
                                          extra_body={"output_config": {"format": {"type": "json_schema", "schema": {
                                              "type": "object", "properties": {"title": {"type": "string"}},
                                              "required": ["title"]}}}})
    assert json.loads(titled.content[0].text) == {"title": "长城"}
    assert "JSON only" in kimi.completions[-1]["prompt"]
    await kimi.wait_deleted(2)


async def test_anthropic_count_tokens_and_models(claude, kimi, http, proxy, token):
    body = {"model": "claude-sonnet-4-5", "system": "你是导游", "messages": user("用一句话介绍长城"), "tools": [CLAUDE_TOOL]}
    counted = await claude.messages.count_tokens(**body)
    counts = await asyncio.gather(*(http.post(proxy + "/v1/messages/count_tokens?beta=true", json=body,
                                              headers={"x-api-key": token}) for _ in range(25)))
    assert {(await response.json())["input_tokens"] for response in counts} == {counted.input_tokens}
    assert kimi.calls == []  # nothing asked of Kimi
    kimi.replies = ["好。"]
    message = await claude.messages.create(max_tokens=16, **body)
    assert message.usage.input_tokens == counted.input_tokens
    models = [model async for model in claude.models.list()]
    assert [model.id for model in models][:2] == ["kimi-k2.6", "kimi-k2.6-thinking"]
    assert all(model.type == "model" and model.display_name and model.created_at for model in models)


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_errors_come_in_anthropics_envelope(http, proxy, token, kimi, stream):
    import anthropic

    response = await http.post(proxy + "/v1/messages", json={"messages": user("hi"), "max_tokens": 1, "stream": stream})
    assert response.status == 401
    assert await response.json() == {"type": "error", "error": {"type": "authentication_error",
                                                                "message": (await response.json())["error"]["message"]}}
    response = await post_messages(http, proxy, token, stream=stream, messages=[{"role": "robot", "content": "hi"}])
    assert response.status == 400 and (await response.json())["error"]["type"] == "invalid_request_error"
    response = await post_messages(http, proxy, token, stream=stream, messages=user("scenario:error_first"))
    assert response.status == 502 and (await response.json())["error"]["type"] == "api_error"
    response = await post_messages(http, proxy, token, stream=stream, messages=user("scenario:overloaded_first"))
    assert response.status == 529 and (await response.json())["error"]["type"] == "overloaded_error"
    assert response.headers["Retry-After"]
    kimi.rate_limited.add(kimi.user_of(token))
    response = await post_messages(http, proxy, token, stream=stream)
    assert response.status == 429 and (await response.json())["error"]["type"] == "rate_limit_error"
    assert response.headers["Retry-After"] == "7"
    kimi.rate_limited.clear()
    client = anthropic.AsyncAnthropic(base_url=proxy, api_key="not-a-kimi-token", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        await client.messages.create(model="claude-sonnet-4-5", max_tokens=1, messages=user("hi"))
    await client.close()
    await kimi.wait_deleted(len(kimi.created))


async def test_a_failure_mid_stream_is_an_error_event(claude, kimi, http, proxy, token):
    import anthropic

    response = await post_messages(http, proxy, token, stream=True, messages=user("scenario:error"))
    events = anthropic_events(await response.read())
    assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == "api_error"
    assert "Kimi 现在有点累了" in events[-1]["error"]["message"]
    with pytest.raises(anthropic.APIStatusError):
        async with claude.messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=user("scenario:error")) as stream:
            await stream.get_final_message()
    await kimi.wait_deleted(2)


async def test_anthropic_pings_keep_a_silent_stream_open(start_proxy, http, token, kimi):
    proxy = await start_proxy(KEEPALIVE_INTERVAL="0.2")
    response = await post_messages(http, proxy, token, stream=True, messages=user("scenario:slow"))
    raw = await response.read()
    assert raw.startswith(b"event: message_start\n") and b"event: ping\ndata: {\"type\":\"ping\"}\n\n" in raw
    assert [b["text"] for b in anthropic_blocks(anthropic_events(raw))] == ["".join(ANSWER)]


def test_anthropic_stream_bytes_exactly(monkeypatch):
    monkeypatch.setattr(kp, "new_id", lambda: "A" * 24)
    wanted = kp.parse_messages({"model": "claude-x", "messages": user("q"), "thinking": {"type": "enabled"}}, LIMITS)
    stream = kp.MessagesStream(wanted, 3)
    out = stream.opening() + stream.feed([kp.Part(kp.REASONING, "想"), kp.Part(kp.TEXT, "好"),
                                          kp.Part(kp.CALLS, (kp.Call("B" * 24, "f", '{"a":1}'),)),
                                          kp.Part(kp.FINISH, kp.CALLS_FINISH), kp.Part(kp.USAGE, kp.Usage(3, 2))]) + stream.end()
    signature = kp.thinking_signature("想")

    def event(name: str, payload: str) -> bytes:
        return f"event: {name}\ndata: {payload}\n\n".encode()

    usage = '"cache_creation_input_tokens":0,"cache_read_input_tokens":0}'
    assert out == b"".join([
        event("message_start", '{"type":"message_start","message":{"id":"msg_' + "A" * 24 + '","type":"message",'
              '"role":"assistant","model":"claude-x","content":[],"stop_reason":null,"stop_sequence":null,'
              '"usage":{"input_tokens":3,"output_tokens":0,' + usage + '}}'),
        event("content_block_start", '{"type":"content_block_start","index":0,"content_block":{"type":"thinking",'
              '"thinking":"","signature":""}}'),
        event("content_block_delta", '{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"想"}}'),
        event("content_block_delta", '{"type":"content_block_delta","index":0,"delta":{"type":"signature_delta",'
              f'"signature":"{signature}"}}}}'),
        event("content_block_stop", '{"type":"content_block_stop","index":0}'),
        event("content_block_start", '{"type":"content_block_start","index":1,"content_block":{"type":"text","text":""}}'),
        event("content_block_delta", '{"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"好"}}'),
        event("content_block_stop", '{"type":"content_block_stop","index":1}'),
        event("content_block_start", '{"type":"content_block_start","index":2,"content_block":{"type":"tool_use",'
              '"id":"toolu_' + "B" * 24 + '","name":"f","input":{}}}'),
        event("content_block_delta", '{"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta",'
              '"partial_json":"{\\"a\\":1}"}}'),
        event("content_block_stop", '{"type":"content_block_stop","index":2}'),
        event("message_delta", '{"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},'
              '"usage":{"input_tokens":3,"output_tokens":2,' + usage + '}'),
        event("message_stop", '{"type":"message_stop"}'),
    ])


@pytest.mark.parametrize("body, param", [
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": 1}]}]},
     "messages[0].content[0].tool_use_id"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                            "data": "@@"}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]},
     "messages[0].content[0]"),
    ({"messages": user("hi"), "tools": [{"name": "has space", "input_schema": {}}]}, "tools[0].name"),
    ({"messages": user("hi"), "tool_choice": {"type": "any"}}, "tool_choice"),
    ({"messages": user("hi"), "tool_choice": {"type": "sometimes"}}, "tool_choice"),
    ({"messages": user("hi"), "max_tokens": "lots"}, "max_tokens"),
    ({"messages": user("hi"), "stop_sequences": [1]}, "stop_sequences"),
    ({"messages": user("hi"), "output_config": {"format": {"type": "xml"}}}, "output_config.format"),
    ({"messages": user("hi"), "system": 5}, "system"),
])
def test_bad_anthropic_bodies_name_the_field(body, param):
    with pytest.raises(kp.ProxyError) as caught:
        kp.parse_messages(body, LIMITS)
    assert (caught.value.status, caught.value.param) == (400, param)


def test_anthropic_bodies_become_neutral_requests():
    wanted = kp.parse_messages({
        "model": "claude-x", "system": [{"type": "text", "text": "be brief"}], "stop_sequences": ["END", ""],
        "tools": [CLAUDE_TOOL], "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        "messages": [{"role": "user", "content": "q"},
                     {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "P"}}]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "18C"},
                                                  {"type": "text", "text": "more"}]}]}, LIMITS)
    assert (wanted.tools.only, wanted.tools.required, wanted.tools.parallel, wanted.stop) == ("get_weather", True, False, ("END",))
    assert [(t.role, t.text, t.call_id) for t in wanted.turns] == [
        ("system", "be brief", None), ("user", "q", None), ("assistant", "", None), ("tool", "18C", "t1"), ("user", "more", None)]
    assert wanted.turns[2].calls == (kp.Call("t1", "get_weather", '{"city":"P"}'),)


# ---------------------------------------------------------------------------------------------
# OpenAI Responses (/v1/responses): the openai SDK, the Agents SDK, raw events, Codex
# ---------------------------------------------------------------------------------------------


TERMINAL = ("response.completed", "response.incomplete", "response.failed")


def responses_events(raw: bytes) -> list[dict]:
    """The events of a Responses stream, checking what the openai SDK's helper and Codex rely on:
    an `event:` line naming each event as its `type` does, sequence numbers 0, 1, 2..., created
    then in_progress first with one response id throughout, every item added before its deltas
    and done after them (same id and type), output indices 0, 1, 2..., a message's part added
    before its text, and exactly one terminal event, last, whose output is every item done."""
    events = named_events(raw)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    assert [event["type"] for event in events[:2]] == ["response.created", "response.in_progress"]
    response_id = events[0]["response"]["id"]
    assert re.fullmatch(r"resp_[A-Za-z0-9]{24}", response_id) and events[0]["response"]["output"] == []
    assert events[0]["response"]["status"] == "in_progress"
    terminal = [event for event in events if event["type"] in TERMINAL]
    assert len(terminal) == 1 and terminal[0] is events[-1] and terminal[0]["response"]["id"] == response_id
    added, done, parts = {}, [], set()
    for event in events[2:-1]:
        kind = event["type"]
        if kind == "response.output_item.added":
            assert event["output_index"] == len(added) == len(done)
            assert event["item"]["type"] == "reasoning" or event["item"]["status"] == "in_progress"
            added[event["output_index"]] = event["item"]
        elif kind == "response.output_item.done":
            item, first = event["item"], added[event["output_index"]]
            assert (item["type"], item["id"], item.get("call_id")) == (first["type"], first["id"], first.get("call_id"))
            done.append(item)
        elif kind == "response.content_part.added":
            parts.add(event["item_id"])
        elif kind in ("response.output_text.delta", "response.output_text.done"):
            assert event["item_id"] in parts and event["output_index"] == len(done) and event["content_index"] == 0
        elif kind.startswith("response.function_call_arguments") or kind.startswith("response.reasoning_summary"):
            assert event["output_index"] == len(done) and event["item_id"] == added[len(done)]["id"]
    assert len(added) == len(done)
    if terminal[0]["type"] != "response.failed":
        assert terminal[0]["response"]["output"] == done
        usage = terminal[0]["response"]["usage"]
        assert set(usage) == {"input_tokens", "input_tokens_details", "output_tokens", "output_tokens_details", "total_tokens"}
        assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0
    return events


async def post_responses(http, proxy, token, **body) -> aiohttp.ClientResponse:
    body.setdefault("model", "kimi")
    body.setdefault("input", "用一句话介绍长城")
    return await http.post(proxy + "/v1/responses", json=body, headers=auth(token))


RESPONSES_TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city now",
                  "parameters": WEATHER["function"]["parameters"], "strict": False}


@BOTH_DIALECTS
async def test_responses_create_through_the_sdk(sdk, kimi):
    response = await sdk.responses.create(model="kimi", instructions="你是导游", input="用一句话介绍长城")
    assert re.fullmatch(r"resp_[A-Za-z0-9]{24}", response.id) and response.object == "response"
    assert response.status == "completed" and response.output_text == "".join(ANSWER)
    (message,) = response.output
    assert message.type == "message" and message.id.startswith("msg_") and message.content[0].type == "output_text"
    (seen,) = kimi.completions
    assert seen["prompt"] == "system:你是导游\nsystem:关注用户最新的消息\nuser:用一句话介绍长城"
    assert response.usage.input_tokens == kp.estimate_tokens(len(seen["prompt"].encode()))
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    await kimi.wait_deleted(1)
    assert kimi.live_chats == []


async def test_responses_stream_with_reasoning_text_and_a_call(sdk, kimi, http, proxy, token):
    kimi.replies = ["我查一下。\n" + block(unit="C")]
    async with sdk.responses.stream(model="kimi-thinking", input=ASK, tools=[RESPONSES_TOOL]) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_response()
    kinds = [item.type for item in final.output]
    assert kinds == ["reasoning", "message", "function_call"], kinds
    reasoning, message, call = final.output
    assert reasoning.summary[0].text == "".join(THINKING) and message.content[0].text == "我查一下。"
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris", "unit": "C"})
    assert call.id.startswith("fc_") and call.call_id.startswith("call_") and call.status == "completed"
    kimi.replies = ["我查一下。\n" + block(unit="C")]
    response = await post_responses(http, proxy, token, model="kimi-thinking", input=ASK, tools=[RESPONSES_TOOL],
                                    stream=True)
    assert response.status == 200
    events = responses_events(await response.read())
    assert events[-1]["type"] == "response.completed"
    await kimi.wait_deleted(2)


async def test_a_function_call_output_round_trip(sdk, kimi):
    kimi.replies = [block()]
    first = await sdk.responses.create(model="kimi", input=ASK, tools=[RESPONSES_TOOL], store=False)
    (call,) = [item for item in first.output if item.type == "function_call"]
    kimi.replies = ["巴黎 18 度，晴。"]
    history = [{"role": "user", "content": ASK},
               {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments,
                "id": call.id, "status": "completed"},
               {"type": "function_call_output", "call_id": call.call_id, "output": "18C, sunny"}]
    final = await sdk.responses.create(model="kimi", input=history, tools=[RESPONSES_TOOL], store=False)
    assert final.output_text == "巴黎 18 度，晴。"
    prompt = kimi.completions[1]["prompt"]
    assert prompt.endswith(f'user:{ASK}\nassistant:<tool_call>\n{{"name":"get_weather","arguments":{{"city":"Paris"}}}}\n'
                           '</tool_call>\ntool:<tool_result name="get_weather">\n18C, sunny\n</tool_result>\n'
                           'system:关注用户最新的消息')
    await kimi.wait_deleted(2)


async def test_responses_json_schema_answers(sdk, kimi):
    kimi.replies = ['{"city": "巴黎", "temp": "18"}', '{"city": "巴黎", "temp": 18}']
    schema = SCHEMA_FORMAT["json_schema"]["schema"]
    response = await sdk.responses.create(model="kimi", input=ASK, text={"format": {
        "type": "json_schema", "name": "weather", "schema": schema, "strict": True}})
    assert json.loads(response.output_text) == {"city": "巴黎", "temp": 18}
    assert "temp: expected integer" in kimi.completions[1]["prompt"]
    await kimi.wait_deleted(1)


async def test_previous_response_id_get_and_delete(sdk, kimi):
    import openai as openai_module

    first = await sdk.responses.create(model="kimi", instructions="只说中文", input="用一句话介绍长城")
    kimi.replies = ["是的。"]
    second = await sdk.responses.create(model="kimi", input="scenario:reply 它长吗？", previous_response_id=first.id)
    assert second.previous_response_id == first.id and second.output_text == "是的。"
    prompt = kimi.completions[1]["prompt"]
    assert prompt == f"user:用一句话介绍长城\nassistant:{''.join(ANSWER)}\nsystem:关注用户最新的消息\nuser:scenario:reply 它长吗？"
    assert (await sdk.responses.retrieve(first.id)).output_text == "".join(ANSWER)
    deleted = await sdk.with_raw_response.responses.delete(first.id)
    assert deleted.http_response.json() == {"id": first.id, "object": "response.deleted", "deleted": True}
    with pytest.raises(openai_module.NotFoundError):
        await sdk.responses.retrieve(first.id)
    with pytest.raises(openai_module.BadRequestError) as caught:
        await sdk.responses.create(model="kimi", input="再说一次", previous_response_id=first.id)
    assert (caught.value.code, caught.value.param) == ("previous_response_not_found", "previous_response_id")
    unstored = await sdk.responses.create(model="kimi", input="hi", store=False)
    with pytest.raises(openai_module.NotFoundError):
        await sdk.responses.retrieve(unstored.id)
    await kimi.wait_deleted(3)
    assert kimi.live_chats == []


async def test_a_stored_response_belongs_to_the_key_that_asked(http, proxy, kimi, token):
    other = kimi.add_user()
    body = await (await post_responses(http, proxy, token)).json()
    assert (await http.get(f"{proxy}/v1/responses/{body['id']}", headers=auth(token))).status == 200
    assert (await http.get(f"{proxy}/v1/responses/{body['id']}", headers=auth(other))).status == 404
    response = await post_responses(http, proxy, other, previous_response_id=body["id"])
    assert response.status == 400
    assert_envelope(await response.json(), "previous_response_not_found", "previous_response_id")


async def test_what_codex_sends_is_accepted(http, proxy, token, kimi):
    """The shape of Codex 0.171's first request (CLIENT_APIS.md §4): developer messages, a
    namespace, web search and tools Kimi cannot run, reasoning and text options, store false."""
    body = {"model": "kimi", "instructions": None, "stream": True, "store": False, "parallel_tool_calls": True,
            "input": [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "You are Codex."}]},
                      {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "scenario:reply 列出文件"}]}],
            "tools": [{"type": "function", "name": "exec_command", "description": "Runs a command", "strict": False,
                       "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}},
                      {"type": "namespace", "name": "multi_agent_v1", "description": "agents",
                       "tools": [{"type": "function", "name": "spawn_agent", "parameters": {"type": "object"}}]},
                      {"type": "web_search", "external_web_access": False},
                      {"type": "custom", "name": "apply_patch", "format": {"type": "grammar", "syntax": "lark"}},
                      {"type": "tool_search"}],
            "tool_choice": "auto", "reasoning": {"summary": "auto"}, "include": ["reasoning.encrypted_content"],
            "prompt_cache_key": "k", "client_metadata": {"x": "y"}, "text": {"verbosity": "low"}, "truncation": "auto",
            "service_tier": "auto", "metadata": {}, "temperature": 1, "top_p": 1}
    kimi.replies = ['<tool_call>\n{"name": "spawn_agent", "arguments": {}}\n</tool_call>']
    response = await http.post(proxy + "/v1/responses", json=body, headers={
        **auth(token), "session-id": "s", "originator": "codex_exec", "Accept": "text/event-stream"})
    assert response.status == 200
    events = responses_events(await response.read())
    (call,) = [item for item in events[-1]["response"]["output"] if item["type"] == "function_call"]
    assert (call["name"], call["namespace"], call["arguments"]) == ("spawn_agent", "multi_agent_v1", "{}")
    (seen,) = kimi.completions
    assert seen["search"] is True and '"name":"exec_command"' in seen["prompt"] and "apply_patch" not in seen["prompt"]
    assert "system:You are Codex." in seen["prompt"]


async def test_responses_tool_choice_forms(http, proxy, token, kimi):
    for choice, expected in (("required", "must call at least one"), ({"type": "function", "name": "get_time"},
                                                                        "must call the function get_time"),
                             ({"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_time"}]},
                              "must call at least one")):
        kimi.replies = [block("get_time")]
        response = await post_responses(http, proxy, token, input=ASK, tool_choice=choice,
                                        tools=[RESPONSES_TOOL, {"type": "function", **TIME["function"]}])
        assert response.status == 200 and (await response.json())["output"][0]["name"] == "get_time"
        assert expected in kimi.completions[-1]["prompt"]
    assert '"name":"get_weather"' not in kimi.completions[-1]["prompt"]  # allowed_tools leaves the others out
    kimi.replies = ["不用工具。"]
    response = await post_responses(http, proxy, token, input=ASK, tools=[RESPONSES_TOOL], tool_choice="none")
    assert response.status == 200 and "<tool_call>" not in kimi.completions[-1]["prompt"]


@pytest.mark.parametrize("body, param", [
    ({"input": 5}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": 5}]}]}, "input[0].content[0]"),
    ({"input": [{"type": "function_call_output", "call_id": 5, "output": "x"}]}, "input[0].call_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]}, "input[0].content[0]"),
    ({"input": "hi", "tools": [{"type": "function", "name": "has space"}]}, "tools[0].name"),
    ({"input": "hi", "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"input": "hi", "tool_choice": "required"}, "tool_choice"),
    ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text.format"),
    ({"input": "hi", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ({"input": "hi", "background": True}, "background"),
    ({"input": "hi", "conversation": "conv_1"}, "conversation"),
    ({"input": "hi", "instructions": 5}, "instructions"),
])
def test_bad_responses_bodies_name_the_field(body, param):
    with pytest.raises(kp.ProxyError) as caught:
        kp.parse_responses(body, LIMITS)
    assert (caught.value.status, caught.value.param) == (400, param)


def test_responses_bodies_become_neutral_requests():
    wanted = kp.parse_responses({
        "model": "kimi-x", "instructions": "be brief", "reasoning": {"effort": "xhigh", "summary": "auto"},
        "parallel_tool_calls": False, "tools": [RESPONSES_TOOL], "tool_choice": {"type": "function", "name": "get_weather"},
        "input": [{"content": "q", "role": "user"},
                  {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"P"}'},
                  {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "18C"}]},
                  {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "and"},
                                                                   {"type": "input_image", "image_url": "https://a.example/i.png"}]}]},
        LIMITS)
    assert (wanted.reasoning_effort, wanted.tools.only, wanted.tools.parallel) == ("high", "get_weather", False)
    assert [(t.role, t.text, t.call_id) for t in wanted.turns] == [
        ("system", "be brief", None), ("user", "q", None), ("assistant", "", None), ("tool", "18C", "c1"), ("user", "and", None)]
    assert wanted.turns[2].calls == (kp.Call("c1", "get_weather", '{"city":"P"}'),)
    assert [a.url for a in wanted.turns[-1].attachments] == ["https://a.example/i.png"]


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_errors(http, proxy, token, kimi, stream):
    response = await http.post(proxy + "/v1/responses", json={"model": "kimi", "input": "hi", "stream": stream})
    assert response.status == 401 and assert_envelope(await response.json(), "invalid_api_key")
    response = await post_responses(http, proxy, token, stream=stream, input="scenario:error_first")
    assert response.status == 502 and assert_envelope(await response.json(), "upstream_error")
    kimi.rate_limited.add(kimi.user_of(token))
    response = await post_responses(http, proxy, token, stream=stream)
    assert response.status == 429 and response.headers["Retry-After"] == "7"
    kimi.rate_limited.clear()
    await kimi.wait_deleted(len(kimi.created))


async def test_a_failure_mid_stream_is_a_failed_response(sdk, http, proxy, token, kimi):
    response = await post_responses(http, proxy, token, stream=True, input="scenario:error")
    events = responses_events(await response.read())
    failed = events[-1]["response"]
    assert events[-1]["type"] == "response.failed" and failed["status"] == "failed"
    assert failed["error"]["code"] == "server_error" and "Kimi 现在有点累了" in failed["error"]["message"]
    assert kp.response_error(kp.RateLimited("Kimi is rate limiting this account", 12)) == {
        "code": "rate_limit_exceeded", "message": "Kimi is rate limiting this account Please try again in 12s."}
    assert kp.response_error(kp.QuotaExhausted("used up"))["code"] == "insufficient_quota"
    await kimi.wait_deleted(1)


async def test_responses_keep_alive_and_citations(start_proxy, http, token, kimi):
    proxy = await start_proxy(KEEPALIVE_INTERVAL="0.2")
    response = await post_responses(http, proxy, token, stream=True, input="scenario:slow")
    raw = await response.read()
    assert b": keep-alive\n\n" in raw
    responses_events(raw)
    body = await (await post_responses(http, proxy, token, model="kimi-search", input="今天杭州天气怎么样")).json()
    (message,) = body["output"]
    text, annotations = message["content"][0]["text"], message["content"][0]["annotations"]
    assert [(a["type"], a["url"], a["title"]) for a in annotations] == [("url_citation", url, title) for title, url in SOURCES]
    assert [text[a["start_index"]:a["end_index"]] for a in annotations] == [
        f"【检索 {n}】 [{title}]({url})" for n, (title, url) in enumerate(SOURCES, 1)]
    streamed = responses_events(await (await post_responses(http, proxy, token, model="kimi-search", stream=True,
                                                            input="今天杭州天气怎么样")).read())
    added = [event["annotation"] for event in streamed if event["type"] == "response.output_text.annotation.added"]
    assert added == streamed[-1]["response"]["output"][0]["content"][0]["annotations"] == annotations


def test_responses_stream_bytes_exactly(monkeypatch):
    ids = iter(f"{n:024d}" for n in range(1, 10))
    monkeypatch.setattr(kp, "new_id", lambda: next(ids))
    monkeypatch.setattr(kp.time, "time", lambda: 1700000000.5)
    wanted = kp.parse_responses({"model": "kimi", "input": "q", "store": False}, LIMITS)
    stream = kp.ResponsesStream(wanted)
    out = stream.opening() + stream.feed([kp.Part(kp.REASONING, "想"), kp.Part(kp.TEXT, "好"),
                                          kp.Part(kp.CALLS, (kp.Call("c" * 24, "f", '{"a":1}'),)),
                                          kp.Part(kp.FINISH, kp.CALLS_FINISH), kp.Part(kp.USAGE, kp.Usage(3, 2, 1))]) \
        + stream.end()
    echo = ('"previous_response_id":null,"store":false,"usage":{usage},"instructions":null,"max_output_tokens":null,'
            '"metadata":null,"temperature":null,"top_p":null,"reasoning":null,"text":{"format":{"type":"text"}},'
            '"truncation":"disabled","service_tier":null,"tools":[],"tool_choice":"auto","parallel_tool_calls":true')
    resp = "resp_" + f"{1:024d}"
    rs, msg, fc, call = "rs_" + f"{2:024d}", "msg_" + f"{3:024d}", "fc_" + "c" * 24, "call_" + "c" * 24

    def response(status: str, output: str, usage: str = "null") -> str:
        return ('{"id":"' + resp + '","object":"response","created_at":1700000000,"status":"' + status + '","error":null,'
                '"incomplete_details":null,"model":"kimi","output":[' + output + '],' + echo.replace("{usage}", usage) + "}")

    reasoning = '{"type":"reasoning","id":"' + rs + '","summary":[{"type":"summary_text","text":"想"}]}'
    message = ('{"type":"message","id":"' + msg + '","role":"assistant","status":"completed","content":[{"type":'
               '"output_text","text":"好","annotations":[],"logprobs":[]}]}')
    function = ('{"type":"function_call","id":"' + fc + '","call_id":"' + call + '","name":"f","arguments":"{\\"a\\":1}",'
                '"status":"completed"}')
    events = [
        ("response.created", '"response":' + response("in_progress", "")),
        ("response.in_progress", '"response":' + response("in_progress", "")),
        ("response.output_item.added", '"output_index":0,"item":{"type":"reasoning","id":"' + rs + '","summary":[]}'),
        ("response.reasoning_summary_part.added", '"item_id":"' + rs + '","output_index":0,"summary_index":0,'
         '"part":{"type":"summary_text","text":""}'),
        ("response.reasoning_summary_text.delta", '"item_id":"' + rs + '","output_index":0,"summary_index":0,"delta":"想"'),
        ("response.reasoning_summary_text.done", '"item_id":"' + rs + '","output_index":0,"summary_index":0,"text":"想"'),
        ("response.reasoning_summary_part.done", '"item_id":"' + rs + '","output_index":0,"summary_index":0,'
         '"part":{"type":"summary_text","text":"想"}'),
        ("response.output_item.done", '"output_index":0,"item":' + reasoning),
        ("response.output_item.added", '"output_index":1,"item":{"type":"message","id":"' + msg + '","role":"assistant",'
         '"status":"in_progress","content":[]}'),
        ("response.content_part.added", '"item_id":"' + msg + '","output_index":1,"content_index":0,'
         '"part":{"type":"output_text","text":"","annotations":[]}'),
        ("response.output_text.delta", '"item_id":"' + msg + '","output_index":1,"content_index":0,"delta":"好","logprobs":[]'),
        ("response.output_text.done", '"item_id":"' + msg + '","output_index":1,"content_index":0,"text":"好","logprobs":[]'),
        ("response.content_part.done", '"item_id":"' + msg + '","output_index":1,"content_index":0,'
         '"part":{"type":"output_text","text":"好","annotations":[],"logprobs":[]}'),
        ("response.output_item.done", '"output_index":1,"item":' + message),
        ("response.output_item.added", '"output_index":2,"item":{"type":"function_call","id":"' + fc + '","call_id":"'
         + call + '","name":"f","arguments":"","status":"in_progress"}'),
        ("response.function_call_arguments.delta", '"item_id":"' + fc + '","output_index":2,"delta":"{\\"a\\":1}"'),
        ("response.function_call_arguments.done", '"item_id":"' + fc + '","output_index":2,"name":"f","arguments":"{\\"a\\":1}"'),
        ("response.output_item.done", '"output_index":2,"item":' + function),
        ("response.completed", '"response":' + response("completed", ",".join([reasoning, message, function]),
                                                        '{"input_tokens":3,"input_tokens_details":{"cached_tokens":0},'
                                                        '"output_tokens":2,"output_tokens_details":{"reasoning_tokens":1},'
                                                        '"total_tokens":5}')),
    ]
    assert out.decode() == "".join(f'event: {name}\ndata: {{"type":"{name}","sequence_number":{n},{fields}}}\n\n'
                                   for n, (name, fields) in enumerate(events))


async def test_the_agents_sdk_runs_a_function_tool(proxy, token, kimi):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)  # else it uploads traces to OpenAI, with the Kimi token as the key
    client = openai.AsyncOpenAI(base_url=proxy + "/v1", api_key=token, max_retries=0)
    ran = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city now."""
        ran.append(city)
        return "18C, sunny"

    agent = agents.Agent(name="weather", instructions="Answer with the tool.", tools=[get_weather],
                         model=agents.OpenAIResponsesModel(model="kimi", openai_client=client))
    kimi.replies = [block(), "巴黎 18 度，晴。"]
    result = await agents.Runner.run(agent, ASK)
    assert result.final_output == "巴黎 18 度，晴。" and ran == ["Paris"]
    second = kimi.completions[1]["prompt"]
    assert second.startswith("system:Answer with the tool.") or "system:Answer with the tool." in second
    assert '<tool_result name="get_weather">\n18C, sunny\n</tool_result>' in second
    kimi.replies = [block(city="Rome"), "罗马 20 度。"]
    streamed = agents.Runner.run_streamed(agent, ASK)
    async for _ in streamed.stream_events():
        pass
    assert streamed.final_output == "罗马 20 度。" and ran == ["Paris", "Rome"]
    await client.close()
    await kimi.wait_deleted(4)
    assert kimi.live_chats == []


async def test_codex_runs_a_command_kimi_calls_and_finishes(proxy, token, kimi, tmp_path):
    codex = real_client("codex")
    home = tmp_path / "codex"
    home.mkdir()
    (home / "config.toml").write_text(
        'model = "kimi"\nmodel_provider = "kimi"\ncheck_for_update_on_startup = false\n'
        '[analytics]\nenabled = false\n'
        f'[model_providers.kimi]\nname = "Kimi"\nbase_url = "{proxy}/v1"\nenv_key = "KIMI_TOKEN"\nwire_api = "responses"\n'
        'request_max_retries = 0\nstream_max_retries = 0\n')
    work = tmp_path / "work"
    work.mkdir()
    kimi.replies = ['我来运行。\n<tool_call>\n{"name": "exec_command", "arguments": {"cmd": "echo kimi-was-here | tee proof.txt"}}\n'
                    '</tool_call>', "文件已写好。"]
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "CODEX_HOME": str(home), "KIMI_TOKEN": token}
    code, out, err = await run_client([codex, "exec", "--skip-git-repo-check", "--json", "-s", "workspace-write",
                                       "scenario:reply 把 kimi-was-here 写进 proof.txt"], env, str(work))
    assert code == 0, (out[-2000:], err[-2000:])
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    messages = [e["item"]["text"] for e in events if e.get("type") == "item.completed" and e["item"].get("type") == "agent_message"]
    # (Codex offers web search, so the fake Kimi's answer starts with its sources)
    assert messages[-1].endswith("文件已写好。") and any(e.get("type") == "turn.completed" for e in events)
    assert (work / "proof.txt").read_text() == "kimi-was-here\n"
    first, second = [c for c in kimi.completions if "scenario:reply" in c["prompt"]]
    assert '"name":"exec_command"' in first["prompt"]
    assert '<tool_result name="exec_command">' in second["prompt"] and "kimi-was-here" in second["prompt"]
    await kimi.wait_deleted(len(kimi.created))
    assert kimi.live_chats == []


# ---------------------------------------------------------------------------------------------
# The real coding agents: Claude Code and Codex, installed from npm (pinned) by .ci/run
# ---------------------------------------------------------------------------------------------


CLI_DIR = os.environ.get("KIMI_PROXY_CLI_DIR") or os.path.join(os.path.dirname(os.path.abspath(__file__)), ".ci-cache",
                                                               "npm", "node_modules", ".bin")
CLI_PACKAGES = "@anthropic-ai/claude-code@2.1.337 @openai/codex@0.171.0"


def real_client(name: str) -> str:
    """The path of a pinned CLI; in CI it must be there, elsewhere the test says how to get it."""
    path = os.path.join(CLI_DIR, name)
    if not os.access(path, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: .ci/run installs it with npm")
        pytest.skip(f"{name} is not installed: npm install --prefix .ci-cache/npm {CLI_PACKAGES}")
    return path


async def run_client(argv: list[str], env: dict, cwd: str, timeout: float = 120) -> tuple[int, str, str]:
    """Run a CLI in this test's loop (the proxy and the fake Kimi answer it meanwhile)."""
    process = await asyncio.create_subprocess_exec(*argv, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def test_claude_code_runs_a_tool_kimi_calls_and_finishes(proxy, token, kimi, tmp_path):
    claude_code = real_client("claude")
    command = "echo kimi-was-here | tee proof.txt"
    kimi.replies = [f'我来运行。\n<tool_call>\n{{"name": "Bash", "arguments": {{"command": "{command}", '
                    '"description": "Write the proof"}}\n</tool_call>', "文件已写好。"]
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "ANTHROPIC_BASE_URL": proxy, "ANTHROPIC_AUTH_TOKEN": token,
           "ANTHROPIC_MODEL": "kimi", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1",
           "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1", "CLAUDE_CODE_DISABLE_EXPERIMENTAL_BETAS": "1"}
    code, out, err = await run_client([claude_code, "-p", "scenario:reply 把 kimi-was-here 写进 proof.txt",
                                       "--output-format", "json", "--allowedTools", "Bash"], env, str(tmp_path))
    assert code == 0, err[-2000:]
    result = json.loads(out)
    assert (result["is_error"], result["num_turns"], result["result"]) == (False, 2, "文件已写好。"), result
    assert (tmp_path / "proof.txt").read_text() == "kimi-was-here\n"
    first, second = [c for c in kimi.completions if "scenario:reply" in c["prompt"]]
    assert '"name":"Bash"' in first["prompt"]
    assert '<tool_result name="Bash">' in second["prompt"] and "kimi-was-here" in second["prompt"]
    await kimi.wait_deleted(len(kimi.created))
    assert kimi.live_chats == []


# ---------------------------------------------------------------------------------------------
# The module's layout
# ---------------------------------------------------------------------------------------------


def test_each_section_of_the_module_uses_only_the_sections_above_it():
    """The module reads top-down: a name defined in a numbered section is used only by that
    section and the ones below it (annotations aside: they are strings)."""
    import ast

    with open(kp.__file__, encoding="utf-8") as module:
        source = module.read()
    starts = [(number, int(match[1])) for number, line in enumerate(source.split("\n"), 1)
              if (match := re.match(r"# §(\d+) ", line))]
    assert [section for _, section in starts] == list(range(1, len(starts) + 1))

    def section_of(line: int) -> int:
        return max([section for start, section in starts if start <= line], default=0)

    tree = ast.parse(source)
    defined = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", node)]
        for target in targets:
            for name in ([target.name] if hasattr(target, "name") else
                         [n.id for n in ([target] if isinstance(target, ast.Name) else getattr(target, "elts", []))
                          if isinstance(n, ast.Name)]):
                defined.setdefault(name, section_of(node.lineno))
    backwards = []
    for node in tree.body:
        local = {sub.arg for sub in ast.walk(node) if isinstance(sub, ast.arg)} | \
            {sub.id for sub in ast.walk(node) if isinstance(sub, ast.Name) and not isinstance(sub.ctx, ast.Load)}
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) and sub.id not in local \
                    and defined.get(sub.id, 0) > section_of(node.lineno):
                backwards.append(f"line {node.lineno} uses {sub.id} of §{defined[sub.id]}")
    assert backwards == []


# ---------------------------------------------------------------------------------------------
# The benchmark (its numbers are for people to read; here it only has to run)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect_name", ["connect", "legacy"])
def test_benchmark_runs_with_tiny_sizes(dialect_name):
    result = subprocess.run([sys.executable, "bench_kimi_proxy.py", "--quick", "--json", "--dialect", dialect_name],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout)
    assert figures["chats_left"] == 0 and figures["streams_failed"] == 0 and figures["cpu_incomplete"] == 0
    assert figures["ttfb_ms_median"] > 0 and figures["chunks_per_s"] > 0 and figures["idle_rss_mb"] > 10


@pytest.mark.parametrize("command", [[], ["--module"]])
def test_benchmark_soak_runs(command):
    result = subprocess.run([sys.executable, "bench_kimi_proxy.py", "--soak", "300", *command],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout)
    assert figures["chats_left"] == 0 and figures["client_errors"] == 0 and len(figures["rss_mb_each_tenth"]) == 10
    assert figures["command"] == ("python -m kimi_proxy" if command else "python kimi_proxy.py")


def test_benchmark_compares_two_checkouts():
    result = subprocess.run([sys.executable, "bench_kimi_proxy.py", "--quick", "--json", "--against", "."],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout)
    assert figures["failed"] == 0 and figures["runs"] == 2
    for key in ("cpu_us_per_chunk", "cpu_us_per_chunk_tools_offered", "cpu_us_per_chunk_tool_call", "stream_kb"):
        assert figures[key]["this"] > 0 and figures[key]["other"] > 0 and figures[key]["ratio"] > 0
