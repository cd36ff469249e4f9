"""Commands around the trainer, apart from the modules that make up training: benchmarks, the
planner, the demo and its data, and the local object store used by the demo, the tests and bench."""
