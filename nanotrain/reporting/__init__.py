"""Reporting: the run directory, run log and sinks, dashboards, speed metrics, run summary (docs/12)."""
