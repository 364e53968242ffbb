"""A throwaway PostgreSQL cluster: initdb into a temp dir, start on a free port, remove after.

Used by the test suite (``tests/pg.py``) and by ``examples/contact_sync.py --demo``. It is not
part of ``engine``: the engine ships to users, and users bring their own database.

PostgreSQL refuses to run as root. When this process is root, the cluster is created and run as
an unprivileged user: ``postgres`` if it exists, otherwise a system user ``conveyor-pg`` that is
created once with ``useradd``. The data directory, the unix socket and the server log all live in
one temp dir owned by that user; ``stop()`` shuts the server down and deletes the dir.

The cluster listens on 127.0.0.1 only, on a free port. Host (TCP) connections need a password
(SCRAM), so the DSN carries a real secret -- the secrets tests check that it never leaks. Local
(unix socket) connections are trusted; only the server's own user can reach that socket dir.

Durability knobs (``fsync``, ``synchronous_commit``, ``full_page_writes``) are off: this cluster
lives for one test session, and a crash of the *client* (what the resume tests do) never loses a
committed row either way. A ``pg_ctl stop``/``restart`` is a clean shutdown that flushes all data.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

__all__ = ["PG_BIN", "PostgresUnavailable", "ThrowawayPostgres", "throwaway_postgres"]

PG_BIN = Path(os.environ.get("CONVEYOR_PG_BIN", "/usr/lib/postgresql/15/bin"))
_FALLBACK_USER = "conveyor-pg"


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL binaries are missing or the cluster could not be started."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_user() -> pwd.struct_passwd | None:
    """The unprivileged user to run the server as, or None to run as ourselves (not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", _FALLBACK_USER):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    try:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             _FALLBACK_USER],
            check=True, capture_output=True, text=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        raise PostgresUnavailable(
            f"running as root and no 'postgres' user exists; useradd {_FALLBACK_USER} failed: "
            f"{detail}"
        ) from exc
    return pwd.getpwnam(_FALLBACK_USER)


class ThrowawayPostgres:
    """One PostgreSQL cluster in a temp dir. Use as a context manager, or start()/stop().

    ``dsn`` is a libpq key/value string and ``url`` the same as a ``postgresql://`` URL; both
    hold the password. ``restart()`` runs ``pg_ctl restart`` (for fault tests).
    """

    def __init__(self, *, bin_dir: Path | str = PG_BIN, database: str = "conveyor",
                 user: str = "conveyor", max_connections: int = 200) -> None:
        self.bin_dir = Path(bin_dir)
        self.database = database
        self.user = user
        self.password = secrets.token_urlsafe(18)
        self.max_connections = max_connections
        self.host = "127.0.0.1"
        self.port = 0
        self.root: Path | None = None
        self._os_user: pwd.struct_passwd | None = None
        self._started = False

    # -- paths -------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        assert self.root is not None, "cluster not started"
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.root is not None, "cluster not started"
        return self.root / "sock"

    @property
    def log_file(self) -> Path:
        assert self.root is not None, "cluster not started"
        return self.root / "server.log"

    @property
    def dsn(self) -> str:
        return (f"host={self.host} port={self.port} dbname={self.database} user={self.user} "
                f"password={self.password} connect_timeout=5")

    @property
    def url(self) -> str:
        return (f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/"
                f"{self.database}?connect_timeout=5")

    # -- running commands as the server's user ----------------------------------------------
    def _run(self, *args: str, check: bool = True,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, object] = {}
        if self._os_user is not None:
            kwargs = {"user": self._os_user.pw_uid, "group": self._os_user.pw_gid,
                      "extra_groups": []}
        env = {"PATH": f"{self.bin_dir}:/usr/bin:/bin", "LC_ALL": "C", "LANG": "C",
               "HOME": str(self.root), "PGHOST": str(self.socket_dir)}
        proc = subprocess.run(  # checked below, with the server log in the message
            [str(self.bin_dir / args[0]), *args[1:]], cwd=self.root, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
            **kwargs,  # type: ignore[call-overload]
        )
        if check and proc.returncode != 0:
            raise PostgresUnavailable(
                f"{args[0]} failed (exit {proc.returncode}): {proc.stdout.strip()}\n"
                f"{self._log_tail()}"
            )
        return proc

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(errors="replace").splitlines()[-lines:]
        except (OSError, AssertionError):
            return ""
        return "server log:\n" + "\n".join(text) if text else ""

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> ThrowawayPostgres:
        missing = [b for b in ("initdb", "pg_ctl", "postgres") if not (self.bin_dir / b).exists()]
        if missing:
            raise PostgresUnavailable(
                f"PostgreSQL binaries not found: {', '.join(missing)} in {self.bin_dir} "
                "(install PostgreSQL 15 or set CONVEYOR_PG_BIN to its bin directory)"
            )
        self._os_user = _server_user()
        self.root = Path(tempfile.mkdtemp(prefix="conveyor-pg-"))
        atexit.register(self.stop)
        try:
            self.socket_dir.mkdir()
            pwfile = self.root / "pwfile"
            pwfile.write_text(self.password + "\n")
            if self._os_user is not None:
                for p in (self.root, self.socket_dir, pwfile):
                    os.chown(p, self._os_user.pw_uid, self._os_user.pw_gid)
            os.chmod(self.root, 0o700)
            os.chmod(pwfile, 0o600)
            self._run("initdb", "-D", str(self.data_dir), "-U", self.user, "--pwfile", str(pwfile),
                      "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                      "--locale=C", "--no-sync")
            pwfile.unlink()
            self.port = _free_port()
            conf = {
                "listen_addresses": "'127.0.0.1'", "port": str(self.port),
                "unix_socket_directories": f"'{self.socket_dir}'",
                "max_connections": str(self.max_connections), "shared_buffers": "'32MB'",
                "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
                "logging_collector": "off",
            }
            with (self.data_dir / "postgresql.conf").open("a") as f:
                f.write("\n# conveyor throwaway cluster\n")
                f.writelines(f"{k} = {v}\n" for k, v in conf.items())
            self._pg_ctl_start()
            self._started = True
            self._run("createdb", "-h", str(self.socket_dir), "-p", str(self.port),
                      "-U", self.user, self.database)
        except BaseException:
            self.stop()
            raise
        return self

    def _pg_ctl_start(self) -> None:
        for attempt in range(3):
            proc = self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file),
                             "-w", "-t", "60", "start", check=False)
            if proc.returncode == 0:
                return
            # Lost the race for the port we picked: take another one.
            if "could not bind" in self._log_tail() and attempt < 2:
                self.port = _free_port()
                with (self.data_dir / "postgresql.conf").open("a") as f:
                    f.write(f"port = {self.port}\n")
                continue
            raise PostgresUnavailable(f"pg_ctl start failed: {proc.stdout.strip()}\n"
                                      f"{self._log_tail()}")

    def create_database(self, name: str) -> str:
        """Create database ``name`` (a plain identifier) and return its DSN."""
        if not name.isidentifier() or not name.isascii():
            raise ValueError(f"database name must be a plain identifier, got {name!r}")
        self._run("createdb", "-h", str(self.socket_dir), "-p", str(self.port), "-U", self.user,
                  name)
        return self.dsn.replace(f"dbname={self.database} ", f"dbname={name} ")

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart``: every open client connection is terminated."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-m", mode,
                  "-w", "-t", "60", "restart")

    def stop(self) -> None:
        """Stop the server (if running) and delete the cluster. Safe to call twice."""
        atexit.unregister(self.stop)
        if self.root is None:
            return
        if self._started:
            self._started = False
            with contextlib.suppress(Exception):
                self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop",
                          check=False, timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> ThrowawayPostgres:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@contextlib.contextmanager
def throwaway_postgres(**kwargs: object) -> Iterator[ThrowawayPostgres]:
    """``with throwaway_postgres() as pg: connect(pg.dsn)`` -- started, then always removed."""
    pg = ThrowawayPostgres(**kwargs)  # type: ignore[arg-type]
    with pg:
        yield pg


if __name__ == "__main__":  # manual smoke test: python examples/_throwaway_pg.py
    t0 = time.perf_counter()
    with throwaway_postgres() as pg:
        print(f"up in {time.perf_counter() - t0:.2f}s on port {pg.port}, root {pg.root}")
