"""Deprecated path, kept for celeryconfig files that name it (`broker_transport`): use
mesh.broker.transport."""
from mesh.broker.transport import *  # noqa: F401,F403
from mesh.broker.transport import Transport  # noqa: F401
