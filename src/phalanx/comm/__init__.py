"""Transport: one process group per membership generation, collectives, shared-memory path."""
