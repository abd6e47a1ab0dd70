"""rcekd: distil big recommenders into small ones with RCE-KD, and serve them."""

__version__ = "0.1.0"
