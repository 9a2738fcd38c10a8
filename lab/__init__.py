"""The lab: benchmarks and their measurement, the toy's synthetic world, synthetic media for
tests."""
