"""thaw's persistent-handler runtime for Python.

Protocol (guest-init/PROTOCOL.md, "persistent handler"): import the agent (the slow part),
print {"ready": true}, then for each line on stdin, an envelope
{"payload": ..., "env": {...}, "sandbox_id": "..."}, print exactly one JSON line.

Clones of one snapshot share this process's memory image, including every userspace random
generator's state. Whenever the sandbox id changes (a new clone), reseed them from the
kernel, which the host reseeded with fresh entropy before the task.

That memory is shared copy-on-write: a clone copies a page only when it writes it. A
garbage collection pass writes to every object it tracks, so the objects the imports made
are frozen (gc.freeze) before the snapshot and no clone's collector touches them.
"""
import gc
import json
import os
import random
import sys
import time

_t0 = time.perf_counter()
import agent  # noqa: E402  (the heavy imports live there)

IMPORT_SECONDS = time.perf_counter() - _t0
# The sandbox this process (and its imports) started in: the template's, before the snapshot.
# A restored clone answers from this same process, so the id differs from the clone's own;
# a handler started afresh in a clone would carry the clone's id here.
IMPORTED_IN_SANDBOX = os.environ.get("THAW_SANDBOX_ID")
gc.collect()
gc.freeze()
_current_sandbox = None


def _reseed():
    random.seed(os.urandom(32))
    try:
        import numpy as np

        np.random.seed(int.from_bytes(os.urandom(4), "little"))
    except Exception:  # numpy is optional for other agents
        pass


def main():
    global _current_sandbox
    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            env = json.loads(line)
        except ValueError as e:
            out.write(json.dumps({"error": f"bad envelope: {e}"}) + "\n")
            out.flush()
            continue
        sid = env.get("sandbox_id")
        if sid != _current_sandbox:
            _current_sandbox = sid
            _reseed()
            # The environment this process started with is the template sandbox's.
            if sid:
                os.environ["THAW_SANDBOX_ID"] = sid
        os.environ.update(env.get("env") or {})
        try:
            result = agent.handle(
                env.get("payload"),
                import_seconds=IMPORT_SECONDS,
                imported_in=IMPORTED_IN_SANDBOX,
            )
        except Exception as e:  # the handler's bug must not kill the worker
            result = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(result, default=str) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
