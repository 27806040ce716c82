"""Segment-local execution: Ansible runs on an execution host inside the segment, fed by the controller.

`runtime` builds and installs what an execution host needs (ansible-core, ansible-runner, Mitogen and their
dependencies at the controller's exact versions); `job` streams one playbook run to it with ansible-runner's
own remote-job protocol (transmit → worker → process, the protocol AWX execution nodes speak) over one SSH
connection; `worker` is the small supervisor that runs `ansible-runner worker` there and stops the job's
processes when the controller's connection goes away.
"""
