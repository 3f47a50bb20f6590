"""ftjobs.client on a connection that drops: a POST is sent again with the same Idempotency-Key and the same bytes
(what lets the server answer the retry with the first response), a new call gets a fresh key, and a server that
never answers is ServerUnreachable. The peer is a raw socket that drops the first connection of each call, so the
client's real transport sees a real disconnect."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from ftjobs.client import Client, ServerUnreachable

JOB = {"id": "job_0123456789abcdef01234567", "status": "queued", "spec": {}, "created_at": "2026-12-02T00:00:00Z"}


class DroppingPeer:
    """Accepts connections forever; drops every odd one unanswered, answers every even one with `answer`."""

    def __init__(self, answer: dict) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.answer = answer
        self.keys: list[str | None] = []
        self.bodies: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            connection, _ = self.server.accept()
            with connection:
                self._read_request(connection)
                if len(self.keys) % 2:
                    continue  # closed without a byte of answer: the client sees the connection drop
                body = json.dumps(self.answer).encode()
                connection.sendall(
                    b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nConnection: close\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )

    def _read_request(self, connection: socket.socket) -> None:
        received = b""
        while b"\r\n\r\n" not in received:
            received += connection.recv(65536)
        head, body = received.split(b"\r\n\r\n", 1)
        headers = {
            name.lower(): value
            for name, _, value in (line.decode().partition(": ") for line in head.split(b"\r\n")[1:])
        }
        while len(body) < int(headers.get("content-length", 0)):
            body += connection.recv(65536)
        self.keys.append(headers.get("idempotency-key"))
        self.bodies.append(body)


def test_a_retried_post_keeps_its_idempotency_key_and_a_new_call_gets_another():
    peer = DroppingPeer(JOB)
    client = Client(peer.url, "key")
    assert client.submit({"base_model": "x"}).id == JOB["id"]
    assert client.cancel(JOB["id"]).status == "queued"
    first, retry, second, second_retry = peer.keys
    assert first and first == retry
    assert second and second == second_retry and second != first


def test_a_retried_upload_sends_the_same_bytes(tmp_path):
    peer = DroppingPeer(
        {"id": "file_0123456789abcdef", "filename": "d.jsonl", "size_bytes": 15, "created_at": "2026-12-02T00:00:00Z"}
    )
    dataset = tmp_path / "d.jsonl"
    dataset.write_text('{"text": "hi"}\n')
    assert Client(peer.url).upload(dataset, "text").size_bytes == 15
    assert peer.keys[0] == peer.keys[1] and peer.bodies[0] == peer.bodies[1]
    assert b'{"text": "hi"}' in peer.bodies[0] and b'name="format"' in peer.bodies[0]


def test_nothing_listening_is_server_unreachable():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: refused
        with pytest.raises(ServerUnreachable, match=f"cannot reach the ftjobs server at http://127.0.0.1:{port}"):
            Client(f"http://127.0.0.1:{port}").jobs()
