"""Membership and rendezvous: who is in the job, generation numbers, heartbeats, decisions.

This package never imports torch: it is plain sockets, JSON and HMAC, so the launcher can host
it cheaply and it can be unit-tested without a process group.
"""

from .client import CoordClient
from .protocol import new_secret
from .server import CoordServer

__all__ = ["CoordClient", "CoordServer", "new_secret"]
