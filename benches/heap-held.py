#!/usr/bin/env python3
"""Heap bytes per held connection, by allocation site: portier under valgrind's DHAT
with N held longpolling requests (or N open WebSockets) at its heap peak.

Where `conns.sh` (shared/peers) measures RSS per held connection side by side with the
peers, this says *what* holds it: DHAT's live blocks at the global heap peak (t-gmax),
grouped by the innermost frame outside the allocator, divided by N.

Usage: benches/heap-held.py [--n 300] [--ws] [--tls] [--one-at-a-time] [--bin BIN] [--top 25]
--tls holds them over TLS (portier's HTTPS listener, ALPN http/1.1; a `wss` WebSocket with --ws).
DHAT sees glibc's malloc only, and portier's default build uses mimalloc: profile a build
without it, e.g. `CARGO_TARGET_DIR=/tmp/ht cargo build --profile profiling -p portier
--no-default-features` and `--bin /tmp/ht/profiling/portier` (the default `--bin`).
By default the requests are opened back to back, so the peak also holds the upstream
connects still in flight (each a boxed future); --one-at-a-time opens each once the
previous one reached the upstream, so the peak is the held state alone.
Needs valgrind. The upstream is a stand-in worker in this script that accepts the
request and never answers it (longpoll) or answers 101 and then stays silent (--ws).
"""
import argparse, asyncio, json, os, shutil, signal, socket, subprocess, sys, tempfile


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


async def upstream(port, ws, held):
    async def handle(r, w):
        held.append(w)
        try:
            while True:
                line = await r.readline()
                if not line:
                    return
                if line in (b"\r\n", b"\n"):
                    break
            if ws:
                w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
                await w.drain()
            await r.read()  # hold until the proxy closes
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
    return await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)


async def client(port, ws, n, held=None, tls=None):
    """Opens `n` held requests (over TLS with `tls`, an SSLContext); with `held` (the
    upstream's list), each only once the previous one reached the upstream, so no
    connect is in flight at the heap's peak."""
    conns = []
    path = "/websocket" if ws else "/longpolling/poll"
    extra = (b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n") if ws else b""
    for _ in range(n):
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=tls,
                                             server_hostname="acme.test" if tls else None)
        w.write(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: acme.test\r\n" + extra + b"\r\n")
        await w.drain()
        conns.append((r, w))
        while held is not None and len(held) < len(conns):
            await asyncio.sleep(0.005)
    if ws:  # wait for every 101
        for r, _ in conns:
            await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 30)
    return conns


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--ws", action="store_true")
    ap.add_argument("--bin", default="/tmp/ht/profiling/portier")
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--one-at-a-time", action="store_true",
                    help="open each request once the previous one reached the upstream: the "
                         "peak is then the held state, without connects in flight")
    a = ap.parse_args()
    if not shutil.which("valgrind"):
        sys.exit("heap-held: valgrind is missing (apt-get install valgrind)")
    d = tempfile.mkdtemp(prefix="portier-dhat.")
    up, http, admin, https = free_port(), free_port(), free_port(), free_port()
    tls = None
    if a.tls:
        import ssl
        os.makedirs(os.path.join(d, "certs"))
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=acme.test", "-addext", "subjectAltName=DNS:acme.test",
                        "-keyout", os.path.join(d, "certs", "acme.key"),
                        "-out", os.path.join(d, "certs", "acme.crt")],
                       check=True, capture_output=True)
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
        tls.set_alpn_protocols(["http/1.1"])
    held = []
    srv = await upstream(up, a.ws, held)
    cfg = os.path.join(d, "p.toml")
    with open(cfg, "w") as f:
        f.write(f'[listen]\nhttp = "127.0.0.1:{http}"\nadmin = "127.0.0.1:{admin}"\nthreads = 1\n'
                + (f'https = "127.0.0.1:{https}"\n[tls]\ncerts = "{d}/certs"\n' if a.tls else "")
                + f'[log]\naccess = false\n[pools.odoo]\nhttp = ["127.0.0.1:{up}"]\n'
                f'longpolling = ["127.0.0.1:{up}"]\n'
                f'[tenants.acme]\nhosts = ["acme.test"]\npool = "odoo"\n')
    out = os.path.join(d, "dhat.json")
    vg = subprocess.Popen(["valgrind", "--tool=dhat", f"--dhat-out-file={out}", a.bin, "run", "-c", cfg],
                          stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "log"), "w"))
    try:
        for _ in range(600):
            try:
                s = socket.create_connection(("127.0.0.1", http), 0.2)
                # a connect to a port nobody listens on yet can meet itself (TCP
                # simultaneous open, when the kernel picks that port as the source)
                mine = s.getsockname() == s.getpeername()
                s.close()
                if not mine:
                    break
            except OSError:
                pass
            await asyncio.sleep(0.1)
        conns = await client(https if a.tls else http, a.ws, a.n,
                             held if a.one_at_a_time else None, tls)
        for _ in range(300):  # every request reached the upstream
            if len(held) >= a.n:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(2)
        print(f"{len(conns)} client connections, {len(held)} upstream connections held", file=sys.stderr)
        for _, w in conns:
            w.close()
        await asyncio.sleep(1)
    finally:
        vg.send_signal(signal.SIGTERM)
        for _ in range(600):
            if vg.poll() is not None:
                break
            await asyncio.sleep(0.1)
        else:
            vg.kill()
        srv.close()
    data = json.load(open(out))
    frames = data["ftbl"]
    # the allocation site: the first frame that is not the allocator itself
    alloc = ("malloc", "calloc", "realloc", "posix_memalign", "memalign", "alloc::",
             "<alloc::", "__rust", "bytes::bytes_mut::BytesMut::reserve_inner",
             "hashbrown::raw", "<hashbrown::raw")
    sites = {}
    total = 0
    for pp in data["pps"]:
        b = pp.get("gb", 0)  # bytes live at the global peak
        if not b:
            continue
        total += b
        name = "?"
        for fi in pp["fs"]:
            fn = frames[fi].split(": ", 1)[-1].split(" (in ")[0]
            if not fn.startswith(alloc) and "sys/alloc/" not in fn and "alloc/src/" not in fn:
                name = fn
                break
        sites[name] = sites.get(name, 0) + b
    print(f"heap at peak: {total / 1024:.0f} KiB, {total / a.n / 1024:.2f} KiB per held "
          f"{'WebSocket' if a.ws else 'longpoll'} (N={a.n}, including the process's base)")
    for name, b in sorted(sites.items(), key=lambda kv: -kv[1])[: a.top]:
        print(f"{b / a.n:9.0f} B/conn  {name[:150]}")
    print(f"(DHAT output: {out})")


asyncio.run(main())
