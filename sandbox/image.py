"""Build the default sandbox image offline: debootstrap a minimal Debian, then `docker import` it.

No image registry is reachable from our machines, so the image is made from Debian's own
package mirror (the one apt on this machine already uses) and imported as a local tag.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "opd-sandbox:bookworm"
SUITE = "bookworm"
# Debian's documented redirector; used only when apt's own configuration names no mirror.
FALLBACK_MIRROR = "http://deb.debian.org/debian"


def apt_mirror(etc_apt: Path = Path("/etc/apt")) -> str:
    """The Debian mirror apt already uses here (deb822 `.sources` or one-line `.list` files).

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); (d / "sources.list.d").mkdir()
    >>> _ = (d / "sources.list.d" / "debian.sources").write_text(
    ...     "Types: deb\\nURIs: http://mirror.example/debian\\nSuites: bookworm\\n"
    ...     "\\nTypes: deb\\nURIs: http://mirror.example/debian-security\\nSuites: bookworm-security\\n")
    >>> apt_mirror(d)
    'http://mirror.example/debian'
    """
    files = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*"))]
    for f in files:
        if not f.is_file() or not (f.suffix in (".list", ".sources") or f.name == "sources.list"):
            continue
        text = f.read_text(errors="replace")
        uris = re.findall(r"^URIs:\s*(\S+)", text, re.M)  # deb822
        uris += re.findall(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", text, re.M)  # one-line
        for uri in uris:
            if uri.rstrip("/").endswith("/debian"):
                return uri.rstrip("/")
    return FALLBACK_MIRROR


def image_exists(tag: str) -> bool:
    """True when the local Docker daemon already has `tag`."""
    out = subprocess.run(["docker", "image", "inspect", tag], capture_output=True)
    return out.returncode == 0


def build_image(tag: str = DEFAULT_IMAGE, mirror: str | None = None, force: bool = False) -> str:
    """Build `tag` from debootstrap (minbase + python3) unless it already exists; returns the tag.

    Needs root (debootstrap chroots) and the `debootstrap` and `docker` commands.
    """
    if not force and image_exists(tag):
        log.info("image %s exists; skipping build (use --force to rebuild)", tag)
        return tag
    for tool in ("debootstrap", "docker"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"`{tool}` not found: run `bash .ci/docker.sh` (apt-get install docker.io debootstrap)")
    mirror = mirror or apt_mirror()
    with tempfile.TemporaryDirectory(prefix="opd-sandbox-rootfs-") as tmp:
        root = Path(tmp) / "rootfs"
        log.info("debootstrap %s from %s into %s", SUITE, mirror, root)
        subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3", SUITE, str(root), mirror],
            check=True, stdout=subprocess.DEVNULL,
        )
        # Shrink: package caches and docs are never used inside a sandbox.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man"):
            shutil.rmtree(root / junk, ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            ["docker", "import", "--change", 'CMD ["python3"]', "-", tag],
            stdin=tar.stdout, check=True, stdout=subprocess.DEVNULL,
        )
        tar.stdout.close()
        if tar.wait() != 0:
            raise RuntimeError("tar of the debootstrap root failed")
    log.info("built image %s", tag)
    return tag


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.INFO)
    build_image(force=bool(os.environ.get("FORCE")))
