"""pvcore's ``scsi`` device class: a SCSI target served to guests as virtio-scsi.

A device class written as a plugin, exactly as a third party would write one
(entry point ``pvcore.plugins: scsi``, hook ``pvcore_device_classes``). One
module per concern:

* :mod:`~pvcore_scsi.sense` — SCSI status, sense keys and fixed-format sense data;
* :mod:`~pvcore_scsi.commands` — what a logical unit is asked (:class:`Command`) and
  answers (:class:`Reply`, :class:`Transfer`, :class:`Deferred`), CDB fields, SPC data
  every unit shares (INQUIRY, REPORT LUNS, mode-page framing);
* :mod:`~pvcore_scsi.cdrom` — a CD-ROM unit emulated from an ISO image (MMC), its tray and events;
* :mod:`~pvcore_scsi.disk` — a disk unit over a raw image through pvcore's block engine (SBC);
* :mod:`~pvcore_scsi.passthrough` — a host SCSI device driven with SG_IO behind an opcode allow-list;
* :mod:`~pvcore_scsi.virtio_scsi` — the virtio-scsi ring device (request, event and control queues);
* :mod:`~pvcore_scsi.media` — the host's media control socket (eject, insert);
* :mod:`~pvcore_scsi.plugin` — the hooks and the ``key=value`` options.
"""
