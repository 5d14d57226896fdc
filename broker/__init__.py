"""trackfleet broker: fans events out to workers over ZeroMQ. Never imports :mod:`kernels`."""
