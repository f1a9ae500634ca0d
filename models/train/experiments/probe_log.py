"""Shared by the device probes: the output folder ($OUT, /tmp/out by default) and a log that prints
each line with the seconds since start and appends it to OUT/log.txt (what comes back from a
device call even when the command is stopped at its limit)."""
import os
import time

T0 = time.time()
OUT = os.environ.get("OUT", "/tmp/out")
os.makedirs(OUT, exist_ok=True)


def log(*a):
    s = f"[{time.time() - T0:6.0f}s] " + " ".join(str(x) for x in a)
    print(s, flush=True)
    with open(f"{OUT}/log.txt", "a") as f:
        f.write(s + "\n")
