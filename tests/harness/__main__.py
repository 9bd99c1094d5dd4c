"""`python -m harness up|down|status [kafka s3 kube]`: the test servers for manual work."""

from __future__ import annotations

import argparse
import importlib
import sys

from harness.common import ServerError, read_live_info, run_dir

SERVERS = ("kafka", "s3", "kube")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("servers", nargs="*", choices=SERVERS, help="default: kafka s3")
    args = parser.parse_args(argv)
    names = args.servers or ["kafka", "s3"]
    for name in names:
        module = importlib.import_module(f"harness.{name}")
        if args.action == "up":
            try:
                running = module.up()
            except ServerError as exc:
                print(f"{name}: {exc}", file=sys.stderr)
                return 1
            print(module.describe(running))
        elif args.action == "down":
            module.down()
            print(f"{name}: stopped")
        else:
            info = read_live_info(run_dir(name))
            print(f"{name}: {'up ' + str(info) if info else 'down'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
