"""The command line every harness script shares: --config FILE --out PATH [--set KEY=VALUE ...]."""

import argparse


def parser() -> argparse.ArgumentParser:
    """Add a script's own arguments to it, then call ``parse_args()``."""
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[])
    return p


def parse_args() -> argparse.Namespace:
    return parser().parse_args()
