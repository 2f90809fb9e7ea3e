"""pvcore plugin for IBM Power logical partitions (PAPR), as QEMU's pseries machine runs them.

A partition finds its virtual devices in its Open Firmware device tree
(:mod:`pvcore_lpar.devicetree`); QEMU's pseries device models own the PAPR
queues and hand pvcore byte streams (:mod:`pvcore_lpar.plugin`);
:mod:`pvcore_lpar.qemu` writes the QEMU arguments that attach a partition to
a running daemon.
"""

HYPERVISOR = "lpar"
"""The name users pass to ``pvcore serve --hypervisor``."""
