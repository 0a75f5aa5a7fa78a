"""Per-stage wall time, peak memory and throughput of one synthesis run.

Why it is built this way:

* Stage edges are the only places that synchronise the device. A CUDA kernel launch returns
  before the work is done, so a stage measured without ``torch.cuda.synchronize()`` at both
  edges would charge its work to whichever later stage happens to block. Synchronising *inside*
  a stage (e.g. per decoded token) would itself slow the engine down, so :class:`StageTimer`
  never does; the decode loop stays free of host syncs and only its end is awaited.
* Peak memory means different things per device, and the record says which one was taken:
  on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors only,
  exact); on CPU there is no allocator counter, so a daemon thread samples the process's
  resident set size (psutil, every ``interval_s``) and keeps the maximum. Sampling can miss a
  spike shorter than the interval; it is a light, honest estimate of "how much RAM did this
  run need", not an exact figure, and it includes the weights already resident.
* A run's own working memory is ``peak_bytes - start_bytes``. On CPU that difference is only
  honest if memory freed by earlier work is not sitting in the C allocator's free lists at the
  start: a later run would reuse it without the RSS growing, and a first run would pay for
  one-time pools that later runs find ready (measured: the same tiny-model run showed 31 MiB
  of working memory first in a process and 22 MiB second). So entering on CPU collects garbage
  and asks glibc to return free memory to the kernel (``malloc_trim(0)``, via ctypes: no
  library exposes it) before reading the starting RSS.
* Results are plain dataclasses of floats/ints/strings with ``to_dict()`` so the eval scorer
  and the experiment runner write them to JSON unchanged.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import torch

# The stages of one synthesis, in pipeline order. "total" is the wall time of the whole call.
STAGES: tuple[str, ...] = ("conditioning", "t3", "cfm", "vocoder", "watermark")

# S3Gen speech tokens are 25 per second of audio.
SPEECH_TOKENS_PER_AUDIO_S = 25.0


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued device work; a no-op on CPU (its ops are synchronous)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(dev)


@dataclass
class Lap:
    """One entry into a stage (filled in when the block exits)."""

    name: str
    seconds: float = 0.0


class StageTimer:
    """Accumulates wall seconds per named stage; ``with timer.stage("t3"): ...``.

    A stage entered several times (e.g. once per batch group) accumulates. Unknown stage
    names are allowed so callers can time sub-steps, but :data:`STAGES` always appear in
    :meth:`seconds` (as 0.0 when a stage did not run, e.g. watermark off).
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._seconds: dict[str, float] = {s: 0.0 for s in STAGES}
        self._t0 = time.perf_counter()
        self._t_end: float | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator["Lap"]:
        """Time the block as stage ``name``; the yielded :class:`Lap` holds this entry's seconds."""
        lap = Lap(name)
        synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield lap
        finally:
            synchronize(self.device)
            lap.seconds = time.perf_counter() - t0
            self._seconds[name] = self._seconds.get(name, 0.0) + lap.seconds

    def stop(self) -> None:
        """Freeze the total (wall time since construction)."""
        synchronize(self.device)
        self._t_end = time.perf_counter()

    @property
    def total(self) -> float:
        end = self._t_end if self._t_end is not None else time.perf_counter()
        return end - self._t0

    def seconds(self) -> dict[str, float]:
        """Stage -> seconds, plus ``total``."""
        out = dict(self._seconds)
        out["total"] = self.total
        return out


class PeakMemory:
    """Peak memory of the code run inside ``with PeakMemory(device) as pm:``; read ``pm.peak_bytes``
    (and ``pm.start_bytes``, what was in use on entry: the weights, mostly).

    ``kind`` says what was measured: ``"cuda_max_allocated"`` or ``"cpu_peak_rss"``.
    """

    def __init__(self, device: torch.device | str | None = None, interval_s: float = 0.01):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.start_bytes = 0
        self.kind = "cuda_max_allocated" if self._cuda else "cpu_peak_rss"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available()

    def __enter__(self) -> "PeakMemory":
        if not self._cuda:
            release_free_memory()
        if self._cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = int(torch.cuda.memory_allocated(self.device))
        else:
            import psutil

            proc = psutil.Process()
            self.peak_bytes = self.start_bytes = proc.memory_info().rss

            def sample() -> None:
                while not self._stop.wait(self.interval_s):
                    self.peak_bytes = max(self.peak_bytes, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, name="cbx-peak-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._cuda:
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            import psutil

            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_bytes = max(self.peak_bytes, psutil.Process().memory_info().rss)


def release_free_memory() -> bool:
    """Collect garbage and hand the C allocator's free memory back to the kernel, so that the
    process's RSS is what is in use (glibc only; returns whether ``malloc_trim`` ran)."""
    import gc

    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


_TRIM: list = []


def _malloc_trim():
    if not _TRIM:
        fn = None
        try:
            import ctypes
            import platform

            if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
                fn = ctypes.CDLL(None).malloc_trim
                fn.argtypes = [ctypes.c_size_t]
                fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            fn = None
        _TRIM.append(fn)
    return _TRIM[0]


class WorkMemory:
    """Peak bytes of tensors allocated inside ``with WorkMemory(device) as wm:`` above what was
    allocated on entry (``wm.work_bytes``): the working memory of that code alone, whatever ran
    in the process before it.

    On CUDA it is ``max_memory_allocated`` after ``reset_peak_memory_stats``, minus the bytes
    allocated on entry. On CPU no allocator counter exists, and the process's RSS depends on
    its history (measured: the same tiny-model synthesis grew the RSS by 26-33 MiB when it was
    the first in a process and by 43-51 MiB when it came later, even after ``malloc_trim``: the
    C heap's layout decides how much of it is re-faulted). So on CPU the torch profiler's
    memory events (every allocation and free of the CPU allocator, with sizes) are replayed
    in order and the highest running sum is taken: exact, history-free, and the same quantity
    as on CUDA. The profiler slows the code it watches, so use it on an untimed pass (the
    runner profiles one extra pass of its first batch after the warm-up, so lazy one-time loads
    such as the watermark model are not charged to the first run of a process), never around
    timed work.
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.work_bytes = 0
        self.kind = "cuda_max_allocated" if self._cuda else "cpu_torch_alloc_peak"
        self._prof = None
        self._start = 0

    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available()

    def __enter__(self) -> "WorkMemory":
        if self._cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = int(torch.cuda.memory_allocated(self.device))
        else:
            import os

            from torch.profiler import ProfilerActivity, profile

            os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # kineto prints a line per start/stop otherwise
            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._cuda:
            torch.cuda.synchronize(self.device)
            self.work_bytes = max(0, int(torch.cuda.max_memory_allocated(self.device)) - self._start)
            return
        self._prof.__exit__(*exc)
        events = [e for e in self._prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
        cur = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            cur += int(e.nbytes())
            peak = max(peak, cur)
        self.work_bytes = peak
        self._prof = None


@dataclass
class RunTiming:
    """What one synthesis call cost. Serialises with :meth:`to_dict`.

    ``stages`` holds seconds per stage and ``total``; ``rtf`` is total seconds per second of
    audio produced (below 1 is faster than real time).
    """

    stages: dict[str, float]
    speech_tokens: int
    audio_s: float
    peak_mem_bytes: int
    mem_kind: str
    device: str
    n_utterances: int = 1
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return float(self.stages.get("total", sum(self.stages.get(s, 0.0) for s in STAGES)))

    @property
    def speech_tokens_per_s(self) -> float:
        t3 = self.stages.get("t3", 0.0)
        return self.speech_tokens / t3 if t3 > 0 else 0.0

    @property
    def rtf(self) -> float:
        return self.total_s / self.audio_s if self.audio_s > 0 else float("inf")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total_s"] = self.total_s
        d["speech_tokens_per_s"] = self.speech_tokens_per_s
        d["rtf"] = self.rtf if self.audio_s > 0 else None
        return d


def apportion(total: float, weights: Sequence[float]) -> list[float]:
    """Split ``total`` over items in proportion to ``weights`` (equal split if all are zero).

    Used to give each utterance of a batch its share of a stage's time: the shares always
    sum to ``total`` so per-utterance rows add up to the batch figure.
    """
    n = len(weights)
    if n == 0:
        return []
    if any(w < 0 for w in weights):
        raise ValueError(f"apportion: negative weight in {list(weights)}")
    s = float(sum(weights))
    if s <= 0:
        return [total / n] * n
    return [total * float(w) / s for w in weights]


def read_bandwidth(n_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Memory read bandwidth in bytes/s: the best of ``repeats`` ``amax`` passes over a float32
    buffer much larger than any cache (a reduction that reads every byte once and writes
    nothing; on the 2-core EPYC about 22 GB/s). The yardstick of memory-bound decode steps."""
    buf = torch.ones(n_bytes // 4, dtype=torch.float32)
    buf.amax()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.amax()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best


def machine_description(device: torch.device | str | None = None) -> dict[str, str | int]:
    """CPU/GPU name, thread count and torch version, for benchmark headers and run records."""
    import platform

    dev = torch.device(device) if device is not None else torch.device("cpu")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, str | int] = {
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(dev),
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info
