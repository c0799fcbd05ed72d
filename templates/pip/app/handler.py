"""Says how big a number of bytes is, with the package setup installed from PyPI."""
import json
import sys

import humanize

payload = json.loads(sys.stdin.read() or "{}")
n = int(payload.get("bytes", 0))
print(json.dumps({"size": humanize.naturalsize(n), "humanize": humanize.__version__}))
