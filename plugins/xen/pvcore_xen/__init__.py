"""pvcore's Xen plugin: xenstore probe, event-channel notification and grant-mapped memory.

The device engines are the core's; this package supplies only what is Xen
specific. :mod:`pvcore_xen.testing` is a simulated Xen host for tests.
"""
