"""Celery settings for Mesh (`celery -A mesh.app worker|beat|flower` reads these).

Values that depend on the mesh (Redis URL, key prefix, timeouts) come from MESH_* environment
variables through mesh.settings; everything else is a plain Celery setting you may edit.
The reasons behind each choice are in docs/configuration.md and docs/architecture.md ("Why
Celery's pieces, and where we step around them").
"""

from mesh.broker.celery_options import mesh_celery_settings

# --- serialization: JSON only, never pickle (a pickle message is rejected by the worker)
task_serializer = "json"
result_serializer = "json"
event_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

# --- broker: kombu's Redis transport, hardened against garbage in a queue (mesh/broker/transport.py);
# `broker_transport` is set below with the URL (its Sentinel flavour for sentinel:// URLs)

# --- delivery: ack after the result is stored (at-least-once; inference must be idempotent)
task_acks_late = True
task_reject_on_worker_lost = False  # solo pool: no child processes to lose
task_default_priority = 5  # 0 is the urgent lane; normal traffic uses 5 (see priority_steps)
task_create_missing_queues = True
task_routes = ("mesh.control.routing.route_task",)

# --- worker: one process per device slot, our own Strategy and inference thread
worker_prefetch_multiplier = 64  # raised at run time from the loaded models' batch sizes
worker_send_task_events = True  # Flower sees every request (received/started/succeeded)
task_send_sent_event = False
worker_hijack_root_logger = False
worker_soft_shutdown_timeout = 10.0
worker_enable_soft_shutdown_on_idle = True
worker_cancel_long_running_tasks_on_connection_loss = False
broker_connection_retry_on_startup = True

# --- results
result_extended = False
redis_socket_keepalive = True
redis_backend_health_check_interval = 25

# Broker/result URLs, key prefix (kombu global_keyprefix), visibility timeout, polling interval
# and priority steps, computed from MESH_* settings.
globals().update(mesh_celery_settings())
