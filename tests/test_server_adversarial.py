"""The server against generated bad input: every request field given every kind of
wrong value, whole bodies that are not what they claim, and each class of broken
HTTP framing, under three cache configurations.

Every reply must start with a status line and none may be a 5xx; a 4xx carries an
OpenAI-style error body. The cases are built from the server's own field lists,
so a new field is covered as soon as it exists. Loopback only, about a minute.
"""

import collections
import json
import re
import socket
import sys
import tempfile
import threading
import time
import unittest
from pathlib import Path

from helpers import tiny_model, write_model_dir

from mlx_lm.server import CHAT_FIELDS, TEXT_FIELDS, build_server, setup_arg_parser

# Raw JSON texts, so that values json.dumps cannot write (lone surrogates,
# infinities, oversized numbers) are sent too.
BAD_VALUES = [
    "null",
    "true",
    "-1",
    "0",
    "1",
    "1.5",
    "4.0",
    "1e999",
    "-1e999",
    "NaN",
    "Infinity",
    "9" * 5000,
    str(2**70),
    '""',
    '"x"',
    '"\\ud800"',
    '"\\u0000"',
    '"\u00b2"',
    "[]",
    '["x"]',
    "[1, 2]",
    "{}",
    '{"a": 1}',
    '{"1": "x"}',
    "[" * 3000 + "]" * 3000,
]

# Valid bodies each field is dropped into; two tokens keep generation short.
BASES = {
    "/v1/chat/completions": (
        CHAT_FIELDS,
        '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2',
    ),
    "/v1/completions": (TEXT_FIELDS, '{"prompt": "hi", "max_tokens": 2'),
}

# Whole bodies that are not a request object.
BAD_BODIES = [
    b"",
    b" ",
    b"[]",
    b'"text"',
    b"42",
    b"null",
    b"{",
    b'{"prompt": "hi"',
    b'{"prompt": "hi"}}',
    b"\xff\xfe{}",
    b"\xef\xbb\xbf{}",
    b'{"prompt": "\xc3"}',
    b'{"prompt": "hi", "prompt": 5}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}',
    b'{"prompt": [[1, 2]]}',
    b'{"prompt": [99999999]}',
    b'{"prompt": [-1]}',
    b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
    b'{"messages": [{"role": "robot", "content": "hi"}]}',
    b'{"messages": [{"content": "hi"}]}',
    b'{"messages": "hi"}',
    b"{" + b'"a":{' * 200 + b"}" * 201,
]

BODY = b'{"prompt": "hi", "max_tokens": 2}'
JSON_HEADERS = b"Host: localhost\r\nContent-Type: application/json\r\n"


def post(body, extra=b"", path=b"/v1/completions", length=None):
    length = len(body) if length is None else length
    return (
        b"POST " + path + b" HTTP/1.1\r\n" + JSON_HEADERS + extra
        + b"Content-Length: " + str(length).encode() + b"\r\n\r\n" + body
    )  # fmt: skip


# Each framing class: (name, raw bytes, whether the client half-closes after).
FRAMING = [
    ("garbage line", b"\x00\x01\x02 nonsense\r\n\r\n", False),
    ("TLS hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", False),
    ("HTTP/0.9", b"GET /v1/models\r\n\r\n", False),
    ("version 0.9", b"GET /v1/models HTTP/0.9\r\n\r\n", False),
    ("version 2.0", b"GET /v1/models HTTP/2.0\r\n\r\n", False),
    ("version 1.x", b"GET /v1/models HTTP/1.x\r\n\r\n", False),
    ("unknown protocol", b"GET /v1/models SPDY/3\r\n\r\n", False),
    ("HTTP/1.0", b"GET /v1/models HTTP/1.0\r\nHost: localhost\r\n\r\n", False),
    ("no Host", b"GET /v1/models HTTP/1.1\r\n\r\n", False),
    ("foreign Host", b"GET /v1/models HTTP/1.1\r\nHost: evil.example\r\n\r\n", False),
    ("broken Host", b"GET /v1/models HTTP/1.1\r\nHost: [::1\r\n\r\n", False),
    ("long request line", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", False),
    (
        "long header",
        b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
        False,
    ),
    (
        "many headers",
        b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n"
        + b"".join(b"X-%d: y\r\n" % i for i in range(150))
        + b"\r\n",
        False,
    ),
    ("header without colon", b"GET /v1/models HTTP/1.1\r\nHost localhost\r\n\r\n", False),
    ("folded header", b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n x\r\n\r\n", False),
    ("latin-1 header", b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX: \xff\r\n\r\n", False),
    ("bare LF", b"GET /v1/models HTTP/1.1\nHost: localhost\n\n", False),
    ("no length", b"POST /v1/completions HTTP/1.1\r\n" + JSON_HEADERS + b"\r\n" + BODY, False),
    ("negative length", post(BODY, length=-5), False),
    ("signed length", post(BODY, length="+34"), False),
    ("float length", post(BODY, length="3.4e1"), False),
    ("other digits", post(BODY, length="\u0663\u0664"), False),
    ("listed length", post(BODY, length="34, 34"), False),
    ("huge length", post(BODY, length=10**30), False),
    ("length past the limit", post(BODY, length=(1 << 20) + 1), False),
    ("short length", post(BODY, length=5), False),
    ("two lengths", post(BODY, extra=b"Content-Length: 3\r\n"), False),
    ("chunked", post(BODY, extra=b"Transfer-Encoding: chunked\r\n"), False),
    ("chunked, listed", post(BODY, extra=b"Transfer-Encoding: gzip, chunked\r\n"), False),
    ("expect, fine", post(BODY, extra=b"Expect: 100-continue\r\n"), False),
    ("expect, too big", post(b"", extra=b"Expect: 100-continue\r\n", length=1 << 30), False),
    ("expect, bad length", post(b"", extra=b"Expect: 100-continue\r\n", length="x"), False),
    ("expect, unknown", post(BODY, extra=b"Expect: 200-ok\r\n"), False),
    ("form body", post(BODY).replace(b"application/json", b"application/x-www-form-urlencoded"), False),
    ("text body", post(BODY).replace(b"application/json", b"text/plain"), False),
    ("pipelined", post(BODY) + post(BODY), False),
    ("half-closed", post(BODY), True),
    ("half-closed stream", post(b'{"prompt": "hi", "max_tokens": 2, "stream": true}'), True),
    ("truncated body", post(BODY[:10], length=len(BODY)), True),
    ("body past length", post(BODY + b"garbage"), False),
    ("absolute URI", post(BODY).replace(b"POST /v1", b"POST http://localhost/v1"), False),
    ("odd path", b"GET /../../etc/passwd HTTP/1.1\r\nHost: localhost\r\n\r\n", False),
    ("query string", b"GET /v1/models?x=%00 HTTP/1.1\r\nHost: localhost\r\n\r\n", False),
    ("method in lower case", post(BODY).replace(b"POST", b"post"), False),
    ("unknown method", b"BREW /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n", False),
    ("OPTIONS", b"OPTIONS /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n", False),
    ("HEAD", b"HEAD /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n", False),
    (
        "cross-site POST",
        post(BODY, extra=b"Origin: http://evil.example\r\n").replace(b"application/json", b"text/plain"),
        False,
    ),
]  # fmt: skip

STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


def exchange(port, data, half_close=False, wanted=1, seconds=30):
    """Send ``data`` on a fresh connection and read until ``wanted`` whole
    replies came, the server closes it, or ``seconds`` pass; returns every byte
    received."""
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as s:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may refuse before reading it all
        received = b""
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline and _whole(received) < wanted:
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                received += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    return received


def _whole(data):
    """How many whole final replies ``data`` begins with (1xx not counted)."""
    count = 0
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            break
        status = STATUS_LINE.match(head)
        if status and status.group(1) == b"100":
            data = rest
            continue
        length = re.search(rb"(?i)\r\ncontent-length: (\d+)", head)
        if length is None:
            # An event stream ends with the connection, after its [DONE].
            count += b"text/event-stream" in head and b"data: [DONE]" in rest
            break
        if len(rest) < int(length.group(1)):
            break
        count += 1
        data = rest[int(length.group(1)) :]
    return count


def replies(data):
    """``(status, body)`` of each final reply in ``data``, in order; raises
    ``AssertionError`` where bytes come without a status line."""
    found = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        status = STATUS_LINE.match(head)
        if status is None:
            raise AssertionError(f"reply without a status line: {data[:80]!r}")
        code = int(status.group(1))
        length = re.search(rb"(?i)\r\ncontent-length: (\d+)", head)
        size = int(length.group(1)) if length else len(rest)
        if code != 100:
            found.append((code, rest[:size]))
        data = rest[size:] if code != 100 else rest
    return found


class AdversarialCase:
    """Drives one server configuration (``flags``) through every case."""

    flags = ()

    @classmethod
    def setUpClass(cls):
        argv = ["--model", MODEL_DIR, "--port", "0", "--max-tokens", "4", *cls.flags]
        cls.server = build_server(setup_arg_parser().parse_args(argv))
        threading.Thread(target=cls.server.serve_forever, daemon=True).start()
        cls.port = cls.server.server_address[1]
        cls.statuses = collections.Counter()

    @classmethod
    def tearDownClass(cls):
        cls.server.shutdown()
        cls.server.close()
        counts = ", ".join(f"{n} x {s}" for s, n in sorted(cls.statuses.items()))
        print(f"\n{cls.__name__}: {counts}", file=sys.stderr)

    def check(self, what, data, half_close=False, expect_reply=True, wanted=1):
        """Send a case; every reply has a status line, none is a 5xx, and every
        error says what went wrong in OpenAI's shape."""
        got = replies(exchange(self.port, data, half_close, wanted))
        self.statuses.update(status for status, _ in got)
        if expect_reply:
            self.assertTrue(got, f"{what}: no reply")
        for status, body in got:
            self.assertLess(status, 500, f"{what}: {status} {body[:200]!r}")
            if status >= 400:
                error = json.loads(body)["error"]
                self.assertIsInstance(error["message"], str, what)
                self.assertIn("type", error, what)
        return got

    def test_every_field_with_every_kind_of_bad_value(self):
        count = 0
        for path, (names, base) in BASES.items():
            for name in sorted(names):
                for value in BAD_VALUES:
                    body = f'{base}, "{name}": {value}}}'.encode()
                    self.check(
                        f"{path} {name}={value[:20]}", post(body, path=path.encode())
                    )
                    count += 1
        self.assertGreater(count, 1000)

    def test_bodies_that_are_not_requests(self):
        for path in BASES:
            for body in BAD_BODIES:
                self.check(f"{path} {body[:30]!r}", post(body, path=path.encode()))

    def test_every_framing_class(self):
        for name, data, half_close in FRAMING:
            with self.subTest(name):
                wanted = 2 if name == "pipelined" else 1
                got = self.check(
                    name, data, half_close, name != "truncated body", wanted
                )
                if name in (
                    "pipelined",
                    "half-closed",
                    "half-closed stream",
                    "expect, fine",
                ):
                    self.assertEqual([s for s, _ in got], [200] * wanted)

    def test_slow_and_vanishing_clients(self):
        # Headers a few bytes at a time, then the body: answered normally.
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
            data = post(BODY)
            for i in range(0, len(data), 16):
                s.sendall(data[i : i + 16])
                time.sleep(0.01)
            reply = s.recv(1 << 16)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200"), reply[:80])
        # Clients that leave mid-request, mid-body or mid-stream.
        stream = b'{"prompt": "hi", "max_tokens": 500, "stream": true}'
        for data in (post(BODY)[:40], post(BODY)[:-5], post(stream)):
            with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
                s.sendall(data)
                time.sleep(0.05)
        # Nothing of that is left behind: the next request is served at once.
        got = self.check("after", post(BODY))
        self.assertEqual([s for s, _ in got], [200])

    def tearDown(self):
        self.assertTrue(self.server.worker._thread.is_alive(), "the worker died")


class DefaultCache(AdversarialCase, unittest.TestCase):
    pass


class CompactedCache(AdversarialCase, unittest.TestCase):
    flags = ("--compact-kv-budget", "48")


class WindowedCache(AdversarialCase, unittest.TestCase):
    flags = ("--window-size", "40")


def setUpModule():
    global TMP, MODEL_DIR
    TMP = tempfile.TemporaryDirectory()
    model, config = tiny_model(seed=5, head_dim=64)
    MODEL_DIR = str(write_model_dir(Path(TMP.name) / "tiny", model, config))


def tearDownModule():
    TMP.cleanup()


if __name__ == "__main__":
    unittest.main()
