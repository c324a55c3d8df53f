"""A PostgreSQL cluster of our own in a folder: initialized once, started on 127.0.0.1:port.

The cluster's superuser `postgres` has a generated password, kept in a libpq password file
beside the cluster (mode 0600), so the `postgresql://` URI carries no secret: give clients
`PGPASSFILE` (see `env`). PostgreSQL refuses to run as root; as root, its programs run as the
`postgres` user that Debian's package creates, and the cluster folder belongs to it.

No shell stands between a path and a program: the server is started as `postgres` itself with
its arguments as a list (not `pg_ctl start`, which hands -D, -l and -o to /bin/sh), so a folder
whose path holds a space, a quote or a dollar sign is taken literally.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

from pipeline.server.private import open_private_log, private_folder, write_private

DATABASE = "mlflow"
SUPERUSER = "postgres"
CLUSTER_OWNER = "postgres"  # the OS user that runs the cluster when we are root
START_TIMEOUT_S = 60


class PostgresError(Exception):
    """The cluster could not be set up or started; the message says what to do."""


PROGRAMS = ("initdb", "postgres", "pg_ctl", "pg_isready", "psql", "createdb")


def find_bin_dir() -> Path | None:
    """A folder with all of PostgreSQL's programs we run: Debian's newest
    /usr/lib/postgresql/<version>/bin, else where `pg_ctl` on PATH really lives."""
    candidates = sorted(Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin"))
    candidates.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
                    reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    return next((c for c in candidates if all((c / p).is_file() for p in PROGRAMS)), None)


class LocalPostgres:
    """`folder` holds the cluster (data/), its socket, log and the password file."""

    def __init__(self, folder: Path, port: int, durable: bool = True,
                 bin_dir: Path | None = None):
        self.folder = Path(folder).resolve()
        self.port = port
        # Throwaway clusters (tests, benches of the server itself) skip fsync: faster, and a
        # crash loses nothing anyone needs.
        self.durable = durable
        self.bin_dir = bin_dir or find_bin_dir()
        if self.bin_dir is None:
            raise PostgresError(
                "PostgreSQL's server programs (initdb, pg_ctl) are not installed: install them "
                "(Debian: apt-get install postgresql) or pass a postgresql:// URI of your own")

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def password_file(self) -> Path:
        return self.folder.parent / f"{self.folder.name}.pgpass"

    @property
    def log(self) -> Path:
        return self.folder / "postgres.log"

    def uri(self, database: str = DATABASE) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def env(self) -> dict[str, str]:
        """What a client process needs besides the URI (the password, through libpq)."""
        return {"PGPASSFILE": str(self.password_file)}

    @property
    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").is_file()

    def init(self) -> None:
        """Create the cluster unless it exists: superuser password in the password file,
        passwords required on 127.0.0.1, the socket only in the cluster's own folder."""
        if self.initialized:
            return
        private_folder(self.folder)
        self._give_to_owner(self.folder)
        password = secrets.token_urlsafe(24)
        secret = self.folder / "initdb-password"
        write_private(secret, password + "\n")
        self._give_to_owner(secret)
        if subprocess.run(["test", "-r", str(secret)], **self._as_owner()).returncode != 0:
            secret.unlink()
            raise PostgresError(
                f"the {CLUSTER_OWNER} user, which runs the cluster, cannot reach {self.folder}: "
                f"open the folders above it to others (chmod o+x) or choose another folder")
        try:
            self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "-E", "UTF8",
                      "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={secret}",
                      "--no-instructions", *([] if self.durable else ["--no-sync"]))
        finally:
            secret.unlink(missing_ok=True)
        write_private(self.password_file, "".join(
            f"{host}:*:*:{SUPERUSER}:{password}\n" for host in ("127.0.0.1", "localhost")))

    def start(self) -> None:
        """Start the cluster (if it is not running) and create the database."""
        if not self.running():
            self._launch()
        exists = self._run("psql", *self._connect(), "-tAc",
                           f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'")
        if exists.strip() != "1":
            self._run("createdb", *self._connect(), DATABASE)

    def _launch(self) -> None:
        """The server in a session of its own (it outlives us, as under pg_ctl), its output
        appended to the log; back once it accepts connections."""
        command = [str(self.bin_dir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                   "-h", "127.0.0.1", "-k", str(self.folder)]
        if not self.durable:
            for setting in ("fsync=off", "synchronous_commit=off", "full_page_writes=off"):
                command += ["-c", setting]
        with open_private_log(self.log) as log:
            before = log.tell()
            server = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      **self._as_owner())
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._accepting():
            if server.poll() is not None or time.monotonic() > deadline:
                if server.poll() is None:
                    server.kill()
                with open(self.log, "rb") as log:
                    log.seek(before)
                    said = log.read().decode(errors="replace").strip().splitlines()
                # Its last words are "database system is shut down"; the cause came before.
                fatal = [line for line in said if "FATAL:" in line] or said or ["no output"]
                raise PostgresError(f"postgres did not start in {self.folder}: {fatal[-1]}; "
                                    f"see {self.log}")
            time.sleep(0.2)

    def _accepting(self) -> bool:
        return subprocess.run([str(self.bin_dir / "pg_isready"), "-q", *self._connect()],
                              capture_output=True, **self._as_owner()).returncode == 0

    def running(self) -> bool:
        if not self.initialized:
            return False
        return subprocess.run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "status"],
                              capture_output=True, **self._as_owner()).returncode == 0

    def stop(self) -> None:
        if self.running():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def _connect(self) -> list[str]:
        """Through the cluster's own socket, as its owner."""
        return ["-h", str(self.folder), "-p", str(self.port), "-U", SUPERUSER]

    def _run(self, program: str, *args: str) -> str:
        result = subprocess.run([str(self.bin_dir / program), *args], capture_output=True,
                                text=True, **self._as_owner())
        if result.returncode != 0:
            said = (result.stderr or result.stdout).strip().splitlines()
            raise PostgresError(f"{program} failed in {self.folder}: "
                                f"{said[-1] if said else f'exit code {result.returncode}'}"
                                f"{'; see ' + str(self.log) if program == 'pg_ctl' else ''}")
        return result.stdout

    @staticmethod
    def _as_owner() -> dict:
        """PostgreSQL refuses root: as root, run its programs as the `postgres` user."""
        if os.geteuid() != 0:
            return {}
        return {"user": CLUSTER_OWNER, "group": CLUSTER_OWNER, "extra_groups": [],
                "cwd": "/", "env": {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C.UTF-8"}}

    @staticmethod
    def _give_to_owner(path: Path) -> None:
        if os.geteuid() == 0:
            shutil.chown(path, CLUSTER_OWNER, CLUSTER_OWNER)
