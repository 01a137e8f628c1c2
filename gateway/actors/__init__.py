"""Long-lived actors: one inbox, one supervised run loop, a small async API each."""
