"""Warm-up check run after the handler is warm: the agent module imports and answers."""
import sys

sys.path.insert(0, "/app")
import agent  # noqa: E402

r = agent.handle({"op": "fit", "x": [0, 1, 2], "y": [1, 3, 5]})
assert abs(r["coef"] - 2.0) < 1e-9, r
print("selfcheck ok", r)
