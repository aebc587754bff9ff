"""One writer per run directory (placeholder API: being implemented)."""


class RunLock:
    def __init__(self, output_dir: str, take_over: bool = False):
        self.output_dir, self.take_over = output_dir, take_over

    def acquire(self):
        """Take the lock, or raise ConfigError naming the holder and how to take over."""

    def release(self):
        """Give the lock back (only if it is still ours)."""

    @property
    def lost(self) -> bool:
        """True once another launch took the lock over (remote leases)."""
        return False
