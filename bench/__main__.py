"""``python -m bench``: nfknock's benchmarks.  See bench/README.md."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

from bench import engine


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("what", nargs="?", default="engine", choices=["engine"])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the bench runs")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    out: dict[str, Any] = {"machine": machine(), "smoke": args.smoke}
    md = [f"machine: {out['machine']}"]
    if args.what == "engine":
        sizes = {"user_counts": (1, 100), "n": 5_000, "repeats": 1} if args.smoke else {}
        res = engine.run(**sizes)  # type: ignore[arg-type]
        out["engine"] = res
        md.append("\n### Engine alone (sans-IO, no kernel)\n")
        md.append(engine.table(res))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.what}.json").write_text(json.dumps(out, indent=1) + "\n")
    (args.out / f"{args.what}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
