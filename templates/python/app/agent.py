"""A small data agent: the kind of tool an LLM agent calls to crunch numbers.

payload: {"op": "describe" | "fit" | "optimize" | "random" | "python" | "info", ...}

"python" runs `code` in one namespace that lives as long as the handler process: in a
session (`thaw session invoke`), a variable set by one call is there in the next, and
survives a pause and resume, because the process's memory does.
"""
import os
import uuid

import numpy as np
import pandas as pd
import scipy.optimize
import sklearn.linear_model


# The "python" op's globals: kept for the life of the process.
_NAMESPACE = {"np": np, "pd": pd}


def _jsonable(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, np.generic):
        return v.item()
    return repr(v)


def run_python(code):
    """Evaluates an expression (returning its value) or executes statements."""
    try:
        compiled = compile(code, "<session>", "eval")
    except SyntaxError:
        exec(compile(code, "<session>", "exec"), _NAMESPACE)
        return {"value": None}
    return {"value": _jsonable(eval(compiled, _NAMESPACE))}


def handle(payload, import_seconds=0.0, imported_in=None):
    if not isinstance(payload, dict):
        payload = {"op": "info"}
    op = payload.get("op", "info")
    if op == "describe":
        df = pd.DataFrame(payload.get("data") or {"x": [1, 2, 3]})
        return {"describe": df.describe().round(6).to_dict()}
    if op == "fit":
        x = np.asarray(payload.get("x", [0, 1, 2, 3]), dtype=float).reshape(-1, 1)
        y = np.asarray(payload.get("y", [1, 3, 5, 7]), dtype=float)
        m = sklearn.linear_model.LinearRegression().fit(x, y)
        return {"coef": float(m.coef_[0]), "intercept": float(m.intercept_),
                "r2": float(m.score(x, y))}
    if op == "optimize":
        c = float(payload.get("center", 3.0))
        r = scipy.optimize.minimize_scalar(lambda v: (v - c) ** 2)
        return {"minimum": round(float(r.x), 6)}
    if op == "random":
        return {"uuid": str(uuid.uuid4()), "urandom": os.urandom(16).hex(),
                "numpy": float(np.random.random())}
    if op == "python":
        return run_python(str(payload.get("code", "None")))
    if op == "crash":
        raise SystemExit(3)
    if op == "sleep":
        import time
        time.sleep(float(payload.get("seconds", 60)))
        return {"slept": True}
    if op == "alloc":
        blob = bytearray(int(payload.get("mib", 1024)) << 20)
        return {"allocated": len(blob)}
    return {
        "agent": "python-data-agent",
        "sandbox": os.environ.get("THAW_SANDBOX_ID"),
        "versions": {"numpy": np.__version__, "pandas": pd.__version__},
        "import_seconds_paid_before_snapshot": round(import_seconds, 3),
        # Warm: the imports ran in another sandbox (the template's, before its snapshot) and
        # this one inherited the process; a clone that had to import again would say False.
        "imports_ran_in_sandbox": imported_in,
        "warm_from_snapshot": imported_in is not None
        and imported_in != os.environ.get("THAW_SANDBOX_ID"),
        "pid": os.getpid(),
    }
