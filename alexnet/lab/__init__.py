"""The lab: the demo and the paper's experiments at small scale (docs/RESULTS.md)."""
