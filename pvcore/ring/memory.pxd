# Cython declarations for memory.py (pure-Python mode: the .py is the source of truth and the fallback).
# GuestMemory is an extension type so that its range checks skip Python's method and attribute lookups;
# it keeps a __dict__ and _span stays overridable (cpdef): Python subclasses (FdGuestMemory, Xen's
# GrantMemory, the tests' TrackingMemory) and per-instance wrappers work as before.
cimport cython

cdef class GuestMemory:
    cdef dict __dict__
    cdef public tuple regions
    cdef public list _starts
    cdef public tuple _spans

    cpdef _span(self, object addr, object length, bint write)
