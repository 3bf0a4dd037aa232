"""nfknock-client: opens doors guarded by nfknock.  Needs only the standard library."""
