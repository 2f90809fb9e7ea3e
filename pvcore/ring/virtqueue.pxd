# Cython declarations for virtqueue.py (pure-Python mode: the .py is the source of truth and the fallback).
# Virtqueue is an extension type: its fields are C slots and its methods are called directly from
# compiled callers (session.pxd types RunningQueue.vq). The used ring's 16-bit stores stay a Python
# memoryview item assignment on the "H" cast (one 16-bit store): _used_u16 is deliberately untyped.
cimport cython

@cython.final
cdef class Virtqueue:
    cdef public int size
    cdef public object desc_addr, avail_addr, used_addr
    cdef object _memory
    cdef public bint event_idx, indirect
    cdef public int next_avail, next_used, signalled_used
    cdef int _published
    cdef public object dirty_log, log_used_addr, inflight
    cdef list _batch
    cdef public list resubmit
    cdef object _desc, _avail, _used, _used_u16

    cdef int _avail_u16(self, Py_ssize_t offset) except -1
    cdef int _put_used(self, object fmt, Py_ssize_t offset, tuple values) except -1
    cpdef int avail_idx(self) except -1
    cpdef int pending(self) except -1
    cpdef pop(self)
    cpdef take(self)
    @cython.locals(seen=int, total=cython.longlong, table_len=int, index=int, flags=int, nxt=int, length=cython.longlong,
                   count=int, indirect=bint, write=bint)
    cpdef _walk(self, int head)
    cpdef push_used(self, int head, long long written)
    cpdef int unpublished(self) except -1
    cpdef bint publish(self) except -1
    @cython.locals(old=int, new=int)
    cpdef bint needs_interrupt(self) except -1
    cpdef disable_kicks(self)
    cpdef bint enable_kicks(self) except -1

@cython.locals(event=int, new=int, old=int)
cpdef bint need_event(int event, int new, int old)
