"""Analysis of trained runs: loop diagnostics (`loopmdm analyze`)."""
