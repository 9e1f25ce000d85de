"""Run the ``tritonserver`` binary shipped in the ``nvidia-pytriton`` wheel on our repository.

The Python backend needs a stub built for the running Python next to ``libtriton_python.so``:
we assemble that backend directory in a temporary folder. The stub finds its packages through
the ``python3`` on ``PATH``, so this interpreter's ``bin/`` goes first on the server's PATH.

    python -m segserve serve [--http-port 8000] [--grpc-port 8001] [--host 127.0.0.1]
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

from segproto import RESTRICTED_ENDPOINTS, TOKEN_HEADER, new_token, token_headers

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_REPOSITORY = REPO_ROOT / "model_repository"
PYTHON_BACKEND_SHM_PREFIX = "triton_python_backend_shm_region"
PR_SET_PDEATHSIG = 1
# Readiness deadline of a start: every model's stubs start together, which takes minutes when
# other work shares a 2-core machine (measured: docs/recovery.md).
START_TIMEOUT_S = 600.0
STUB_TIMEOUT_S = 120
# Set when the launcher chose OMP_WAIT_POLICY: the network stubs then drop it (the name is
# repeated in segserve.backend.onnx_runner, which imports nothing of the launcher's).
NETWORK_STUB_OMP_DEFAULT = "SEGSERVE_NETWORK_OMP_DEFAULT_WAIT"
# The repository the user named, for the pipeline steps (segserve.backend.sliding_window), which
# run on the copy the server loaded (``TritonServer.prepare``).
SOURCE_REPOSITORY_ENV = "SEGSERVE_SOURCE_REPOSITORY"
PORT_FIELDS = ("http_port", "grpc_port", "metrics_port")
# Starts on newly picked ports when one picked port was taken before tritonserver bound it.
PORT_ATTEMPTS = 3
# How long a restart waits for its ports to be let go by the stopped server before refusing.
RESTART_PORT_WAIT_S = 10.0
# How long the old instance of a reloaded model may take to unload before its requests are
# taken as stuck (then the server is restarted). An instance with nothing in flight unloads as
# the new one loads (measured: gone before the load returns); one with requests inside a dead
# stub never unloads. Too short costs only a needless restart.
STUCK_GRACE_S = 5.0
# A server with requests stuck in a dead stub cannot finish Triton's graceful shutdown (it waits
# its whole exit timeout, 30 s): it gets this long after SIGINT, then SIGKILL.
STUCK_STOP_S = 3.0
# Preloaded into tritonserver and the stubs. Each frame moves tens of MB between the pipeline's
# steps; glibc returns such buffers to the OS and faults them in again on every request, tcmalloc
# keeps them (measured: docs/benchmarks.md). "auto" takes tcmalloc when installed.
ALLOCATORS = {"auto": None, "tcmalloc": "tcmalloc_minimal", "jemalloc": "jemalloc", "glibc": None}


class ServerError(RuntimeError):
    """The server could not start, become ready, or stop."""


class ServerExitedError(ServerError):
    """The server exited before it was ready (a model failed to load, a port was taken)."""


class PortInUseError(ServerError):
    """A port the server was told to use is in use by another process."""


class StartCancelledError(ServerError):
    """The start was called off (``TritonServer.start_cancelled`` set) before the server was ready."""


class StuckRequestsError(ServerError):
    """Requests are stuck inside a dead stub: only a restart (a quick one) answers them."""


@dataclasses.dataclass
class ServerConfig:
    """Where and how to run Triton.

    Port 0 picks a free port (read the chosen one from the config after ``start``).
    ``host`` is the bind address of all endpoints: 127.0.0.1 keeps the server local.
    ``restricted_endpoints`` answer only requests with the ``segserve-token`` header equal to
    ``token`` (None: a random token is made at start; read it from the config).
    """

    model_repository: pathlib.Path = DEFAULT_REPOSITORY
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_verbose: int = 0
    python_shm_bytes: int = 64 * 1024 * 1024
    allocator: str = "auto"
    cuda_pool_bytes: int = 2 * 1024**3
    token: str | None = None
    restricted_endpoints: tuple[str, ...] = RESTRICTED_ENDPOINTS
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.allocator not in ALLOCATORS:
            raise ServerError(f"allocator must be one of {', '.join(ALLOCATORS)}, got {self.allocator!r}")


@dataclasses.dataclass(frozen=True)
class TritonDistribution:
    """Paths inside the installed ``nvidia-pytriton`` wheel."""

    server_binary: pathlib.Path
    python_backend: pathlib.Path
    stub: pathlib.Path
    libraries: pathlib.Path

    @classmethod
    def find(cls) -> "TritonDistribution":
        spec = importlib.util.find_spec("pytriton")
        if spec is None or spec.origin is None:
            raise ServerError("nvidia-pytriton is not installed: run `make setup`")
        package = pathlib.Path(spec.origin).parent
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        found = cls(
            server_binary=package / "tritonserver" / "bin" / "tritonserver",
            python_backend=package / "tritonserver" / "backends" / "python",
            stub=package / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub",
            libraries=package.parent / "nvidia_pytriton.libs",
        )
        for path in (found.server_binary, found.python_backend, found.stub):
            if not path.exists():
                raise ServerError(f"{path} is missing from the nvidia-pytriton install (Python {version})")
        return found

    def assemble_backends(self, directory: pathlib.Path) -> pathlib.Path:
        """Copy the Python backend with the stub for this Python into ``directory/python``."""
        backend = directory / "python"
        shutil.copytree(self.python_backend, backend, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(self.stub, backend / "triton_python_backend_stub")
        return directory


def copy_models(destination: pathlib.Path, models: tuple[str, ...],
                source: pathlib.Path = DEFAULT_REPOSITORY) -> pathlib.Path:
    """A model repository at ``destination`` holding only ``models`` of ``source`` (a server that
    loads one pipeline starts, restarts and idles smaller); returns ``destination``."""
    for model in models:
        shutil.copytree(source / model, destination / model, symlinks=True)
    return destination


LOG_ERROR_LINES = 12
LOG_LINE_CHARS = 400
LOG_TAIL_BYTES = 1 << 20  # a long-running server's log since its start can be large


def copy_repository(repository: pathlib.Path, destination: pathlib.Path) -> pathlib.Path:
    """Every model of ``repository`` (``repository_models``) copied into ``destination``,
    symbolic links followed; returns ``destination``."""
    for model in repository_models(repository):
        shutil.copytree(pathlib.Path(repository) / model, destination / model,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return destination


# What Triton 2.51 logs on every start on a machine without a GPU: never why a start failed.
NO_GPU_NOISE = re.compile(r"CudaDriverHelper|CUDA driver version is insufficient|NVML|DCGM")
# Triton's words for a model that failed to load (2.51: "failed to load 'm' version 1: ...",
# "load failed for model 'm': ..."); only used to name the models first in a failed start's hint.
FAILED_MODEL = re.compile(r"(?:failed to load (?:model )?|load failed for model )'([^']+)'")


def log_errors(log_path: pathlib.Path, start: int = 0, fallback: bool = True,
               ignore: re.Pattern | None = None) -> list[str]:
    """The last error lines of a server log from byte ``start`` on (its last MiB at most):
    Triton's own (``E`` then the date, and its last words ``error: ...``) and Python tracebacks'
    last lines, less those ``ignore`` finds; with ``fallback``, the last lines of all when none
    match. Each is cut to ``LOG_LINE_CHARS``."""
    try:
        with open(log_path, "rb") as log:
            log.seek(max(start, log.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            lines = log.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    errors = [line for line in lines if re.match(r"E\d{4} |error: |\w*(Error|Exception)\b", line)
              and not (ignore is not None and ignore.search(line))]
    chosen = (errors or (lines if fallback else []))[-LOG_ERROR_LINES:]
    return [line[:LOG_LINE_CHARS] for line in chosen]


def failed_models(error_lines: list[str]) -> list[str]:
    """Models that error lines say failed to load, in order of first mention."""
    return list(dict.fromkeys(match for line in error_lines for match in FAILED_MODEL.findall(line)))


def address_family(host: str) -> socket.AddressFamily:
    """AF_INET or AF_INET6: the family of ``host`` (a name or an address).

    Raises:
        ServerError: not a host name or address.
    """
    try:
        return socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    except (socket.gaierror, UnicodeError) as error:
        raise ServerError(f"--host {host}: not a host name or address ({error})") from None


def check_bindable_host(host: str) -> None:
    """Refuse a ``host`` the server could not listen on (a mistyped or another machine's
    address was told as "port ... in use by another process").

    Raises:
        ServerError: not a host name or address, or not one of this machine's.
    """
    with socket.socket(address_family(host), socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError as error:
            raise ServerError(f"--host {host}: cannot listen there ({error.strerror}: not an address of this "
                              "machine?); give one of its addresses, 127.0.0.1 (local only) or 0.0.0.0 (all)") from None


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free on ``host`` now (the probes are held open together: picked
    one at a time, the same port can come back twice). Another process may still take one
    before the server binds it: ``TritonServer.start`` then picks again."""
    with contextlib.ExitStack() as probes:
        ports = []
        for _ in range(count):
            probe = probes.enter_context(socket.socket(address_family(host), socket.SOCK_STREAM))
            probe.bind((host, 0))
            ports.append(probe.getsockname()[1])
        return ports


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``port`` now (a closed connection's TIME_WAIT does not
    count: Triton binds with SO_REUSEADDR too)."""
    with socket.socket(address_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def visible_gpu_count() -> int:
    """GPUs this process can use (0 without a driver), asked of nvidia-smi to keep CUDA out of the launcher."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return 0
    count = sum(line.startswith("GPU ") for line in listing.splitlines())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return count if visible is None else min(count, len([v for v in visible.split(",") if v.strip()]))


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the launching process dies."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def python_backend_stubs(root_pid: int) -> dict[int, str]:
    """Python-backend stub processes under process ``root_pid``: pid -> the model.py it runs."""
    import psutil

    stubs = {}
    for child in psutil.Process(root_pid).children(recursive=True):
        try:
            command = child.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if is_stub_command(command):
            stubs[child.pid] = command[1] if len(command) > 1 else "?"
    return stubs


def is_stub_command(command: list[str]) -> bool:
    """Whether a process's command line is a Python-backend stub's."""
    return bool(command) and command[0].endswith("triton_python_backend_stub")


def process_command(pid: int) -> list[str]:
    """Process ``pid``'s command line; empty once it has exited (gone, or a zombie)."""
    try:
        raw = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode("utf-8", "replace").split("\0")[:-1] if raw else []


def token_is_served(token: str) -> bool:
    """Whether a tritonserver running on this machine restricts its endpoints with ``token``
    (its command line carries the rule ``restriction_args`` writes)."""
    rule = f"{TOKEN_HEADER}={token}"
    for path in pathlib.Path("/proc").glob("[0-9]*"):
        command = process_command(int(path.name))
        if command and command[0].endswith("tritonserver") and any(argument.endswith(rule) for argument in command):
            return True
    return False


def _stubs_per_model(stubs: dict[int, str]) -> dict[str, int]:
    """``{pid: model.py path}`` -> stub count per model name."""
    counts: dict[str, int] = {}
    for path in stubs.values():
        model = pathlib.Path(path).parent.parent.name
        counts[model] = counts.get(model, 0) + 1
    return counts


def python_backend_regions() -> set[str]:
    """Names of the Python backend's shared-memory regions in /dev/shm, every server's."""
    shm = pathlib.Path("/dev/shm")
    return {p.name for p in shm.glob(f"{PYTHON_BACKEND_SHM_PREFIX}*")} if shm.is_dir() else set()


def python_backend_region_users() -> dict[str, set[int]]:
    """Region name -> pids of the live processes mapping it (those whose maps this user may
    read: a region of another user's server cannot be removed by this one anyway)."""
    users: dict[str, set[int]] = {}
    marker = f"/dev/shm/{PYTHON_BACKEND_SHM_PREFIX}"
    for maps in pathlib.Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_bytes().decode("utf-8", "replace")
        except OSError:  # gone, or not ours to read
            continue
        for line in text.splitlines():
            if marker in line:
                name = line.split("/dev/shm/", 1)[1].split()[0]
                users.setdefault(name, set()).add(int(maps.parent.name))
    return users


def first_line_of(text: str | None) -> str:
    """A Python traceback's reason as Triton passes it on: its first line (at most LOG_LINE_CHARS)."""
    return (text or "").strip().split("\n", 1)[0][:LOG_LINE_CHARS]


NETWORK_RUNNER = "segserve.backend.onnx_runner"  # what an exported network's model.py imports


def is_network(model_directory: pathlib.Path) -> bool:
    """Whether a model directory holds an exported network, not a pipeline step: its ONNX file,
    or a model.py running one (a network whose ONNX file is missing is a network too)."""
    if (model_directory / "1" / "model.onnx").is_file():
        return True
    try:
        return NETWORK_RUNNER in (model_directory / "1" / "model.py").read_text()
    except (OSError, UnicodeDecodeError):
        return False


def repository_models(repository: pathlib.Path) -> list[str]:
    """The model directories of ``repository``. Hidden ones are not models (an export's staging
    directory, ``.ipynb_checkpoints``), but ``--load-model=*`` would load them and fail the start."""
    if not pathlib.Path(repository).is_dir():
        raise ServerError(f"model repository {repository} is not a directory")
    return sorted(p.name for p in pathlib.Path(repository).iterdir() if p.is_dir() and not p.name.startswith("."))


class TritonServer:
    """A ``tritonserver`` child process: ``start()`` waits for readiness, ``stop()`` shuts down.

    Use as a context manager. Stop sends SIGINT (Triton finishes in-flight requests), waits,
    then kills; after a kill it removes the Python-backend shared-memory regions it left.
    """

    def __init__(self, config: ServerConfig | None = None, log_path: pathlib.Path | None = None,
                 start_cancelled: threading.Event | None = None, drain_cancelled: threading.Event | None = None):
        """``log_path``: file the server's output is appended to; None leaves it on stdout/stderr.
        ``start_cancelled``: once set, a start (or restart) waiting for readiness stops the server
        and raises StartCancelledError (a Ctrl-C while the models load). ``drain_cancelled``:
        once set, a stop's drain ends and the server gets a short grace (a second Ctrl-C)."""
        self.config = config or ServerConfig()
        self.log_path = log_path
        self.start_cancelled = start_cancelled or threading.Event()
        self.drain_cancelled = drain_cancelled or threading.Event()
        self.process: subprocess.Popen | None = None
        self._scratch: tempfile.TemporaryDirectory | None = None
        self._regions_before: set[str] = set()
        self._stubs_at_start: dict[int, str] = {}
        self._log_file = None
        self._log_start = 0  # where this start's output begins in the appended log
        self._loaded: tempfile.TemporaryDirectory | None = None  # the repository as the server loaded it
        self.networks_not_loaded: dict[str, str] = {}  # network -> why, at the last start

    @property
    def http_url(self) -> str:
        return f"{self.config.host}:{self.config.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.config.host}:{self.config.grpc_port}"

    def prepare(self, port_wait_s: float = 0.0) -> None:
        """What a start needs, checked before anything starts (a command can then write its
        token file, knowing the start was not refused): the ports given are free, the log file
        can be written, and the repository is copied.

        The server loads the copy, and reloads from it after a stub died (``reload_models``,
        ``restart``): an export or an edit while it runs changes nothing it serves, where a
        reload used to switch to a network overwritten since the start without a word.

        Raises:
            PortInUseError: a port given is in use.
            ServerError: the host is none of this machine's, the repository is not a directory,
                the log file cannot be written.
        """
        check_bindable_host(self.config.host)
        self.refuse_ports_in_use(wait_s=port_wait_s)
        if self.log_path is not None:
            try:
                open(self.log_path, "ab").close()
            except OSError as error:
                raise ServerError(f"cannot write the log file {self.log_path}: {error.strerror}") from None
        if self._loaded is None:
            repository_models(self.config.model_repository)  # refused before a copy is begun
            self._loaded = tempfile.TemporaryDirectory(prefix="segserve-loaded-")
            copy_repository(self.config.model_repository, pathlib.Path(self._loaded.name))

    @property
    def loaded_repository(self) -> pathlib.Path:
        """The copy of the repository the server runs on (``prepare``)."""
        if self._loaded is None:
            raise ServerError("the server is not prepared: start() it")
        return pathlib.Path(self._loaded.name)

    def command(self, backend_directory: pathlib.Path, server_binary: pathlib.Path) -> list[str]:
        c = self.config
        return [
            str(server_binary),
            f"--model-repository={self.loaded_repository}",
            f"--backend-directory={backend_directory}",
            f"--http-address={c.host}", f"--http-port={c.http_port}",
            f"--grpc-address={c.host}", f"--grpc-port={c.grpc_port}",
            f"--metrics-address={c.host}", f"--metrics-port={c.metrics_port}",
            # explicit (every model loaded at start): a model whose stub died is reloaded alone
            # (``reload_models``); the repository API stays restricted to token holders.
            "--model-control-mode=explicit",
            *(f"--load-model={name}" for name in repository_models(self.loaded_repository)),
            # A network that fails to load is left out and the rest serve (one user's broken
            # export stopped every pipeline); a pipeline that fails fails the start
            # (``_check_models_loaded``). Strict readiness would wait for the left-out one forever.
            "--exit-on-error=false",
            "--strict-readiness=false",
            "--exit-timeout-secs=30",
            f"--log-verbose={c.log_verbose}",
            f"--backend-config=python,shm-default-byte-size={c.python_shm_bytes}",
            f"--backend-config=python,shm-growth-byte-size={c.python_shm_bytes}",
            # A stub's handshake has 30 s by default; with every stub starting at once on a busy
            # 2-core machine that ran out (a crashed start, measured), so allow more.
            f"--backend-config=python,stub-timeout-seconds={STUB_TIMEOUT_S}",
            *self.restriction_args(),
            *self.gpu_args(),
            *c.extra_args,
        ]

    def restriction_args(self) -> list[str]:
        """Triton's flags restricting the sensitive endpoints to token holders (both protocols)."""
        endpoints = ",".join(self.config.restricted_endpoints)
        if not endpoints:
            return []
        rule = f"{endpoints}:{TOKEN_HEADER}={self.config.token}"
        return [f"--grpc-restricted-protocol={rule}", f"--http-restricted-api={rule}"]

    def token_headers(self, protocol: str = "grpc") -> dict[str, str]:
        """Headers a client of ``protocol`` needs for the restricted endpoints of this server."""
        return token_headers(self.config.token, protocol)

    def gpu_args(self) -> list[str]:
        """A CUDA memory pool per GPU large enough for a big frame's logits between steps."""
        return [f"--cuda-memory-pool-byte-size={gpu}:{self.config.cuda_pool_bytes}" for gpu in range(visible_gpu_count())]

    def allocator_library(self) -> str | None:
        """Shared library to preload for the configured allocator, None for glibc's malloc."""
        if self.config.allocator == "glibc":
            return None
        name = ALLOCATORS["tcmalloc" if self.config.allocator == "auto" else self.config.allocator]
        library = ctypes.util.find_library(name)
        if library is None and self.config.allocator != "auto":
            raise ServerError(f"allocator {self.config.allocator} requested but lib{name} is not installed")
        return library

    def environment(self, distribution: TritonDistribution) -> dict[str, str]:
        env = dict(os.environ)
        allocator = self.allocator_library()
        if allocator:
            env["LD_PRELOAD"] = " ".join(filter(None, [allocator, env.get("LD_PRELOAD")]))
        env["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [env.get("LD_LIBRARY_PATH"), str(distribution.libraries)]))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env[SOURCE_REPOSITORY_ENV] = str(pathlib.Path(self.config.model_repository).resolve())
        # The pipeline's steps run in separate stub processes that hand work to each other; an
        # OpenMP thread spinning after its step steals the cores the next step needs. The network
        # models' stubs go back to libgomp's default (segserve.backend.onnx_runner): they run
        # the network alone, and TorchScript's threads sleeping between operators cost it half
        # again. A policy the user set stays everywhere.
        if "OMP_WAIT_POLICY" not in env:
            env["OMP_WAIT_POLICY"] = "PASSIVE"
            env[NETWORK_STUB_OMP_DEFAULT] = "1"
        else:  # the user's policy, everywhere (an inherited marker must not drop it)
            env.pop(NETWORK_STUB_OMP_DEFAULT, None)
        return env

    def start(self, timeout_s: float = START_TIMEOUT_S, port_wait_s: float = 0.0) -> "TritonServer":
        """Start and wait until ready. Ports given as 0 are picked here; when another process
        took one of them before the server bound it, the start is tried again on new ports.

        Raises:
            PortInUseError: a port given (not 0) is in use, checked before anything starts
                (after up to ``port_wait_s`` for it to be let go) and again when the start
                fails.
        """
        try:
            return self._start_on_free_ports(timeout_s, port_wait_s)
        except BaseException:
            self.stop()  # a failed start leaves nothing behind: the repository's copy is removed too
            raise

    def _start_on_free_ports(self, timeout_s: float, port_wait_s: float) -> "TritonServer":
        picked = [field for field in PORT_FIELDS if getattr(self.config, field) == 0]
        given = [field for field in PORT_FIELDS if field not in picked]
        self.prepare(port_wait_s)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            for field, port in zip(picked, free_ports(len(picked), self.config.host)):
                setattr(self.config, field, port)
            try:
                return self._start_once(timeout_s)
            except ServerExitedError:
                self.refuse_ports_in_use(given)
                taken = self._ports_taken(picked)
                if not taken or attempt == PORT_ATTEMPTS:
                    raise
                print(f"segserve: port(s) {', '.join(map(str, taken))} were taken before tritonserver bound them; "
                      "starting again on new ports", file=sys.stderr, flush=True)
        raise AssertionError("unreachable")

    def refuse_ports_in_use(self, fields: list[str] | None = None, wait_s: float = 0.0) -> None:
        """Raise PortInUseError naming the ports of ``fields`` (default: those not 0) in use by
        another process, once they have been for ``wait_s`` (a stopped server's stubs may hold
        them a moment)."""
        if fields is None:
            fields = [field for field in PORT_FIELDS if getattr(self.config, field) != 0]
        deadline = time.monotonic() + wait_s
        while taken := [field for field in fields if not port_is_free(getattr(self.config, field), self.config.host)]:
            if time.monotonic() >= deadline:
                raise PortInUseError(", ".join(f"{field.removesuffix('_port')} port {getattr(self.config, field)}"
                                               for field in taken)
                                     + f" on {self.config.host} in use by another process (another server?); "
                                     "stop it or choose another port (0 picks a free one)")
            time.sleep(0.25)

    def _ports_taken(self, fields: list[str]) -> list[int]:
        """Of the ports in ``fields``, those in use by another process now or named in the
        failed start's error lines (Triton names the socket it could not bind; its other lines
        name every port it did bind, so only error lines count)."""
        errors = "\n".join(log_errors(self.log_path, self._log_start, fallback=False)) if self.log_path else ""
        ports = [getattr(self.config, field) for field in fields]
        return [port for port in ports if re.search(rf":{port}\b", errors) or not port_is_free(port, self.config.host)]

    def _start_once(self, timeout_s: float) -> "TritonServer":
        if self.config.token is None:
            self.config.token = new_token()
        distribution = TritonDistribution.find()
        self._scratch = tempfile.TemporaryDirectory(prefix="segserve-backends-")
        backends = distribution.assemble_backends(pathlib.Path(self._scratch.name))
        self._regions_before = python_backend_regions()
        output = None  # without a log file the server writes to this process's terminal
        if self.log_path is not None:
            self._log_file = open(self.log_path, "ab")
            self._log_start = self._log_file.tell()
            output = self._log_file
        self.process = subprocess.Popen(
            self.command(backends, distribution.server_binary), env=self.environment(distribution),
            stdout=output, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent, start_new_session=True, cwd=REPO_ROOT,
        )
        self.wait_ready(timeout_s)
        self._check_models_loaded()
        self._stubs_at_start = self.stub_processes()
        return self

    def _check_models_loaded(self) -> None:
        """Set ``networks_not_loaded`` to the networks of the repository that failed to load.

        Raises:
            ServerError: a pipeline model failed to load, naming it and why.
        """
        not_ready = self.models_not_ready()
        pipelines = [name for name in not_ready if not is_network(self.loaded_repository / name)]
        if pipelines:
            reasons = "".join(f"\n  {name}: {not_ready[name]}" for name in pipelines)
            raise ServerError(f"tritonserver could not load {', '.join(pipelines)}{self._log_hint(name_failed=False)}{reasons}")
        self.networks_not_loaded = not_ready

    def models_not_ready(self) -> dict[str, str]:
        """``{model: why}`` for the repository's models that are not ready, from Triton's
        repository index (``POST /v2/repository/index``, with the token)."""
        answer = self._repository_post("index", "the model repository index did not answer", 30)
        try:
            index = {entry["name"]: entry for entry in json.loads(answer)}
        except (ValueError, KeyError, TypeError) as error:
            raise ServerError(f"the model repository index did not parse: {error}") from None
        return {name: self._unlocated(first_line_of(index.get(name, {}).get("reason")) or self._log_reason(name))
                for name in repository_models(self.loaded_repository) if index.get(name, {}).get("state") != "READY"}

    def default_networks(self) -> dict[str, str]:
        """``{pipeline: its default_network}`` of the loaded repository's pipeline models."""
        from segserve.network_spec import read_model_config

        defaults = {}
        for name in repository_models(self.loaded_repository):
            try:
                config = read_model_config(self.loaded_repository / name / "config.pbtxt")
            except Exception:  # noqa: BLE001 - no config, or one that does not parse: no default named
                continue
            if "default_network" in config.parameters:
                defaults[name] = config.parameters["default_network"].string_value
        return defaults

    def _log_reason(self, model: str) -> str:
        """This start's first error line naming ``model`` (a config that does not parse is in
        no index, only in the log), else where to look."""
        errors = log_errors(self.log_path, self._log_start, fallback=False) if self.log_path else []
        named = [line for line in errors if f"'{model}'" in line]
        return named[0] if named else "not loaded, see the server log"

    def _unlocated(self, text: str) -> str:
        """``text`` naming the model repository the user gave, not the copy the server loaded."""
        return text.replace(str(self.loaded_repository), str(self.config.model_repository))

    def stub_processes(self) -> dict[int, str]:
        """Python-backend stub processes of this server: pid -> the model.py it runs."""
        if self.process is None or self.process.poll() is not None:
            return {}
        return python_backend_stubs(self.process.pid)

    def health_problem(self) -> str | None:
        """Why the running server can no longer serve every request, or None.

        Triton 2.51's Python backend does not restart a stub that died: the model stays "ready"
        while every request routed to that instance fails ("Stub process ... is not healthy").
        So the launcher counts the stubs it saw at readiness.
        """
        if self.process is None or self.process.poll() is not None:
            return f"tritonserver exited with code {None if self.process is None else self.process.returncode}"
        broken = self.broken_models()
        if broken:
            return f"Python-backend stub(s) of {', '.join(broken)} died"
        return None

    def broken_models(self) -> list[str]:
        """Models with a Python-backend stub that died since the last (re)load."""
        missing = set(self._stubs_at_start) - set(self.stub_processes())
        return sorted(_stubs_per_model({pid: self._stubs_at_start[pid] for pid in missing}))

    def reload_models(self, models: list[str], timeout_s: float = START_TIMEOUT_S) -> None:
        """Unload then load ``models`` through the repository API (new stubs; a load returns once
        the model is loaded or failed). Much faster than a restart: the other models stay loaded. A plain load of
        an unchanged model is a no-op in Triton 2.51 (it keeps the dead instance), hence the
        unload first; meanwhile requests get "no available versions", which clients retry.

        Raises:
            ServerError: a call failed, the server is not ready in time, or the model still
                has fewer stubs than before.
        """
        old_stubs = {pid for pid, path in self._stubs_at_start.items() if _stubs_per_model({pid: path}).keys() & set(models)}
        for model in models:
            self._repository_call(model, "unload", timeout_s)
            self._repository_call(model, "load", timeout_s)
        self.wait_ready(timeout_s, stop_on_timeout=False)
        # Requests that were inside the dead stub never return in Triton 2.51, and the old
        # instance cannot unload under them (seen in tests/test_faults.py): only a restart
        # drops those connections so their clients retry. An old instance that unloads in time
        # had nothing stuck.
        deadline = time.monotonic() + STUCK_GRACE_S
        while old_stubs & set(self.stub_processes()) and time.monotonic() < deadline:
            time.sleep(0.5)
        if old_stubs & set(self.stub_processes()):
            raise StuckRequestsError(f"requests are stuck in the dead instance of {', '.join(models)}")
        current = self.stub_processes()
        expected = _stubs_per_model(self._stubs_at_start)
        short = [m for m in models if _stubs_per_model(current).get(m, 0) < expected.get(m, 0)]
        if short:  # Triton kept the old instances: the dead stub is still in service
            raise ServerError(f"reloading {', '.join(short)} did not replace the dead stub(s)")
        self._stubs_at_start = current

    def _repository_call(self, model: str, action: str, timeout_s: float) -> None:
        """``POST /v2/repository/models/<model>/<action>`` (load, unload) with the token."""
        self._repository_post(f"models/{model}/{action}", f"{action} of {model} failed", timeout_s)

    def _repository_post(self, path: str, failure: str, timeout_s: float) -> bytes:
        """The answer to ``POST /v2/repository/<path>`` with the token.

        Raises:
            ServerError: ``failure``, with the reason, when the call fails.
        """
        headers = {"Content-Type": "application/json", **token_headers(self.config.token, "http")}
        request = urllib.request.Request(f"http://{self.http_url}/v2/repository/{path}", data=b"{}", headers=headers,
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            raise ServerError(f"{failure}: {error}") from None

    def restart(self, timeout_s: float = START_TIMEOUT_S, stop_timeout_s: float = 40.0) -> "TritonServer":
        """Stop (killing what has not stopped after ``stop_timeout_s``) and start again on the
        same ports and token."""
        self._stop_process(stop_timeout_s)
        self.process = None
        if self.start_cancelled.is_set():  # asked to stop while the old one stopped: no new one
            raise StartCancelledError("stopped before it was restarted")
        return self.start(timeout_s, port_wait_s=RESTART_PORT_WAIT_S)

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def wait_ready(self, timeout_s: float, stop_on_timeout: bool = True) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.start_cancelled.is_set():
                if not stop_on_timeout:  # a reload: the server serves meanwhile, and the stop drains it
                    return
                self._stop_process(STUCK_STOP_S)
                raise StartCancelledError("stopped before it was ready")
            if self.process.poll() is not None:
                error = ServerExitedError(f"tritonserver exited with code {self.process.returncode} before ready{self._log_hint()}")
                self._cleanup()
                raise error
            if self.is_ready() and self._listens_on_http_port():
                return
            time.sleep(0.25)
        hint = self._log_hint()  # before the stop removes the copy its lines are told apart from
        if stop_on_timeout:
            self.stop()
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s{hint}")

    def _listens_on_http_port(self) -> bool:
        """Whether this server's process holds the HTTP port. Another server on that port
        answers readiness too, while this one loads its models and then fails to bind."""
        import psutil
        try:
            sockets = psutil.Process(self.process.pid).net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            return False
        except psutil.AccessDenied:  # cannot tell: readiness alone decides, as before
            return True
        return any(s.status == psutil.CONN_LISTEN and s.laddr.port == self.config.http_port for s in sockets)

    def _log_hint(self, name_failed: bool = True) -> str:
        """Where to read why the server failed, with this start's error lines when in a log file
        (CI shows the exception, not the log); with ``name_failed``, the models they say failed."""
        if self.log_path is None:
            return "; see the server output above"
        errors = [self._unlocated(line) for line in
                  log_errors(self.log_path, self._log_start, ignore=NO_GPU_NOISE if visible_gpu_count() == 0 else None)]
        failed = failed_models(errors) if name_failed else []
        named = f"; failed to load: {', '.join(failed)}" if failed else ""
        return f"{named}; see {self.log_path}" + "".join(f"\n  {line}" for line in errors)

    def activity(self) -> tuple[int, ...] | None:
        """Execution counts of every model (they move while any request is in the pipeline),
        or None when the server does not answer."""
        try:
            url = f"http://{self.http_url}/v2/models/stats"
            with urllib.request.urlopen(url, timeout=2) as response:
                stats = json.load(response)["model_stats"]
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError, KeyError):
            return None
        return tuple(int(model.get("execution_count", 0)) for model in stats)

    def drain(self, timeout_s: float = 60.0, quiet_s: float = 3.0) -> bool:
        """Wait until no model has executed anything for ``quiet_s`` (at most ``timeout_s``).

        Triton's own shutdown refuses new inference requests at once, and that includes the BLS
        calls an in-flight frame's sliding window still has to make: without a drain, SIGINT
        fails every frame in the pipeline. A frame keeps some model executing every few hundred
        ms, so a quiet window of seconds means nothing is in flight. Returns True when quiet.
        """
        deadline = time.monotonic() + timeout_s
        last, quiet_since = self.activity(), time.monotonic()
        while time.monotonic() < deadline:
            if self.drain_cancelled.wait(0.25):
                return False
            current = self.activity()
            if current is None:
                return True  # not answering: nothing to wait for
            if current != last:
                last, quiet_since = current, time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                return True
        return False

    def stop(self, timeout_s: float = 40.0, drain_s: float = 0.0) -> int | None:
        """Optionally drain (up to ``drain_s``), then SIGINT, wait up to ``timeout_s``, then
        SIGKILL; the loaded copy of the repository is removed. Returns the exit code."""
        code = self._stop_process(timeout_s, drain_s)
        if self._loaded is not None:
            self._loaded.cleanup()
            self._loaded = None
        return code

    def _stop_process(self, timeout_s: float = 40.0, drain_s: float = 0.0) -> int | None:
        if self.process is None:
            return None
        killed = False
        if drain_s > 0 and self.process.poll() is None:
            self.drain(drain_s)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self._wait_for_exit(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
                killed = True
        self._cleanup(remove_regions=killed or self.process.returncode != 0)
        return self.process.returncode

    def _wait_for_exit(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the process to exit, cut to ``STUCK_STOP_S`` once
        ``drain_cancelled`` is set (Triton's own shutdown waits for requests in flight).

        Raises:
            subprocess.TimeoutExpired: it has not exited by then.
        """
        deadline, hurried = time.monotonic() + timeout_s, False
        while self.process.poll() is None:
            if not hurried and self.drain_cancelled.is_set():
                deadline, hurried = min(deadline, time.monotonic() + STUCK_STOP_S), True
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.process.args, timeout_s)
            time.sleep(0.1)

    def _cleanup(self, remove_regions: bool = True) -> None:
        if remove_regions:
            for name in self._regions_left():
                with contextlib.suppress(OSError):  # another user's (sticky /dev/shm), or gone
                    pathlib.Path("/dev/shm", name).unlink(missing_ok=True)
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _regions_left(self) -> set[str]:
        """Python-backend regions this server left: made since it started, and mapped by no
        live process but its own (stubs still dying). Other servers on this machine keep theirs."""
        users = python_backend_region_users()
        server = self.process.pid if self.process is not None else None

        def ours(pid: int) -> bool:
            """This server, one of its stubs (argument 5 of a stub's command line is its parent's
            pid, r24.10 ``stub_launcher.cc``; a stub outlives a killed server for a moment), or
            a process that has exited since its maps were read."""
            if pid == server:
                return True
            command = process_command(pid)
            return not command or (is_stub_command(command) and len(command) > 5 and command[5] == str(server))

        return {name for name in python_backend_regions() - self._regions_before
                if all(ours(pid) for pid in users.get(name, ()))}

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc_info) -> None:
        self.stop()
