"""trackfleet's client side: event readers and writers, simulation, validation, the producer role and
the ``trackfleet`` command."""
