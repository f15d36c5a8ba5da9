"""Experiment tooling on top of the trainer: sweeps of settings over seeds from shared cold starts (`sweep`), their
statistics (`stats`) and reports (`report`). `python -m rftjax.studies.sweep`."""
