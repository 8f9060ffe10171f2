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
  straight and through Hanlin (target: the same within noise);
- with --llama-server [PATH] (default: found under ~/.cache/hanlin/llama.cpp):
  two llama-server nodes of --gguf-model as one pool. Their streamed
  tokens per second straight and through Hanlin; then --failover-streams
  concurrent streams (one user each) while one node is killed: how the
  requests were spread over the nodes, that every stream either finished or
  ended with an error event (no 5xx, no hang), that requests sent after the
  kill were answered by the other node, and that each user's usage row
  equals the usage the stream reported (finished streams) or lies between
  the chunks received and max_tokens (cut ones).

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


def stream_detail(host, port, key, body):
    """One streamed chat completion: (HTTP status, finished, error event,
    content chunks, the usage chunk's usage)."""
    c = http.client.HTTPConnection(host, port, timeout=300)
    c.request("POST", "/v1/chat/completions", json.dumps(body),
              {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    r = c.getresponse()
    if r.status != 200:
        return r.status, False, r.read()[:200].decode(errors="replace"), 0, None
    done, error, chunks, usage = False, None, 0, None
    while True:
        line = r.readline()
        if not line:
            break
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            break
        v = json.loads(data)
        if "error" in v:
            error = v["error"].get("message")
            continue
        if v.get("usage"):
            usage = v["usage"]
        for ch in v.get("choices") or []:
            if (ch.get("delta") or {}).get("content"):
                chunks += 1
    c.close()
    return 200, done, error, chunks, usage


def find_llama_server():
    b = os.environ.get("LLAMA_CPP_BIN")
    if b and (Path(b) / "llama-server").exists():
        return Path(b) / "llama-server"
    found = sorted((Path.home() / ".cache" / "hanlin" / "llama.cpp").glob("*/vendor/llama.cpp/build*/bin/llama-server"))
    return found[-1] if found else None


def start_llama(binary, gguf, port):
    env = dict(os.environ, LD_LIBRARY_PATH=str(Path(binary).parent))
    proc = subprocess.Popen([str(binary), "-m", gguf, "--port", str(port), "-t", "1", "-np", "8", "-c", "8192",
                             "--host", "127.0.0.1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return proc
        except OSError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            raise SystemExit(f"llama-server on {port} did not start")
        time.sleep(0.5)


def metric_lines(port, name):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    return [line for line in text.splitlines() if line.startswith(name)]


def failover(args, port, db, tmp, nodes, procs):
    """Concurrent streams over two llama-server nodes; one is killed."""
    n = args.failover_streams
    keys = {}
    for i in range(n + 8):
        user = f"fo{port}_{i}"
        keys[user] = hanlin(args.hanlin, ["admin", "key", "create", "--user", user, "--plan", "bench"], tmp, db).strip().splitlines()[-1].strip()
    users = list(keys)
    results = {}
    max_tokens = 96

    def one(user, i):
        body = {"model": "llama", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
                "temperature": 0, "messages": [{"role": "user", "content": f"Conversation {i}: count from 1 to 100, one number per line."}]}
        results[user] = stream_detail("127.0.0.1", port, keys[user], body)

    threads = [threading.Thread(target=one, args=(u, i)) for i, u in enumerate(users[:n])]
    for t in threads:
        t.start()
    time.sleep(args.kill_after)
    procs[1].kill()
    procs[1].wait()
    killed_at = time.time()
    # Sent after the kill: the dead node is tried (refused) and skipped.
    late = [threading.Thread(target=one, args=(u, n + i)) for i, u in enumerate(users[n:])]
    for t in late:
        t.start()
    for t in threads + late:
        t.join(timeout=300)
    hung = sum(t.is_alive() for t in threads + late)
    print(f"failover: {n} streams over 2 nodes, node {nodes[1]} killed after {args.kill_after:.1f} s, then 8 more requests")
    for name in ["hanlin_upstream_requests_total", "hanlin_upstream_failed_attempts"]:
        for line in metric_lines(port, name):
            if 'model="llama"' in line:
                print("  " + line)
    statuses = [r[0] for r in results.values()]
    finished = [u for u, r in results.items() if r[1]]
    cut = [u for u, r in results.items() if r[0] == 200 and not r[1]]
    clean_cut = [u for u in cut if results[u][2]]
    late_ok = sum(results.get(u, (0, False))[1] for u in users[n:])
    print(f"  finished {len(finished)}, cut with an error event {len(clean_cut)}, cut without one {len(cut) - len(clean_cut)}, "
          f"non-200 {sum(s != 200 for s in statuses)}, hung {hung}; requests after the kill answered {late_ok}/8")
    time.sleep(2)  # the last usage rows' writes
    rows = subprocess.run(["psql", db, "-At", "-F", " ", "-c",
                           "SELECT u.name, SUM(g.prompt_tokens), SUM(g.completion_tokens), COUNT(*) FROM usage g "
                           f"JOIN users u ON u.id = g.user_id WHERE u.name LIKE 'fo{port}_%' GROUP BY u.name"],
                          capture_output=True, text=True, check=True).stdout.split("\n")
    db_usage = {r.split()[0]: tuple(int(x) for x in r.split()[1:]) for r in rows if r.strip()}
    exact = sum(1 for u in finished if results[u][4] and db_usage.get(u, (0, 0, 0))[:2] ==
                (results[u][4]["prompt_tokens"], results[u][4]["completion_tokens"]) and db_usage[u][2] == 1)
    bounded = sum(1 for u in cut if u in db_usage and results[u][3] <= db_usage[u][1] <= max_tokens)
    print(f"  usage rows equal to the streamed usage: {exact}/{len(finished)} finished streams; "
          f"within [chunks received, max_tokens]: {bounded}/{len(cut)} cut streams "
          f"({time.time() - killed_at:.1f} s after the kill)")


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
    ap.add_argument("--real-reps", type=int, default=5, help="pairs of streams (straight, through) on the real upstream")
    ap.add_argument("--llama-server", nargs="?", const="", help="two llama-server nodes as one pool (PATH, or found)")
    ap.add_argument("--gguf-model", default="qwen2.5-coder-0.5b", help="the model the llama-server nodes serve")
    ap.add_argument("--failover-streams", type=int, default=16)
    ap.add_argument("--kill-after", type=float, default=3.0, help="seconds into the failover streams")
    args = ap.parse_args()
    llama_procs, llama_ports = [], []
    if args.llama_server is not None:
        binary = Path(args.llama_server) if args.llama_server else find_llama_server()
        if not binary or not binary.exists():
            raise SystemExit("llama-server not found: run scripts/build_llama_cpp.sh (HANLIN_LLAMA_AVX2_ONLY=1 on a machine it was not built on)")
        gguf = subprocess.run([args.hanlin, "show", args.gguf_model, "--path"], check=True, capture_output=True,
                              text=True).stdout.strip()
        llama_ports = [free_port(), free_port()]
        llama_procs = [start_llama(binary, gguf, p) for p in llama_ports]
        args.real = f"http://127.0.0.1:{llama_ports[0]}/v1"

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
    if llama_ports:
        urls = ", ".join(f'"http://127.0.0.1:{p}/v1"' for p in llama_ports)
        lines += ['[models.llama]', f'upstream = [{urls}]', f'upstream_model = "{args.real_model}"', "max_tokens = 512",
                  "first_byte_secs = 120", "idle_secs = 30"]
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
            for _ in range(args.real_reps):
                f, e, n = stream(host, int(rport), "/v1/chat/completions", None, dict(rb, model=args.real_model))
                straight.append((n - 1) / (e - f))
                f, e, n = stream("127.0.0.1", port, "/v1/chat/completions", key, rb)
                through.append((n - 1) / (e - f))
            s, t = statistics.median(straight), statistics.median(through)
            ratios = sorted(b / a for a, b in zip(straight, through))
            print(f"real upstream, streamed chunks/s, median of {args.real_reps}: straight {s:.1f}, through Hanlin {t:.1f} "
                  f"({t / s:.3f}x; per-pair ratios {', '.join(f'{r:.3f}' for r in ratios)})")
        if llama_procs:
            failover(args, port, db, tmp, [f"127.0.0.1:{p}" for p in llama_ports], llama_procs)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        server.shutdown()
        for p in llama_procs:
            p.kill()


if __name__ == "__main__":
    main()
