"""`pdiff config [KEY ...]`: every config key with its type (the choices, for an enumeration),
default and meaning, generated from pdiff/config.py. KEY narrows it to a section or keys
(`pdiff config optim train.batch`); --markdown prints the table docs/CONFIG.md holds."""
from __future__ import annotations

import argparse

from pdiff.config import ConfigError, reference, reference_rows
from pdiff.helpformat import HelpFormatter


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="pdiff config", description=__doc__, formatter_class=HelpFormatter,
                                 epilog="A config file sets any of them by section (data: {path: ...}); the "
                                        "command line as section.key=value; `pdiff train --config FILE "
                                        "--dry-run` prints a whole resolved config.")
    ap.add_argument("keys", nargs="*", help="sections or keys to show, e.g. optim or train.batch (default: all)")
    ap.add_argument("--markdown", action="store_true", help="a Markdown table (docs/CONFIG.md)")
    args = ap.parse_args(argv)
    known = {k for k, *_ in reference_rows()}
    for key in args.keys:
        if key not in known and not any(k.startswith(key + ".") for k in known):
            raise ConfigError(f"{key!r} is neither a section nor a key (sections: "
                              f"{', '.join(sorted({k.split('.')[0] for k in known if '.' in k}))})")
    print(reference(args.markdown, args.keys), end="")
    return 0
