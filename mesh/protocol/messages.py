"""What producers, workers and the scheduler must agree on about a message: task names,
headers, priority lanes, and how long a producer trusts that a model is being served.

Nothing here imports Celery: the task classes (mesh/broker/tasks.py) and the router
(mesh/control/routing.py) both build on these names.
"""

from __future__ import annotations

# Task names (stable: producers that know only Celery send them with app.send_task).
INFER_TASK = "mesh.infer"
COMMAND_TASK = "mesh.command"
REBALANCE_TASK = "mesh.rebalance"
SYNC_REPOSITORY_TASK = "mesh.sync_repository"

# Message headers. ModelMesh's names for the model and vmodel ids are kept
# (https://github.com/kserve/modelmesh, docs/vmodels.md), so its users find them.
MODEL_HEADER = "mm-model-id"
VMODEL_HEADER = "mm-vmodel-id"
SENT_AT_HEADER = "mesh-sent-at"  # epoch seconds at send: the worker's queue-time metric

# kombu's Redis transport serves lower numbers first. Two lanes: 0 (urgent) and 5 (normal).
# Each step is one more Redis list per queue in every BRPOP (kombu/transport/redis.py,
# `priority_steps`), so two is the useful minimum for priorities.
PRIORITIES = {"high": 0, "normal": 5}
PRIORITY_STEPS = sorted(set(PRIORITIES.values()))

# A producer that saw a live copy of a model skips the route script for this long; the
# worker's orphan watch (workers/worker.py) covers that window after a copy leaves.
SERVING_TTL_S = 1.0

# A producer's reply list (mesh/broker/replies.py) outlives the last result pushed to it this
# long: the list of a producer that died goes away on its own.
REPLY_TTL_S = 300

# The runtimes a worker can load (workers/runtimes/): producers check `ModelInfo.runtime`
# against these at registration, without importing the worker.
RUNTIME_NAMES: tuple[str, ...] = ("sklearn", "onnx", "python", "xgboost", "lightgbm", "tensorflow")
