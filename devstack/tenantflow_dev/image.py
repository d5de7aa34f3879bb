"""The worker image, built here with podman from the unchanged `Dockerfile` (`make image`).

No registry is reachable from these machines, so the `PYTHON_IMAGE` the Dockerfile starts
from (`python:3.11-slim-bookworm`) is made locally, in three cached steps:

1. **base**: `debootstrap --variant=minbase bookworm` from Debian's mirror, kept as a
   tarball in the cache folder and imported once as `localhost/tenantflow-base:bookworm`;
2. **python layer**: on it, Debian's `python3.11`, `python3-pip`, `python3-venv` and
   `ca-certificates`, trusting this host's CA bundle too (`/usr/local/share/ca-certificates`:
   the machine's egress presents its own CA, and pip and uv in the Dockerfile's steps must
   reach PyPI through it), tagged with the name the Dockerfile's `PYTHON_IMAGE` default
   names. It behaves as the official image does for the Dockerfile: `python3.11`, `pip`
   (installing outside Debian's packages, as the official image's does) and `groupadd`;
3. **worker**: `podman build --pull=never` of the Dockerfile as it is, tagged
   `tenantflow-worker:latest` and `tenantflow-worker:<content>`, the content being a digest
   of the Dockerfile, the files it copies and the python layer.

Each step is skipped when its result is cached (the base image or its tarball; the python
layer by a digest of its recipe and the host's CAs; the worker by its content tag), so a
second `make image` with nothing changed takes seconds. One build at a time per cache
folder (a lock file): the two test streams may ask at once.

The python layer's CA trust and `SSL_CERT_FILE` are properties of this local base, never of
the Dockerfile: users build the same Dockerfile with Docker against the official image.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tenantflow_dev.errors import StackError
from tenantflow_dev.podman import IMAGE, Podman, require_tools

__all__ = [
    "BASE_IMAGE",
    "DEBIAN_MIRROR",
    "DEBIAN_SUITE",
    "PYTHON_PACKAGES",
    "BuiltImage",
    "build_image",
    "copied_paths",
    "python_image_name",
]

log = logging.getLogger("tenantflow_dev")

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
BASE_IMAGE = f"localhost/tenantflow-base:{DEBIAN_SUITE}"
PYTHON_LAYER = "localhost/tenantflow-python"
PYTHON_PACKAGES = ("python3.11", "python3-pip", "python3-venv", "ca-certificates")
#: The host's own CAs (Debian's place for local ones), trusted by the python layer too.
HOST_CA_FOLDER = Path("/usr/local/share/ca-certificates")
#: Never part of an image's content (what `.dockerignore` keeps out of the context).
#: podman build's step lines (`STEP 2/5: ...`, `[1/2] STEP 2/10: ...` in a multi-stage build).
_STEP = re.compile(r"^(\[\d+/\d+\] )?STEP \d+/\d+: ")
_NOT_CONTENT = re.compile(r"(^|/)(__pycache__|[^/]+\.pyc|[^/]+\.egg-info)(/|$)")

_PYTHON_LAYER_RECIPE = f"""\
FROM {BASE_IMAGE}
COPY ca/ /usr/local/share/ca-certificates/
# NOTE: the suite's updates and security fixes, as the official image has them; the
# EXTERNALLY-MANAGED marker goes so that pip installs as the official image's pip does (the
# Dockerfile's `pip install uv`); `python` as the official image names it.
RUN printf '%s\\n' \\
        'deb {DEBIAN_MIRROR} {DEBIAN_SUITE} main' \\
        'deb {DEBIAN_MIRROR} {DEBIAN_SUITE}-updates main' \\
        'deb {DEBIAN_SECURITY_MIRROR} {DEBIAN_SUITE}-security main' \\
        > /etc/apt/sources.list \\
    && apt-get update -qq \\
    && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \\
        {" ".join(PYTHON_PACKAGES)} \\
    && update-ca-certificates \\
    && rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED \\
    && ln -sf python3 /usr/bin/python \\
    && apt-get clean && rm -rf /var/lib/apt/lists/*
ENV LANG=C.UTF-8 \\
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
"""


@dataclass
class BuiltImage:
    """What `build_image` made or found."""

    reference: str
    #: `tenantflow-worker:<digest of what went in>`.
    content_tag: str
    image_id: str
    size_bytes: int
    #: The steps that ran (`base`, `python layer`, `worker`); none when everything was cached.
    built: list[str] = field(default_factory=list)
    seconds: float = 0.0


def python_image_name(dockerfile: Path) -> str:
    """The default of the Dockerfile's `ARG PYTHON_IMAGE`: the name the build starts from."""
    for line in dockerfile.read_text().splitlines():
        found = re.match(r"^\s*ARG\s+PYTHON_IMAGE=(\S+)\s*$", line)
        if found:
            return found.group(1)
    raise StackError(f"{dockerfile} declares no `ARG PYTHON_IMAGE=<image>` default")


def copied_paths(dockerfile: Path) -> list[str]:
    """The build-context paths the Dockerfile's `COPY` steps take (not `COPY --from`)."""
    paths: list[str] = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if len(words) < 3 or words[0].upper() != "COPY":
            continue
        sources = [word for word in words[1:-1] if not word.startswith("--")]
        if any(word.startswith("--from") for word in words):
            continue
        paths += [source.rstrip("/") for source in sources]
    return paths


def _content_digest(project: Path, dockerfile: Path, python_layer_id: str) -> str:
    digest = hashlib.sha256(python_layer_id.encode())
    inputs = [dockerfile, project / ".dockerignore"]
    for source in copied_paths(dockerfile):
        path = project / source
        inputs += sorted(path.rglob("*")) if path.is_dir() else [path]
    for path in inputs:
        relative = path.relative_to(project).as_posix()
        if not path.is_file() or _NOT_CONTENT.search(relative):
            continue
        digest.update(relative.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


@contextlib.contextmanager
def _build_lock(podman: Podman) -> Iterator[None]:
    lock = podman.cache / "image.lock"
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _Builder:
    def __init__(self, podman: Podman, project: Path, *, verbose: bool) -> None:
        self.podman = podman
        self.project = project
        self.dockerfile = project / "Dockerfile"
        self.verbose = verbose
        self.logs = podman.cache / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.built: list[str] = []

    def say(self, message: str, *args: object) -> None:
        if self.verbose:
            log.info(message, *args)

    def stream(self, step: str, command: list[str], *, env: dict[str, str] | None = None) -> None:
        """Run `command`, its output to `logs/<step>.log` (podman's STEP lines shown when
        verbose); StackError naming the step and the log's last line when it fails."""
        log_file = self.logs / f"{step.replace(' ', '-')}.log"
        with log_file.open("w") as out:
            process = subprocess.Popen(  # noqa: S603 (our own tools and arguments)
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env or self.podman.environment(),
                cwd=self.project,
            )
            assert process.stdout is not None  # noqa: S101 (PIPE above)
            last = ""
            for line in process.stdout:
                out.write(line)
                if line.strip():
                    last = line.strip()
                if _STEP.match(line):
                    self.say("  %s", line.rstrip()[:120])
            code = process.wait()
        if code != 0:
            raise StackError(f"{step} failed (exit {code}): {last[:300]}; the log: {log_file}")

    def base(self) -> str:
        """The debootstrapped base, imported from its cached tarball (made when missing)."""
        if self.podman.image_id(BASE_IMAGE):
            self.say("base: %s (cached)", BASE_IMAGE)
            return BASE_IMAGE
        tarball = self.podman.cache / "base" / f"debian-{DEBIAN_SUITE}-minbase.tar"
        if not tarball.exists():
            self.debootstrap(tarball)
        started = time.monotonic()
        self.podman.run("import", str(tarball), BASE_IMAGE, timeout=600)
        self.built.append("base")
        self.say("base: %s imported in %.1fs", BASE_IMAGE, time.monotonic() - started)
        return BASE_IMAGE

    def debootstrap(self, tarball: Path) -> None:
        require_tools("debootstrap")
        started = time.monotonic()
        tarball.parent.mkdir(parents=True, exist_ok=True)
        # NOTE: debootstrap makes devices and chowns as root; without root it runs in
        # podman's user namespace (`podman unshare`), where it is root.
        unshare = [] if os.geteuid() == 0 else self.podman.argv("unshare")
        with tempfile.TemporaryDirectory(dir=tarball.parent, prefix="debootstrap-") as folder:
            root = Path(folder) / "root"
            self.say("base: debootstrap --variant=minbase %s ...", DEBIAN_SUITE)
            self.stream(
                "debootstrap",
                [
                    *unshare,
                    "debootstrap",
                    "--variant=minbase",
                    DEBIAN_SUITE,
                    str(root),
                    DEBIAN_MIRROR,
                ],
            )
            partial = tarball.with_suffix(".partial")
            self.stream(
                "base tarball",
                [
                    *unshare,
                    "tar",
                    "--numeric-owner",
                    "--exclude=./var/cache/apt/archives/*.deb",
                    "--exclude=./var/lib/apt/lists/*",
                    "-C",
                    str(root),
                    "-cf",
                    str(partial),
                    ".",
                ],
            )
            partial.replace(tarball)
            if unshare:
                self.stream("base cleanup", [*unshare, "rm", "-rf", str(root)])
        self.say("base: debootstrapped in %.1fs (%s)", time.monotonic() - started, tarball)

    def python_layer(self, base: str) -> str:
        """Debian's Python on the base, tagged as the Dockerfile's PYTHON_IMAGE."""
        name = python_image_name(self.dockerfile)
        certificates = sorted(HOST_CA_FOLDER.glob("*.crt")) if HOST_CA_FOLDER.is_dir() else []
        digest = hashlib.sha256(_PYTHON_LAYER_RECIPE.encode())
        digest.update((self.podman.image_id(base) or "").encode())
        for certificate in certificates:
            digest.update(certificate.name.encode() + b"\0" + certificate.read_bytes())
        layer = f"{PYTHON_LAYER}:{digest.hexdigest()[:12]}"
        if self.podman.image_id(layer):
            self.say("python layer: %s (cached)", layer)
        else:
            started = time.monotonic()
            with tempfile.TemporaryDirectory(prefix="tenantflow-python-") as folder:
                context = Path(folder)
                (context / "ca").mkdir()
                for certificate in certificates:
                    shutil.copyfile(certificate, context / "ca" / certificate.name)
                (context / "Containerfile").write_text(_PYTHON_LAYER_RECIPE)
                self.stream(
                    "python layer",
                    self.podman.argv(
                        "build", "--pull=never", "--layers=false", "-t", layer, str(context)
                    ),
                )
            self.built.append("python layer")
            self.say("python layer: %s built in %.1fs", layer, time.monotonic() - started)
        self.podman.run("tag", layer, name)
        return layer

    def worker(self, python_layer: str) -> BuiltImage:
        """`podman build --pull=never` of the Dockerfile, unless its content tag exists."""
        content = _content_digest(
            self.project, self.dockerfile, self.podman.image_id(python_layer) or ""
        )
        repository = IMAGE.partition(":")[0]
        content_tag = f"{repository}:{content}"
        if self.podman.image_id(content_tag):
            self.say("worker: %s (cached)", content_tag)
        else:
            started = time.monotonic()
            self.stream(
                "worker image",
                self.podman.argv(
                    "build",
                    "--pull=never",
                    "--layers",
                    "-f",
                    str(self.dockerfile),
                    "-t",
                    content_tag,
                    str(self.project),
                ),
            )
            self.built.append("worker")
            self.say("worker: %s built in %.1fs", content_tag, time.monotonic() - started)
        self.podman.run("tag", content_tag, IMAGE)
        image_id = self.podman.image_id(IMAGE) or ""
        size = self.podman.run("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout
        return BuiltImage(
            reference=IMAGE,
            content_tag=content_tag,
            image_id=image_id,
            size_bytes=int(size.strip() or 0),
            built=self.built,
        )


def build_image(
    project_dir: Path, *, podman: Podman | None = None, verbose: bool = False
) -> BuiltImage:
    """Build (or find cached) the worker image of the project in `project_dir`.

    Args:
        project_dir: the checkout (its Dockerfile and build context).
        podman: the podman to build with (default: the dev stack's, `Podman.from_env()`);
            a throwaway one (`Podman.from_env(cache=...)`) builds cold.
        verbose: log each step (`tenantflow-dev image`), not only failures.

    Raises:
        StackError: podman, runc or (for a missing base) debootstrap not installed; a step
            failed (its log file named).
    """
    podman = podman or Podman.from_env()
    started = time.monotonic()
    with _build_lock(podman):
        builder = _Builder(podman, project_dir.resolve(), verbose=verbose)
        built = builder.worker(builder.python_layer(builder.base()))
    built.seconds = time.monotonic() - started
    return built
