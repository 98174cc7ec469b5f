#!/usr/bin/env python
"""Write a train/validation text corpus of real English from Debian's ``fortunes`` package, for ``train_lm.py``.

    sudo apt-get install fortunes            # 2.5 MB of quotations, jokes and poems under /usr/share/games/fortunes
    python recipes/prepare_fortunes.py --out data/fortunes
    python recipes/train_lm.py --dataset data/fortunes ...

Each fortune (the text between two ``%`` lines) is one document; documents are shuffled with ``--seed`` and the
last ``--validation-fraction`` of them is ``validation.txt``, the rest ``train.txt`` (documents separated by a
blank line), so no fortune is in both. ASCII-art files (``art``, ``ascii-art``) are left out: they are not text.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_SOURCE = Path("/usr/share/games/fortunes")
SKIP = {"art", "ascii-art"}


def read_fortunes(source: Path) -> list[str]:
    """Every fortune of every text file in ``source`` (not the ``.dat`` indexes or ``.u8`` links), in file order."""
    if not source.is_dir():
        raise SystemExit(f"{source} is not a folder: install Debian's fortunes package (apt-get install fortunes)")
    docs: list[str] = []
    for path in sorted(source.iterdir()):
        if path.suffix or path.name in SKIP or path.is_symlink() or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        docs += [d.strip("\n") for d in text.split("\n%\n") if d.strip()]
    if not docs:
        raise SystemExit(f"no fortunes found under {source}")
    return docs


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    p.add_argument("--out", type=Path, required=True, help="folder to write train.txt and validation.txt into")
    p.add_argument("--validation-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 0 < args.validation_fraction < 1:
        p.error(f"--validation-fraction must be in (0, 1), got {args.validation_fraction}")
    docs = read_fortunes(args.source)
    random.Random(args.seed).shuffle(docs)
    n_val = max(1, round(len(docs) * args.validation_fraction))
    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.txt", docs[:-n_val]), ("validation.txt", docs[-n_val:])):
        (args.out / name).write_text("\n\n".join(part) + "\n", encoding="utf-8")
    size = sum((args.out / n).stat().st_size for n in ("train.txt", "validation.txt"))
    print(f"{len(docs) - n_val} train and {n_val} validation fortunes ({size / 1e6:.2f} MB) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
