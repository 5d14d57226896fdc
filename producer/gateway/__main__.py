"""``python -m producer.gateway``: the KServe v2 gateway (see :mod:`producer.gateway.cli`)."""

from __future__ import annotations

import sys

from producer.gateway.cli import main

if __name__ == "__main__":
    sys.exit(main())
