"""Workload logs on the device: each component's rotated log (written by its runtime) read
back as lines for the controller's ``logs`` streams."""
