"""Disaster recovery: node fingerprints, drift, rebuild through the BMC, Pulumi state backups."""
