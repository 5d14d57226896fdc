"""trackfleet worker: holds a warm reconstruction chain and serves events from the broker."""
