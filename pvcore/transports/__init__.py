"""Core ring transports: how a virtio ring device reaches a guest through a front end many VMMs speak.

A *core ring transport* carries the control plane of a virtio device between
the guest's virtual machine monitor (the front end) and pvcore (the back
end): it learns the features, where guest memory and the rings are, and how
each side signals the other, and hands all of that to a core
:class:`~pvcore.ring.session.VirtioSession`, whose ring engine and device
engines do the rest. It belongs to no hypervisor: it reaches guest memory and
notification channels only through the :class:`~pvcore.contract.Primitives`
it is given (:class:`pvcore.primitives.HypervisorPrimitives`: the serving
plugin's hooks, then the core's defaults for fd-described memory and
eventfds). A hypervisor plugin picks a core transport in its
``pvcore_front_door`` and keeps only what is its own (detect, probe, how a
guest is pointed at the device).

* :mod:`pvcore.transports.vhost_user`: vhost-user, spoken by QEMU with any
  accelerator (TCG included), cloud-hypervisor, crosvm, Firecracker and
  Xen's virtio front ends.

A transport only one hypervisor speaks (xen's xenbus with grant-mapped
rings) stays in that hypervisor's plugin.
"""
