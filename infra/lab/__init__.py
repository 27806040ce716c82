"""The local lab: `stacks/Pulumi.lab.yaml` brought to life as nspawn hosts on one Debian 12 machine.

Everything here is lab-only. Product code never imports it; the lab only changes where packages,
images and models come from (a mirror and an "outside world" host), never what the roles do.
"""
