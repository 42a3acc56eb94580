"""Helpers shared by the tracking tests (imported by conftest and test modules alike: one module, one state)."""

from __future__ import annotations

import shutil
from pathlib import Path

from icmil.config import ICMILConfig, load_config

CLASSES = ["normal", "tumor"]
TEMPLATE: dict[str, Path] = {}


def fresh_sqlite(path: Path) -> str:
    """A migrated, empty MLflow sqlite store at ``path`` (a copy of the session template); returns its URI."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        shutil.copyfile(TEMPLATE["db"], path)
    return f"sqlite:///{path}"


def make_cfg(run_dir: Path, *overrides: str) -> ICMILConfig:
    """A config on a fresh sqlite store in ``run_dir`` whose tracking retries are fast (no real backoff)."""
    fresh_sqlite(Path(run_dir) / "mlflow.db")
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            "tracking.retries=2",
            "tracking.retry_backoff=0.05",
            "tracking.retry_backoff_max=0.2",
            *overrides,
        ],
    )


class TcpProxy:
    """A loopback TCP forwarder that can be switched off and on: a tracking-server outage on demand.

    ``down()`` closes the listening socket and every open connection (clients get "connection refused");
    ``up()`` listens again on the same port.
    """

    def __init__(self, target_port: int) -> None:
        import socket

        self.target_port = target_port
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = int(probe.getsockname()[1])
        probe.close()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        import socket
        import threading

        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        import contextlib
        import socket

        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self._conns.clear()

    def _accept(self, listener: object) -> None:
        import socket
        import threading

        assert isinstance(listener, socket.socket)
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: object, dst: object) -> None:
        import contextlib
        import socket

        assert isinstance(src, socket.socket) and isinstance(dst, socket.socket)
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
