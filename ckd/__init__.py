__version__ = '0.1.0'

from ckd import procs as _procs

_procs.install()  # worker processes end with ckd (kill -9 included)
