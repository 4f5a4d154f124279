"""Celery bootsteps that turn a `celery worker` into a mesh worker.

`MeshWorkerStep` (worker blueprint) makes the worker consume its private command queue and
nothing else at start; model queues are added as models load. `MeshConsumerStep` (consumer
blueprint) creates the MeshWorker before the Tasks step builds the strategies, starts its
threads, and hands it connection loss and shutdown.
"""

from __future__ import annotations

from celery import bootsteps

from mesh.protocol import jsonwire
from mesh.protocol.keys import Keys
from mesh.settings import MeshSettings


class MeshWorkerStep(bootsteps.Step):
    def __init__(self, worker, **kwargs):
        # before any message is taken: Celery's Request decodes every body through kombu's
        # registry, a tenth of the worker's CPU with the standard library's decoder
        jsonwire.install()
        queues = worker.app.amqp.queues
        keys = Keys(worker.app.conf.mesh_prefix)
        private = keys.worker_queue(worker.hostname)
        if queues._consume_from is None:
            # no -Q given: consume only the private queue, not the default queue
            queues.select([private])
        else:
            queues.select_add(private)
        # every worker can take scheduler runs (mesh.rebalance, mesh.sync_repository), so
        # beat needs no extra process; the leader locks keep runs one at a time
        if MeshSettings(prefix=keys.prefix).worker_control_queue:
            queues.select_add(keys.control_queue)
        super().__init__(worker, **kwargs)


class MeshConsumerStep(bootsteps.StartStopStep):
    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, consumer, **kwargs):
        from .worker import MeshWorker

        consumer.mesh = MeshWorker(consumer)
        super().__init__(consumer, **kwargs)

    def start(self, consumer):
        consumer.mesh.start()

    def stop(self, consumer):
        consumer.mesh.on_connection_lost()

    def shutdown(self, consumer):
        consumer.mesh.shutdown()
