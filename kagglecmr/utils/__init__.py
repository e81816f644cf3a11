"""Helpers every layer uses: errors, atomic file writing, runtime (device, threads, seeding, environment record), progress, tracking, locks, plots."""
