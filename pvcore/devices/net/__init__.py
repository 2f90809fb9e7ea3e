"""Networking: the daemon's L2 switch and the guest NICs that are its ports.

:mod:`.switch` holds the switch, the :class:`Port` interface and the switch
registry; :mod:`.virtio_net` the virtio-net device and its factory;
:mod:`.tap` the tap uplink that puts the host on a switch.
"""

from pvcore.devices.net.switch import (
    MAX_FRAME_LEN,
    MIN_FRAME_LEN,
    Port,
    PortCounters,
    Switch,
    SwitchRegistry,
    format_mac,
    get_switch,
    parse_mac,
    switches,
)
from pvcore.devices.net.virtio_net import (
    NetEndpoint,
    VirtioNet,
    VirtioNetPort,
    VirtioNetStats,
    create_net_device,
    parse_net_options,
)

__all__ = [
    "MAX_FRAME_LEN",
    "MIN_FRAME_LEN",
    "NetEndpoint",
    "Port",
    "PortCounters",
    "Switch",
    "SwitchRegistry",
    "VirtioNet",
    "VirtioNetPort",
    "VirtioNetStats",
    "create_net_device",
    "format_mac",
    "get_switch",
    "parse_mac",
    "parse_net_options",
    "switches",
]
