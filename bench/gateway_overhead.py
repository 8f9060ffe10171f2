#!/usr/bin/env python3
"""What Hanlin adds in front of an upstream server (issue: scale-out).

A fake OpenAI-compatible upstream that answers at once runs in this
process; `hanlin serve` serves it as an upstream model, on PostgreSQL (the
exact reservation: a per-user transaction lock, a request row and a token
hold per request, committed with PostgreSQL's default synchronous_commit=on).
Printed:

- time to the first streamed event, median over --requests, straight to the
  upstream and through Hanlin, and the difference (target: <= 5 ms);
- Hanlin's CPU time per relayed chunk over --streams streams of --chunks
  chunks each (target: <= 50 us), from /proc/PID/stat;
- with --real URL --real-model NAME (e.g. llama-server from
  scripts/build_llama_cpp.sh): a real upstream's streamed tokens per second,
  straight and through Hanlin (target: the same within noise).

    bench/gateway_overhead.py [--database-url postgres://...] [--requests 200]

Without --database-url it starts the throwaway PostgreSQL of
scripts/start_postgres.sh and makes a database of its own there.
"""
import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class Fake(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        body = b'{"object":"list","data":[]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        req = json.loads(self.rfile.read(n) or b"{}")
        chunks = int(req.get("max_tokens") or 1)
        if not req.get("stream"):
            body = json.dumps({
                "id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "tok " * chunks}, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": chunks, "total_tokens": 5 + chunks},
            }).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        chunk = b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"tok "},"finish_reason":null}]}\n\n'
        out = [chunk] * chunks
        usage = {"id": "x", "object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": chunks, "total_tokens": 5 + chunks}}
        out.append(b"data: " + json.dumps(usage).encode() + b"\n\n")
        out.append(b"data: [DONE]\n\n")
        self.wfile.write(b"".join(out))
        self.close_connection = True


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream(host, port, path, key, body):
    """(seconds to the first data line, seconds to the end, data lines)."""
    c = http.client.HTTPConnection(host, port, timeout=600)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    t0 = time.perf_counter()
    c.request("POST", path, json.dumps(body), headers)
    r = c.getresponse()
    if r.status != 200:
        raise SystemExit(f"{path}: {r.status} {r.read()[:300]!r}")
    first, lines = None, 0
    while True:
        line = r.readline()
        if not line:
            break
        if line.startswith(b"data:"):
            lines += 1
            if first is None:
                first = time.perf_counter() - t0
            if line.strip() == b"data: [DONE]":
                break
    end = time.perf_counter() - t0
    c.close()
    return first, end, lines


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hanlin(binary, args, home, db, env=None):
    cmd = [binary, *args, "--database-url", db]
    e = dict(os.environ, HANLIN_HOME=str(home), **(env or {}))
    out = subprocess.run(cmd, env=e, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args)}: {out.stderr}")
    return out.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hanlin", default=str(ROOT / "target/release/hanlin"))
    ap.add_argument("--database-url", help="PostgreSQL (default: scripts/start_postgres.sh)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--streams", type=int, default=40)
    ap.add_argument("--chunks", type=int, default=1000)
    ap.add_argument("--real", help="a real upstream's base URL (…/v1)")
    ap.add_argument("--real-model", default="model")
    args = ap.parse_args()

    db = args.database_url
    if not db:
        out = subprocess.run([str(ROOT / "scripts/start_postgres.sh")], capture_output=True, text=True, check=True)
        server = out.stdout.strip().splitlines()[-1]
        # A database of its own, with the current schema.
        name = f"hanlin_gw_{os.getpid()}"
        subprocess.run(["psql", server, "-q", "-c", f"CREATE DATABASE {name}"], check=True, capture_output=True)
        db = server.rsplit("/", 1)[0] + "/" + name
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(describe(os.cpu_count()), f"commit {commit}", sep="; ")

    fake_port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", fake_port), Fake)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    tmp = Path(tempfile.mkdtemp(prefix="hanlin-gw-"))
    port = free_port()
    config = tmp / "config.toml"
    lines = [
        f'port = {port}', 'model = "fake"', f'database_url = "{db}"',
        '[models.fake]', f'upstream = ["http://127.0.0.1:{fake_port}/v1"]', f"max_tokens = {max(args.chunks, 16)}",
    ]
    if args.real:
        lines += ['[models.real]', f'upstream = ["{args.real}"]', f'upstream_model = "{args.real_model}"', "max_tokens = 512"]
    config.write_text("\n".join(lines) + "\n")
    user = f"bench{port}"
    hanlin(args.hanlin, ["admin", "plan", "set", "bench", "--rpm", "1000000", "--tpm", "1000000000", "--tpd", "100000000000", "--max-context", "32768"], tmp, db)
    key = hanlin(args.hanlin, ["admin", "key", "create", "--user", user, "--plan", "bench"], tmp, db).strip().splitlines()[-1].strip()
    proc = subprocess.Popen([args.hanlin, "serve", "--config", str(config)], env=dict(os.environ, HANLIN_HOME=str(tmp)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise SystemExit("hanlin serve did not start")
                time.sleep(0.2)
        body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
        for _ in range(20):  # warm-up: connections, caches
            stream("127.0.0.1", port, "/v1/chat/completions", key, body)
        direct, via = [], []
        for _ in range(args.requests):
            direct.append(stream("127.0.0.1", fake_port, "/v1/chat/completions", None, body)[0])
            via.append(stream("127.0.0.1", port, "/v1/chat/completions", key, body)[0])
        d, v = statistics.median(direct) * 1000, statistics.median(via) * 1000
        print(f"time to first event, median of {args.requests}: upstream {d:.2f} ms, through Hanlin {v:.2f} ms, added {v - d:.2f} ms (target <= 5)")

        big = dict(body, max_tokens=args.chunks)
        before = cpu_seconds(proc.pid)
        total = 0
        for _ in range(args.streams):
            total += stream("127.0.0.1", port, "/v1/chat/completions", key, big)[2]
        used = cpu_seconds(proc.pid) - before
        print(f"CPU per relayed chunk: {used * 1e6 / total:.1f} us ({total} chunks, {used:.2f} s of CPU; target <= 50)")

        if args.real:
            rb = {"model": "real", "messages": [{"role": "user", "content": "Count from 1 to 300, one number per line."}], "max_tokens": 256, "temperature": 0, "stream": True}
            host, rport = args.real.split("//", 1)[1].split("/", 1)[0].split(":")
            straight, through = [], []
            for _ in range(3):
                f, e, n = stream(host, int(rport), "/v1/chat/completions", None, dict(rb, model=args.real_model))
                straight.append((n - 1) / (e - f))
                f, e, n = stream("127.0.0.1", port, "/v1/chat/completions", key, rb)
                through.append((n - 1) / (e - f))
            s, t = statistics.median(straight), statistics.median(through)
            print(f"real upstream, streamed chunks/s, median of 3: straight {s:.1f}, through Hanlin {t:.1f} ({t / s:.3f}x)")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        server.shutdown()


if __name__ == "__main__":
    main()
