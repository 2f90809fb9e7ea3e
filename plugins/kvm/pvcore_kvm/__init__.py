"""pvcore-kvm: the KVM/QEMU plugin of pvcore.

It keeps only what is KVM/QEMU's own; the vhost-user transport it serves
block, net and rng over is the core's (:mod:`pvcore.transports.vhost_user`),
and the console is the core's chardev front door.

* :mod:`pvcore_kvm.plugin`: the hook implementations (detect, probe, front door choice);
* :mod:`pvcore_kvm.qemu`: the QEMU arguments that attach a guest (``pvcore_qemu_args``);
* :mod:`pvcore_kvm.libvirt`: the libvirt device XML, written and read back (``pvcore_libvirt_xml``);
* :mod:`pvcore_kvm.options`: the device options only kvm understands (``pvcore_device_options``).
"""
