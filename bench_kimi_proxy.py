"""Benchmark kimi_proxy: added latency, CPU per relayed chunk, memory per open stream, large bodies.

Starts the fake Kimi of the test suite and the proxy as real processes on this machine, drives
load with an aiohttp client, and prints one table (or JSON with --json). With the connect dialect
it also starts a minimal relay (below: one ClientSession, decode and forward, nothing else) in
front of a fake of its own, and reports the proxy's figures as ratios to the relay's, measured
alternately in the same run. Each figure is taken --runs times and the median is reported, since
shared machines are noisy.

    python bench_kimi_proxy.py                 # the full run (several minutes)
    python bench_kimi_proxy.py --quick --json  # tiny sizes, to prove it works
    python bench_kimi_proxy.py --soak 100000   # memory over a long mixed workload with faults
    python bench_kimi_proxy.py --soak 100000 --module  # the same, started as python -m kimi_proxy
    python bench_kimi_proxy.py --against DIR   # CPU and memory beside another checkout, in turn
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import sys
import time

import aiohttp
import orjson
from aiohttp import web

HERE = os.path.dirname(os.path.abspath(__file__))
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20

FULL = {"runs": 3, "ttfb_requests": 200, "cpu_requests": 200, "cpu_chunks": 200, "cpu_concurrency": 32,
        "open_streams": 1000, "stream_seconds": 10, "upload_mb": 100, "body_mb": 19}
QUICK = {"runs": 1, "ttfb_requests": 10, "cpu_requests": 8, "cpu_chunks": 20, "cpu_concurrency": 4,
         "open_streams": 20, "stream_seconds": 1, "upload_mb": 2, "body_mb": 2}
# the targets: ratios to the minimal relay (connect), and the client APIs beside Chat Completions
TARGETS = {"added_ttfb_ms_over_relay": 0.2, "stream_kb_ratio_to_relay": 1.15, "streams_failed": 0,
           "upload_rss_growth_mb": 32.0, "upload_spooled_rss_growth_mb": 32.0, "chats_left": 0,
           "body_rss_ratio": 3.0, "sent_body_rss_ratio": 3.0, "cpu_ratio_messages": 1.1, "cpu_ratio_responses": 1.1,
           "stream_kb_ratio_messages": 1.1, "stream_kb_ratio_responses": 1.1}


# ---------------------------------------------------------------------------------------------
# The processes: the fake Kimi (the test suite's, plus a file server), the minimal relay
# ---------------------------------------------------------------------------------------------


async def serve_fake(dialect: str) -> None:
    import test_kimi_proxy as suite

    fake = suite.FAKES[dialect]()
    app = fake.app()
    app.router.add_get("/_bench/state", lambda request: web.json_response(
        {"created": len(fake.created), "deleted": len(fake.deleted), "open_streams": fake.open_streams}))
    app.router.add_get("/_bench/file", serve_file)
    runner, fake.url = await suite.start_app(app)
    refresh_token = fake.add_user()
    access_token = fake.issue_access_token(fake.user_of(refresh_token), 86400)
    print("READY", fake.url, refresh_token, access_token, flush=True)
    await asyncio.Event().wait()


async def serve_file(request: web.Request) -> web.StreamResponse:
    """`size` bytes made on the fly (never held whole), with or without a Content-Length."""
    size = int(request.query["size"])
    response = web.StreamResponse(headers={"Content-Type": "application/pdf"})
    if request.query.get("length") == "1":
        response.content_length = size
    else:
        response.enable_chunked_encoding()
    await response.prepare(request)
    block = b"%PDF" + bytes(range(256)) * 256
    sent = 0
    while sent < size:
        piece = block[:min(len(block), size - sent)]
        await response.write(piece)
        sent += len(piece)
    await response.write_eof()
    return response


CONNECT_CHAT = "/apiv2/kimi.gateway.chat.v1.ChatService/Chat"


async def serve_relay(kimi: str, access: str, port: int) -> None:
    """The floor: a Chat Completions stream relayed from Kimi's Connect stream by the least code
    that can, with one ClientSession: no tokens to renew, no checks, no chat deletion."""
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                    timeout=aiohttp.ClientTimeout(total=None, sock_read=120))
    headers = {"Authorization": f"Bearer {access}", "Content-Type": "application/connect+json",
               "Connect-Protocol-Version": "1"}

    async def chat(request: web.Request) -> web.StreamResponse:
        prompt = (await request.json())["messages"][-1]["content"]
        payload = orjson.dumps({"scenario": "SCENARIO_CHAT", "tools": [],
                                "options": {"thinking": False, "model": "k2d6-chat"},
                                "message": {"role": "user", "scenario": "SCENARIO_CHAT",
                                            "blocks": [{"message_id": "", "text": {"content": prompt}}]}})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        async with session.post(kimi + CONNECT_CHAT, data=b"\0" + len(payload).to_bytes(4, "big") + payload,
                                headers=headers) as upstream:
            await response.prepare(request)
            buffer = bytearray()
            async for data in upstream.content.iter_any():
                buffer += data
                out = []
                while len(buffer) >= 5 and len(buffer) >= 5 + int.from_bytes(buffer[1:5], "big"):
                    end = 5 + int.from_bytes(buffer[1:5], "big")
                    message = orjson.loads(buffer[5:end])
                    del buffer[:end]
                    text = (message.get("block") or {}).get("text") if isinstance(message, dict) else None
                    if text and text.get("content"):
                        out.append(b"data: " + orjson.dumps({"choices": [{"delta": {"content": text["content"]}}]})
                                   + b"\n\n")
                if out:
                    await response.write(b"".join(out))
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/ping", lambda request: web.Response(text="pong"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


# ---------------------------------------------------------------------------------------------
# Processes and measurements
# ---------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_MB


def free_port() -> int:
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def start_fake(dialect: str, quiet: bool = False) -> tuple[asyncio.subprocess.Process, str, str, str]:
    process = await asyncio.create_subprocess_exec(sys.executable, __file__, "--serve-fake", dialect, cwd=HERE,
                                                   stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.DEVNULL if quiet else None)
    ready = (await process.stdout.readline()).decode().split()
    if not ready or ready[0] != "READY":
        raise SystemExit("the fake Kimi did not start")
    return process, ready[1], ready[2], ready[3]


async def wait_serving(http: aiohttp.ClientSession, url: str, what: str) -> None:
    for _ in range(400):
        try:
            async with http.get(url + "/ping") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.025)
    raise SystemExit(f"the {what} did not start")


async def start_proxy(dialect: str, kimi_url: str, http: aiohttp.ClientSession,
                      quiet: bool = False, as_module: bool = False,
                      checkout: str = HERE) -> tuple[asyncio.subprocess.Process, str]:
    """The proxy as `python kimi_proxy.py`, or as `python -m kimi_proxy` (as the Docker image runs
    it), from this checkout or another."""
    port = free_port()
    env = {**os.environ, "KIMI_PROTOCOL": dialect, "KIMI_BASE_URL": kimi_url, "HOST": "127.0.0.1",
           "PORT": str(port), "LOG_LEVEL": "WARNING", "MAX_STREAMS_PER_TOKEN": "5000",
           "ALLOW_PRIVATE_FILE_URLS": "1", "MAX_FILE_MB": "200", "MAX_BODY_MB": "200"}
    command = ("-m", "kimi_proxy") if as_module else ("kimi_proxy.py",)
    process = await asyncio.create_subprocess_exec(sys.executable, *command, cwd=checkout, env=env,
                                                   stderr=asyncio.subprocess.DEVNULL if quiet else None)
    url = f"http://127.0.0.1:{port}"
    await wait_serving(http, url, "proxy")
    return process, url


async def start_relay(kimi_url: str, access: str, http: aiohttp.ClientSession) -> tuple[asyncio.subprocess.Process, str]:
    port = free_port()
    process = await asyncio.create_subprocess_exec(sys.executable, __file__, "--serve-relay", kimi_url, access,
                                                   str(port), cwd=HERE)
    url = f"http://127.0.0.1:{port}"
    await wait_serving(http, url, "relay")
    return process, url


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}}, "required": ["city"]}}}

# Each client API's streamed question, and what marks a piece of answer text in its stream
API_PATHS = {"chat": "/v1/chat/completions", "messages": "/v1/messages", "responses": "/v1/responses"}
TEXT_MARKS = {"chat": b'"content":"', "messages": b'"text_delta"', "responses": b'"response.output_text.delta"'}
END_MARKS = {"chat": b"data: [DONE]", "messages": b"event: message_stop", "responses": b"event: response.completed"}


def api_body(api: str, prompt: str, stream: bool = True, tools: list | None = None, **extra) -> dict:
    if api == "messages":
        body = {"model": "kimi", "stream": stream, "max_tokens": 1024, "messages": [{"role": "user", "content": prompt}]}
        if tools:
            body["tools"] = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in tools]
    elif api == "responses":
        body = {"model": "kimi", "stream": stream, "input": prompt, "store": False}
        if tools:
            body["tools"] = [{"type": "function", **t["function"]} for t in tools]
    else:
        body = {"model": "kimi", "stream": stream, "messages": [{"role": "user", "content": prompt}]}
        if tools:
            body["tools"] = tools
    return {**body, **extra}


def chat_body(prompt: str, stream: bool = True, **extra) -> dict:
    return api_body("chat", prompt, stream, **extra)


async def proxy_stream(http, proxy: str, token: str, prompt: str, api: str = "chat",
                       **extra) -> tuple[float, int, bool, bool]:
    """(seconds to the first content byte, content chunks, ended as the API ends, ended with a tool call)."""
    started = time.perf_counter()
    first, chunks, done, called = 0.0, 0, False, False
    text, end = TEXT_MARKS[api], END_MARKS[api]
    async with http.post(proxy + API_PATHS[api], json=api_body(api, prompt, **extra),
                         headers={"Authorization": f"Bearer {token}"}) as response:
        async for line in response.content:
            if text in line and b'"content":""' not in line:
                chunks += 1
                first = first or time.perf_counter() - started
            elif line.startswith(end):
                done = True
            called = called or b'"tool_calls"' in line or b'"tool_use"' in line or b'"function_call"' in line
    return first, chunks, done, called


async def direct_first_content(http, kimi: str, access: str, dialect: str) -> float:
    """The same upstream calls the proxy makes, straight to the fake: seconds to the first text."""
    headers = {"Authorization": f"Bearer {access}"}
    started = time.perf_counter()
    first = 0.0
    if dialect == "legacy":
        async with http.post(kimi + "/api/chat", json={"enter_method": "new_chat", "is_example": False,
                                                       "kimiplus_id": "kimi", "name": "未命名会话"},
                             headers=headers) as response:
            chat_id = (await response.json())["id"]
        body = {"kimiplus_id": "kimi", "messages": [{"role": "user", "content": "scenario:chunks_5\n"}], "refs": [],
                "refs_file": [], "use_math": False, "use_research": False, "use_search": False,
                "extend": {"sidebar": True}}
        async with http.post(f"{kimi}/api/chat/{chat_id}/completion/stream", json=body, headers=headers) as response:
            async for line in response.content:
                if b'"cmpl"' in line and not first:
                    first = time.perf_counter() - started
        async with http.delete(f"{kimi}/api/chat/{chat_id}", headers=headers):
            pass
        return first
    payload = orjson.dumps({"scenario": "SCENARIO_CHAT", "tools": [],
                            "options": {"thinking": False, "model": "k2d6-chat", "reasoning_effort": "REASONING_EFFORT_NONE"},
                            "message": {"role": "user", "scenario": "SCENARIO_CHAT",
                                        "blocks": [{"message_id": "", "text": {"content": "scenario:chunks_5"}}]}})
    chat_id = None
    async with http.post(kimi + CONNECT_CHAT, data=b"\0" + len(payload).to_bytes(4, "big") + payload,
                         headers={**headers, "Content-Type": "application/connect+json",
                                  "Connect-Protocol-Version": "1"}) as response:
        async for data in response.content.iter_any():
            if b"block.text.content" in data and not first:
                first = time.perf_counter() - started
            if chat_id is None and b'"chat":{"id":"' in data:
                chat_id = data.split(b'"chat":{"id":"', 1)[1].split(b'"', 1)[0].decode()
    async with http.post(kimi + "/apiv2/kimi.chat.v1.ChatService/DeleteChat", json={"chat_id": chat_id},
                         headers={**headers, "Connect-Protocol-Version": "1"}) as response:
        if response.status != 200:
            raise SystemExit(f"the direct call to the fake Kimi failed: HTTP {response.status}")
    return first


async def measure_ttfb(http, proxy, relay, kimi, token, access, dialect, requests: int) -> dict:
    through, relayed, direct = [], [], []
    for _ in range(requests):  # interleaved, so drift on a shared machine hits all alike
        through.append((await proxy_stream(http, proxy, token, "scenario:chunks_5"))[0])
        if relay:
            relayed.append((await proxy_stream(http, relay, token, "scenario:chunks_5"))[0])
        direct.append(await direct_first_content(http, kimi, access, dialect))
    through_ms = sorted(1000 * t for t in through)
    direct_ms = sorted(1000 * t for t in direct)
    figures = {"ttfb_ms_median": statistics.median(through_ms), "ttfb_ms_p99": percentile(through_ms, 99),
               "direct_ttfb_ms_median": statistics.median(direct_ms),
               "added_ttfb_ms_median": statistics.median(through_ms) - statistics.median(direct_ms)}
    if relay:
        relay_ms = sorted(1000 * t for t in relayed)
        figures.update(relay_ttfb_ms_median=statistics.median(relay_ms),
                       added_ttfb_ms_over_relay=statistics.median(through_ms) - statistics.median(relay_ms))
    return figures


def ratio(a: float, b: float) -> float:
    return a / b if b else 0.0  # (tiny sizes can measure nothing)


def percentile(ordered: list[float], p: int) -> float:
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def measure_cpu(http, proxy, pid, relay, relay_pid, token, requests: int, chunks: int, concurrency: int) -> dict:
    args = (requests, chunks, concurrency)
    plain = await cpu_per_chunk(http, proxy, pid, token, *args, "chunks")
    figures = {"cpu_us_per_chunk": plain[0], "chunks_per_s": plain[1]}
    incomplete = plain[2]
    if relay:
        relayed = await cpu_per_chunk(http, relay, relay_pid, token, *args, "chunks")
        figures.update(relay_cpu_us_per_chunk=relayed[0], cpu_ratio_to_relay=ratio(plain[0], relayed[0]))
        incomplete += relayed[2]
    for api in ("messages", "responses"):
        other = await cpu_per_chunk(http, proxy, pid, token, *args, "chunks", api=api)
        figures[f"cpu_us_per_chunk_{api}"] = other[0]
        figures[f"cpu_ratio_{api}"] = ratio(other[0], plain[0])
        incomplete += other[2]
    offered = await cpu_per_chunk(http, proxy, pid, token, *args, "chunks", tools=[WEATHER_TOOL])
    called = await cpu_per_chunk(http, proxy, pid, token, *args, "call", tools=[WEATHER_TOOL])
    figures.update(cpu_us_per_chunk_tools_offered=offered[0], cpu_us_per_chunk_tool_call=called[0],
                   cpu_incomplete=incomplete + offered[2] + called[2])
    return figures


async def cpu_per_chunk(http, proxy, pid, token, requests: int, chunks: int, concurrency: int, scenario: str,
                        api: str = "chat", **extra) -> tuple[float, float, int]:
    """(CPU µs per answer piece Kimi sent, pieces per second, answers incomplete). An answer with a
    tool call is `chunks` pieces of text and then the call in pieces."""
    from test_kimi_proxy import bulk_pieces

    gate = asyncio.Semaphore(concurrency)
    sent = len(bulk_pieces(f"{scenario}_{chunks}"))

    async def one() -> tuple[int, bool]:
        async with gate:
            _, received, done, called = await proxy_stream(http, proxy, token, f"scenario:{scenario}_{chunks}", api,
                                                           **extra)
            return received, done and called == (scenario == "call")

    cpu_before, started = cpu_seconds(pid), time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(requests)))
    wall, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu_before
    return (1e6 * cpu / (sent * requests), sent * requests / wall,
            sum(1 for received, done in results if received < chunks or not done))


async def measure_open_streams(http, url, pid, token, streams: int, seconds: int,
                               api: str = "chat") -> tuple[float, float, int]:
    """(peak RSS in MB, KB per open stream above what the process held before, streams failed)."""
    await asyncio.sleep(0.3)
    before = peak = rss_mb(pid)
    running = True

    async def sample() -> None:
        nonlocal peak
        while running:
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.1)

    sampler = asyncio.ensure_future(sample())
    try:
        results = await asyncio.gather(*(proxy_stream(http, url, token, f"scenario:trickle_{seconds}", api)
                                         for _ in range(streams)), return_exceptions=True)
    finally:
        running = False
        await sampler
    failed = sum(1 for r in results if isinstance(r, BaseException) or r[1] != seconds or not r[2])
    return peak, 1024 * (peak - before) / streams, failed


async def fresh_streams(http, start, token, streams: int, seconds: int, api: str = "chat") -> tuple[float, float, int]:
    """measure_open_streams in a process of its own, started for it: memory a process has used
    once stays in its RSS, so each figure needs a process that has not held streams before."""
    process, url = await start()
    try:
        await proxy_stream(http, url, token, "scenario:chunks_5", api)  # warm: token, catalog, connections
        return await measure_open_streams(http, url, process.pid, token, streams, seconds, api)
    finally:
        process.terminate()
        await process.wait()


async def measure_streams(http, start_proxy_process, start_relay_process, token, streams: int, seconds: int) -> dict:
    """Memory per open stream: the proxy's for each client API, the relay's, alternately."""
    peak, per_stream, failed = await fresh_streams(http, start_proxy_process, token, streams, seconds)
    figures = {"streams_rss_mb": peak, "stream_kb": per_stream}
    if start_relay_process:
        _, relayed, relay_failed = await fresh_streams(http, start_relay_process, token, streams, seconds)
        figures.update(relay_stream_kb=relayed, stream_kb_ratio_to_relay=ratio(per_stream, relayed))
        failed += relay_failed
    for api in ("messages", "responses"):
        _, other, other_failed = await fresh_streams(http, start_proxy_process, token, streams, seconds, api)
        figures[f"stream_kb_{api}"] = other
        figures[f"stream_kb_ratio_{api}"] = ratio(other, per_stream)
        failed += other_failed
    figures["streams_failed"] = failed
    return figures


async def measure_upload(http, proxy, pid, token, kimi, megabytes: int, with_length: bool) -> float:
    """Peak RSS growth of the proxy while it moves one document of `megabytes` MB to Kimi."""
    size = megabytes * 10**6
    url = f"{kimi}/_bench/file?size={size}&length={int(with_length)}"
    body = chat_body("总结", stream=False)
    body["messages"][0]["content"] = [{"type": "text", "text": "总结"},
                                      {"type": "file", "file_url": {"url": url}}]
    growth, status = await peak_rss_growth(pid, http.post(proxy + "/v1/chat/completions", json=body,
                                                          headers={"Authorization": f"Bearer {token}"}))
    if status != 200:
        raise SystemExit(f"the upload failed: HTTP {status}")
    return growth


async def peak_rss_growth(pid: int, request) -> tuple[float, int]:
    """(peak RSS growth of the proxy in MB while `request` runs, its HTTP status)."""
    baseline = peak = rss_mb(pid)
    running = asyncio.ensure_future(request)
    while not running.done():
        peak = max(peak, rss_mb(pid))
        await asyncio.sleep(0.002)
    async with await running as response:
        await response.read()
        return peak - baseline, response.status


async def measure_body(http, proxy, pid, megabytes: int) -> float:
    """Peak RSS growth of the proxy, in multiples of the body, while it reads and plans one JSON
    body of `megabytes` MB that is mostly a data URI (a token Kimi refuses ends it after that)."""
    image = os.urandom(megabytes * 10**6 * 3 // 4)
    body = orjson.dumps(chat_body("这是什么", stream=False, messages=[{"role": "user", "content": [
        {"type": "text", "text": "这是什么"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}}]}]))
    del image
    growth, status = await peak_rss_growth(pid, http.post(proxy + "/v1/chat/completions", data=io.BytesIO(body),
                                                          headers={"Authorization": "Bearer not-a-kimi-token"}))
    if status != 401:
        raise SystemExit(f"the big body was not read and refused: HTTP {status}")
    return growth / (len(body) / 2**20)


async def measure_sent_body(http, proxy, pid, token, megabytes: int) -> float:
    """Peak RSS growth of the proxy, in multiples of the body, while a message of `megabytes` MB
    is read, planned and sent on to Kimi, who answers it."""
    body = orjson.dumps(chat_body("scenario:chunks_5 " + "长城" * (megabytes * 2**20 // 6), stream=False))
    growth, status = await peak_rss_growth(pid, http.post(proxy + "/v1/chat/completions", data=io.BytesIO(body),
                                                          headers={"Authorization": f"Bearer {token}"}))
    if status != 200:
        raise SystemExit(f"the big message was not answered: HTTP {status}")
    return growth / (len(body) / 2**20)


async def chats_left(http, kimi: str) -> int:
    for _ in range(100):  # deletions run after the answers: give them a moment
        async with http.get(kimi + "/_bench/state") as response:
            state = await response.json()
        if state["created"] == state["deleted"]:
            return 0
        await asyncio.sleep(0.05)
    return state["created"] - state["deleted"]


def collect(figures: dict[str, list], measured: dict) -> None:
    for name, value in measured.items():
        figures.setdefault(name, []).append(value)


async def run(dialect: str, sizes: dict) -> dict:
    fake, kimi, token, access = await start_fake(dialect)
    processes = [fake]
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        try:
            proxy_process, proxy = await start_proxy(dialect, kimi, http)
            processes.append(proxy_process)
            relay = relay_pid = None
            start_another_relay = None
            if dialect == "connect":  # the relay has a fake of its own, so that chats_left counts the proxy's
                relay_fake, relay_kimi, _, relay_access = await start_fake(dialect)
                processes.append(relay_fake)
                relay_process, relay = await start_relay(relay_kimi, relay_access, http)
                processes.append(relay_process)
                relay_pid = relay_process.pid
                await proxy_stream(http, relay, token, "scenario:chunks_5")
                start_another_relay = lambda: start_relay(relay_kimi, relay_access, http)  # noqa: E731
            pid = proxy_process.pid
            await proxy_stream(http, proxy, token, "scenario:chunks_5")  # warm: token, catalog, connections
            await asyncio.sleep(0.5)
            figures: dict[str, list] = {"idle_rss_mb": [rss_mb(pid)]}
            for _ in range(sizes["runs"]):
                collect(figures, await measure_ttfb(http, proxy, relay, kimi, token, access, dialect,
                                                    sizes["ttfb_requests"]))
                collect(figures, await measure_cpu(http, proxy, pid, relay, relay_pid, token, sizes["cpu_requests"],
                                                   sizes["cpu_chunks"], sizes["cpu_concurrency"]))
            # (a fresh connect proxy could not use the refresh token: the first one has rotated it)
            fresh_token = access if dialect == "connect" else token
            for _ in range(sizes["runs"]):
                collect(figures, await measure_streams(http, lambda: start_proxy(dialect, kimi, http),
                                                       start_another_relay, fresh_token, sizes["open_streams"],
                                                       sizes["stream_seconds"]))
                collect(figures, {"upload_rss_growth_mb": await measure_upload(http, proxy, pid, token, kimi,
                                                                               sizes["upload_mb"], with_length=True),
                                  "upload_spooled_rss_growth_mb": await measure_upload(
                                      http, proxy, pid, token, kimi, sizes["upload_mb"], with_length=False)})
            for _ in range(sizes["runs"]):
                collect(figures, {"body_rss_ratio": await measure_body(http, proxy, pid, sizes["body_mb"]),
                                  "sent_body_rss_ratio": await measure_sent_body(http, proxy, pid, token,
                                                                                 sizes["body_mb"])})
            figures["chats_left"] = [await chats_left(http, kimi)]
        finally:
            for process in reversed(processes):
                process.terminate()
                await process.wait()
    return {name: statistics.median(values) for name, values in figures.items()}


ROWS = [("added time to first content, over the minimal relay (ms)", "added_ttfb_ms_over_relay"),
        ("added time to first content, over Kimi itself (ms)", "added_ttfb_ms_median"),
        ("time to first content through the proxy, median (ms)", "ttfb_ms_median"),
        ("time to first content through the relay, median (ms)", "relay_ttfb_ms_median"),
        ("CPU per relayed chunk, Chat Completions (µs)", "cpu_us_per_chunk"),
        ("CPU per relayed chunk, the minimal relay (µs)", "relay_cpu_us_per_chunk"),
        ("  ratio to the relay", "cpu_ratio_to_relay"),
        ("CPU per relayed chunk, Anthropic Messages (µs)", "cpu_us_per_chunk_messages"),
        ("  ratio to Chat Completions", "cpu_ratio_messages"),
        ("CPU per relayed chunk, Responses (µs)", "cpu_us_per_chunk_responses"),
        ("  ratio to Chat Completions", "cpu_ratio_responses"),
        ("CPU per relayed chunk, tools offered, plain answer (µs)", "cpu_us_per_chunk_tools_offered"),
        ("CPU per Kimi piece, answer ending in a tool call (µs)", "cpu_us_per_chunk_tool_call"),
        ("chunks relayed per second", "chunks_per_s"),
        ("resident memory, idle (MB)", "idle_rss_mb"),
        ("resident memory, {open_streams} open streams (MB)", "streams_rss_mb"),
        ("memory per open stream, Chat Completions (KB)", "stream_kb"),
        ("memory per open stream, the minimal relay (KB)", "relay_stream_kb"),
        ("  ratio to the relay", "stream_kb_ratio_to_relay"),
        ("memory per open stream, Anthropic Messages (KB)", "stream_kb_messages"),
        ("  ratio to Chat Completions", "stream_kb_ratio_messages"),
        ("memory per open stream, Responses (KB)", "stream_kb_responses"),
        ("  ratio to Chat Completions", "stream_kb_ratio_responses"),
        ("open streams failed or incomplete", "streams_failed"),
        ("RSS growth, {upload_mb} MB upload with a length (MB)", "upload_rss_growth_mb"),
        ("RSS growth, {upload_mb} MB upload without one, spooled (MB)", "upload_spooled_rss_growth_mb"),
        ("RSS growth reading a {body_mb} MB data-URI body refused (times its size)", "body_rss_ratio"),
        ("RSS growth sending a {body_mb} MB message to Kimi (times its size)", "sent_body_rss_ratio"),
        ("Kimi chats left undeleted", "chats_left")]


def table(dialect: str, sizes: dict, results: dict) -> str:
    lines = [f"kimi_proxy benchmark: {dialect} dialect, fake Kimi, median of {sizes['runs']} runs, "
             f"{os.cpu_count()} cores", f"{'figure':<72}{'value':>10}{'target':>10}"]
    for label, key in ROWS:
        if key in results:
            target = TARGETS.get(key)
            lines.append(f"{label.format(**sizes):<72}{results[key]:>10.2f}{'' if target is None else f'<= {target:g}':>10}")
    return "\n".join(lines)


# Before and after: this checkout against another (`--against DIR`, e.g. a `git worktree` of an
# older commit), alternately in one run
AGAINST_FIGURES = [("CPU per relayed chunk (µs)", "cpu_us_per_chunk"),
                   ("CPU per relayed chunk, tools offered, plain answer (µs)", "cpu_us_per_chunk_tools_offered"),
                   ("CPU per Kimi piece, answer ending in a tool call (µs)", "cpu_us_per_chunk_tool_call"),
                   ("memory per open stream (KB)", "stream_kb")]


async def measure_checkout(http, dialect: str, kimi: str, token: str, checkout: str, sizes: dict) -> dict:
    """One run of the AGAINST_FIGURES for the proxy of one checkout, each in a fresh process."""
    process, url = await start_proxy(dialect, kimi, http, quiet=True, checkout=checkout)
    try:
        await proxy_stream(http, url, token, "scenario:call_5", tools=[WEATHER_TOOL])  # warm
        args = (sizes["cpu_requests"], sizes["cpu_chunks"], sizes["cpu_concurrency"])
        plain = await cpu_per_chunk(http, url, process.pid, token, *args, "chunks")
        offered = await cpu_per_chunk(http, url, process.pid, token, *args, "chunks", tools=[WEATHER_TOOL])
        called = await cpu_per_chunk(http, url, process.pid, token, *args, "call", tools=[WEATHER_TOOL])
    finally:
        process.terminate()
        await process.wait()
    _, per_stream, failed = await fresh_streams(
        http, lambda: start_proxy(dialect, kimi, http, quiet=True, checkout=checkout), token, sizes["open_streams"],
        sizes["stream_seconds"])
    return {"cpu_us_per_chunk": plain[0], "cpu_us_per_chunk_tools_offered": offered[0],
            "cpu_us_per_chunk_tool_call": called[0], "stream_kb": per_stream,
            "failed": plain[2] + offered[2] + called[2] + failed}


async def against(dialect: str, other: str, sizes: dict) -> dict:
    """The AGAINST_FIGURES of this checkout and of `other`, taken in turn (ABBA), with the median
    of each and this one's ratio to the other's."""
    fake, kimi, token, access = await start_fake(dialect, quiet=True)
    token = access if dialect == "connect" else token  # (each fresh connect proxy would rotate the refresh token)
    checkouts = [("this", HERE), ("other", os.path.abspath(other))]
    runs: dict[str, dict[str, list]] = {"this": {}, "other": {}}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_read=120)) as http:
        try:
            for run in range(sizes["runs"]):
                for name, checkout in checkouts if run % 2 == 0 else checkouts[::-1]:
                    collect(runs[name], await measure_checkout(http, dialect, kimi, token, checkout, sizes))
        finally:
            fake.terminate()
            await fake.wait()
    this, that = ({key: statistics.median(values) for key, values in runs[name].items()} for name in ("this", "other"))
    return {"dialect": dialect, "other": os.path.abspath(other), "runs": sizes["runs"], "failed": int(this["failed"] + that["failed"]),
            **{key: {"this": this[key], "other": that[key], "ratio": ratio(this[key], that[key])}
               for _, key in AGAINST_FIGURES}}


def against_table(results: dict) -> str:
    lines = [f"kimi_proxy benchmark: this checkout against {results['other']}, {results['dialect']} dialect, "
             f"median of {results['runs']} runs taken in turn", f"{'figure':<60}{'this':>10}{'other':>10}{'ratio':>8}"]
    for label, key in AGAINST_FIGURES:
        figure = results[key]
        lines.append(f"{label:<60}{figure['this']:>10.2f}{figure['other']:>10.2f}{figure['ratio']:>8.3f}")
    return "\n".join(lines + [f"streams or answers failed: {results['failed']}"])


# The soak's mix: (what the request does, how often), with faults from both sides
SOAK_MIX = [("stream", 6), ("json", 4), ("chunks", 2), ("tool_call", 2), ("call_required", 1), ("error", 1),
            ("error_first", 1), ("drop", 1), ("disconnect", 1), ("bad_body", 1), ("no_key", 1), ("unknown_path", 1),
            ("messages", 2), ("responses", 2)]


async def soak_request(http, proxy: str, token: str, kind: str) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    url = proxy + "/v1/chat/completions"
    if kind in ("stream", "json", "chunks", "error", "error_first", "drop"):
        prompt = {"stream": "写一首短诗", "json": "写一首短诗", "chunks": "scenario:chunks_20"}.get(kind, f"scenario:{kind}")
        async with http.post(url, json=chat_body(prompt, stream=kind != "json"), headers=headers) as response:
            await response.read()
    elif kind in ("messages", "responses"):  # the other client APIs, one streamed and one not, in turn
        body = api_body(kind, "scenario:call_5", stream=True, tools=[WEATHER_TOOL]) if soak_request.turn % 2 else \
            api_body(kind, "写一首短诗", stream=False)
        soak_request.turn += 1
        async with http.post(proxy + API_PATHS[kind], json=body, headers=headers) as response:
            await response.read()
    elif kind in ("tool_call", "call_required"):  # a streamed call; a required call never made (a re-ask, a 502)
        body = chat_body("scenario:call_5", tools=[WEATHER_TOOL]) if kind == "tool_call" else \
            chat_body("写一首短诗", stream=False, tools=[WEATHER_TOOL], tool_choice="required")
        async with http.post(url, json=body, headers=headers) as response:
            await response.read()
    elif kind == "disconnect":  # the client leaves after the first bytes of the answer
        async with http.post(url, json=chat_body("scenario:pace"), headers=headers) as response:
            await response.content.readany()
            response.close()
    elif kind == "bad_body":
        async with http.post(url, data=b'{"messages": [', headers=headers) as response:
            await response.read()
    elif kind == "no_key":
        async with http.post(url, json=chat_body("hi")) as response:
            await response.read()
    else:
        async with http.get(proxy + "/v1/nothing/here", headers=headers) as response:
            await response.read()


soak_request.turn = 0


async def measure_soak(http, proxy, pid, token, requests: int, concurrency: int = 64) -> dict:
    """RSS after each tenth of `requests` requests of SOAK_MIX, 64 at once."""
    kinds = [kind for kind, weight in SOAK_MIX for _ in range(weight)]
    done, samples, failures = 0, [], 0
    tenth = max(1, requests // 10)

    async def worker(number: int) -> None:
        nonlocal done, failures
        for index in range(number, requests, concurrency):
            try:
                await soak_request(http, proxy, token, kinds[index % len(kinds)])
            except (aiohttp.ClientError, asyncio.TimeoutError):
                failures += 1
            done += 1
            if done % tenth == 0:
                samples.append(round(rss_mb(pid), 1))

    await asyncio.gather(*(worker(number) for number in range(concurrency)))
    return {"rss_mb_each_tenth": samples, "client_errors": failures,
            "growth_from_10_percent": round(100 * (samples[-1] - samples[0]) / samples[0], 1),
            "growth_over_second_half": round(100 * (samples[-1] - samples[4]) / samples[4], 1)}


async def soak(dialect: str, requests: int, as_module: bool) -> dict:
    fake, kimi, token, _ = await start_fake(dialect, quiet=True)  # (the faults make both sides log a lot)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:
        proxy_process, proxy = await start_proxy(dialect, kimi, http, quiet=True, as_module=as_module)
        try:
            result = await measure_soak(http, proxy, proxy_process.pid, token, requests)
            result["chats_left"] = await chats_left(http, kimi)
        finally:
            for process in (proxy_process, fake):
                process.terminate()
                await process.wait()
    return {"dialect": dialect, "requests": requests, "command": "python -m kimi_proxy" if as_module else
            "python kimi_proxy.py", **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dialect", choices=("connect", "legacy"), default="connect")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: proves the benchmark works")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--soak", type=int, metavar="N", help="only the soak: N requests of a mixed workload")
    parser.add_argument("--module", action="store_true", help="soak the proxy started as python -m kimi_proxy")
    parser.add_argument("--against", metavar="DIR", help="only CPU and memory, beside another checkout's proxy")
    parser.add_argument("--serve-fake", metavar="DIALECT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-relay", nargs=3, metavar=("KIMI", "ACCESS", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fake:
        asyncio.run(serve_fake(args.serve_fake))
        return
    if args.serve_relay:
        kimi, access, port = args.serve_relay
        asyncio.run(serve_relay(kimi, access, int(port)))
        return
    if args.soak:
        print(json.dumps(asyncio.run(soak(args.dialect, args.soak, args.module))))
        return
    sizes = QUICK if args.quick else FULL
    if args.against:
        results = asyncio.run(against(args.dialect, args.against, {**sizes, "runs": max(2, sizes["runs"] * 2)}))
        print(json.dumps(results, indent=2) if args.json else against_table(results))
        return
    results = asyncio.run(run(args.dialect, sizes))
    print(json.dumps(results, indent=2) if args.json else table(args.dialect, sizes, results))


if __name__ == "__main__":
    main()
