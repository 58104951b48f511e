"""One hardened container and the JSON-lines channel to the exec server inside it."""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
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
SHM_BYTES = 16 << 20  # /dev/shm (docker's default is 64 MiB); emptied on every reset


class SandboxError(RuntimeError):
    """The sandbox could not do what was asked (daemon down, start deadline passed, lost session)."""


class ProtocolError(ValueError):
    """A reply on the channel that does not answer the request just sent."""


MAX_TIMEOUT_S = 3600.0  # the longest any one exec or check may run


def check_timeout(timeout: float, what: str = "timeout") -> float:
    """A per-call timeout as a float, or a ValueError naming the bad value.

    >>> check_timeout(2)
    2.0
    >>> check_timeout(float("inf"))
    Traceback (most recent call last):
    ...
    ValueError: timeout inf is not allowed: give a number of seconds in (0, 3600]
    """
    try:
        t = float(timeout)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {timeout} is not a number of seconds") from None
    if not 0 < t <= MAX_TIMEOUT_S:  # also false for nan
        raise ValueError(f"{what} {timeout} is not allowed: give a number of seconds in (0, {MAX_TIMEOUT_S:g}]")
    return t


class Limits(BaseModel):
    """Per-container resource limits and per-exec caps; every one is finite and bounded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    memory_mb: int = Field(512, ge=64, le=64 * 1024, description="Memory limit; swap is disabled (memory+swap = memory).")
    cpus: float = Field(1.0, gt=0, le=64, description="CPU quota in cores.")
    pids: int = Field(128, ge=16, le=4096, description="Max processes/threads in the container (stops fork bombs).")
    tmpfs_mb: int = Field(64, ge=1, le=16 * 1024, description="Size of the writable /work tmpfs (counts toward memory).")
    timeout_s: float = Field(10.0, gt=0, le=MAX_TIMEOUT_S, description="Default wall-clock timeout of one exec.")
    max_output_bytes: int = Field(1 << 20, ge=1024, le=64 << 20, description="Cap on captured stdout+stderr of one exec.")
    start_timeout_s: float = Field(30.0, gt=0, le=600, description="Deadline for creating+starting one container.")


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
            # The exec server is root with only SETUID/SETGID/KILL; every child it runs drops to
            # 65534 before user code starts (sandbox/server.py says why that keeps the channel out of reach).
            user="0:0",
            working_dir="/work",
            hostname="sandbox",
            labels=owner_labels(pool_id),
            host_config=api.create_host_config(
                network_mode="none",
                read_only=True,
                tmpfs={"/work": f"{tmpfs_opts},size={limits.tmpfs_mb}m", "/tmp": f"{tmpfs_opts},size=16m"},
                cap_drop=["ALL"],
                cap_add=["SETUID", "SETGID", "KILL"],
                shm_size=SHM_BYTES,
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
        """Send one request and wait for its reply; raises (and marks the box dead) on failure.

        Each request carries a fresh random id that the reply must echo, and nothing may follow
        the reply: a reply that is stale, injected or out of step kills the box, which the pool
        then destroys and replaces, so no caller ever gets another request's result.
        """
        if self.dead or self._sock is None:
            raise ConnectionError("sandbox is dead")
        rid = secrets.token_hex(8)
        try:
            self._sock.sendall(json.dumps({**req, "id": rid}).encode() + b"\n")
            reply = json.loads(self._read_line(time.monotonic() + timeout))
            if not isinstance(reply, dict) or reply.get("id") != rid or self._buf:
                got = reply.get("id") if isinstance(reply, dict) else reply
                raise ProtocolError(f"sandbox reply out of step (sent id {rid}, got {got!r}); destroying it")
            return reply
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
        timeout = self.limits.timeout_s if timeout is None else check_timeout(timeout)
        req = {
            "op": "exec", "argv": argv, "python": python, "timeout": timeout, "kill_group": kill_group,
            "max_output": self.limits.max_output_bytes,
            "stdin": _b64(stdin) if stdin else "",
            "files": {p: _b64(d) for p, d in (files or {}).items()},
        }
        return self._exec_request(req, timeout, "exec")

    def check(self, argv: list[str], files: dict[str, str | bytes], timeout: float) -> Result:
        """Run a task's check: every process killed, `files` written fresh, then argv in a clean environment.

        Never raises; a failure (a file that cannot be written fresh, say) is an error Result.
        """
        timeout = check_timeout(timeout)
        req = {"op": "check", "argv": argv, "timeout": timeout, "max_output": self.limits.max_output_bytes,
               "files": {p: _b64(d) for p, d in files.items()}}
        return self._exec_request(req, timeout, "check")

    def _exec_request(self, req: dict, timeout: float, what: str) -> Result:
        t0 = time.monotonic()
        try:
            # The server enforces `timeout`; our own deadline only catches a wedged server.
            rep = self.request(req, timeout=timeout + 10.0)
        except (OSError, TimeoutError, ConnectionError, ValueError) as e:
            return Result.failed(f"sandbox failed during {what}: {e}", time.monotonic() - t0)
        if not rep.get("ok"):
            return Result.failed(f"sandbox refused {what}: {rep.get('error')}", time.monotonic() - t0)
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
        """Restore the state a fresh container starts in (see `SandboxPool`); False if the server
        could not prove it, and then the box must be destroyed."""
        try:
            rep = self.request({"op": "reset"}, timeout=10)
        except (OSError, TimeoutError, ConnectionError, ValueError) as e:
            log.warning("reset of %s failed: %s", self.name, e)
            return False
        if not rep.get("ok"):
            log.warning("reset of %s incomplete (%s); replacing it", self.name, rep.get("error"))
        return bool(rep.get("ok"))

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
