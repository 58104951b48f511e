"""One hardened container and the JSON-lines channel to the exec server inside it."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import docker
import docker.errors
from docker.types import Ulimit
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

LABEL = "opd.sandbox"  # every container we start carries it: `docker ps -a --filter label=opd.sandbox`
SERVER_SRC = (Path(__file__).parent / "server.py").read_text()


class SandboxError(RuntimeError):
    """The sandbox could not do what was asked (daemon down, start deadline passed, lost session)."""


class Limits(BaseModel):
    """Per-container resource limits and per-exec caps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    memory_mb: int = Field(512, description="Memory limit; swap is disabled (memory+swap = memory).")
    cpus: float = Field(1.0, description="CPU quota in cores.")
    pids: int = Field(128, description="Max processes/threads in the container (stops fork bombs).")
    tmpfs_mb: int = Field(64, description="Size of the writable /work tmpfs (counts toward memory).")
    timeout_s: float = Field(10.0, description="Default wall-clock timeout of one exec.")
    max_output_bytes: int = Field(1 << 20, description="Cap on captured stdout+stderr of one exec.")
    start_timeout_s: float = Field(30.0, description="Deadline for creating+starting one container.")


@dataclass(frozen=True)
class Result:
    """What one exec produced. `exit_code` follows the shell: 128+N when killed by signal N."""

    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool = False
    oom_killed: bool = False
    truncated: bool = False
    duration: float = 0.0
    error: str | None = None  # set when the sandbox itself failed (container died, lost channel)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.error is None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def failed(cls, error: str, duration: float = 0.0) -> Result:
        return cls(stdout="", stderr=error, exit_code=-1, duration=duration, error=error)


def docker_client(timeout: float = 60.0) -> docker.DockerClient:
    """A client for $DOCKER_HOST (or the default socket), or a SandboxError that says what to do."""
    where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env(timeout=int(timeout))
        client.ping()
    except docker.errors.DockerException as e:
        raise SandboxError(
            f"cannot reach the Docker daemon at {where} ({type(e).__name__}); start it "
            "(`bash .ci/docker.sh`, or `dockerd &` as root) or point DOCKER_HOST at a live daemon"
        ) from None
    return client


def owner_labels(pool_id: str) -> dict[str, str]:
    """Labels naming the owning process, so a later pool can tell an orphan from a live pool's box."""
    return {
        LABEL: "1",
        f"{LABEL}.pool": pool_id,
        f"{LABEL}.host": socket.gethostname(),
        f"{LABEL}.pid": str(os.getpid()),
        f"{LABEL}.pid_start": process_start(os.getpid()),
    }


def process_start(pid: int) -> str:
    """The kernel's start time of `pid` (guards against pid reuse); '' if it is not running."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def is_orphan(labels: dict[str, str]) -> bool:
    """True when the container's owning process (on this host) is gone."""
    if labels.get(f"{LABEL}.host") != socket.gethostname():
        return False  # another machine's pool: not ours to judge
    pid = int(labels.get(f"{LABEL}.pid", "0") or 0)
    return pid <= 0 or process_start(pid) != labels.get(f"{LABEL}.pid_start")


class Box:
    """A started container plus its attached exec-server channel. Used by one holder at a time."""

    def __init__(self, client: docker.DockerClient, image: str, limits: Limits, pool_id: str):
        self.client, self.limits = client, limits
        self.name = f"opd-sandbox-{uuid.uuid4().hex[:12]}"
        self.id: str | None = None
        self._sock: socket.socket | None = None
        self._buf = b""  # demuxed stdout bytes not yet split into lines
        self.dead = False
        try:
            self.id = self._create(image, limits, pool_id)
        except BaseException:
            self.destroy(by_name=True)  # a create that timed out client-side may still have happened
            raise
        try:
            sock = client.api.attach_socket(self.id, params={"stdin": 1, "stdout": 1, "stream": 1})
            self._sock = getattr(sock, "_sock", sock)
            client.api.start(self.id)
            pong = self.request({"op": "ping"}, timeout=limits.start_timeout_s)
            if not pong.get("ok"):
                raise SandboxError(f"exec server did not answer: {pong}")
        except BaseException:
            self.destroy()
            raise

    def _create(self, image: str, limits: Limits, pool_id: str) -> str:
        mem = f"{limits.memory_mb}m"
        tmpfs_opts = "rw,exec,nosuid,nodev,mode=1777,uid=65534,gid=65534"
        api = self.client.api
        container = api.create_container(
            image,
            command=["python3", "-I", "-c", SERVER_SRC],
            name=self.name,
            stdin_open=True,
            user="65534:65534",
            working_dir="/work",
            hostname="sandbox",
            labels=owner_labels(pool_id),
            host_config=api.create_host_config(
                network_mode="none",
                read_only=True,
                tmpfs={"/work": f"{tmpfs_opts},size={limits.tmpfs_mb}m", "/tmp": f"{tmpfs_opts},size=16m"},
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                pids_limit=limits.pids,
                mem_limit=mem,
                memswap_limit=mem,
                nano_cpus=int(limits.cpus * 1e9),
                ulimits=[Ulimit(name="nofile", soft=1024, hard=1024)],
                ipc_mode="private",
            ),
        )
        return container["Id"]

    # -- channel -------------------------------------------------------------------------------
    def _read_line(self, deadline: float) -> bytes:
        while b"\n" not in self._buf:
            header = self._recv_exact(8, deadline)
            size = int.from_bytes(header[4:8], "big")
            payload = self._recv_exact(size, deadline)
            if header[0] == 1:  # stdout; the server never writes stderr
                self._buf += payload
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _recv_exact(self, n: int, deadline: float) -> bytes:
        chunks, got = [], 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("sandbox did not reply before its deadline")
            self._sock.settimeout(left)
            chunk = self._sock.recv(min(n - got, 1 << 20))
            if not chunk:
                raise ConnectionError("sandbox channel closed (container died or was killed)")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def request(self, req: dict, timeout: float) -> dict:
        """Send one request and wait for its reply; raises (and marks the box dead) on failure."""
        if self.dead or self._sock is None:
            raise ConnectionError("sandbox is dead")
        try:
            self._sock.sendall(json.dumps(req).encode() + b"\n")
            return json.loads(self._read_line(time.monotonic() + timeout))
        except (OSError, TimeoutError, ConnectionError, ValueError):
            self.dead = True
            raise

    # -- operations ----------------------------------------------------------------------------
    def exec(
        self,
        argv: list[str] | None = None,
        *,
        python: str | None = None,
        files: dict[str, str | bytes] | None = None,
        stdin: str | bytes | None = None,
        timeout: float | None = None,
        kill_group: bool = True,
    ) -> Result:
        """Run argv (or Python code, as `python3 -c` would, in a forked copy of the exec server) in /work.

        Never raises: a failure of the sandbox itself comes back as an error Result.
        """
        timeout = self.limits.timeout_s if timeout is None else timeout
        req = {
            "op": "exec", "argv": argv, "python": python, "timeout": timeout, "kill_group": kill_group,
            "max_output": self.limits.max_output_bytes,
            "stdin": _b64(stdin) if stdin else "",
            "files": {p: _b64(d) for p, d in (files or {}).items()},
        }
        t0 = time.monotonic()
        try:
            # The server enforces `timeout`; our own deadline only catches a wedged server.
            rep = self.request(req, timeout=timeout + 10.0)
        except (OSError, TimeoutError, ConnectionError, ValueError) as e:
            return Result.failed(f"sandbox failed during exec: {e}", time.monotonic() - t0)
        if not rep.get("ok"):
            return Result.failed(f"sandbox refused exec: {rep.get('error')}", time.monotonic() - t0)
        return Result(
            stdout=base64.b64decode(rep["stdout"]).decode("utf-8", "replace"),
            stderr=base64.b64decode(rep["stderr"]).decode("utf-8", "replace"),
            exit_code=rep["exit_code"], timed_out=rep["timed_out"], oom_killed=rep["oom_killed"],
            truncated=rep["truncated"], duration=time.monotonic() - t0,
        )

    def write_file(self, path: str, data: str | bytes) -> None:
        rep = self._request_or_raise({"op": "write", "path": path, "data": _b64(data)}, f"write_file {path}")
        if not rep.get("ok"):
            raise SandboxError(f"write_file {path}: {rep.get('error')}")

    def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        cap = self.limits.max_output_bytes if max_bytes is None else max_bytes
        rep = self._request_or_raise({"op": "read", "path": path, "max_bytes": cap}, f"read_file {path}")
        if not rep.get("ok"):
            raise SandboxError(f"read_file {path}: {rep.get('error')}")
        return base64.b64decode(rep["data"])

    def _request_or_raise(self, req: dict, what: str) -> dict:
        try:
            return self.request(req, timeout=30)
        except (OSError, TimeoutError, ConnectionError, ValueError) as e:
            raise SandboxError(f"{what}: sandbox failed: {e}") from None

    def reset(self) -> bool:
        """Kill every process but the server and wipe /work and /tmp; False if that failed."""
        try:
            return bool(self.request({"op": "reset"}, timeout=10).get("ok"))
        except (OSError, TimeoutError, ConnectionError, ValueError):
            return False

    def destroy(self, by_name: bool = False) -> None:
        """Remove the container (force); safe to call twice."""
        self.dead = True
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None
        target = self.id or (self.name if by_name else None)
        if target is not None:
            try:
                self.client.api.remove_container(target, force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.DockerException as e:
                log.warning("could not remove sandbox %s: %s", self.name, e)
            self.id = None


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()
