"""Body limits hold while the body streams, against the API under uvicorn as deployed.

A chunked 2 GiB upload (no Content-Length) is refused having written no more than the upload limit, and a
100 MiB JSON body is refused without the API's peak memory growing by more than about 20 MiB. The figures
come from the server process's own /proc counters: `wchar` (bytes it passed to write()) and `VmHWM` (its peak
resident memory).
"""

from __future__ import annotations

import select
import socket
from pathlib import Path

import httpx
import pytest

UPLOAD_LIMIT_BYTES = 8 * 1024 * 1024
CHUNK = b"x" * (256 * 1024)
GIB, MIB = 1024**3, 1024**2


@pytest.fixture(scope="module")
def server(uvicorn_api):
    with uvicorn_api(FTJOBS_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT_BYTES)) as (url, pid):
        yield int(url.rsplit(":", 1)[1]), pid


def proc_field(pid: int, name: str, file: str) -> int:
    for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
        if line.startswith(name):
            return int(line.split()[1])
    raise KeyError(name)


def send_chunked(
    port: int, path: str, headers: dict[str, str], offer_bytes: int, preamble: bytes = b""
) -> tuple[int, bytes]:
    """Stream up to `offer_bytes` as a chunked body, stopping as soon as the server answers.
    Returns the bytes the client managed to send and the raw response."""
    sock = socket.create_connection(("127.0.0.1", port))
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    sock.sendall(head.encode())
    if preamble:
        sock.sendall(f"{len(preamble):x}\r\n".encode() + preamble + b"\r\n")
    sent, frame = 0, f"{len(CHUNK):x}\r\n".encode() + CHUNK + b"\r\n"
    try:
        while sent < offer_bytes:
            readable, writable, _ = select.select([sock], [sock], [], 10)
            if readable:
                break
            if writable:
                sock.sendall(frame)
                sent += len(CHUNK)
    except (BrokenPipeError, ConnectionResetError):
        pass
    sock.settimeout(10)
    response = b""
    try:
        while chunk := sock.recv(65536):
            response += chunk
            if b"\r\n\r\n" in response and b'"code"' in response:
                break
    except (TimeoutError, ConnectionResetError):
        pass
    sock.close()
    return sent, response


def test_chunked_2_gib_upload_stops_at_the_limit(server, admin_key):
    port, pid = server
    before = proc_field(pid, "wchar", "io")
    boundary = "b0undary"
    sent, response = send_chunked(
        port,
        "/v1/files",
        {"Content-Type": f"multipart/form-data; boundary={boundary}", **admin_key.headers},
        offer_bytes=2 * GIB,
        preamble=f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'.encode(),
    )
    written = proc_field(pid, "wchar", "io") - before
    print(f"upload: client sent {sent / MIB:.1f} MiB of 2048 MiB offered; server wrote {written / MIB:.2f} MiB")
    assert response.startswith(b"HTTP/1.1 413"), response[:300]
    assert b"application/problem+json" in response and b"upload_too_large" in response
    assert written <= UPLOAD_LIMIT_BYTES + MIB  # the limit, plus the envelope and the response
    assert sent < 64 * MIB


def test_100_mib_json_body_is_refused_without_growing_memory(server, admin_key):
    port, pid = server
    # One ordinary request first, so the baseline includes what every request costs.
    httpx.get(f"http://127.0.0.1:{port}/v1/jobs", headers=admin_key.headers, timeout=10)
    peak_before = proc_field(pid, "VmHWM", "status") * 1024
    sent, response = send_chunked(
        port,
        "/v1/jobs",
        {"Content-Type": "application/json", **admin_key.headers},
        offer_bytes=100 * MIB,
        preamble=b'{"base_model": "',
    )
    growth = proc_field(pid, "VmHWM", "status") * 1024 - peak_before
    print(
        f"json body: client sent {sent / MIB:.1f} MiB of 100 MiB offered; server peak RSS grew {growth / MIB:.2f} MiB"
    )
    assert response.startswith(b"HTTP/1.1 413") and b"body_too_large" in response, response[:300]
    assert growth <= 20 * MIB


def test_declared_oversized_body_is_refused_before_it_is_sent(server, admin_key):
    port, _pid = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        auth = admin_key.headers["Authorization"]
        sock.sendall(
            f"POST /v1/jobs HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Authorization: {auth}\r\nContent-Length: {100 * MIB}\r\n\r\n".encode()
        )
        response = b""
        while b'"code"' not in response and (chunk := sock.recv(65536)):
            response += chunk
    assert response.startswith(b"HTTP/1.1 413") and b"body_too_large" in response, response[:300]
