"""`/openapi.json` validates as OpenAPI 3.x, and a schema-driven fuzz run (schemathesis) against
a Herald of its own finds no 5xx and no answer that breaks the document's own schemas.

Run inside a network namespace of its own (`.ci/run` uses `unshare --net`): the fuzzer creates
webhook endpoints with arbitrary public URLs and publishes to them, and nothing may leave the
machine. Bounded: a fixed number of examples per operation and a time budget.
"""

import json
import os
import secrets
import subprocess
import sys
import tempfile
import urllib.request

from openapi_spec_validator import validate

sys.path.insert(0, os.path.dirname(__file__))
from browser_harness import Checks, start_herald  # noqa: E402

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))
BUDGET_SECS = int(os.environ.get("FUZZ_SECONDS", "300"))
SCHEMATHESIS = os.path.join(os.path.dirname(sys.executable), "schemathesis")


def main():
    checks = Checks()
    token = "fuzz-admin-token-" + secrets.token_hex(8)
    with tempfile.TemporaryDirectory() as data:
        # Rate limits off: the fuzzer should reach the handlers, not the limiter.
        herald = start_herald(token, 0, data, {
            "HERALD_API__PUBLISH_PER_SECOND_PER_APP": "0",
            "HERALD_INGEST__REQUESTS_PER_SECOND_PER_IP": "0",
            "HERALD_INGEST__REQUESTS_PER_SECOND_PER_SOURCE": "0",
            "HERALD_API__AUTH_FAILURES_PER_SECOND_PER_IP": "0",
        })
        base = herald.base
        try:
            with urllib.request.urlopen(base + "/openapi.json") as response:
                spec = json.load(response)
            validate(spec)
            checks.ok(f"/openapi.json validates as OpenAPI {spec['openapi']} ({len(spec['paths'])} paths)")

            command = [
                SCHEMATHESIS, "run", base + "/openapi.json",
                "--checks", "not_a_server_error,response_schema_conformance",
                "--header", f"Authorization: Bearer {token}",
                "--max-examples", str(EXAMPLES),
                "--max-time", str(BUDGET_SECS),
                "--phases", "examples,coverage,fuzzing",
                "--seed", "20261202",
                # Generous: a shared 2-core CI machine can stall a request for seconds, and a
                # timeout would count as an error; a hung route still fails the run.
                "--request-timeout", "30",
                # One worker: with two, hypothesis describes its filters from two threads at
                # once, and Python 3.11's `ast.parse` can then fail ("AST constructor recursion
                # depth mismatch", CPython gh-106905), which crashed a CI run.
                "--workers", "1",
                "--no-color",
                # Streams never end; the browser checks cover them.
                "--exclude-path", "/apps/{app_id}/sse",
                "--exclude-path", "/api/v1/app/{app_id}/tail",
            ]
            run = subprocess.run(command, text=True, capture_output=True)
            print(run.stdout[-20000:])
            if run.returncode != 0:
                print(run.stderr[-5000:], file=sys.stderr)
                raise SystemExit(f"FAIL: schemathesis found problems (exit {run.returncode})")
            checks.ok("schemathesis: no 5xx and no answer outside the document's schemas")
            if herald.poll() is not None:
                raise SystemExit("FAIL: herald exited during the fuzz run")
            checks.ok("herald served the whole fuzz run")
        finally:
            herald.terminate()
            herald.wait(timeout=30)


if __name__ == "__main__":
    main()
