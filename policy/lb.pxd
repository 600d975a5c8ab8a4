cdef class Picker:
    pass

cdef class RoundRobinPicker(Picker):
    cdef public object _eps
    cdef public object _equal
    cdef public object _next
    cdef public object _current

cdef class LeastRequestPicker(Picker):
    cdef public object active
    cdef public object _eps
    cdef public object _equal

cdef class RandomPicker(Picker):
    cdef public object _eps
    cdef public object _equal
    cdef public object _cum

cdef class RingHashPicker(Picker):
    cdef public object minimum_ring_size
    cdef public object _eps
    cdef public object _hashes
    cdef public object _owners
