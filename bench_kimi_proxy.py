"""Benchmark kimi_proxy: added latency, CPU per relayed chunk, memory, and a 100 MB upload.

Starts the fake Kimi of the test suite and the proxy as real processes on this machine, drives
load with an aiohttp client, and prints one table (or JSON with --json). Each figure is taken
--runs times and the median is reported, since shared machines are noisy.

    python bench_kimi_proxy.py                 # the full run (a few minutes)
    python bench_kimi_proxy.py --quick --json  # tiny sizes, to prove it works
    python bench_kimi_proxy.py --soak 100000   # memory over a long mixed workload with faults
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
        "open_streams": 1000, "stream_seconds": 10, "upload_mb": 100}
QUICK = {"runs": 1, "ttfb_requests": 10, "cpu_requests": 8, "cpu_chunks": 20, "cpu_concurrency": 4,
         "open_streams": 20, "stream_seconds": 1, "upload_mb": 2}
TARGETS = {"added_ttfb_ms_median": 0.5, "cpu_us_per_chunk": 8.0, "idle_rss_mb": 45.0, "streams_rss_mb": 80.0,
           "streams_failed": 0, "upload_rss_growth_mb": 32.0, "upload_spooled_rss_growth_mb": 32.0, "chats_left": 0,
           "body_rss_ratio": 3.0}


# ---------------------------------------------------------------------------------------------
# The fake Kimi process: the test suite's fake plus a file server, in a process of its own
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


async def start_proxy(dialect: str, kimi_url: str, http: aiohttp.ClientSession,
                      quiet: bool = False) -> tuple[asyncio.subprocess.Process, str]:
    port = free_port()
    env = {**os.environ, "KIMI_PROTOCOL": dialect, "KIMI_BASE_URL": kimi_url, "HOST": "127.0.0.1",
           "PORT": str(port), "LOG_LEVEL": "WARNING", "MAX_STREAMS_PER_TOKEN": "5000",
           "ALLOW_PRIVATE_FILE_URLS": "1", "MAX_FILE_MB": "200", "MAX_BODY_MB": "200"}
    process = await asyncio.create_subprocess_exec(sys.executable, "kimi_proxy.py", cwd=HERE, env=env,
                                                   stderr=asyncio.subprocess.DEVNULL if quiet else None)
    url = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            async with http.get(url + "/ping") as response:
                if response.status == 200:
                    return process, url
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.025)
    raise SystemExit("the proxy did not start")


def chat_body(prompt: str, stream: bool = True, **extra) -> dict:
    return {"model": "kimi", "stream": stream, "messages": [{"role": "user", "content": prompt}], **extra}


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}}, "required": ["city"]}}}


async def proxy_stream(http, proxy: str, token: str, prompt: str, **extra) -> tuple[float, int, bool, bool]:
    """(seconds to the first content byte, content chunks, ended with [DONE], ended with a tool call)."""
    started = time.perf_counter()
    first, chunks, done, called = 0.0, 0, False, False
    async with http.post(proxy + "/v1/chat/completions", json=chat_body(prompt, **extra),
                         headers={"Authorization": f"Bearer {token}"}) as response:
        async for line in response.content:
            if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                chunks += 1
                first = first or time.perf_counter() - started
            elif line.startswith(b"data: [DONE]"):
                done = True
            called = called or b'"finish_reason":"tool_calls"' in line
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
    async with http.post(kimi + "/apiv2/kimi.gateway.chat.v1.ChatService/Chat",
                         data=b"\0" + len(payload).to_bytes(4, "big") + payload,
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
        pass
    return first


async def measure_ttfb(http, proxy, kimi, token, access, dialect, requests: int) -> dict:
    through, direct = [], []
    for _ in range(requests):  # interleaved, so drift on a shared machine hits both alike
        through.append((await proxy_stream(http, proxy, token, "scenario:chunks_5"))[0])
        direct.append(await direct_first_content(http, kimi, access, dialect))
    through_ms = sorted(1000 * t for t in through)
    direct_ms = sorted(1000 * t for t in direct)
    return {"ttfb_ms_median": statistics.median(through_ms), "ttfb_ms_p99": percentile(through_ms, 99),
            "direct_ttfb_ms_median": statistics.median(direct_ms), "direct_ttfb_ms_p99": percentile(direct_ms, 99),
            "added_ttfb_ms_median": statistics.median(through_ms) - statistics.median(direct_ms),
            "added_ttfb_ms_p99": percentile(through_ms, 99) - percentile(direct_ms, 99)}


def percentile(ordered: list[float], p: int) -> float:
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def measure_cpu(http, proxy, pid, token, requests: int, chunks: int, concurrency: int) -> dict:
    plain = await cpu_per_chunk(http, proxy, pid, token, requests, chunks, concurrency, "chunks")
    offered = await cpu_per_chunk(http, proxy, pid, token, requests, chunks, concurrency, "chunks", tools=[WEATHER_TOOL])
    called = await cpu_per_chunk(http, proxy, pid, token, requests, chunks, concurrency, "call", tools=[WEATHER_TOOL])
    return {"cpu_us_per_chunk": plain[0], "chunks_per_s": plain[1], "cpu_us_per_chunk_tools_offered": offered[0],
            "cpu_us_per_chunk_tool_call": called[0], "cpu_incomplete": plain[2] + offered[2] + called[2]}


async def cpu_per_chunk(http, proxy, pid, token, requests: int, chunks: int, concurrency: int, scenario: str,
                        **extra) -> tuple[float, float, int]:
    """(CPU µs per answer piece Kimi sent, pieces per second, answers incomplete). An answer with a
    tool call is `chunks` pieces of text and then the call in pieces."""
    from test_kimi_proxy import bulk_pieces

    gate = asyncio.Semaphore(concurrency)
    sent = len(bulk_pieces(f"{scenario}_{chunks}"))

    async def one() -> tuple[int, bool]:
        async with gate:
            _, received, done, called = await proxy_stream(http, proxy, token, f"scenario:{scenario}_{chunks}", **extra)
            return received, done and called == (scenario == "call")

    cpu_before, started = cpu_seconds(pid), time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(requests)))
    wall, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu_before
    return (1e6 * cpu / (sent * requests), sent * requests / wall,
            sum(1 for received, done in results if received < chunks or not done))


async def measure_open_streams(http, proxy, pid, token, streams: int, seconds: int) -> dict:
    peak = rss_mb(pid)
    running = True

    async def sample() -> None:
        nonlocal peak
        while running:
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.1)

    sampler = asyncio.ensure_future(sample())
    try:
        results = await asyncio.gather(*(proxy_stream(http, proxy, token, f"scenario:trickle_{seconds}")
                                         for _ in range(streams)), return_exceptions=True)
    finally:
        running = False
        await sampler
    failed = sum(1 for r in results if isinstance(r, BaseException) or r[1] != seconds or not r[2])
    return {"streams_rss_mb": peak, "streams_failed": failed}


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


async def chats_left(http, kimi: str) -> int:
    for _ in range(100):  # deletions run after the answers: give them a moment
        async with http.get(kimi + "/_bench/state") as response:
            state = await response.json()
        if state["created"] == state["deleted"]:
            return 0
        await asyncio.sleep(0.05)
    return state["created"] - state["deleted"]


async def run(dialect: str, sizes: dict) -> dict:
    fake, kimi, token, access = await start_fake(dialect)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        proxy_process, proxy = await start_proxy(dialect, kimi, http)
        pid = proxy_process.pid
        try:
            await proxy_stream(http, proxy, token, "scenario:chunks_5")  # warm: token, catalog, connections
            await asyncio.sleep(0.5)
            figures: dict[str, list] = {"idle_rss_mb": [rss_mb(pid)]}
            for _ in range(sizes["runs"]):
                for name, value in (await measure_ttfb(http, proxy, kimi, token, access, dialect,
                                                       sizes["ttfb_requests"])).items():
                    figures.setdefault(name, []).append(value)
                for name, value in (await measure_cpu(http, proxy, pid, token, sizes["cpu_requests"],
                                                      sizes["cpu_chunks"], sizes["cpu_concurrency"])).items():
                    figures.setdefault(name, []).append(value)
            for _ in range(sizes["runs"]):
                for name, value in (await measure_open_streams(http, proxy, pid, token, sizes["open_streams"],
                                                               sizes["stream_seconds"])).items():
                    figures.setdefault(name, []).append(value)
                figures.setdefault("upload_rss_growth_mb", []).append(
                    await measure_upload(http, proxy, pid, token, kimi, sizes["upload_mb"], with_length=True))
                figures.setdefault("upload_spooled_rss_growth_mb", []).append(
                    await measure_upload(http, proxy, pid, token, kimi, sizes["upload_mb"], with_length=False))
            for _ in range(sizes["runs"]):
                figures.setdefault("body_rss_ratio", []).append(
                    await measure_body(http, proxy, pid, sizes["upload_mb"]))
            figures["chats_left"] = [await chats_left(http, kimi)]
        finally:
            for process in (proxy_process, fake):
                process.terminate()
                await process.wait()
    return {name: statistics.median(values) for name, values in figures.items()}


def table(dialect: str, sizes: dict, results: dict) -> str:
    rows = [("added time to first content, median (ms)", "added_ttfb_ms_median"),
            ("added time to first content, p99 (ms)", "added_ttfb_ms_p99"),
            ("time to first content through the proxy, median (ms)", "ttfb_ms_median"),
            ("time to first content from the fake directly, median (ms)", "direct_ttfb_ms_median"),
            ("CPU per relayed chunk (µs)", "cpu_us_per_chunk"),
            ("CPU per relayed chunk, tools offered, plain answer (µs)", "cpu_us_per_chunk_tools_offered"),
            ("CPU per Kimi piece, answer ending in a tool call (µs)", "cpu_us_per_chunk_tool_call"),
            ("chunks relayed per second", "chunks_per_s"),
            ("resident memory, idle (MB)", "idle_rss_mb"),
            (f"resident memory, {sizes['open_streams']} open streams (MB)", "streams_rss_mb"),
            ("open streams failed or incomplete", "streams_failed"),
            (f"RSS growth, {sizes['upload_mb']} MB upload with a length (MB)", "upload_rss_growth_mb"),
            (f"RSS growth, {sizes['upload_mb']} MB upload without one, spooled (MB)", "upload_spooled_rss_growth_mb"),
            (f"RSS growth reading a {sizes['upload_mb']} MB data-URI body (times its size)", "body_rss_ratio"),
            ("Kimi chats left undeleted", "chats_left")]
    lines = [f"kimi_proxy benchmark: {dialect} dialect, fake Kimi, median of {sizes['runs']} runs, "
             f"{os.cpu_count()} cores", f"{'figure':<62}{'value':>12}{'target':>10}"]
    for label, key in rows:
        target = TARGETS.get(key)
        lines.append(f"{label:<62}{results[key]:>12.2f}{'' if target is None else f'<= {target:g}':>10}")
    return "\n".join(lines)


# The soak's mix: (what the request does, how often), with faults from both sides
SOAK_MIX = [("stream", 6), ("json", 4), ("chunks", 2), ("tool_call", 2), ("call_required", 1), ("error", 1),
            ("error_first", 1), ("drop", 1), ("disconnect", 1), ("bad_body", 1), ("no_key", 1), ("unknown_path", 1)]


async def soak_request(http, proxy: str, token: str, kind: str) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    url = proxy + "/v1/chat/completions"
    if kind in ("stream", "json", "chunks", "error", "error_first", "drop"):
        prompt = {"stream": "写一首短诗", "json": "写一首短诗", "chunks": "scenario:chunks_20"}.get(kind, f"scenario:{kind}")
        async with http.post(url, json=chat_body(prompt, stream=kind != "json"), headers=headers) as response:
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
            "growth_from_10_percent": round(100 * (samples[-1] - samples[0]) / samples[0], 1)}


async def soak(dialect: str, requests: int) -> dict:
    fake, kimi, token, _ = await start_fake(dialect, quiet=True)  # (the faults make both sides log a lot)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:
        proxy_process, proxy = await start_proxy(dialect, kimi, http, quiet=True)
        try:
            result = await measure_soak(http, proxy, proxy_process.pid, token, requests)
            result["chats_left"] = await chats_left(http, kimi)
        finally:
            for process in (proxy_process, fake):
                process.terminate()
                await process.wait()
    return {"dialect": dialect, "requests": requests, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dialect", choices=("connect", "legacy"), default="connect")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: proves the benchmark works")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--soak", type=int, metavar="N", help="only the soak: N requests of a mixed workload")
    parser.add_argument("--serve-fake", metavar="DIALECT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fake:
        asyncio.run(serve_fake(args.serve_fake))
        return
    if args.soak:
        print(json.dumps(asyncio.run(soak(args.dialect, args.soak))))
        return
    sizes = QUICK if args.quick else FULL
    results = asyncio.run(run(args.dialect, sizes))
    print(json.dumps(results, indent=2) if args.json else table(args.dialect, sizes, results))


if __name__ == "__main__":
    main()
