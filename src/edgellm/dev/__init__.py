"""Local development clusters: real control planes on loopback with KWOK fake nodes."""
