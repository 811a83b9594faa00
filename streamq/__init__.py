"""streamq: streaming vector quantisation, Gaussian mixtures and HMM alignment.

Learns codebooks, diagonal GMMs and linear-chain HMM alignments from frame
stores too big for memory. See README.md for the command line.
"""

__version__ = "0.1.0"
