"""Several gateways on one Redis: the node registry, swap slots and the shared upload directory check."""
