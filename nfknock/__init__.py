"""nfknock: TOTP port knocking on NFQUEUE."""

__version__ = "0.1.0"
