# Cython declarations for session.py (pure-Python mode: the .py is the source of truth and the fallback).
# RunningQueue is an extension type whose counters and batching state are C slots and whose vq is a
# Virtqueue (its ring methods are direct C calls); it keeps a __dict__, so its methods can still be
# replaced on an instance (tests wrap flush) and the compiled code calls the replacement.
cimport cython
from pvcore.ring.virtqueue cimport Virtqueue

cdef class RunningQueue:
    cdef dict __dict__
    cdef public object session, kick, call
    cdef public int index
    cdef public Virtqueue vq
    cdef public long long in_flight, completions, interrupts, kicks
    cdef public bint _processing, _batching, _overlapped, _stopped, _detached
    cdef public int _depth, _batch_target, _batch_ceiling
    cdef public object _flush_handle, _idle
    cdef public object poll, _poll_handle
    cdef public long long _poll_start, _poll_deadline, _asleep_since

    @cython.locals(vq=Virtqueue, budget=int, held=int, polling=bint)
    cpdef process(self)
    @cython.locals(held=int)
    cdef _publish_when_batch_done(self)
