"""Shared-memory regions of the client: system (``/dev/shm``) and CUDA (device memory by IPC).

Region names carry the owning process id (``segclient_<pid>_<set>_<tensor>_<generation>``, the
set numbered across all clients of the process) so a
later client can tell the regions of a crashed run from those of a live one: regions whose owner
is gone are unregistered from the server and unlinked from ``/dev/shm`` when a shared-memory
client starts (``remove_stale_regions``).
"""

from __future__ import annotations

import itertools
import os
import pathlib
import re
import time
import warnings

import numpy as np
import tritonclient.utils.shared_memory as system_shm

from client.connection import Connection, SegmentationError

REGION_PREFIX = "segclient"
REGION_NAME = re.compile(rf"^{REGION_PREFIX}_(\d+)_")
DEV_SHM = pathlib.Path("/dev/shm")
SHM_KINDS = {"shm": "system", "cuda-shm": "cuda"}
# Regions grow in steps of this size so frames of slightly different sizes reuse them.
GROWTH_STEP = 1 << 20
# How long close() waits for the server to let go of regions an abandoned request still uses.
CLOSE_GRACE_S = 30.0


def owner_pid(name: str) -> int | None:
    """The process id in one of our region names; None for anybody else's region."""
    match = REGION_NAME.match(name.lstrip("/"))
    return int(match.group(1)) if match else None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def is_stale(name: str) -> bool:
    pid = owner_pid(name)
    return pid is not None and pid != os.getpid() and not process_alive(pid)


def remove_stale_regions(connection: Connection, kind: str, grace_s: float = CLOSE_GRACE_S) -> list[str]:
    """Unregister ``kind`` (``system``/``cuda``) regions left by dead clients, unlink their
    ``/dev/shm`` files, and return the names removed.

    A region the dead client's last request still uses in the server ("in use": the client was
    killed with frames in flight) is retried for up to ``grace_s`` seconds, then left
    registered for a later client, with a warning: a new run never fails on it."""
    removed = []
    in_use = []
    for region in connection.shared_memory_status(kind):
        name = region.get("name", "")
        if is_stale(name):
            (removed if _unregistered(connection, kind, name) else in_use).append(name)
    deadline = time.monotonic() + grace_s
    while in_use and time.monotonic() < deadline:
        time.sleep(0.2)
        done = [name for name in in_use if _unregistered(connection, kind, name)]
        removed += done
        in_use = [name for name in in_use if name not in done]
    if in_use:
        warnings.warn(f"shared-memory regions of a dead client still in use by the server after {grace_s:.0f} s, "
                      f"left registered: {', '.join(sorted(in_use))}", stacklevel=2)
    if kind == "system" and DEV_SHM.is_dir():
        for path in DEV_SHM.glob(f"{REGION_PREFIX}_*"):
            if is_stale(path.name):
                path.unlink(missing_ok=True)
                removed.append(path.name)
    return sorted(set(removed))


def _unregistered(connection: Connection, kind: str, name: str) -> bool:
    """Unregister ``name``; False while a request in the server still uses it."""
    try:
        connection.call(f"unregister_{kind}_shared_memory", name)
    except SegmentationError as error:
        if "in use" in str(error):
            return False
        raise
    return True


def rounded_size(nbytes: int) -> int:
    return max(GROWTH_STEP, -(-nbytes // GROWTH_STEP) * GROWTH_STEP)


class SystemRegion:
    """A ``/dev/shm`` region of ``nbytes`` registered with the server under ``name``."""

    def __init__(self, name: str, nbytes: int, device_id: int = 0):
        self.name, self.nbytes = name, nbytes
        self.handle = system_shm.create_shared_memory_region(name, f"/{name}", nbytes, create_only=True)

    def register(self, connection: Connection) -> None:
        connection.call("register_system_shared_memory", self.name, f"/{self.name}", self.nbytes)

    def write(self, array) -> None:
        system_shm.set_shared_memory_region(self.handle, [np.ascontiguousarray(array)])

    def read(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        # A copy: the region is reused by the next frame.
        return np.array(system_shm.get_contents_as_numpy(self.handle, dtype, shape), copy=True)

    def destroy(self) -> None:
        system_shm.destroy_shared_memory_region(self.handle)


class CudaRegion:
    """Device memory of ``nbytes`` on GPU ``device_id``, shared with the server by CUDA IPC."""

    def __init__(self, name: str, nbytes: int, device_id: int = 0):
        cuda_shm = import_cuda_shared_memory()
        self.name, self.nbytes, self.device_id = name, nbytes, device_id
        try:
            self.handle = cuda_shm.create_shared_memory_region(name, nbytes, device_id)
        except cuda_shm.CudaSharedMemoryException as error:
            raise SegmentationError(f"cannot allocate CUDA shared memory on GPU {device_id}: {error} "
                                    f"({error.__cause__ or 'no details'})") from None

    def register(self, connection: Connection) -> None:
        cuda_shm = import_cuda_shared_memory()
        connection.call("register_cuda_shared_memory", self.name, cuda_shm.get_raw_handle(self.handle),
                        self.device_id, self.nbytes)

    def write(self, array) -> None:
        """Copy a numpy array, or a torch/CuPy tensor on any device (DLPack, no host copy)."""
        cuda_shm = import_cuda_shared_memory()
        if isinstance(array, np.ndarray):
            cuda_shm.set_shared_memory_region(self.handle, [np.ascontiguousarray(array)])
        else:
            cuda_shm.set_shared_memory_region_from_dlpack(self.handle, [array])

    def read(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        return import_cuda_shared_memory().get_contents_as_numpy(self.handle, dtype, shape)

    def destroy(self) -> None:
        import_cuda_shared_memory().destroy_shared_memory_region(self.handle)


def import_cuda_shared_memory():
    """tritonclient's CUDA shared-memory module, or a SegmentationError saying what is missing."""
    try:
        import tritonclient.utils.cuda_shared_memory as cuda_shm
    except (ImportError, RuntimeError) as error:
        raise SegmentationError(f"CUDA shared memory needs the cuda-python package and a GPU: {error}") from None
    return cuda_shm


def cuda_problem(device_id: int = 0) -> str | None:
    """Why CUDA shared memory cannot be allocated on GPU ``device_id`` here (no driver, no
    device, no cuda-python), in one line; None when it can."""
    try:
        cuda_shm = import_cuda_shared_memory()
        cuda_shm.destroy_shared_memory_region(cuda_shm.create_shared_memory_region("segclient_probe", 64, device_id))
    except Exception as error:  # no driver, no device, no cuda-python: all mean "no"
        cause = error.__cause__
        if isinstance(getattr(cause, "args", None), tuple) and cause.args and isinstance(cause.args[0], bytes):
            cause = cause.args[0].decode(errors="replace")  # tritonclient's CUDA errors carry bytes
        return f"{error}: {cause}" if cause else str(error)
    return None


def cuda_available(device_id: int = 0) -> bool:
    """True when CUDA shared memory can be allocated here (a GPU and cuda-python)."""
    return cuda_problem(device_id) is None


def check_cuda(device_id: int = 0) -> None:
    """Refuse CUDA shared memory where it cannot be allocated: a SegmentationError in one line,
    saying why and what to use instead (asked once, before any connection; frame by frame
    each request failed with the driver's words)."""
    problem = cuda_problem(device_id)
    if problem is not None:
        raise SegmentationError(f"CUDA shared memory needs a GPU, and GPU {device_id} cannot be used here ({problem}); "
                                "use system shared memory instead: transport='shm' (--transport shm)")


REGION_CLASSES = {"system": SystemRegion, "cuda": CudaRegion}
_REGION_SET_IDS = itertools.count()


class RegionSet:
    """The regions of one in-flight slot, one per tensor, created on first use and grown when a
    frame needs more.

    After a failed call the regions are retired, not reused: a request the client gave up on
    (deadline passed) may still be running and write its outputs later, and a restarted server
    no longer knows them. Fresh regions are made for the next frame.

    Args:
        connection: the slot's connection (registration goes through it).
        kind: ``system`` or ``cuda``.
        device_id: GPU of CUDA regions.
    """

    def __init__(self, connection: Connection, kind: str, device_id: int = 0):
        self.connection, self.kind, self.device_id = connection, kind, device_id
        self.set_id = next(_REGION_SET_IDS)  # unique in this process, across clients
        self.regions: dict[str, SystemRegion | CudaRegion] = {}
        self.created = 0  # regions created over the set's life (reuse keeps this small)
        self._generation = 0
        self._still_registered: set[str] = set()  # retired regions an abandoned request still uses

    def region(self, tensor: str, nbytes: int):
        """The region for ``tensor`` with at least ``nbytes``, registered with the server."""
        if self._still_registered:
            self._unregister_pending()
        region = self.regions.get(tensor)
        if region is not None and region.nbytes >= nbytes:
            return region
        if region is not None:
            self._release(tensor)
        self._generation += 1
        name = f"{REGION_PREFIX}_{os.getpid()}_{self.set_id}_{tensor.lower()}_{self._generation}"
        region = REGION_CLASSES[self.kind](name, rounded_size(nbytes), self.device_id)
        self.created += 1
        try:
            region.register(self.connection)
        except SegmentationError:
            region.destroy()
            raise
        self.regions[tensor] = region
        return region

    def retire(self) -> None:
        """Drop every region after a failed call; the next frame gets fresh ones."""
        for tensor in list(self.regions):
            self._release(tensor)

    def _unregister(self, name: str) -> None:
        try:
            if not _unregistered(self.connection, self.kind, name):  # an abandoned request still runs on it
                self._still_registered.add(name)
                return
        except SegmentationError:
            pass  # the server is gone or has forgotten it (restart): nothing left to undo
        self._still_registered.discard(name)

    def _unregister_pending(self) -> None:
        for name in list(self._still_registered):
            self._unregister(name)

    def _release(self, tensor: str) -> None:
        region = self.regions.pop(tensor)
        self._unregister(region.name)
        region.destroy()  # the server keeps its own mapping while a request still uses it

    def close(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Unregister every region from the server and free it (unlink ``/dev/shm``). Regions
        an abandoned request still uses are retried for up to ``grace_s`` seconds; past that
        they are left to the next client's stale-region cleanup."""
        self.retire()
        deadline = time.monotonic() + grace_s
        while self._still_registered and time.monotonic() < deadline:
            time.sleep(0.2)
            self._unregister_pending()
        if self._still_registered:
            warnings.warn(f"shared-memory regions still in use by the server after {grace_s:.0f} s, left registered: "
                          f"{', '.join(sorted(self._still_registered))}", stacklevel=2)
