"""Every seed of a run derived from a hash of its parts: (seed, "order", epoch), (seed, "noise",
step), ... Sums such as seed + epoch collide (seed 1 would replay seed 0's orders one epoch later);
a hash of the parts does not, and it is the same on every worker, host and restart."""
import hashlib


def derive_seed(*parts) -> int:
    """A 63-bit seed from (seed, epoch, key, ...)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
