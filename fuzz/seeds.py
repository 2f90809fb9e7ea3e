"""Write every target's seed inputs to ``fuzz/corpus/<target>/``: ``python -m fuzz.seeds [TARGET...]``.

Seeds come from each target's ``seeds()``: the vhost-user ones are recorded
from the Python front end's real session with the real devices (messages,
fd kinds and the guest RAM's rings as they stood at the kick), the others
are the streams the real peers (QEMU, libnbd's tools, xenstored) send.
"""

from __future__ import annotations

import hashlib
import importlib
import sys

from fuzz.run import CORPUS_DIR, TARGETS


def main(argv: list[str] | None = None) -> int:
    """Write the seeds of the named targets (default: all)."""
    targets = (sys.argv[1:] if argv is None else argv) or list(TARGETS)
    for target in targets:
        module = importlib.import_module(f"fuzz.targets.{target}")
        directory = CORPUS_DIR / target
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in module.seeds().items():
            digest = hashlib.sha1(data).hexdigest()[:12]
            (directory / f"{name}-{digest}").write_bytes(data)
        print(f"{target}: {len(list(directory.iterdir()))} seed(s) in {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
