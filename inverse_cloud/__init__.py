"""inverse-cloud: CardDAV/CalDAV on your laptop, published through an SSH relay that only carries TLS."""

__version__ = "0.1.0"
