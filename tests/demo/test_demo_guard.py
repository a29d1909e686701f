"""The web app's front door against real server processes, over raw sockets so every header is the test's own:
foreign Host names refused (HTTP and websocket upgrades; DNS rebinding), the token when extra names are
allowed, Origin on upgrades and writes, request bodies refused by size before they are read, and error
messages that never echo a whole rejected value."""

from __future__ import annotations

import json
import re
import socket

import pytest

from demo_helpers import DemoProcess

TOKEN_LINE = re.compile(r"every request needs the token (\S+):")
UPGRADE = ("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")


def raw(port: int, request: bytes, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as is and read the answer's status, headers and (Content-Length) body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers.setdefault(k.strip().lower(), v.strip())
        want = int(headers.get("content-length", "0"))
        while len(body) < want:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        return status, headers, body


def http(port: int, method: str, path: str, host: str, body: bytes = b"", **headers: str):
    extra = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    length = f"Content-Length: {len(body)}\r\nContent-Type: application/json\r\n" if body or method != "GET" else ""
    return raw(port, f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{length}{extra}Connection: close\r\n\r\n"
               .encode() + body)


def upgrade(port: int, host: str, path: str = "/ws?role=control", **headers: str) -> int:
    extra = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    status, _, _ = raw(port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{UPGRADE}{extra}\r\n".encode())
    return status


def test_loopback_names_are_served_and_foreign_hosts_refused(demo):
    port = demo.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST"):
        status, _, body = http(port, "GET", "/api/status", host)
        assert status == 200, (host, body)
    # DNS rebinding: a foreign name resolving to this machine, with its own Origin, as the attack sends it
    evil = f"rebind.example:{port}"
    for method, path, body in (("GET", "/", b""), ("GET", "/api/status", b""),
                               ("PUT", "/api/presets/1", b'{"prompt_a": "owned"}')):
        status, _, answer = http(port, method, path, evil, body, Origin=f"http://{evil}")
        assert status == 403, (method, path, answer)
        msg = json.loads(answer)["error"]
        assert "rebind.example" in msg and "--allow-host" in msg and "localhost" in msg
    assert json.loads(http(port, "GET", "/api/presets", f"127.0.0.1:{port}")[2])["presets"][0] is None
    assert upgrade(port, evil, Origin=f"http://{evil}") == 403
    assert upgrade(port, f"127.0.0.1:{port}", Origin=f"http://127.0.0.1:{port}") == 101


def test_cross_origin_upgrades_and_writes_are_refused(demo):
    port, host = demo.port, f"127.0.0.1:{demo.port}"
    assert upgrade(port, host, Origin="http://evil.example") == 403
    status, _, body = http(port, "POST", "/api/seed", host, b'{"seed": 5}', Origin="http://evil.example")
    assert status == 403 and "cross-origin" in json.loads(body)["error"]
    status, _, _ = http(port, "POST", "/api/seed", host, b'{"seed": 5}', Origin=f"http://{host}")
    assert status == 200


def test_an_oversize_body_is_refused_before_it_is_read(demo):
    port, host = demo.port, f"127.0.0.1:{demo.port}"
    # 200 MB announced, not one byte of it sent: the answer can only come from the header
    status, headers, body = raw(port, f"PUT /api/presets/1 HTTP/1.1\r\nHost: {host}\r\n"
                                      f"Content-Type: application/json\r\nContent-Length: 200000000\r\n\r\n".encode())
    assert status == 413 and headers.get("connection") == "close"
    assert len(body) < 200 and "at most 65536 bytes" in json.loads(body)["error"]
    # no Content-Length (chunked): read up to the limit, then refused. The one chunk is limit + 1 bytes and its
    # closing CRLF is never sent, so every byte sent is read before the answer (no reset on the server's close).
    request = (f"POST /api/prompt HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Transfer-Encoding: chunked\r\n\r\n{65537:x}\r\n").encode() + b"x" * 65537
    status, _, body = raw(port, request)
    assert status == 413 and b"xxxxxxxxxx" not in body
    status, _, body = http(port, "GET", "/api/status", host)  # still serving
    assert status == 200


def test_a_long_rejected_value_is_not_echoed(api):
    r = api.post("/api/prompt", {"prompt_a": "y" * 50_000})  # under the body limit, over the prompt limit
    assert r.status == 422 and len(r.body) < 400 and b"y" * 100 not in r.body, r.body[:500]
    msg = r.json()["error"]
    assert "prompt_a" in msg and "at most 2000 characters" in msg and "(50000 characters)" in msg
    msg = api.post("/api/prompt", {"method": "z" * 5000}).json()["error"]
    assert "method" in msg and len(msg) < 300


@pytest.fixture(scope="module")
def studio():
    server = DemoProcess("--allow-host", "studio.example")
    yield server
    server.stop()


def test_extra_host_names_need_the_token_made_at_start(studio):
    m = TOKEN_LINE.search(studio.log())
    assert m, studio.log()[-2000:]
    token, port = m.group(1), studio.port
    named, loopback = f"studio.example:{port}", f"127.0.0.1:{port}"
    for host in (named, loopback):
        status, _, body = http(port, "GET", "/api/status", host)
        assert status == 401 and "token" in json.loads(body)["error"]
        assert http(port, "GET", "/api/status", host, Authorization="Bearer wrong-token-123")[0] == 401
        assert http(port, "GET", "/api/status", host, Authorization=f"Bearer {token}")[0] == 200
    assert http(port, "GET", "/api/status", f"other.example:{port}", Authorization=f"Bearer {token}")[0] == 403
    # the page: opened with ?token=, it gets a cookie that its own requests and its websocket then carry
    status, headers, body = http(port, "GET", f"/?token={token}", named)
    assert status == 200 and b'id="promptA"' in body
    cookie = headers["set-cookie"].split(";")[0]
    assert cookie == f"rtd_token={token}" and "HttpOnly" in headers["set-cookie"]
    assert http(port, "GET", "/static/app.js", named, Cookie=cookie)[0] == 200
    assert http(port, "POST", "/api/seed", named, b'{"seed": 3}', Cookie=cookie, Origin=f"http://{named}")[0] == 200
    assert upgrade(port, named, Origin=f"http://{named}") == 403
    assert upgrade(port, named, Origin=f"http://{named}", Cookie=cookie) == 101
    assert upgrade(port, named, path=f"/ws?role=view&token={token}") == 101


# ---- the pieces, without a server ----------------------------------------------------------------------------
def test_host_names_short_echoes_and_option_checks():
    from demo.guard import AccessPolicy, host_name, short
    from demo.server import DemoOptions

    assert host_name("Example.COM:8000") == "example.com" and host_name("[::1]:80") == "::1"
    assert host_name("localhost.") == "localhost" and host_name("") is None
    for junk in ("evil.example@127.0.0.1", "127.0.0.1/x", "127.0.0.1 :80", "localhost:80:80", "[::1"):
        assert host_name(junk) is None, junk
    assert short("a" * 10) == repr("a" * 10)
    assert short("b" * 10_000) == repr("b" * 10_000)[:60] + "... (10000 characters)"
    policy = AccessPolicy.build("0.0.0.0", ("Studio.Local", "192.168.1.20"), "token-1234", 65536)
    assert {"localhost", "127.0.0.1", "::1", "0.0.0.0", "studio.local", "192.168.1.20"} == set(policy.hosts)
    assert "::" in AccessPolicy.build("::", (), None, 65536).hosts
    for bad in ("http://studio.local", "studio.local:8000", "studio.local/x", ""):
        with pytest.raises(ValueError, match="bare name or address"):
            DemoOptions(allowed_hosts=(bad,), token="token-1234")
    with pytest.raises(ValueError, match="8 to 200 characters"):
        DemoOptions(token="short")
    with pytest.raises(ValueError, match="8 to 200 characters"):
        DemoOptions(token="has;semicolon")
    with pytest.raises(ValueError, match="max_body_bytes"):
        DemoOptions(max_body_bytes=10)
    DemoOptions(allowed_hosts=("studio.local",))  # the token is made at start when none is given


def test_an_older_presets_file_still_loads(tmp_path):
    import json as _json

    from demo.controls import PresetStore

    path = tmp_path / "presets.json"
    path.write_text(_json.dumps([{"prompt_a": "old", "prompt_b": "", "blend": 0.0, "negative_prompt": "",
                                  "seed": None}, None]))
    store = PresetStore(str(path))
    assert store.get(1) == {"prompt_a": "old", "prompt_b": "", "blend": 0.0, "negative_prompt": ""}
    assert store.get(2) is None
    path.write_text(_json.dumps([{"prompt_a": "x", "colour": "red"}]))
    with pytest.raises(ValueError, match="presets file .*: preset 1: colour: Extra inputs are not permitted"):
        PresetStore(str(path))
