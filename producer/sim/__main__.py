"""``python -m producer.sim``: the ``trackfleet simulate`` command without the trackfleet CLI.

Kept so data sets can be made before (or without) the full CLI; it accepts the same options.
"""

from __future__ import annotations

import argparse
import logging
import sys

from producer.sim.simulate import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the simulation."""
    parser = argparse.ArgumentParser(prog="python -m producer.sim", description=__doc__)
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (ACTS at INFO)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
