"""The python template's reward command: scores an episode by the answer its task left.

A rollout's task writes /tmp/answer.json, {"answer": <number>}, for the episode's problem,
whose expected answer is in the environment as EXPECTED (set per session or per call).
Prints 1.0 for a right answer (within 1e-6), 0.0 for a wrong or missing one: the last line
of output is the reward.
"""
import json
import os
import sys


def main():
    expected = float(os.environ.get("EXPECTED", "0"))
    try:
        with open("/tmp/answer.json") as f:
            answer = float(json.load(f)["answer"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"no answer: {e}", file=sys.stderr)
        print(0.0)
        return
    print(1.0 if abs(answer - expected) <= 1e-6 else 0.0)


main()
