"""Test scaffolding: tiny models of many families and the fault hook. Only tests (and benchmarks) import it."""
