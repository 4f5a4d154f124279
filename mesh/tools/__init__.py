"""What people run: the `mesh` command, its status dashboard, the process launcher and local
stack, the embedded Redis, the demo and its example models, and the scheduler simulator."""
