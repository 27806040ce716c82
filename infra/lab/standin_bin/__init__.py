"""Programs shipped inside the stand-in NVIDIA packages (stdlib-only Python 3, run on lab nodes).

SIMULATED — gpufleet lab stand-ins, not NVIDIA software. They read the lab-only GPU declaration
/etc/gpufleet-lab/gpus.json (written by `gpufleet lab up`) and /usr/lib/gpufleet-lab/driver.json
(shipped by the installed stand-in driver package).
"""
