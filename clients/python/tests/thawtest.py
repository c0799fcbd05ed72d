"""The real ``thaw serve`` the tests run against: a fresh ``THAW_HOME``, an API key made by
``thaw keys create``, the server on a free loopback port, ``templates/shell`` deployed
through the client. Nothing is mocked.

Environment:
    THAW_BIN    the thaw binary (default: target/debug/thaw of this repository; it finds
                thaw-guest-init beside itself, or at THAW_GUEST_INIT)
    THAW_CACHE  the shared build cache (default /var/cache/thaw, as the Rust e2e tests)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set

import pytest

import thaw

REPO = Path(__file__).resolve().parents[3]
SHELL_TEMPLATE = REPO / "templates" / "shell"
ROLLOUT_SKIP = "server predates the rollout routes"


def thaw_bin() -> Path:
    p = Path(os.environ.get("THAW_BIN") or REPO / "target" / "debug" / "thaw")
    if not p.is_file():
        pytest.exit(f"{p} missing: run `cargo build -p thaw-cli` (or `make test-python`), or set THAW_BIN", 2)
    return p


@contextlib.contextmanager
def made_session(client: thaw.Client, template: str = "shell", **kw: Any) -> Iterator[thaw.Session]:
    """A session created with ``kw``, deleted afterwards unless the test already did."""
    s = client.create_session(template, **kw)
    try:
        yield s
    finally:
        try:
            client.delete_session(s.id)
        except thaw.NotFoundError:
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``thaw serve`` over its own home, as a child process."""

    def __init__(self, name: str, serve_args: Optional[List[str]] = None) -> None:
        self.home = Path(tempfile.mkdtemp(prefix=f"thaw-py-{name}-", dir="/tmp"))
        self.env = dict(os.environ)
        self.env["THAW_HOME"] = str(self.home)
        for k in ("THAW_SERVER", "THAW_API_KEY", "THAW_TIER"):
            self.env.pop(k, None)
        self.log_path = self.home / "serve.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = self.new_key("pytest", 16)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(thaw_bin()), "serve", "--listen", f"127.0.0.1:{self.port}", *(serve_args or [])],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait_listening()
        self._paths: Optional[Set[str]] = None
        self._schemas: Optional[Dict[str, Any]] = None

    def run_thaw(self, *args: str) -> str:
        out = subprocess.run(
            [str(thaw_bin()), *args], env=self.env, stdin=subprocess.DEVNULL, capture_output=True, timeout=120
        )
        if out.returncode != 0:
            raise RuntimeError(f"thaw {' '.join(args)} failed: {out.stdout.decode()}{out.stderr.decode()}")
        return out.stdout.decode()

    def new_key(self, name: str, max_sandboxes: int, admin: bool = False) -> str:
        """A new key's secret; ``admin``: an operator's key (``thaw keys create --admin``),
        which sees and may end every key's sandboxes and audit records."""
        args = ["--json", "keys", "create", "--name", name, "--max-sandboxes", str(max_sandboxes)]
        doc = json.loads(self.run_thaw(*args, *(["--admin"] if admin else [])))
        return str(doc["secret"])

    def key_with_shell(self, name: str, max_sandboxes: int) -> str:
        """A new key with its own deploy of templates/shell (a key sees only its own
        templates)."""
        key = self.new_key(name, max_sandboxes)
        with self.client(key) as c:
            c.deploy(SHELL_TEMPLATE)
        return key

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _wait_listening(self) -> None:
        # Generous: opening the engine on a loaded machine can take a while.
        deadline = time.monotonic() + 180
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"thaw serve exited ({self.proc.returncode}) before listening:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"thaw serve did not listen within 180 s:\n{self.log_tail()}")
            time.sleep(0.05)

    def client(self, key: Optional[str] = None, **kw: Any) -> thaw.Client:
        return thaw.Client(self.url, key if key is not None else self.key, **kw)

    def async_client(self, key: Optional[str] = None, **kw: Any) -> thaw.AsyncClient:
        return thaw.AsyncClient(self.url, key if key is not None else self.key, **kw)

    def _openapi(self) -> None:
        if self._paths is None:
            with self.client() as c:
                doc = c.openapi()
            self._paths = set(doc.get("paths", {}))
            self._schemas = dict(doc.get("components", {}).get("schemas", {}))

    def has_route(self, path: str) -> bool:
        """Capability probe: whether the server's OpenAPI document has ``path``."""
        self._openapi()
        assert self._paths is not None
        return path in self._paths

    def has_field(self, schema: str, field: str) -> bool:
        self._openapi()
        assert self._schemas is not None
        return field in (self._schemas.get(schema, {}).get("properties") or {})

    def stop(self) -> None:
        if self.proc.poll() is None:
            # SIGTERM: in-flight calls finish, prepared sandboxes are torn down.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def destroy(self) -> None:
        """Ends every session of every key (through the engine, as the CLI does), stops
        the server and removes its home."""
        try:
            with self.client(retry=1) as c:
                for s in c.sessions():
                    try:
                        c.delete_session(s.id)
                    except thaw.ThawError:
                        pass
        except thaw.ThawError:
            pass
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)


_SERVER: Optional[Server] = None


def get_server() -> Server:
    """The session's server, started on first use (by the ``server`` fixture, or by a
    ``skipif`` probe evaluated before it) and deployed with ``templates/shell``."""
    global _SERVER
    if _SERVER is None:
        srv = Server("main")
        try:
            with srv.client() as c:
                t = c.deploy(SHELL_TEMPLATE)
                assert t.name == "shell" and t.state == "ready", t
        except BaseException:
            srv.destroy()
            raise
        _SERVER = srv
    return _SERVER


def shutdown_server() -> None:
    global _SERVER
    if _SERVER is not None:
        _SERVER.destroy()
        _SERVER = None


def lacks_routes(*paths: str) -> bool:
    """Capability probe for ``pytest.mark.skipif``: whether the server's OpenAPI document
    lacks one of ``paths``. Evaluated lazily, at each test's setup."""
    srv = get_server()
    return not all(srv.has_route(p) for p in paths)


def lacks_field(schema: str, field: str) -> bool:
    return not get_server().has_field(schema, field)


def rollout(*paths: str) -> pytest.MarkDecorator:
    """Skips a test only when the server lacks one of ``paths`` (see :func:`lacks_routes`)."""
    cond = "lacks_routes(" + ", ".join(repr(p) for p in paths) + ")"
    return pytest.mark.skipif(cond, reason=ROLLOUT_SKIP)


def needs_routes(what: str, *paths: str) -> pytest.MarkDecorator:
    """Like :func:`rollout`, for other routes: skipped with "server predates ``what``"."""
    cond = "lacks_routes(" + ", ".join(repr(p) for p in paths) + ")"
    return pytest.mark.skipif(cond, reason=f"server predates {what}")


def needs_field(what: str, schema: str, field: str) -> pytest.MarkDecorator:
    """Skips a test only when the server's request ``schema`` lacks ``field``."""
    return pytest.mark.skipif(f"lacks_field({schema!r}, {field!r})", reason=f"server predates {what}")
