"""The app container's program in the pod test (tests/deploy/test_containers.py): the official openai client
against its sidecar at OPENAI_BASE_URL (http://localhost:<port>/v1), then the admin API with the Secret's token.
Prints one JSON line per request and exits 0 once all are done.

    python3 pod_client.py QUESTION [QUESTION ...]
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request

from openai import OpenAI


def wait_ready(root: str, timeout_s: float = 240) -> None:
    """The app starts beside its sidecar (Podman has no native sidecar ordering): wait for /readyz."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(root + "/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the sidecar never became ready")
        time.sleep(0.5)


def admin(root: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(root + "/admin/config", headers=headers), timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def main(questions: list[str]) -> int:
    base = os.environ["OPENAI_BASE_URL"]
    root = base.removesuffix("/v1")
    wait_ready(root)
    client = OpenAI(max_retries=0, timeout=120)
    for question in questions:
        started = time.perf_counter()
        raw = client.chat.completions.with_raw_response.create(
            model="cachecade/auto", max_tokens=32, messages=[{"role": "user", "content": question}]
        )
        answer = raw.parse().choices[0].message.content
        print(json.dumps({"question": question, "x-cache": raw.headers.get("x-cache"),
                          "x-served-by": raw.headers.get("x-served-by"), "answer": answer,
                          "ms": round((time.perf_counter() - started) * 1000, 2)}), flush=True)  # fmt: skip
    token = os.environ.get("CACHECADE_ADMIN_TOKEN")
    print(json.dumps({"admin_with_token": admin(root, token), "admin_without_token": admin(root, None)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
