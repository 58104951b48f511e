"""Peak resident memory of a block of code, for the bench scripts (Linux).

torch allocates outside Python, so tracemalloc sees none of it; the process's resident set does.
Run each variant in its own subprocess so one's allocations cannot hide another's.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys


def rss_kib(field: str = "VmRSS") -> int:
    """A /proc/self/status memory field in KiB (VmRSS: now, VmHWM: peak since the last reset)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS through /proc/self/clear_refs (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakDelta:
    """`with PeakDelta() as m: ...` then `m.mib`: the block's peak RSS above the RSS at its start.

    Where the peak cannot be reset, ru_maxrss (the process's lifetime peak) stands in, which can only
    over-state the delta; `m.exact` says which was used.
    """

    def __enter__(self) -> PeakDelta:
        self.before = rss_kib()
        self.exact = reset_peak()
        return self

    def __exit__(self, *exc) -> None:
        peak = rss_kib("VmHWM") if self.exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.mib = (peak - self.before) / 1024


def in_subprocesses(script: str, variants: tuple[str, ...], args: dict) -> dict[str, dict]:
    """Run `script --variant V --k=v ...` once per variant, each in a fresh process; its last stdout
    line is JSON. The script's main() answers that call by measuring V and printing the result."""
    results = {}
    for variant in variants:
        cmd = [sys.executable, script, "--variant", variant] + [f"--{k}={v}" for k, v in args.items()]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    return results
