"""The `phalanx` command line: run (spawn, supervise, respawn workers; host the coordinator), bench."""
