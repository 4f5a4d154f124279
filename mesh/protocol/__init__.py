"""The lowest layer above mesh.errors: what producers, workers and the scheduler agree on (task
names, headers, priorities, Redis key and queue names, id and relative-path rules, KServe V2
tensors). Imports nothing of Mesh but its errors."""
