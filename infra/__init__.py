"""gpufleet: typed GPU site model → Pulumi components and Ansible roles."""
