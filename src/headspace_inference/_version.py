"""The library's version, in one place: the package metadata and the client's User-Agent
read it from here."""

__version__ = "0.1.0"
