"""The control plane's actions: the scheduler run (rebalance), vmodel transitions, routing with
the cold path, commands to workers, repository sync. Each reads and writes state through
mesh.store and decides through mesh.policy."""
