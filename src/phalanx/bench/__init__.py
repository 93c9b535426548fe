"""Benchmarks behind `phalanx bench`: each measures phalanx against a peer in the same run."""
