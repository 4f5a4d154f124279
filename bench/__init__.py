"""Benchmarks (`./scripts/bench <mode>`): measured against baselines on the same machine, in
one run. Not tests: no assertions on timing, only figures."""
