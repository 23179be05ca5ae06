"""ipfacediff: identity-preserving, flicker-free face editing in videos from a text prompt."""

__version__ = "0.1.0"
