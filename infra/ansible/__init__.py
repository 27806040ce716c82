"""Ansible execution: inventory from the plan, runs through ansible-runner, rolling batches, CLI."""
