"""pvcore-kvm: the KVM/QEMU plugin of pvcore (vhost-user and chardev front doors).

* :mod:`pvcore_kvm.protocol`: the vhost-user message codec and its validation;
* :mod:`pvcore_kvm.backend`: :class:`~pvcore_kvm.backend.VhostUserFrontDoor`,
  the backend side serving a core :class:`~pvcore.virtio.VirtioDevice`;
* :mod:`pvcore_kvm.plugin`: the hook implementations;
* :mod:`pvcore_kvm.frontend`: a Python vhost-user frontend (QEMU's side) for
  tests and benchmarks.
"""
