"""pvcore: paravirtual device backends (console, block, net, rng) for every hypervisor.

The device logic is written once, here; each hypervisor is a small plugin (see
:mod:`pvcore.hookspecs`) that supplies only detect, probe, memory, notification
and stream access.
"""

__version__ = "0.1.0"

from pvcore.build import install_source_finder

install_source_finder()
