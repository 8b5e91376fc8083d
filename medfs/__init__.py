"""medfs: an encrypted FUSE filesystem for health records on IPFS."""

__version__ = "0.1.0"
