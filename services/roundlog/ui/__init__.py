"""``roundlog ui``: a read-only web dashboard over the projections (see docs/dashboard.md)."""

#: Where ``roundlog ui`` listens unless told otherwise (on 127.0.0.1).
DEFAULT_PORT = 8321
