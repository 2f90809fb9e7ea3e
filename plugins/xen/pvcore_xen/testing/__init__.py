"""A SIMULATED Xen host for tests: no part of this package talks to a real hypervisor.

Xen's own xenstored needs the hypervisor (on a host without one it crashes on
the first write), so the xen plugin's tests run against these simulations,
which implement the real wire formats.
"""
