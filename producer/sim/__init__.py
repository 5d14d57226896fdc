"""Event simulation (pyacts, the ``sim`` extra): generic detector, Fatras, geometric digitization.

Entry points live in :mod:`producer.sim.simulate` (``simulate``, ``add_arguments``, ``run``). They are
deliberately not re-exported here: a function named ``simulate`` on the package would shadow the
submodule of the same name. Importing this package never imports ``acts``; ``simulate`` raises
``SimulationUnavailable`` with install instructions when it is missing.
"""

from __future__ import annotations
