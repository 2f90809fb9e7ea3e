"""libvirt-managed hosts: pvcore reaches every host through libvirt connections.

One concept per module:

* :mod:`pvcore.libvirt.connection` — opening a connection (qemu:///system,
  qemu+ssh://host/system, test:///default...) and choosing the hypervisor
  plugin through the detect hook;
* :mod:`pvcore.libvirt.devicexml` — the plugin's device XML (its
  ``pvcore_libvirt_xml``: writing, reading back, checking a definition) and
  what is the same for every hypervisor: placing and finding elements, disk
  target names;
* :mod:`pvcore.libvirt.metadata` — the ``<metadata>`` element that records
  the devices pvcore owns (their DEVICE specs);
* :mod:`pvcore.libvirt.deploy` — ``pvcore deploy`` / ``pvcore undeploy``;
* :mod:`pvcore.libvirt.follower` — ``pvcore daemon``: serves every domain's
  devices from metadata and follows lifecycle events;
* :mod:`pvcore.libvirt.hosting` — where the daemon's devices run: in its own
  process, or in worker processes (``--workers N``);
* :mod:`pvcore.libvirt.probe` — ``pvcore probe``: what a connection holds.

libvirt-python is an optional dependency (``pip install pvcore[libvirt]``);
only these modules import it.
"""

from __future__ import annotations


class LibvirtError(Exception):
    """A libvirt operation pvcore was asked for cannot be done; the message names the thing and the fix."""
