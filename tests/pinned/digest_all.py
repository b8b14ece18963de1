"""Run every pinned job in THIS process and print {name: adapter digest} as JSON.

The test runs this module in a fresh process under `PORTABLE_KERNELS` (the kernel choices
must be made before torch starts). To re-pin after a change that means to move results:

    PORTABLE=1 .venv/bin/python -m tests.pinned.digest_all --write

(`PORTABLE=1` re-executes the module under `PORTABLE_KERNELS`). Say why in the commit."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from tests.pinned.jobs import PIN_FILE, PORTABLE_KERNELS, adapter_digest, jobs


def digests(root: Path, names: list[str] | None = None) -> dict[str, str]:
    """Each job's adapter digest, the jobs run through the CLI in this process."""
    from tests.conftest import run_in_process

    out: dict[str, str] = {}
    for name, sets in jobs(root).items():
        if names and name not in names:
            continue
        run = root / "runs" / name
        args = ["run", "--quiet", "--out", str(run)]
        for kv in sets:
            args += ["--set", kv]
        res = run_in_process(*args)  # every job sets train.threads=1
        if res.returncode != 0:
            raise SystemExit(f"{name}: exit {res.returncode}\n{res.stderr[-2000:]}")
        out[name] = adapter_digest(run)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, help="a folder for the inputs and runs (else a new one)")
    ap.add_argument("--write", action="store_true", help="rewrite the pins with these digests")
    ap.add_argument("names", nargs="*", help="only these jobs")
    args = ap.parse_args()
    if os.environ.get("PORTABLE") == "1":
        env = {k: v for k, v in os.environ.items() if k != "PORTABLE"}
        os.execvpe(sys.executable, [sys.executable, "-m", __spec__.name, *sys.argv[1:]],
                   {**env, **PORTABLE_KERNELS})  # fmt: skip
    # the inputs too are made here: the tiny models' random initialisation runs on the kernels
    from transformers import AutoTokenizer

    from declora.model.classifier import bundled_minilm_path
    from tests.conftest import WORDS
    from tests.pinned.jobs import write_inputs

    root = args.root or Path(tempfile.mkdtemp(prefix="pinned-"))
    write_inputs(root, AutoTokenizer.from_pretrained(bundled_minilm_path()), WORDS)
    found = digests(root, args.names)
    if args.write:
        PIN_FILE.write_text(json.dumps(found, indent=2, sort_keys=True) + "\n")
    print(json.dumps(found))


if __name__ == "__main__":
    main()
