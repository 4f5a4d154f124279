"""The only code that talks to Redis for control-plane state: the registry, copies, claims and
heartbeats (StateStore), vmodel transactions, the scheduler's view of the cluster, and the one
factory that builds them from a Celery app or settings."""
