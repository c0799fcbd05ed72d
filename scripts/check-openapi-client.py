#!/usr/bin/env python3
"""Checks the Python client openapi-python-client generated from thaw's OpenAPI document
(`make test-openapi`): every operation of the document became a function, binary bodies are
files, and each stream event has its own model. Exits non-zero with what is wrong.

Usage: check-openapi-client.py OPENAPI_JSON CLIENT_DIR GENERATE_LOG
(CLIENT_DIR is the generated package, e.g. target/openapi/thaw_client.)
"""

import importlib
import inspect
import json
import pathlib
import sys


def main() -> int:
    spec_path, client_dir, log_path = map(pathlib.Path, sys.argv[1:4])
    spec = json.loads(spec_path.read_text())
    log = log_path.read_text()
    problems = []

    # openapi-python-client says "Endpoint will not be generated" for what it could not
    # parse; the checks below name what went missing, the log says why.
    if "Error(s) encountered" in log:
        problems.append("openapi-python-client reported errors (see the log above)")

    sys.path.insert(0, str(client_dir.parent))
    package = client_dir.name
    operations = {}
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method not in ("get", "put", "post", "delete", "patch"):
                continue
            operations[op["operationId"]] = (method, path, op)
    for op_id, (method, path, op) in sorted(operations.items()):
        tag = op["tags"][0]
        name = f"{package}.api.{tag}.{op_id}"
        try:
            module = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure is a missing operation
            problems.append(f"{method.upper()} {path}: no {name} ({e})")
            continue
        for fn in ("sync_detailed", "asyncio_detailed"):
            if not callable(getattr(module, fn, None)):
                problems.append(f"{method.upper()} {path}: {name}.{fn} missing")

    def body_type(op_id: str) -> str:
        module = importlib.import_module(f"{package}.api.{operations[op_id][2]['tags'][0]}.{op_id}")
        return str(inspect.signature(module.sync_detailed).parameters["body"].annotation)

    for op_id in ("deploy_template", "write_session_file"):
        if op_id in operations:
            try:
                t = body_type(op_id)
                if "File" not in t:
                    problems.append(f"{op_id}: body is {t}, expected a File (binary)")
            except Exception as e:  # noqa: BLE001
                problems.append(f"{op_id}: cannot inspect its body ({e})")
    for op_id in ("deploy_template", "exec_template", "invoke_template", "exec_session",
                  "invoke_session", "checkpoint_session", "list_checkpoints", "delete_checkpoint",
                  "reset_session", "fork_session", "batch_sessions", "reward_session"):
        if op_id not in operations:
            problems.append(f"the document has no operation {op_id}")

    models = importlib.import_module(f"{package}.models")
    for model in ("StdoutEvent", "StderrEvent", "ExitEvent", "ResultEvent", "ErrorEvent",
                  "BatchSessionEvent", "BatchErrorEvent", "BatchDoneEvent", "BatchAbortedEvent"):
        if not hasattr(models, model):
            problems.append(f"no model {model} for a stream event")

    for p in problems:
        print(f"check-openapi-client: {p}", file=sys.stderr)
    if not problems:
        print(f"check-openapi-client: {len(operations)} operations generated, binary bodies are files, "
              "stream events have their models")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
