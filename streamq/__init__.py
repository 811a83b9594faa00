"""streamq: streaming vector quantisation, Gaussian mixtures and HMM alignment.

Learns codebooks, diagonal GMMs and linear-chain HMM alignments from frame
stores too big for memory. See README.md for the command line.
"""

import os as _os

# Numba's OpenMP threading layer spin-waits between parallel regions by default. streamq calls many
# short parallel kernels per second; on a shared or oversubscribed machine the spinning threads cost
# 10-100x (measured: a 4096x256 assign took 8 ms instead of 0.27 ms under load). Passive waiting
# costs microseconds when the machine is idle. Set before Numba starts its thread pool; an explicit
# user setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
