"""Celery and kombu glue: the task classes, the Celery options Mesh computes, the hardened Redis
transport, the result backend, and which Redis URL to use."""
